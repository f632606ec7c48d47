"""Adapter switching: zFLoRA's fused hot-swap vs a merged LoRA (unmerge + merge) vs PEFT's set_adapter."""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter_io import Adapter, base_identity, load_adapter, save_adapter, set_adapter
from ..methods import random_adapter, randomize_lora
from ..transform import adapter_parameters
from .harness import Timer, summarize
from .report import target

MERGED = "merged LoRA: unmerge + merge another"
HOT_SWAP = "fused hot-swap, adapter in memory"


@torch.no_grad()
def time_switch(method: str, operation: str, timer: Timer, repeats: int, fn: Callable[[int], Any]) -> dict:
    fn(1)  # warm-up, discarded
    samples = [timer(partial(fn, i)) for i in range(repeats)]
    return {"method": method, "operation": operation, **summarize(samples), "samples_ms": samples}


def _zflora_rows(m: nn.Module, seed: int, timer: Timer, repeats: int) -> list[dict]:
    current = {n: p.detach().clone() for n, p in adapter_parameters(m).items()}
    adapters = [Adapter(m.zflora_config, base_identity(m), current), random_adapter(m, seed)]
    rows = [time_switch("zflora", HOT_SWAP, timer, repeats, lambda i: set_adapter(m, adapters[i % 2]))]
    with tempfile.TemporaryDirectory() as tmp:
        paths = [save_adapter(set_adapter(m, a), Path(tmp) / f"a{i}") for i, a in enumerate(adapters)]
        rows.append(time_switch("zflora", "fused hot-swap, load_adapter from disk", timer, repeats,
                          lambda i: load_adapter(m, paths[i % 2])))  # fmt: skip
    return rows


@torch.no_grad()
def _switch_lora(model: nn.Module, i: int, merged: bool) -> None:
    if merged:
        model.unmerge_adapter()
    model.set_adapter(("other", "default")[i % 2])
    if merged:
        model.merge_adapter()


def _lora_row(model: nn.Module, method: str, seed: int, timer: Timer, repeats: int) -> dict:
    merged = method == "lora-merged"
    if "other" not in model.peft_config:  # a second adapter, loaded once, before timing
        with warnings.catch_warnings():  # PEFT unmerges here, and says so
            warnings.simplefilter("ignore")
            model.add_adapter("other", copy.deepcopy(model.peft_config["default"]))
        randomize_lora(model, seed, adapter="other")
        _switch_lora(model, 1, merged=False)
        if merged:
            model.merge_adapter()
    switch = partial(_switch_lora, model, merged=merged)
    what = MERGED if merged else "PEFT set_adapter (unmerged)"
    row = time_switch(method, what, timer, repeats, switch)
    switch(1)  # leave the default adapter active (and merged)
    return row


def switch_study(models: dict[str, nn.Module], seed: int, timer: Timer, repeats: int = 5) -> list[dict]:
    """Switch rows for whichever of zflora, lora-merged and lora are in `models`."""
    rows: list[dict] = []
    if "zflora" in models:
        rows += _zflora_rows(models["zflora"], seed + 2, timer, repeats)
    for method in ("lora-merged", "lora"):
        if method in models:
            rows.append(_lora_row(models[method], method, seed + 3, timer, repeats))
    return rows


def with_ratios(rows: list[dict]) -> list[dict]:
    merged = [r["median_ms"] for r in rows if r["operation"] == MERGED]
    for r in rows:
        r["ratio_to_merged_lora"] = r["median_ms"] / merged[0] if merged else None
    return rows


def check_target(rows: list[dict]) -> list[dict[str, Any]]:
    sw = {r["operation"]: r for r in rows}
    if HOT_SWAP in sw and MERGED in sw:
        return [target("zflora hot-swap / merged-LoRA switch", sw[HOT_SWAP]["median_ms"] / sw[MERGED]["median_ms"],
                       0.05)]  # fmt: skip
    return []


def markdown(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["", "| adapter switch | median ms (IQR) | x merged-LoRA switch |", "|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio_to_merged_lora']:.4f}" if r["ratio_to_merged_lora"] is not None else "-"
        lines.append(f"| {r['method']}: {r['operation']} | {r['median_ms']:.2f} ({r['p25_ms']:.2f}-"
                     f"{r['p75_ms']:.2f}) | {ratio} |")  # fmt: skip
    return lines
