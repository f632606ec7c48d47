"""`zflora bench --compile`: every method compiled (`zflora.compile`), its compile time, and adapter
swaps under compile: zFLoRA's fused hot-swap against PEFT's compiled hot-swap
(`prepare_model_for_compiled_hotswap` before compiling, `hotswap_adapter_from_state_dict`
after), each between adapters of different alpha, with the graphs compiled counted.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..adapter_io import Adapter, base_identity, set_adapter
from ..compiled import compile, compile_count, is_frozen
from ..methods import lora_config, random_adapter
from ..transform import adapter_parameters
from .harness import Timer
from .report import target
from .switch import time_switch


def compile_models(models: dict[str, nn.Module], rank: int, freeze: bool) -> None:
    """Compile every model in place; the unmerged PEFT model is first prepared for compiled hot-swap."""
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    for method, model in models.items():
        if method == "lora":
            prepare_model_for_compiled_hotswap(model, target_rank=rank)  # scalings become tensors: alpha may change
        compile(model, freeze=freeze, dynamic=True)


def warm_up(runner: Any, lengths: tuple[int, ...]) -> dict[str, Any]:
    """Run every shape the benchmark times once (this is when compilation happens): seconds and graphs."""
    before, started = compile_count(), time.perf_counter()
    for n in lengths:
        runner.prefill(n)
    runner.fill_context()
    for _ in range(2):  # as the timed rounds go: decode on a fresh cache, a longer one, then a cropped one
        for _ in range(2):
            runner.decode_step()
        runner.rewind()
    return {"compile_s": time.perf_counter() - started, "graphs": compile_count() - before}


def _swap_row(method: str, operation: str, swap: Callable[[int], Any], step: Callable[[], Any], timer: Timer) -> dict:
    """Time `swap` (alternating two adapters), then count the graphs compiled by swap + forward. Two steps
    first: the KV cache's own states (a cropped cache has other strides) compile their graphs there."""
    row = time_switch(method, operation, timer, 5, swap)
    step()
    step()
    before = compile_count()
    for i in range(2):
        swap(i)
        step()
    return row | {"recompiles": compile_count() - before}


def swap_rows(models: dict[str, nn.Module], runners: dict[str, Any], cfg: Any, timer: Timer) -> list[dict]:
    """Swaps under compile for zflora (fused hot-swap) and lora (PEFT's compiled hot-swap); alpha 2r <-> r."""
    rows = []

    def step(method: str) -> Callable[[], Any]:
        def run() -> None:
            runners[method].decode_step()
            runners[method].rewind()

        return run

    if "zflora" in models and not is_frozen(models["zflora"]):
        m = models["zflora"]
        current = Adapter(m.zflora_config, base_identity(m), {n: p.detach().clone() for n, p in
                                                              adapter_parameters(m).items()})  # fmt: skip
        other = random_adapter(m, cfg.seed + 5)
        other.config = dataclasses.replace(m.zflora_config, alpha=float(cfg.rank))  # another alpha
        adapters = [other, current]
        rows.append(_swap_row("zflora", "fused hot-swap under compile, alpha 2r <-> r", lambda i: set_adapter(
            m, adapters[i % 2]), step("zflora"), timer))  # fmt: skip
    if "lora" in models:
        from peft.utils.hotswap import hotswap_adapter_from_state_dict

        m = models["lora"]
        g = torch.Generator().manual_seed(cfg.seed + 6)
        current = {k: v.detach().clone() for k, v in m.state_dict().items() if "lora_" in k and ".default." in k}
        other = {k: (torch.randn(v.shape, generator=g) * 0.02).to(v.dtype) for k, v in current.items()}
        configs = [lora_config(cfg.rank, float(cfg.rank)), m.peft_config["default"]]
        states = [other, current]
        rows.append(_swap_row("lora", "PEFT compiled hot-swap (hotswap_adapter_from_state_dict), alpha 2r <-> r",
                              lambda i: hotswap_adapter_from_state_dict(m, states[i % 2], "default", configs[i % 2]),
                              step("lora"), timer))  # fmt: skip
    return rows


def check_targets(rows: list[dict]) -> list[dict[str, Any]]:
    return [target("zflora swaps under compile: recompiles", r["recompiles"], 0) for r in rows
            if r["method"] == "zflora"]  # fmt: skip


def markdown(compiled: dict[str, dict[str, Any]], rows: list[dict]) -> list[str]:
    lines = ["", "| method | compile + first run of every shape, s | graphs compiled |", "|---|---|---|"]
    lines += [f"| {m} | {c['compile_s']:.1f} | {c['graphs']} |" for m, c in compiled.items()]
    if rows:
        lines += ["", "| swap under compile | median ms (IQR) | recompiles |", "|---|---|---|"]
        lines += [f"| {r['method']}: {r['operation']} | {r['median_ms']:.2f} ({r['p25_ms']:.2f}-{r['p75_ms']:.2f}) "
                  f"| {r['recompiles']} |" for r in rows]  # fmt: skip
    return lines
