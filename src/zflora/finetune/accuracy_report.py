"""The accuracy study's report, read from its directory alone: runs, baselines, paired differences, chart.

Primary metric per category (`category_avg`, the mean over its tasks):
    commonsense  likelihood accuracy: acc_norm (per-character) where options differ in length and
                 lm-evaluation-harness reports it (ARC, OpenBookQA, PIQA), acc elsewhere (boolq,
                 social_i_qa, winogrande, whose partial scoring shares one continuation)
    math         exact-match accuracy of the generated answer
    summary      ROUGE-L F1, the best over DialogSum's three references
"""

from __future__ import annotations

import hashlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from ..charts import figure, save_figure
from ..hardware import describe_machine
from .config import STUDY_METHODS, AccuracyConfig
from .stats import mean_std, paired_bootstrap

CATEGORY_METRIC = {"commonsense": "acc", "math": "exact", "summary": "rougeL"}
ACC_NORM_TASKS = ("ARC-Challenge", "ARC-Easy", "openbookqa", "piqa")
CATEGORY_ORDER = ("commonsense", "math", "summary")
# The study JSON's paired comparisons: key -> (a, b, title) for a − b. "paired_mha" is the paper's attention-only pair.
PAIRS = {
    "paired": ("zflora", "lora", "zFLoRA − LoRA"),
    "paired_mha": ("zflora-mha", "lora-mha", "zFLoRA-MHA − LoRA-MHA"),
}

# Settings that define a study: a rerun with other values would mix incomparable runs.
DEFINING = (
    "model",
    "dtype",
    "rank",
    "seeds",
    "steps",
    "batch_size",
    "max_length",
    "n_val",
    "n_test",
    "lrs",
    "sweep_steps",
    "warmup_ratio",
    "loraplus_lr_ratio",
    "targets",
)
# Defining settings a study record may lack, at the value every study ran with before the setting existed.
ADDED_LATER = {"warmup_ratio": 0.03, "loraplus_lr_ratio": None, "targets": None}


def settings(cfg: AccuracyConfig) -> dict[str, Any]:
    """The defining settings, as JSON stores them (so a rerun compares equal values)."""
    return json.loads(json.dumps({k: getattr(cfg, k) for k in DEFINING}, default=str))


def recorded_settings(output: Path) -> dict[str, Any]:
    """The defining settings in the study's record; one that studies gained later reads as the value every
    study ran with before it existed."""
    return ADDED_LATER | json.loads((output / "study.json").read_text())["settings"]


def primary(category: str, task: str) -> str:
    return "acc_norm" if category == "commonsense" and task in ACC_NORM_TASKS else CATEGORY_METRIC[category]


