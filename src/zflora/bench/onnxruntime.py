"""`zflora bench --engine onnxruntime`: base vs LoRA (unmerged and merged) vs fused zFLoRA exported to ONNX
and run in ONNX Runtime (CPU execution provider), in fp32 and quantized.

Each method is exported with `zflora.export.onnx` (the same graph signature for all; logits of the last
position only, as `zflora bench` reads them), on a preset's shape with random weights or on a real
checkpoint (`--model`). Precisions:
- `int8`, `int4`: `zflora.export.onnx.quantize_export`, block-wise `MatMulNBits` weights, a zFLoRA
  adapter's blocks quantized on their own (what `zflora export onnx --quantize` writes);
- `int8-dynamic`: ONNX Runtime's `quantize_dynamic` after folding (`quant_pre_process`), per-tensor int8
  MatMul weights with int8 activations, the adapter folded into each weight (no swap possible).
Prefill is the prompt with an empty past; decode is one token after `decode_context` cached tokens (the
same past every step). Methods in rotating order within each repetition; ratios to base of the same
precision, from one run. The adapter swap is timed in each precision against rebuilding the export.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..config import check_alpha
from ..hardware import describe_machine, environment
from .common import base_model, build_method, empty_samples, measure_round, phase_label
from .config import BenchConfig
from .harness import Timer, rotated
from .report import bar_chart, md_table, rows, target, targets_table, write_outputs


def quantize(src: Path, dst: Path) -> Path:
    """ONNX Runtime's dynamic int8 quantization of every MatMul weight, after folding the graph's constant
    subgraphs (the weights' Transpose, zFLoRA's Concat) into initializers it can quantize."""
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    dst.mkdir(parents=True, exist_ok=True)
    folded = dst / "folded.onnx"
    quant_pre_process(str(src / "model.onnx"), str(folded), skip_symbolic_shape=True, save_as_external_data=True,
                      all_tensors_to_one_file=True, external_data_location="folded.onnx.data")  # fmt: skip
    quantize_dynamic(folded, dst / "model.onnx", weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     use_external_data_format=True)  # fmt: skip
    for f in dst.glob("folded.onnx*"):
        f.unlink()
    return dst


class OrtRunner:
    """Prefill and decode feeds for one session; the decode past comes from a real prefill."""

    def __init__(self, path: Path, manifest: dict[str, Any], cfg: BenchConfig, threads: int) -> None:
        import onnxruntime as ort

        from ..export.onnx import feeds

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])
        g = np.random.default_rng(cfg.seed)
        longest = max(*cfg.prompt_lens, cfg.decode_context)
        ids = g.integers(3, manifest["vocab_size"], (cfg.batch, longest + 1))
        self.prefills = {n: feeds(manifest, ids[:, :n], None, 0) for n in cfg.prompt_lens}
        _, *past = self.session.run(None, feeds(manifest, ids[:, : cfg.decode_context], None, 0))
        self.decode = feeds(manifest, ids[:, -1:], past, cfg.decode_context)

    def prefill(self, n: int) -> None:
        self.session.run(None, self.prefills[n])

    def decode_step(self) -> None:
        self.session.run(None, self.decode)

    def rewind(self) -> None:
        """Nothing to drop: every decode step runs on the same past (the feeds are fixed)."""


def export_all(cfg: BenchConfig, base: torch.nn.Module, root: Path) -> tuple[dict[str, Path], Path, float | None]:
    """Every method exported in fp32, another adapter saved for the swaps, and zflora's export seconds."""
    from ..adapter_io import save_adapter, set_adapter
    from ..export.onnx import export
    from ..methods import random_adapter

    paths, other, export_s = {}, root / "other-adapter", None
    for m in cfg.methods:
        model = build_method(base, m, cfg, keep_base=True)
        started = time.perf_counter()
        paths[m] = export(model, root / m, method=m, last_logits=True)
        if m == "zflora":
            export_s = time.perf_counter() - started
            save_adapter(set_adapter(model, random_adapter(model, cfg.seed + 9)), other)
        del model
    return paths, other, export_s


