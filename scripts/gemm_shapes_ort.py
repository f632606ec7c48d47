"""Time ONNX Runtime's `MatMulNBits` (int8 / int4 block-wise weights, the quantized export's operator) for one
decoder layer's projections at base shapes and at zFLoRA's shapes, interleaved: is a quantized zFLoRA
slowdown the extra r columns / rows, or the kernel at a K that is not a multiple of the block?

    .venv/bin/python scripts/gemm_shapes_ort.py [--model smollm2-135m-instruct] [--rank 16] [--bits 4,8]
        [--tokens 1,128,512] [--accuracy-level 4] [--repeats 30]

Per projection: base (d), zFLoRA (d + r: the input projections' K, the output projections' N), and zFLoRA
with the input projections' K zero-padded to the next block ("padded": what a stream widened to a block
multiple would run). Weights are random; time is the median session.run of one MatMulNBits node.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
import torch
from gemm_shapes_torch import shapes  # the same per-layer shapes as the PyTorch GEMM script
from onnx import TensorProto, helper, numpy_helper
from transformers import AutoConfig

from zflora.fusion import kind_of
from zflora.hardware import describe_machine, environment
from zflora.models import preset_config, require_local
from zflora.presets import PRESETS
from zflora.quantization import Quantization, block_quantize


def session(k: int, n: int, q: Quantization, threads: int) -> ort.InferenceSession:
    w = np.random.default_rng(k * 7919 + n).standard_normal((k, n), dtype=np.float32) * 0.05
    packed, scales = block_quantize(w, q)
    node = helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft", K=k, N=n,
                            bits=q.bits, block_size=q.block_size, accuracy_level=q.accuracy_level)  # fmt: skip
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales")],
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct", help="a fetched name, a directory or a preset")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--bits", default="4,8")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--tokens", default="1,128,512")
    p.add_argument("--accuracy-level", type=int, default=4)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    if args.model in PRESETS:  # a preset's shape (LLaMA-3.2-1B's by name)
        config = preset_config(args.model, 1)
    else:
        config = AutoConfig.from_pretrained(require_local(args.model), local_files_only=True)
    r, blk = args.rank, args.block_size
    print(f"{args.model}: d = {config.hidden_size}, r = {r}, block {blk}, accuracy_level {args.accuracy_level}, "
          f"{args.threads} threads; ONNX Runtime {ort.__version__}; "
          f"{describe_machine(environment(torch.device('cpu'), 'fp32'))}")  # fmt: skip
    for bits in map(int, args.bits.split(",")):
        q = Quantization(bits, blk, args.accuracy_level)
        for tokens in map(int, args.tokens.split(",")):
            totals = {"base": 0.0, "zflora": 0.0, "padded": 0.0}
            cells = []
            for name, (k, n) in shapes(config).items():
                inside = kind_of(name) == "in"
                variants = {"base": (k, n), "zflora": (k + r, n) if inside else (k, n + r),
                            "padded": (k + -(-r // blk) * blk, n) if inside else (k, n + r)}  # fmt: skip
                sessions = {v: session(kk, nn, q, args.threads) for v, (kk, nn) in variants.items()}
                feeds = {v: {"x": np.random.default_rng(1).standard_normal((tokens, kk), dtype=np.float32)}
                         for v, (kk, _) in variants.items()}  # fmt: skip
                times: dict[str, list[float]] = {v: [] for v in variants}
                for i in range(args.repeats + 3):  # interleaved; the first 3 rounds warm up
                    for v, sess in sessions.items():
                        start = time.perf_counter()
                        sess.run(None, feeds[v])
                        if i >= 3:
                            times[v].append(time.perf_counter() - start)
                med = {v: statistics.median(t) for v, t in times.items()}
                for v in totals:
                    totals[v] += med[v]
                cells.append(f"{name} {med['zflora'] / med['base']:.2f}/{med['padded'] / med['base']:.2f}")
            zf, padded = totals["zflora"] / totals["base"], totals["padded"] / totals["base"]
            print(f"int{bits}, tokens {tokens}: layer {1e3 * totals['base']:.3f} ms; zflora {zf:.3f}x, K padded "
                  f"to the block {padded:.3f}x (FLOPs +{100 * r / config.hidden_size:.1f}%); zflora/padded per "
                  f"projection: {', '.join(cells)}")  # fmt: skip


if __name__ == "__main__":
    main()
