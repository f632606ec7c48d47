"""Latency benchmarks: one module per engine over a shared harness (timing, statistics, environment)
and report (one row schema; JSON, Markdown and PNG writers).

    config.py      the configs of every benchmark (light: the CLI reads them for its flags)
    harness.py     timing, interleaving, statistics, the machine's description
    report.py      result rows, ratios to base, writers
    common.py      what every engine shares: each method's model, prefill/decode runs, one round
    hf.py          Hugging Face transformers, end to end (`zflora bench`)
    compiled.py    the same, compiled (`--compile`): compile time, swaps under compile
    onnxruntime.py the same in ONNX Runtime, fp32 and int8 (`--engine onnxruntime`)
    mixed.py       many adapters in one batch (`zflora mixed-bench`)
    projection.py  one projection: LoRA's four operations vs naive fusion vs zFLoRA's one matmul
    switch.py      adapter switching
    vllm.py        vLLM serving (`zflora serve-bench`)
"""

from __future__ import annotations

from typing import Any


def main(cfg: Any) -> None:
    """`zflora bench`: the engine `cfg.engine` names (imported only when it runs)."""
    if cfg.engine == "onnxruntime":
        from . import onnxruntime

        onnxruntime.main(cfg)
    else:
        from . import hf

        hf.main(cfg)
