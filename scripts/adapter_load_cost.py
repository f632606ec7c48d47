"""What verifying an adapter costs at load: the weights' sha256 and the base fingerprint, timed on a real model.

.venv/bin/python scripts/adapter_load_cost.py [MODEL] [RANK]
"""

from __future__ import annotations

import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import zflora
from zflora.adapter_io import WEIGHTS_NAME, base_fingerprint, checkpoint_fingerprint
from zflora.hardware import describe_machine, environment
from zflora.models import load_local_model, require_local


def median_s(fn, n: int = 7) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-instruct"
    rank = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    model = load_local_model(name)
    zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=rank))
    zflora.set_adapter(model, zflora.random_adapter(model))
    with tempfile.TemporaryDirectory() as tmp:
        zflora.save_adapter(model, tmp)
        file = Path(tmp) / WEIGHTS_NAME
        size = file.stat().st_size
        read = median_s(lambda: zflora.read_adapter(tmp))
        digest = median_s(lambda: hashlib.sha256(file.read_bytes()).hexdigest())
        load = median_s(lambda: zflora.load_adapter(model, tmp))
    fingerprint = median_s(lambda: base_fingerprint(model))
    from_file = median_s(lambda: checkpoint_fingerprint(require_local(name), model.config.num_hidden_layers))
    print(f"{name}, r = {rank}: adapter file {size / 1e6:.1f} MB")
    print(f"read_adapter {1e3 * read:.1f} ms, of which the sha256 check {1e3 * digest:.1f} ms")
    print(f"load_adapter (hot-swap, every check) {1e3 * load:.1f} ms")
    print(f"base fingerprint: from the model {1e3 * fingerprint:.2f} ms, from its safetensors {1e3 * from_file:.2f} ms")
    print(describe_machine(environment(next(model.parameters()).device, "fp32")))


if __name__ == "__main__":
    main()