def quantized(precision: str, fp32: Path, dst: Path, accuracy_level: int | None) -> float:
    """The fp32 export at `fp32` written to `dst` in `precision`; the seconds that took."""
    from ..export.onnx import quantize_export
    from ..quantization import Quantization

    started = time.perf_counter()
    if precision == "int8-dynamic":
        quantize(fp32, dst)
    else:
        quantize_export(fp32, dst, Quantization.named(precision, accuracy_level=accuracy_level))
    return time.perf_counter() - started


def swap_rows(precision: str, path: Path, other: Path, rebuild_s: float, rebuild: str) -> list[dict[str, Any]]:
    """An adapter swap in an export against rebuilding it: bytes written and seconds."""
    from ..export.onnx import ADAPTER, swap

    done = swap(path, other)
    total = sum(f.stat().st_size for f in path.iterdir())
    return [{"precision": precision, "operation": f"zflora export swap ({ADAPTER} only)", **done},
            {"precision": precision, "operation": rebuild, "bytes_written": total, "seconds": rebuild_s},
            {"precision": precision, "operation": "adapter file / whole export",
             "bytes_written": (path / ADAPTER).stat().st_size,
             "fraction": (path / ADAPTER).stat().st_size / total}]  # fmt: skip


@torch.no_grad()
def run(cfg: BenchConfig) -> dict[str, Any]:
    from ..export.onnx import read_manifest

    threads = cfg.threads or torch.get_num_threads()
    base = base_model(cfg, torch.float32, "cpu")
    settings = asdict(cfg) | {"dtype": "fp32", "layers": base.config.num_hidden_layers, "engine": "onnxruntime",
                              "hidden_size": base.config.hidden_size, "alpha": check_alpha(cfg.alpha, cfg.rank),
                              "logits": "last position", "model": str(cfg.model) if cfg.model else None}  # fmt: skip
    timer, results, swaps = Timer(torch.device("cpu")), [], []
    with tempfile.TemporaryDirectory(prefix="zflora-onnx-") as tmp:
        exported, other, export_s = export_all(cfg, base, Path(tmp))
        paths = {("fp32", m): p for m, p in exported.items()}
        del base
        if export_s is not None and "fp32" in cfg.precisions:
            swaps += swap_rows("fp32", paths["fp32", "zflora"], other, export_s, "full re-export")
        for precision in (p for p in cfg.precisions if p != "fp32"):
            for m in cfg.methods:
                paths[precision, m] = Path(tmp) / f"{m}-{precision}"
                seconds = quantized(precision, paths["fp32", m], paths[precision, m], cfg.accuracy_level)
                if m == "zflora" and precision != "int8-dynamic":
                    swaps += swap_rows(precision, paths[precision, m], other, seconds, "full re-quantization")
        sizes = {f"{p}/{m}": sum(f.stat().st_size for f in path.iterdir()) / 2**20 for (p, m), path in paths.items()}
        for precision in cfg.precisions:
            manifest = read_manifest(paths["fp32", cfg.methods[0]])
            runners = {m: OrtRunner(paths[precision, m], manifest, cfg, threads) for m in cfg.methods}
            samples = {m: {("prefill", n, cfg.batch): [] for n in cfg.prompt_lens} | {
                ("decode", cfg.decode_context, cfg.batch): []} for m in cfg.methods}  # fmt: skip
            bar = tqdm(total=cfg.warmup + cfg.repeats, disable=not cfg.progress, desc=f"onnxruntime {precision}")
            for rep in range(cfg.warmup + cfg.repeats):
                for m in rotated(list(cfg.methods), rep):
                    measure_round(runners[m], timer, cfg, samples[m] if rep >= cfg.warmup else empty_samples(cfg))
                bar.update(1)
            bar.close()
            results += [r | {"precision": precision} for r in rows(samples)]
            del runners
    env = environment(torch.device("cpu"), "fp32") | {"onnxruntime": _ort_version()}
    result = {"environment": env, "settings": settings, "end_to_end": results, "model_mb": sizes, "swap": swaps}
    result["targets"] = check_targets(results, cfg.rank, settings["hidden_size"])
    return result


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def check_targets(result_rows: list[dict[str, Any]], rank: int, d: int) -> list[dict[str, Any]]:
    """zFLoRA within r/d + 2 points of base in ONNX Runtime, per precision, LoRA's ratio beside it."""
    lora = {(r["precision"], r["phase"], r["tokens"]): r["ratio_to_base"] for r in result_rows if r["method"] == "lora"}
    bound = 1 + rank / d + 0.02
    return [target(f"zflora {r['precision']} {phase_label(r)} / base (1 + r/d + 0.02)", r["ratio_to_base"], bound,
                   **({"note": f"lora {lora[key]:.3f}"} if (key := (r["precision"], r["phase"], r["tokens"])) in lora
                      else {}))
            for r in result_rows if r["method"] == "zflora"]  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    env, st, res = result["environment"], result["settings"], result["end_to_end"]
    shape = f"**{Path(st['model']).name}** (real weights)" if st.get("model") else f"**{st['preset']}** shape"
    lines = [f"{shape} in ONNX Runtime {env['onnxruntime']} (CPU execution provider), "
             f"{st['layers']} layers, d = {st['hidden_size']}, r = {st['rank']}, batch {st['batch']}; "
             f"{describe_machine(env)}; median of {st['repeats']} repetitions after {st['warmup']} warm-up; "
             f"block-wise int8 / int4 at accuracy_level {st.get('accuracy_level') or '4 / 1'}",
             ""]  # fmt: skip
    keys = list(dict.fromkeys((r["phase"], r["tokens"]) for r in res))
    head = ["precision", "method", *(f"{phase_label({'phase': p, 'tokens': t})} (x base)" for p, t in keys),
            *(f"{phase_label({'phase': p, 'tokens': t})} ms" for p, t in keys), "model MB"]  # fmt: skip
    by = {(r["precision"], r["method"], r["phase"], r["tokens"]): r for r in res}
    body = [[prec, m, *(f"{by[prec, m, p, t]['ratio_to_base']:.3f}" for p, t in keys),
             *(f"{by[prec, m, p, t]['median_ms']:.1f}" for p, t in keys), f"{result['model_mb'][f'{prec}/{m}']:.0f}"]
            for prec in st["precisions"] for m in st["methods"]]  # fmt: skip
    swap = [
        [
            r["precision"],
            r["operation"],
            f"{r['bytes_written'] / 2**20:.2f} MB",
            f"{r['seconds']:.2f} s" if "seconds" in r else f"{100 * r['fraction']:.2f}%",
        ]
        for r in result["swap"]
    ]
    swap_lines = ["", *md_table(["precision", "adapter swap", "written", "time"], swap)] if swap else []
    return "\n".join(lines + md_table(head, body) + swap_lines + targets_table(result["targets"])) + "\n"


def chart(result: dict[str, Any], path: Any) -> None:
    from ..charts import figure, save_figure

    precisions = result["settings"]["precisions"]
    fig, axes = figure(len(precisions), 6 * len(precisions))
    for ax, prec in zip(axes, precisions, strict=True):
        bar_chart(ax, [r for r in result["end_to_end"] if r["precision"] == prec], phase_label)
        st = result["settings"]
        name = Path(st["model"]).name if st.get("model") else st["preset"]
        ax.set_title(f"ONNX Runtime {prec}, {name} ({st['layers']} layers)")
    fig.suptitle(describe_machine(result["environment"]), fontsize=8)
    save_figure(fig, path)


def main(cfg: BenchConfig) -> None:
    print(write_outputs(run(cfg), cfg, markdown, chart))
