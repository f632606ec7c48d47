"""One row schema for every benchmark, and the writers (JSON, Markdown, PNG), each atomic.

A row: {"method", "phase", "tokens", "batch", "median_ms", "p25_ms", "p75_ms", "n",
"ratio_to_base", "samples_ms"}; the ratio divides by the base model's median of the
same phase, tokens and batch in the same run (higher is slower).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..files import write_json, write_text
from .harness import summarize

Key = tuple[str, int, int]  # (phase, tokens, batch)


def rows(samples: dict[str, dict[Key, list[float]]]) -> list[dict[str, Any]]:
    """Rows of every method and key, with the ratio to base's median; base must be among the methods."""
    base = {key: statistics.median(v) for key, v in samples["base"].items()}
    out = []
    for method, by_key in samples.items():
        for (phase, tokens, batch), ss in by_key.items():
            ratio = statistics.median(ss) / base[phase, tokens, batch]
            key = {"method": method, "phase": phase, "tokens": tokens, "batch": batch}
            out.append(key | summarize(ss) | {"ratio_to_base": ratio, "samples_ms": ss})
    return out


def md_table(head: list[str], body: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(str(c) for c in cells) + " |" for cells in body]


def target(name: str, value: float, bound: float, **extra: Any) -> dict[str, Any]:
    """A benchmark target, evaluated on the run's numbers (reported, never asserted)."""
    return {"target": f"{name} <= {bound:.3f}", "value": value, "met": value <= bound, **extra}


def targets_table(targets: list[dict[str, Any]]) -> list[str]:
    if not targets:
        return []
    body = [[t["target"], f"{t['value']:.3f}" + (f" ({t['note']})" if "note" in t else ""),
             "yes" if t["met"] else "NO"] for t in targets]  # fmt: skip
    return ["", *md_table(["target", "value", "met"], body)]


def bar_chart(ax: Any, result_rows: list[dict[str, Any]], label: Callable[[dict], str], log: bool = False) -> None:
    """Grouped bars of ratio to base: one group per (phase, tokens, batch), one bar per method."""
    keys = list(dict.fromkeys((r["phase"], r["tokens"], r["batch"]) for r in result_rows))
    methods = list(dict.fromkeys(r["method"] for r in result_rows))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        by = {(r["phase"], r["tokens"], r["batch"]): r for r in result_rows if r["method"] == m}
        bars = ax.bar([j + i * width for j in range(len(keys))], [by[k]["ratio_to_base"] for k in keys], width,
                      label=m)  # fmt: skip
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
    if log:
        ax.set_yscale("log")
    ax.axhline(1.0, color="black", linewidth=0.8)
    first = {(r["phase"], r["tokens"], r["batch"]): r for r in result_rows}
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], [label(first[k]) for k in keys], fontsize=8)
    ax.set_ylabel("latency / base")
    ax.legend(fontsize=7)


def write_outputs(
    result: dict[str, Any], cfg: Any, render: Callable[[dict[str, Any]], str],
    draw: Callable[[dict[str, Any], Path], None],
) -> str:  # fmt: skip
    """Write what `cfg` asks for (JSON, Markdown, PNG chart), each atomically; return the Markdown."""
    text = render(result)
    if cfg.json_path:
        write_json(cfg.json_path, result)
    if cfg.markdown_path:
        write_text(cfg.markdown_path, text)
    if cfg.chart_path:
        draw(result, cfg.chart_path)
    return text
