"""`zflora quantized-accuracy`: how much of a trained adapter's gain survives a quantized deployment.

For one category and seed of a `zflora accuracy` study, on the study's own test items and held-out records:
- the base quantized (int8 / int4, `zflora.quantization`), the floor every adapted row is measured from;
- zFLoRA fused on the quantized base, its blocks quantized on their own (what `zflora export onnx
  --quantize` ships, and what a swap rewrites);
- LoRA merged into the base and the whole model quantized, the way LoRA is deployed on a quantized base;
- the fp32 rows are the study's finished runs (base, LoRA merged, zFLoRA fused), read back, not rerun;
- with `--train-on-quantized int4` (or int8), zFLoRA trained on the quantized base itself (QLoRA's recipe:
  the frozen base is the quantized one; the study run's learning rate, steps, seed and data), then deployed
  as above. zFLoRA never rewrites the base, so the base it was trained on is exactly the base it is served on.

Each quantized model is the PyTorch model that computes with exactly the export's quantized weights
(`simulate`: equal to ONNX Runtime with fp32 activations, `accuracy_level=1`). "Kept" is the adapter's
gain over the base at that precision, as a share of its fp32 gain. Rows are small files under `output`,
so an interrupted run goes on where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..adapter_io import attach_adapter
from ..files import write_json, write_text
from ..hardware import environment
from ..methods import prepare_for_eval
from ..models import load_tokenizer
from ..quantization import Quantization, simulate
from .accuracy import ADAPTER, evaluate_category, heldout_loss, load_model, run_name, train, train_split, work_dir
from .accuracy_report import CATEGORY_METRIC, by_task, read_items, recorded_settings, sha256, task_scores, verified
from .config import CATEGORIES, AccuracyConfig, QuantizedAccuracyConfig
from .train import last_complete_checkpoint

METHODS = ("base", "lora", "zflora")  # lora: merged, then quantized with the base
FP32_ADAPTER = "-fp32-adapter"  # zflora-fp32-adapter: the base quantized, the adapter blocks not (a diagnosis)
ON_QUANTIZED = "zflora-trained-quantized"  # zFLoRA trained on the quantized base (QLoRA's recipe)


def study_config(cfg: QuantizedAccuracyConfig) -> AccuracyConfig:
    """The study's own settings (its record), with this command's data root and evaluation batch."""
    record = cfg.study / "study.json"
    if not record.is_file():
        raise FileNotFoundError(f"{cfg.study}: no study.json; run `zflora accuracy --output {cfg.study}` first")
    s = recorded_settings(cfg.study)
    keep = {f.name for f in dataclasses.fields(AccuracyConfig)}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in s.items() if k in keep}
    fields |= {"model": Path(s["model"]), "data": cfg.data, "output": cfg.study, "work": cfg.work, "report": None,
               "eval_batch_size": cfg.eval_batch_size, "progress": False, "methods": METHODS}  # fmt: skip
    return AccuracyConfig(**fields)


def adapter_dir(cfg: QuantizedAccuracyConfig, study: AccuracyConfig, method: str) -> Path:
    """The adapter given, or the study's run's: the one it kept, else its final checkpoint on this machine."""
    given = cfg.zflora_adapter if method == "zflora" else cfg.lora_adapter
    if given is not None:
        if not given.is_dir():
            raise FileNotFoundError(f"{method}_adapter: {given} is not a directory")
        return given
    run = work_dir(study) / run_name(method, study.rank, cfg.seed) / cfg.category
    done = cfg.study / "runs" / run_name(method, study.rank, cfg.seed) / cfg.category
    finished = verified(done) is not None
    if finished and (done / ADAPTER).is_dir():
        return done / ADAPTER
    last = last_complete_checkpoint(run)
    if last is None or not finished:
        why = "kept no adapter (over KEEP_ADAPTER_BYTES)" if finished else "has not finished"
        raise FileNotFoundError(f"{method}: the study's run {done} {why}, and this machine has no final checkpoint "
                                f"of it under {run}; pass --{method}-adapter DIR")  # fmt: skip
    return last


def fp32_row(cfg: QuantizedAccuracyConfig, study: AccuracyConfig, method: str) -> dict[str, Any]:
    name = run_name(method, None if method == "base" else study.rank, cfg.seed if method != "base" else 0)
    run = cfg.study / "runs" / name / cfg.category
    if (result := verified(run)) is None:
        raise FileNotFoundError(f"{run}: the study has not finished this run; finish it first (`zflora accuracy`)")
    return row(cfg.category, result, read_items(run / "items.jsonl")) | {"source": str(run)}


def row(category: str, result: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, Any]:
    tasks = task_scores(category, by_task(items))
    return {"score": sum(tasks.values()) / len(tasks), "tasks": tasks, "heldout_loss": result["heldout_loss"]}


def row_dir(cfg: QuantizedAccuracyConfig, method: str, precision: str) -> Path:
    return cfg.output / cfg.category / f"{precision}-{method}-s{cfg.seed}"


def quantized_row(cfg: QuantizedAccuracyConfig, study: AccuracyConfig, method: str, precision: str) -> dict[str, Any]:
    """One quantized model evaluated (or read back when it already was)."""
    out = row_dir(cfg, method, precision)
    if (result := verified(out)) is None:
        tokenizer = load_tokenizer(study.model)
        q = Quantization.named(precision, cfg.block_size, accuracy_level=1)
        model = load_model(study)  # the study's dtype: fp32
        source: Any = None
        trained: dict[str, Any] = {}
        if method == ON_QUANTIZED:
            model, source, trained = trained_on_quantized(cfg, study, simulate(model, q), precision, tokenizer)
        elif method != "base":
            source = adapter_dir(cfg, study, method.removesuffix(FP32_ADAPTER))
            model = attach_adapter(model, source)
        model = prepare_for_eval(model)  # zFLoRA fused, LoRA merged
        model = simulate(model, q, adapter=not method.endswith(FP32_ADAPTER))
        started = time.perf_counter()
        result = {"method": method, "precision": precision, "seed": cfg.seed, "category": cfg.category,
                  "quantization": q.to_dict(), "adapter": None if source is None else str(source), **trained,
                  "heldout_loss": heldout_loss(model, tokenizer, train_split(study, cfg.category, tokenizer, 0)[1],
                                               study.max_length)}  # fmt: skip
        rows = evaluate_category(study, model, tokenizer, cfg.category)
        write_text(out / "items.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        result |= {"eval_wall_s": time.perf_counter() - started, "items": len(rows),
                   "items_sha256": sha256(out / "items.jsonl"),
                   "environment": environment(torch.device("cpu"), "fp32")}  # fmt: skip
        write_json(out / "result.json", result)  # last: the row counts as finished
    return row(cfg.category, result, read_items(out / "items.jsonl")) | {"source": str(out)}


def trained_on_quantized(cfg: QuantizedAccuracyConfig, study: AccuracyConfig, base: torch.nn.Module,
                         precision: str, tokenizer: Any) -> tuple[torch.nn.Module, Path, dict[str, Any]]:  # fmt: skip
    """zFLoRA trained on `base` (the quantized base, fp32 values) as the study trained its seed's run: its
    learning rate, steps, batch and data. Checkpoints under the study's work directory, so it resumes.
    Returns the model, where it was trained and what the training cost."""
    fp32 = json.loads((cfg.study / "runs" / run_name("zflora", study.rank, cfg.seed) / cfg.category /
                       "result.json").read_text())  # fmt: skip
    steps = dict(zip(CATEGORIES, study.steps, strict=True))[cfg.category]
    seen, _ = train_split(study, cfg.category, tokenizer, steps * study.batch_size)
    work = work_dir(study) / "quantized" / f"{precision}-{ON_QUANTIZED}-s{cfg.seed}" / cfg.category
    model, log = train(study, "zflora", study.rank, fp32["lr"], cfg.seed, seen, steps, work, base=base)
    return model, work, {"lr": fp32["lr"], "steps": steps, "train_wall_s": log["wall_s"],
                         "tokens_seen": log["tokens_seen"]}  # fmt: skip


def run(cfg: QuantizedAccuracyConfig) -> dict[str, Any]:
    study = study_config(cfg)
    rows = {("fp32", m): fp32_row(cfg, study, m) for m in METHODS}
    methods = (*METHODS, f"zflora{FP32_ADAPTER}") if cfg.fp32_adapter else METHODS
    to_run = {m.removesuffix(FP32_ADAPTER) for p in cfg.precisions for m in methods
              if m not in ("base", ON_QUANTIZED) and verified(row_dir(cfg, m, p)) is None}  # fmt: skip
    for method in sorted(to_run):
        adapter_dir(cfg, study, method)  # every adapter still needed found before an hour of evaluation
    for precision in cfg.precisions:
        for method in (*methods, ON_QUANTIZED) if precision in cfg.train_on_quantized else methods:
            rows[precision, method] = quantized_row(cfg, study, method, precision)
    out = {"category": cfg.category, "metric": CATEGORY_METRIC[cfg.category], "seed": cfg.seed,
           "block_size": cfg.block_size, "rows": []}  # fmt: skip
    gain32 = {m: rows["fp32", m]["score"] - rows["fp32", "base"]["score"] for m in ("lora", "zflora")}
    gain32[f"zflora{FP32_ADAPTER}"] = gain32[ON_QUANTIZED] = gain32["zflora"]
    for (precision, method), r in rows.items():
        gain = r["score"] - rows[precision, "base"]["score"]
        adapted = method != "base"
        out["rows"].append({"precision": precision, "method": method, **r, "gain": gain if adapted else None,
                            "kept": gain / gain32[method] if adapted and gain32[method] else None})  # fmt: skip
    write_json(cfg.output / f"{cfg.category}.json", out)
    write_text(cfg.output / f"{cfg.category}.md", markdown(out))
    return out


LABELS = {
    "base": "base (quantized alone)",
    "lora": "LoRA, merged then quantized",
    "zflora": "zFLoRA, blocks apart",
    f"zflora{FP32_ADAPTER}": "zFLoRA, base quantized, blocks fp32 (diagnosis)",
    ON_QUANTIZED: "zFLoRA trained on the quantized base, blocks apart",
}
FP32_LABELS = {"base": "base", "lora": "LoRA, merged", "zflora": "zFLoRA, fused"}


def markdown(out: dict[str, Any]) -> str:
    lines = [f"{out['category']}, seed {out['seed']}: {out['metric']} (mean over tasks); block {out['block_size']} "
             "along K, symmetric, round to nearest; kept = gain over the same precision's base / fp32 gain",
             "", "| precision | method | score | gain over base | kept | held-out loss |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in out["rows"]:
        gain = "" if r["gain"] is None else f"{r['gain']:+.1f}"
        kept = "" if r["kept"] is None else f"{100 * r['kept']:.0f}%"
        label = (FP32_LABELS if r["precision"] == "fp32" else LABELS)[r["method"]]
        lines.append(f"| {r['precision']} | {label} | {r['score']:.1f} | {gain} | {kept} | "
                     f"{r['heldout_loss']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(cfg: QuantizedAccuracyConfig) -> None:
    print(markdown(run(cfg)))