def read_items(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mean(rows: list[dict], key: str) -> float:
    return 100 * statistics.fmean(r[key] for r in rows)


def by_task(items: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """A run's per-item rows, grouped by task (in the order the tasks first appear)."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in items:
        grouped.setdefault(row["task"], []).append(row)
    return grouped


def task_scores(category: str, grouped: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Each task's primary score (percent) over its items (`by_task`'s grouping)."""
    return {task: _mean(rows, primary(category, task)) for task, rows in grouped.items()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verified(run: Path) -> dict[str, Any] | None:
    """A finished run's result, or None where it has none or its items file does not match it (a lost or
    edited line would otherwise be scored on fewer records without a word); the mismatch is named."""
    if not (run / "result.json").is_file():
        return None
    result = json.loads((run / "result.json").read_text())
    items = run / "items.jsonl"
    if not items.is_file() or sha256(items) != result.get("items_sha256"):
        print(f"zflora accuracy: {items} does not match {run / 'result.json'}; not counted", file=sys.stderr)
        return None
    return result


def _run_rows(output: Path) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(result, items) of every finished, verified run in the study directory."""
    found = []
    for result_path in sorted(output.glob("runs/*/*/result.json")):
        if (result := verified(result_path.parent)) is not None:
            log = result_path.parent / "train_log.json"
            if log.is_file() and (steps := json.loads(log.read_text()).get("step_time_s")):
                result["median_step_s"] = statistics.median(steps)  # wall time counts pauses; a median does not
            found.append((result, read_items(result_path.parent / "items.jsonl")))
    return found


def _merge(found: list[tuple[dict, list[dict]]]) -> list[dict[str, Any]]:
    """One row per (method, rank, seed), in the shape of the study JSON."""
    runs: dict[tuple, dict[str, Any]] = {}
    for result, items in found:
        key = (result["method"], result["rank"], result["seed"])
        run = runs.setdefault(
            key,
            {
                "method": key[0],
                "seed": key[2],
                "rank": key[1],
                "lr": result["lr"],
                "trainable_params": result.get("trainable_params", 0),
                "scores": {},
                "category_avg": {},
                "heldout_loss": {},
                "generation": {},
                "rouge": {},
                "cost": {},
            },
        )
        category = result["category"]
        grouped = by_task(items)
        run["scores"] |= task_scores(category, grouped)
        for task, rows in grouped.items():
            if category == "commonsense":
                run["generation"][task] = {"acc": _mean(rows, "gen_acc"), "valid": _mean(rows, "gen_valid")}
            if category == "summary":
                run["rouge"][task] = {k: _mean(rows, k) for k in rows[0] if k.startswith("rouge")}
        run["category_avg"][category] = statistics.fmean(run["scores"][t] for t in grouped)
        run["heldout_loss"][category] = result["heldout_loss"]
        run["cost"][category] = {
            k: result.get(k)
            for k in ("train_wall_s", "tokens_seen", "tokens_per_s", "eval_wall_s", "median_step_s", "resumed_at_step")
        }
    return sorted(runs.values(), key=lambda r: (_method_order(r["method"]), r["rank"] or 0, r["seed"]))


def _method_order(method: str) -> int:
    """The study's order of methods (base, lora, lora-mha, zflora, ...), not the run directories' names."""
    return STUDY_METHODS.index(method) if method in STUDY_METHODS else len(STUDY_METHODS)


def _per_item(found: list[tuple[dict, list[dict]]], method: str, category: str) -> dict[int, dict[tuple, float]]:
    """seed -> {(task, item): primary score} of `method` (at the study's rank) in `category`."""
    out: dict[int, dict[tuple, float]] = {}
    for result, items in found:
        if result["method"] == method and result["category"] == category:
            out[result["seed"]] = {(r["task"], r["item"]): r[primary(category, r["task"])] for r in items}
    return out


def paired(found: list[tuple[dict, list[dict]]], a: str = "zflora", b: str = "lora") -> dict[str, dict[str, Any]]:
    """Per category: the paired bootstrap 95% CI of (a - b) over the same test items and seeds (in points)."""
    out = {}
    for category in CATEGORY_ORDER:
        mine, theirs = _per_item(found, a, category), _per_item(found, b, category)
        seeds = sorted(set(mine) & set(theirs))
        if not seeds:
            continue
        if bad := [s for s in seeds if mine[s].keys() != theirs[s].keys()]:
            raise ValueError(f"{a}, {b}: {category} seed {bad[0]} scored other test items; not comparable")
        diffs: dict[str, list[float]] = {}
        for task, item in mine[seeds[0]]:
            d = statistics.fmean(mine[s][(task, item)] - theirs[s][(task, item)] for s in seeds)
            diffs.setdefault(task, []).append(100 * d)
        out[category] = paired_bootstrap(diffs) | {"seeds": seeds}
    return out


def paired_across(a: Path, b: Path, method_a: str = "zflora", method_b: str = "lora") -> dict[str, Any]:
    """`method_a`'s runs in study `a` against `method_b`'s in study `b`, paired over the same test items and
    seeds: an ablation's zFLoRA against the main study's LoRA. Refused unless both studies scored the same
    items; the defining settings that differ (the ablation's) are named in the result."""
    label_a, label_b = f"{method_a} in {a}", f"{method_b} in {b}"
    found = [({**r, "method": label_a}, i) for r, i in _run_rows(a) if r["method"] == method_a]
    found += [({**r, "method": label_b}, i) for r, i in _run_rows(b) if r["method"] == method_b]
    sa, sb = recorded_settings(a), recorded_settings(b)
    return {
        "a": label_a,
        "b": label_b,
        "differing_settings": {k: [sa.get(k), sb.get(k)] for k in DEFINING if sa.get(k) != sb.get(k)},
        "paired": paired(found, label_a, label_b),
    }


def collect(output: Path, data: Path | None = None) -> dict[str, Any]:
    """The study JSON: `{"model", "dtype", "runs": [...], "paired": {...}, ...}` from `output` alone."""
    st = recorded_settings(output)
    found = _run_rows(output)
    sweeps = [json.loads(p.read_text()) for p in output.glob("sweeps/*.json")]
    sweeps.sort(key=lambda sw: (_method_order(sw["method"]), sw["rank"]))
    baselines = json.loads((output / "baselines.json").read_text()) if (output / "baselines.json").is_file() else {}
    envs = [r["environment"] for r, _ in found if "environment" in r]
    return {
        "model": Path(st["model"]).name,
        "dtype": st["dtype"],
        "settings": st,
        "machines": sorted({describe_machine(e) for e in envs}),
        "baselines": baselines,
        "sweeps": sweeps,
        "runs": _merge(found),
        **{key: paired(found, a, b) for key, (a, b, _) in PAIRS.items()},
    }


def groups(out: dict[str, Any]) -> dict[tuple[str, Any], list[dict]]:
    by: dict[tuple[str, Any], list[dict]] = {}
    for run in out["runs"]:
        by.setdefault((run["method"], run["rank"]), []).append(run)
    return by


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    return [_row(head), "|" + "---|" * len(head), *map(_row, rows), ""]


def _recipe(settings: dict[str, Any]) -> str:
    """The settings a study may change from the usual recipe, as a clause of the report's header."""
    ratio, targets = settings.get("loraplus_lr_ratio"), settings.get("targets")
    plus = "" if ratio is None else f", LoRA+ (the B matrices at {ratio:g} x the lr column, the A matrices at it)"
    return plus + ("" if targets is None else f", adapters on {','.join(targets)} only")


def markdown(out: dict[str, Any]) -> str:
    cats = [c for c in CATEGORY_ORDER if any(c in r["category_avg"] for r in out["runs"])]
    st, by = out["settings"], groups(out)
    lines = [
        f"# Accuracy study: {out['model']} ({out['dtype']})",
        "",
        f"Rank {st['rank']}, {st['seeds']} seeds for lora and zflora (the others: the table's seeds); training steps "
        f"{dict(zip(CATEGORY_ORDER, st['steps'], strict=False))} of {st['batch_size']} records, warm-up "
        f"{st['warmup_ratio']:.0%} of the steps{_recipe(st)}; test records per task "
        f"{dict(zip(CATEGORY_ORDER, st['n_test'], strict=False))}. Scores in %, mean ± std over seeds.",
        "",
        "## Category averages (primary metric)",
        "",
    ]
    rows = []
    for (method, rank), runs in by.items():
        avgs = [mean_std([r["category_avg"][c] for r in runs if c in r["category_avg"]]) for c in cats]
        rows.append(
            [
                method,
                rank or "-",
                len(runs),
                f"{runs[0]['trainable_params']:,}",
                runs[0]["lr"] or "-",
                *avgs,
                *(_loss(runs, c) for c in cats),
            ]
        )
    lines += _table(
        ["method", "rank", "seeds", "trainable params", "lr", *cats, *(f"held-out loss {c}" for c in cats)], rows
    )
    lines += _task_table(out, by)
    lines += _paired_lines(out)
    lines += _generation_lines(out, by)
    lines += _cost_lines(out, by)
    lines += [f"Machines: {'; '.join(out['machines']) or '-'}.", ""]
    return "\n".join(lines)


def _loss(runs: list[dict], category: str) -> str:
    values = [r["heldout_loss"][category] for r in runs if category in r["heldout_loss"]]
    if not values:
        return "-"
    return f"{statistics.fmean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def _task_table(out: dict[str, Any], by: dict) -> list[str]:
    tasks = list(dict.fromkeys(t for r in out["runs"] for t in r["scores"]))
    base = out["baselines"]
    lines = [
        "## Per task",
        "",
        "Commonsense: likelihood accuracy (acc_norm for ARC, OpenBookQA, PIQA; acc for the "
        "others). Math: exact match. Summary: ROUGE-L, best of 3 references.",
        "",
    ]
    rows = [
        ["chance", *(_fmt(base.get(t, {}).get("chance")) for t in tasks)],
        ["majority class", *(_fmt(base.get(t, {}).get("majority")) for t in tasks)],
        ["lead-2", *(_fmt(base.get(t, {}).get("lead2", {}).get("rougeL")) for t in tasks)],
    ]
    for (method, rank), runs in by.items():
        label = method if rank is None else f"{method} r={rank}"
        rows.append([label, *(mean_std([r["scores"][t] for r in runs if t in r["scores"]]) for t in tasks)])
    return lines + _table(["", *tasks], rows)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _paired_lines(out: dict[str, Any]) -> list[str]:
    lines = []
    for key, (a, b, title) in PAIRS.items():
        if not out.get(key):  # older study JSONs have no paired_mha
            continue
        rows = [
            [c, f"{p['diff']:+.2f}", f"[{p['ci_low']:+.2f}, {p['ci_high']:+.2f}]", len(p["seeds"]), p["items"]]
            for c, p in out[key].items()
        ]
        lines += [
            f"## {title}, paired",
            "",
            "Difference of the category average in points, with a 95% paired "
            "bootstrap interval (2000 resamples of the test items, stratified by task; each item's difference "
            "averaged over the seeds both methods ran).",
            "",
            *_table(["category", f"{a} − {b}", "95% CI", "seeds", "items"], rows),
        ]
    return lines


def _generation_lines(out: dict[str, Any], by: dict) -> list[str]:
    tasks = list(dict.fromkeys(t for r in out["runs"] for t in r["generation"]))
    summary = list(dict.fromkeys(t for r in out["runs"] for t in r["rouge"]))
    lines = []
    if tasks:
        lines += [
            "## Commonsense, the paper's generation protocol",
            "",
            "The LLM-Adapters instruction (options "
            "listed, answer by label word) in the chat template; accuracy % (valid answers %).",
            "",
        ]
        rows = [
            [
                m if k is None else f"{m} r={k}",
                *(
                    f"{mean_std([r['generation'][t]['acc'] for r in runs if t in r['generation']])} "
                    f"({mean_std([r['generation'][t]['valid'] for r in runs if t in r['generation']])})"
                    for t in tasks
                ),
            ]
            for (m, k), runs in by.items()
        ]
        lines += _table(["", *tasks], rows)
    for task in summary:
        keys = ("rouge1", "rouge2", "rougeL", "rouge1_s1", "rouge2_s1", "rougeL_s1")
        lead = out["baselines"].get(task, {}).get("lead2", {})
        rows = [["lead-2", *(_fmt(lead.get(k)) for k in keys)]]
        rows += [
            [
                m if k is None else f"{m} r={k}",
                *(mean_std([r["rouge"][task][x] for r in runs if task in r["rouge"]]) for x in keys),
            ]
            for (m, k), runs in by.items()
        ]
        lines += [
            f"## {task}: ROUGE F1",
            "",
            "Best of the three references, and against `summary1` alone (_s1).",
            "",
            *_table(["", "R-1", "R-2", "R-L", "R-1 s1", "R-2 s1", "R-L s1"], rows),
        ]
    return lines


def _cost_lines(out: dict[str, Any], by: dict) -> list[str]:
    lines = ["## Learning rates and cost", "",
             "Wall times include any pause of the study (it is paused while benchmarks run); the median "
             "training step is the comparable figure. A run resumed from a checkpoint is timed over the steps "
             "of its last process.", ""]  # fmt: skip
    for sw in out["sweeps"]:
        losses = ", ".join(f"{lr}: {v:.4f}" for lr, v in sw["heldout_loss"].items())
        grid = [float(lr) for lr in sw["heldout_loss"]]
        edge = " (the grid's edge: the best rate may lie beyond it)" if len(grid) > 1 and sw["best_lr"] in (
            min(grid), max(grid)) else ""  # fmt: skip
        lines.append(
            f"- sweep {sw['method']} (r = {sw['rank']}, {sw['steps']} steps, all categories mixed; held-out "
            f"loss): {losses}; chosen {sw['best_lr']}{edge}"
        )
    if len(lrs := out["settings"]["lrs"]) == 1:
        lines.append(f"- learning rate {lrs[0]} for every method, as given (`--lrs` with one value: no sweep)")
    for (method, rank), runs in by.items():
        parts = []
        for c, cost in runs[0]["cost"].items():
            step = f", median step {cost['median_step_s']:.2f} s" if cost.get("median_step_s") else ""
            resumed = f" after resuming at step {cost['resumed_at_step']}" if cost.get("resumed_at_step") else ""
            rate = f", {cost['tokens_per_s']:.0f} tok/s" if cost.get("tokens_per_s") else ""  # older resumed runs
            train = (
                f"train {cost['train_wall_s'] / 60:.1f} min{resumed}, {cost['tokens_seen']:,} tokens{rate}{step}; "
                if cost.get("train_wall_s")
                else ""
            )
            parts.append(f"{c}: {train}eval {cost['eval_wall_s'] / 60:.1f} min")
        lines.append(f"- {method}{f' r={rank}' if rank else ''} (seed {runs[0]['seed']}): {'; '.join(parts)}")
    return [*lines, ""]


def chart(out: dict[str, Any], path: Path) -> None:
    cats = [c for c in CATEGORY_ORDER if any(c in r["category_avg"] for r in out["runs"])]
    if not cats:
        return
    fig, (ax,) = figure(1, 9)
    by = groups(out)
    width = 0.8 / max(1, len(by))
    for i, ((method, rank), runs) in enumerate(by.items()):
        vals = [[r["category_avg"][c] for r in runs if c in r["category_avg"]] for c in cats]
        means = [statistics.fmean(v) if v else 0 for v in vals]
        errs = [statistics.stdev(v) if len(v) > 1 else 0 for v in vals]
        ax.bar(
            [j + i * width for j in range(len(cats))],
            means,
            width,
            yerr=errs,
            capsize=2,
            label=f"{method}{f' r={rank}' if rank else ''}",
        )
    for j, c in enumerate(cats):  # the no-model baseline of the category: majority class, lead-2
        tasks = {t for r in out["runs"] for t in r["scores"] if c in r["category_avg"]} & set(out["baselines"])
        levels = [
            out["baselines"][t].get("majority") or out["baselines"][t].get("lead2", {}).get("rougeL") for t in tasks
        ]
        if levels := [v for v in levels if v is not None]:
            ax.hlines(
                statistics.fmean(levels),
                j - width / 2,
                j + 0.8 - width / 2,
                colors="black",
                linestyles="--",
                label="majority class / lead-2" if j == 0 else None,
            )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cats))], cats)
    ax.set_ylabel("category average (%)")
    ax.set_title(f"Accuracy study: {out['model']} ({out['dtype']})")
    ax.legend(fontsize=7)
    save_figure(fig, path)
