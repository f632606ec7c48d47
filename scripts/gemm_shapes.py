"""Time vLLM's CPU GEMM (oneDNN `onednn_mm`, prepacked weights, as vLLM's CPU linear layers run it)
for LLaMA-3.2-1B's projections at base shapes and at zFLoRA's d + r shapes, interleaved.

    .venv-vllm/bin/python scripts/gemm_shapes.py [--rank 64] [--threads 1] [--tokens 1,128,512]

It answers "is a zFLoRA slowdown the architecture or the kernel?": zFLoRA adds no operator
per layer, only r rows or columns to four GEMMs, so the per-layer cost is the sum below.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from vllm import _custom_ops as ops


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="vLLM's CPU worker ran on 1 core on the 2-core VM")
    p.add_argument("--tokens", default="1,128,512")
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    d, inter, q, kv, r = 2048, 8192, 2048, 512, args.rank
    # name: (base K, base N, zFLoRA K, zFLoRA N)
    shapes = {
        "qkv": (d, q + 2 * kv, d + r, q + 2 * kv),
        "o": (q, d, q, d + r),
        "gate_up": (d, 2 * inter, d + r, 2 * inter),
        "down": (inter, d, inter, d + r),
    }
    g = torch.Generator().manual_seed(0)

    def handler(k: int, n: int):
        w = (torch.rand(n, k, generator=g) * 0.07 - 0.035).to(torch.bfloat16)
        return ops.create_onednn_mm(w.t(), 32)

    handlers = {(name, v): handler(*((s[0], s[1]) if v == "base" else (s[2], s[3])))
                for name, s in shapes.items() for v in ("base", "zflora")}  # fmt: skip
    print(f"rank {r}, {args.threads} thread(s), bf16, ms per call (median of {args.repeats}, interleaved)")
    print(f"{'tokens':>6} {'proj':>8} {'base':>9} {'zflora':>9} {'ratio':>7} {'flops ratio':>11}")
    for m in (int(t) for t in args.tokens.split(",")):
        xs = {(name, v): torch.randn(m, shapes[name][0 if v == "base" else 2], generator=g).to(torch.bfloat16)
              for name in shapes for v in ("base", "zflora")}  # fmt: skip
        times: dict = {key: [] for key in handlers}
        inner = max(1, 64 // m)
        for _ in range(2):  # warm-up
            for key, h in handlers.items():
                ops.onednn_mm(h, xs[key], None)
        for rep in range(args.repeats):
            keys = list(handlers)
            keys = keys[rep % len(keys) :] + keys[: rep % len(keys)]
            for key in keys:
                t = time.perf_counter()
                for _ in range(inner):
                    ops.onednn_mm(handlers[key], xs[key], None)
                times[key].append((time.perf_counter() - t) * 1e3 / inner)
        layer = {"base": 0.0, "zflora": 0.0}
        for name, s in shapes.items():
            b, z = (statistics.median(times[(name, v)]) for v in ("base", "zflora"))
            layer["base"] += b
            layer["zflora"] += z
            print(f"{m:>6} {name:>8} {b:>9.3f} {z:>9.3f} {z / b:>7.3f} {s[2] * s[3] / (s[0] * s[1]):>11.3f}")
        lb, lz = layer["base"], layer["zflora"]
        print(f"{m:>6} {'layer':>8} {lb:>9.3f} {lz:>9.3f} {lz / lb:>7.3f}")


if __name__ == "__main__":
    main()
