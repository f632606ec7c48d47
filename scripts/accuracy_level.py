"""How far a quantized export's int8 activations (`MatMulNBits` accuracy_level 4, the fast CPU path) move the
logits from the exact quantized weights (`zflora.quantization.simulate`, = accuracy_level 1), on a real model
with a trained adapter: the gap between what `zflora quantized-accuracy` measures and what ships by default.

    .venv/bin/python scripts/accuracy_level.py --adapter RUN/checkpoint-N [--model smollm2-135m-instruct]
        [--precisions int8,int4]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from zflora.adapter_io import attach_adapter
from zflora.export import onnx as zonnx
from zflora.methods import prepare_for_eval
from zflora.models import load_local_model, load_tokenizer, require_local
from zflora.quantization import Quantization, simulate

PROMPTS = [
    "Question: Which animal is a mammal? Answer: the whale",
    "Summarize the dialogue: #Person1#: Are we still meeting tomorrow at nine? #Person2#: Yes, in room B.",
    "Weng earns $12 an hour for babysitting. Yesterday she did 50 minutes of babysitting. How much did she earn?",
]


def with_level(path: Path, level: int) -> Path:
    graph = onnx.load(str(path / zonnx.GRAPH), load_external_data=False)
    for node in graph.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = level
    out = path / f"model-level{level}.onnx"
    onnx.save_model(graph, str(out))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--adapter", required=True)
    p.add_argument("--precisions", default="int8,int4")
    args = p.parse_args()
    path = require_local(args.model)
    model = prepare_for_eval(attach_adapter(load_local_model(path, torch.float32), args.adapter))
    tokenizer = load_tokenizer(path)
    ids = [np.array([tokenizer(t)["input_ids"]]) for t in PROMPTS]
    print(f"{args.model} + {args.adapter}: {sum(i.shape[1] for i in ids)} positions over {len(PROMPTS)} prompts")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.precisions.split(","):
            q = Quantization.named(name, accuracy_level=1)
            out = zonnx.export(model, Path(tmp) / name, quantization=q)
            manifest, exact = zonnx.read_manifest(out), simulate(model, q)
            for level in (1, 4):
                sess = ort.InferenceSession(str(with_level(out, level)), providers=["CPUExecutionProvider"])
                agree = total = 0
                worst = 0.0
                for x in ids:
                    got = sess.run(None, zonnx.feeds(manifest, x, None, 0))[0][0]
                    with torch.no_grad():
                        want = exact(torch.from_numpy(x)).logits[0].numpy()
                    agree, total = agree + int((got.argmax(-1) == want.argmax(-1)).sum()), total + len(want)
                    worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
                print(f"{name} accuracy_level {level}: top-1 equal to the exact quantized weights' at {agree}/{total} "
                      f"positions; largest logit difference {100 * worst:.2f}% of the largest logit")  # fmt: skip


if __name__ == "__main__":
    main()
