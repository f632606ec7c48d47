"""Time the GEMMs of one decoder layer at base shapes and at zFLoRA's d + r shapes, in PyTorch (oneDNN on a
CPU), interleaved: is a zFLoRA slowdown the architecture or the kernel's efficiency at d + r?

    .venv/bin/python scripts/gemm_shapes_torch.py [--model smollm2-135m-instruct | --preset llama-3.2-1b]
        [--ranks 16,32,64] [--tokens 128,512] [--dtype bf16] [--repeats 50] [--int4]

zFLoRA adds no operator per layer, only r input columns to q, k, v, gate, up and r output rows to o, down,
so the per-layer cost is the sum printed. Shapes come from the model's config (a fetched name or a directory)
or a preset's. A rank R also stands for any smaller r padded to d + R (`zflora.fuse(model, pad_to=...)`): the
GEMMs are the same shape. `--int4`: PyTorch's int4 weight-only kernel instead (`zflora.weight_only`, groups of
32; activations in --dtype), the matmuls `zflora bench --quantize int4` runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoConfig

from zflora.fusion import kind_of
from zflora.hardware import describe_machine, environment
from zflora.models import head_dim, preset_config, require_local, torch_dtype


def shapes(config) -> dict[str, tuple[int, int]]:
    d, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * head_dim(config), config.num_key_value_heads * head_dim(config)
    return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, inter), "up": (d, inter),
            "down": (inter, d)}  # fmt: skip


def matmul(w: torch.Tensor, int4: bool, dtype: torch.dtype):
    """x -> x w^T: oneDNN's GEMM, or PyTorch's int4 weight-only kernel on w quantized (groups of 32)."""
    if not int4:
        return lambda x: torch.nn.functional.linear(x, w)
    from zflora.quantization import Quantization
    from zflora.weight_only import QuantizedLinear

    return QuantizedLinear(w.float(), None, Quantization(4, 32, 1), dtype)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--preset", help="a preset's shape instead of --model (e.g. llama-3.2-1b)")
    p.add_argument("--ranks", default="16,32,64")
    p.add_argument("--tokens", default="128,512")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--int4", action="store_true", help="PyTorch's int4 weight-only kernel (zflora.weight_only)")
    args = p.parse_args()
    if args.preset:
        config = preset_config(args.preset, None)
    else:
        config = AutoConfig.from_pretrained(require_local(args.model), local_files_only=True)
    dtype, g = torch_dtype(args.dtype), torch.Generator().manual_seed(0)
    machine = describe_machine(environment(torch.device("cpu"), args.dtype))
    kernel = "int4 weight-only (aten._weight_int4pack_mm_for_cpu)" if args.int4 else "oneDNN GEMM"
    print(f"{args.preset or args.model}: d = {config.hidden_size}; {kernel}; {machine}")
    for tokens in map(int, args.tokens.split(",")):
        for r in map(int, args.ranks.split(",")):
            base_total = fused_total = 0.0
            cells = []
            for name, (n_in, n_out) in shapes(config).items():
                wide_in = n_in + r if kind_of(name) == "in" else n_in
                wide_out = n_out + r if kind_of(name) == "out" else n_out
                xb, wb = (
                    torch.randn(tokens, n_in, generator=g).to(dtype),
                    torch.randn(n_out, n_in, generator=g).to(dtype),
                )
                xz, wz = (
                    torch.randn(tokens, wide_in, generator=g).to(dtype),
                    torch.randn(wide_out, wide_in, generator=g).to(dtype),
                )
                run = {"base": (xb, matmul(wb, args.int4, dtype)), "zflora": (xz, matmul(wz, args.int4, dtype))}
                times: dict[str, list[float]] = {"base": [], "zflora": []}
                with torch.no_grad():
                    for i in range(args.repeats + 5):  # interleaved; the first 5 rounds warm up
                        for key, (x, f) in run.items():
                            start = time.perf_counter()
                            f(x)
                            if i >= 5:
                                times[key].append(time.perf_counter() - start)
                b, z = statistics.median(times["base"]), statistics.median(times["zflora"])
                base_total, fused_total = base_total + b, fused_total + z
                cells.append(f"{name} {z / b:.2f}")
            flops = 100 * r / config.hidden_size
            print(f"tokens {tokens}, r = {r} (d + r = {config.hidden_size + r}): layer GEMMs {1e3 * base_total:.3f} -> "
                  f"{1e3 * fused_total:.3f} ms = {fused_total / base_total:.3f}x (FLOPs +{flops:.1f}%"
                  f" on the widened ones); {', '.join(cells)}")  # fmt: skip


if __name__ == "__main__":
    main()
