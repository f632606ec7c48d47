"""`zflora study`: a miniature of the paper's accuracy study on the real stories260K model.

Every method learns the three TinyStories tasks of `tasks.py` together (one
mixed training set), then is scored on each task's held-out split. Two
comparisons, as in the paper: all adapters at the same rank, and zFLoRA at the
rank that matches LoRA's trainable-parameter count. Several seeds; mean and
standard deviation; and time per training step.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..files import write_json, write_text
from ..hardware import environment
from ..methods import matched_rank, prepare_for_eval
from ..models import load_local_model, load_tokenizer
from .config import ADAPTER_METHODS, StudyConfig, TrainConfig
from .data import Example, to_example
from .evaluate import evaluate_tasks
from .stats import mean_std
from .tasks import TASKS, make_splits
from .train import step_time_summary, train_model


def run_one(
    cfg: StudyConfig, method: str, rank: int, seed: int, train: list[Example], test: dict[str, list[Example]]
) -> dict[str, Any]:
    tokenizer = load_tokenizer(cfg.model)
    result: dict[str, Any] = {"method": method, "rank": rank if method in ADAPTER_METHODS else None, "seed": seed}
    model = load_local_model(cfg.model)
    if method != "base":
        with tempfile.TemporaryDirectory() as tmp:
            tc = TrainConfig(
                model=cfg.model, data=[Path("<tasks>")], output=Path(tmp), method=method, rank=rank,
                lr=cfg.fft_lr if method == "fft" else cfg.lr, max_steps=cfg.steps, batch_size=cfg.batch_size,
                max_length=cfg.max_length, seed=seed, save_steps=-1, logging_steps=25, progress=False,
            )  # fmt: skip
            model, log = train_model(tc, examples=train, model=model, tokenizer=tokenizer)
        result |= {"trainable_parameters": log["trainable_parameters"], "final_loss": log["loss"][-1]["loss"],
                   "step_ms": 1e3 * step_time_summary(log["step_time_s"])}  # fmt: skip
    model = prepare_for_eval(model)  # as it is served: zFLoRA fused, LoRA merged
    scores, _ = evaluate_tasks(model, tokenizer, test, batch_size=50, kinds=TASKS)
    result["scores"] = {task: r["score"] for task, r in scores.items()}
    result["average"] = statistics.fmean(result["scores"].values())
    return result


def run(cfg: StudyConfig) -> dict[str, Any]:
    train_records, test_records = make_splits(cfg.n_train, cfg.n_test)
    train = [to_example(r, f"{task}: train {i}") for task, rs in train_records.items() for i, r in enumerate(rs)]
    test = {task: [to_example(r, f"{task}: test {i}") for i, r in enumerate(rs)] for task, rs in test_records.items()}
    z_rank = matched_rank(cfg.model, "zflora", "lora", cfg.rank)
    zm_rank = matched_rank(cfg.model, "zflora-mha", "lora-mha", cfg.rank)
    plan = [("base", cfg.rank, 0)]
    for seed in range(cfg.seeds):
        plan += [(m, cfg.rank, seed) for m in (*ADAPTER_METHODS, "fft")]
        plan += [("zflora", z_rank, seed), ("zflora-mha", zm_rank, seed)]
    started = time.perf_counter()
    runs = [run_one(cfg, m, r, s, train, test) for m, r, s in tqdm(plan, disable=not cfg.progress, desc="study")]
    result = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "matched_ranks": {"zflora": z_rank, "zflora-mha": zm_rank, "lora": cfg.rank, "lora-mha": cfg.rank},
        "tasks": TASKS,
        "runs": runs,
        "wall_s": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
        "environment": environment(torch.device("cpu"), "fp32"),
    }
    if cfg.output:
        write_json(cfg.output / "study.json", result)
        write_text(cfg.output / "study.md", markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    runs, tasks, st = result["runs"], list(result["tasks"]), result["settings"]
    ranks = result["matched_ranks"]
    groups = [
        (f"Matched rank (r = {st['rank']})", [(m, st["rank"]) for m in ("base", *ADAPTER_METHODS, "fft")]),
        (
            "Matched trainable parameters (zFLoRA's rank raised to LoRA's count)",
            [("lora", st["rank"]), ("zflora", ranks["zflora"]), ("lora-mha", st["rank"]),
             ("zflora-mha", ranks["zflora-mha"])],
        ),
    ]  # fmt: skip
    head = "| method | rank | trainable params | " + " | ".join(tasks) + " | average | ms / step |"
    lines = [
        f"stories260K, {st['seeds']} seeds, {st['steps']} steps of batch {st['batch_size']}, "
        f"lr {st['lr']} (fft {st['fft_lr']}); scores in % (ROUGE-L F1 for the summary); mean ± std over seeds",
        "",
    ]
    for title, rows in groups:
        lines += [f"**{title}**", "", head, "|---" * (len(tasks) + 5) + "|"]
        for method, rank in rows:
            mine = [r for r in runs if r["method"] == method and (r["rank"] in (rank, None))]
            if not mine:
                continue
            cells = [mean_std([r["scores"][t] for r in mine]) for t in tasks]
            params = mine[0].get("trainable_parameters", 0)
            step = mean_std([r["step_ms"] for r in mine]) if "step_ms" in mine[0] else "-"
            shown_rank = rank if method in ADAPTER_METHODS else "-"
            avg = mean_std([r["average"] for r in mine])
            lines.append(f"| {method} | {shown_rank} | {params:,} | " + " | ".join(cells) + f" | {avg} | {step} |")
        lines.append("")
    return "\n".join(lines)


def main(cfg: StudyConfig) -> None:
    print(markdown(run(cfg)))
