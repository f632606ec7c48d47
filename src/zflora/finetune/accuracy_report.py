"""The accuracy study's report: runs merged per (method, rank, seed), the paper's table, a chart."""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..charts import figure, save_figure
from ..hardware import environment
from .config import CATEGORIES, AccuracyConfig
from .study import mean_std


def _merge(results: list[dict]) -> list[dict[str, Any]]:
    """One row per (method, rank, seed): every category's task scores and its average, cost figures."""
    runs: dict[tuple, dict[str, Any]] = {}
    for r in results:
        run = runs.setdefault((r["method"], r["rank"], r["seed"]), {
            "method": r["method"], "seed": r["seed"], "rank": r["rank"], "lr": r["lr"],
            "trainable_params": r.get("trainable_params", 0), "scores": {}, "category_avg": {},
            "train_wall_s": {}, "eval_wall_s": {}, "tokens_per_s": {},
        })  # fmt: skip
        run["scores"] |= r["scores"]
        run["category_avg"][r["category"]] = statistics.fmean(r["scores"].values())
        run["eval_wall_s"][r["category"]] = r["eval_s"]
        if "train_wall_s" in r:
            run["train_wall_s"][r["category"]] = r["train_wall_s"]
            run["tokens_per_s"][r["category"]] = r["tokens_per_s"]
    return list(runs.values())


def summary(cfg: AccuracyConfig, results: list[dict], sweeps: dict, wall_s: float) -> dict[str, Any]:
    from .accuracy import chance, test_sets

    chances, categories = {}, {}
    for category in cfg.categories:
        tests = test_sets(cfg, category)
        chances |= {task: chance(examples) for task, examples in tests.items()}
        categories |= dict.fromkeys(tests, category)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    return {"model": str(cfg.model), "settings": settings, "environment": environment(torch.device("cpu"), "fp32"),
            "wall_s": wall_s, "chance": chances, "task_category": categories, "sweeps": sweeps,
            "runs": _merge(results)}  # fmt: skip


def groups(out: dict[str, Any]) -> dict[tuple[str, Any], list[dict]]:
    by: dict[tuple[str, Any], list[dict]] = {}
    for run in out["runs"]:
        by.setdefault((run["method"], run["rank"]), []).append(run)
    return by


def markdown(out: dict[str, Any]) -> str:
    cats = [c for c in CATEGORIES if any(c in r["category_avg"] for r in out["runs"])]
    tasks = [t for t in out["chance"] if any(t in r["scores"] for r in out["runs"])]
    head = ["method", "rank", "seeds", "trainable params", *tasks, *(f"**{c}**" for c in cats), "lr"]
    lines = [f"Accuracy study on **{out['model']}**; scores in % (ROUGE-L F1 for summaries, best of the "
             "references); mean ± std over seeds; the same test records and prompts for every method.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| chance | | | | " + " | ".join("-" if out["chance"][t] is None else f"{out['chance'][t]:.1f}"
                                               for t in tasks) + " |" * (len(cats) + 1) + " |"]  # fmt: skip
    for (method, rank), runs in groups(out).items():
        cells = [mean_std([r["scores"][t] for r in runs if t in r["scores"]]) for t in tasks]
        avgs = [f"**{mean_std([r['category_avg'][c] for r in runs if c in r['category_avg']])}**" for c in cats]
        lines.append(f"| {method} | {rank or '-'} | {len(runs)} | {runs[0]['trainable_params']:,} | "
                     + " | ".join(cells + avgs) + f" | {runs[0]['lr'] or '-'} |")  # fmt: skip
    lines += ["", "Learning-rate sweep (validation loss on held-out commonsense training records):", ""]
    for method, sw in out["sweeps"].items():
        losses = ", ".join(f"{lr}: {v:.4f}" for lr, v in sw["val_loss"].items())
        lines.append(f"- {method} (r = {sw['rank']}, {sw['steps']} steps): {losses}; chosen {sw['best_lr']}")
    lines += ["", "Cost per run (seed 0): training wall time and tokens/s by category, evaluation wall time:", ""]
    for (method, rank), runs in groups(out).items():
        r = runs[0]
        train = ", ".join(f"{c} {r['train_wall_s'][c] / 60:.1f} min ({r['tokens_per_s'][c]:.0f} tok/s)"
                          for c in r["train_wall_s"])  # fmt: skip
        evals = ", ".join(f"{c} {s / 60:.1f} min" for c, s in r["eval_wall_s"].items())
        lines.append(f"- {method}{f' r={rank}' if rank else ''}: train {train or '-'}; eval {evals}")
    env = out["environment"]
    lines += ["", f"{env['hardware']} ({', '.join(env['cpu_capability'])}), {env['threads']} threads, fp32, "
              f"torch {env['torch']}, transformers {env['transformers']}; study wall time {out['wall_s'] / 3600:.2f} h "
              "(this invocation; resumed runs were read from disk)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def chart(out: dict[str, Any], path: Path) -> None:
    cats = [c for c in CATEGORIES if any(c in r["category_avg"] for r in out["runs"])]
    if not cats:
        return
    fig, (ax,) = figure(1, 9)
    by = groups(out)
    width = 0.8 / max(1, len(by))
    for i, ((method, rank), runs) in enumerate(by.items()):
        vals = [[r["category_avg"][c] for r in runs if c in r["category_avg"]] for c in cats]
        means = [statistics.fmean(v) if v else 0 for v in vals]
        errs = [statistics.stdev(v) if len(v) > 1 else 0 for v in vals]
        ax.bar([j + i * width for j in range(len(cats))], means, width, yerr=errs, capsize=2,
               label=f"{method}{f' r={rank}' if rank else ''}")  # fmt: skip
    for j, c in enumerate(cats):  # chance: the mean of the category's tasks' chance levels (where defined)
        levels = [v for t, v in out["chance"].items() if v is not None and out["task_category"].get(t) == c]
        if levels:
            ax.hlines(statistics.fmean(levels), j - width / 2, j + 0.8 - width / 2, colors="black", linestyles="--",
                      label="chance" if j == 0 else None)  # fmt: skip
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cats))], cats)
    ax.set_ylabel("category average (%)")
    ax.set_title(f"Accuracy study: {out['model']}")
    ax.legend(fontsize=7)
    save_figure(fig, path)
