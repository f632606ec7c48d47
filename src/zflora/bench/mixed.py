"""`zflora mixed-bench`: a batch of requests for k different adapters, served in one forward.

Stacked zFLoRA (`zflora.stack_adapters` + `zflora.route`: the same operators as the
base model, (r_1 + ... + r_k) / d more work) against PEFT's mixed-batch LoRA (one
PeftModel holding every adapter, `adapter_names=` per row: its LoRA branch runs once
per distinct adapter on that adapter's rows) and the base model. Row b of the batch
goes to adapter b mod k. Prefill and decode as in `zflora bench`, every model alive at
once and visited in rotating order in each repetition; ratios to base from one run.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..charts import figure, save_figure
from ..config import ZFLoRAConfig, check_alpha
from ..hardware import auto_dtype, describe_machine, environment
from ..methods import lora_config, prepare_model, random_adapter, randomize_lora
from ..models import meta_model, preset_config, random_model, torch_dtype
from ..stacking import route, stack_adapters
from ..transform import apply_zflora
from .common import Runner, empty_samples, inference_state, measure_round, phase_label
from .config import MixedBenchConfig
from .harness import Timer, pick_device, rotated
from .report import md_table, rows, target, targets_table, write_outputs


def _shared_copy(base: nn.Module) -> nn.Module:
    """A copy of `base` that shares its tensors (the methods below replace modules, never write base weights)."""
    return copy.deepcopy(base, {id(t): t for t in [*base.parameters(), *base.buffers()]})


def random_adapters(base: nn.Module, cfg: MixedBenchConfig) -> list[Any]:
    """max(k) distinct non-zero zFLoRA adapters of rank `cfg.rank` on every projection."""
    probe = apply_zflora(meta_model(base.config), ZFLoRAConfig(r=cfg.rank, alpha=cfg.alpha))
    return [random_adapter(probe, cfg.seed + 1 + i) for i in range(max(cfg.adapters))]


def lora_mixed(base: nn.Module, cfg: MixedBenchConfig) -> tuple[nn.Module, list[str]]:
    """One PeftModel holding max(k) non-zero LoRA adapters, and their names."""
    model = prepare_model(_shared_copy(base), "lora", r=cfg.rank, alpha=cfg.alpha)
    names = ["default", *(f"a{i}" for i in range(1, max(cfg.adapters)))]
    for name in names[1:]:
        model.add_adapter(name, lora_config(cfg.rank, cfg.alpha))
    for i, name in enumerate(names):
        randomize_lora(model, cfg.seed + 1 + i, adapter=name)
    return model, names


def build_runners(base: nn.Module, cfg: MixedBenchConfig, device: torch.device, routes: contextlib.ExitStack
                  ) -> dict[str, Runner]:  # fmt: skip
    """A runner per (method, k), keyed "method k=K" ("base" alone)."""
    runners = {"base": Runner(inference_state(base), cfg, device)}
    adapters = random_adapters(base, cfg) if "zflora-stacked" in cfg.methods else []
    peft, names = lora_mixed(base, cfg) if "lora-mixed" in cfg.methods else (None, [])
    for k in cfg.adapters:
        slots = torch.arange(cfg.batch) % k  # row b -> adapter b mod k
        if "zflora-stacked" in cfg.methods:
            model = stack_adapters(_shared_copy(base), adapters[:k])
            routes.enter_context(route(model, slots))  # this model's rows stay routed for the whole run
            runners[f"zflora-stacked k={k}"] = Runner(inference_state(model), cfg, device)
        if peft is not None:
            runner = runners[f"lora-mixed k={k}"] = Runner(inference_state(peft), cfg, device)
            runner.extra = {"adapter_names": [names[int(j)] for j in slots]}
    return runners


def split_rows(result_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ "method k=K" keys back into the row schema plus an `adapters` field (0 for base)."""
    for r in result_rows:
        method, _, k = r["method"].partition(" k=")
        r["method"], r["adapters"] = method, int(k or 0)
    return result_rows


@torch.no_grad()
def run(cfg: MixedBenchConfig) -> dict[str, Any]:
    device = pick_device("auto", cfg.threads)
    dtype_name = auto_dtype(cfg.dtype, device)
    base = random_model(preset_config(cfg.preset, cfg.layers), torch_dtype(dtype_name), device, cfg.seed)
    settings = asdict(cfg) | {"dtype": dtype_name, "dtype_requested": cfg.dtype, "hidden_size": base.config.hidden_size,
                              "layers": base.config.num_hidden_layers, "alpha": check_alpha(cfg.alpha, cfg.rank),
                              "targets": "all", "routing": "row b -> adapter b mod k"}  # fmt: skip
    timer = Timer(device)
    with contextlib.ExitStack() as routes:
        runners = build_runners(base, cfg, device, routes)
        samples = {name: empty_samples(cfg) for name in runners}
        bar = tqdm(total=(cfg.warmup + cfg.repeats) * len(runners), disable=not cfg.progress,
                   desc="zflora mixed-bench", unit="round")  # fmt: skip
        for runner in runners.values():
            runner.fill_context()
        for rep in range(cfg.warmup + cfg.repeats):
            for name in rotated(list(runners), rep):
                measure_round(runners[name], timer, cfg, samples[name] if rep >= cfg.warmup else empty_samples(cfg))
                bar.update(1)
        bar.close()
    result = {"environment": environment(device, dtype_name), "settings": settings, "mixed": split_rows(rows(samples))}
    result["targets"] = check_targets(result["mixed"], max(cfg.adapters))
    return result


def check_targets(result_rows: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """Stacked zFLoRA with the most adapters at <= 1.05x base, LoRA's ratio beside it (reported, not asserted)."""
    lora = {(r["phase"], r["tokens"]): r["ratio_to_base"] for r in result_rows if r["method"] == "lora-mixed"
            and r["adapters"] == k}  # fmt: skip
    return [target(f"zflora-stacked k={k} {phase_label(r)} / base", r["ratio_to_base"], 1.05,
                   **({"note": f"lora-mixed {lora[r['phase'], r['tokens']]:.3f}"} if lora else {}))
            for r in result_rows if r["method"] == "zflora-stacked" and r["adapters"] == k]  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    env, st, res = result["environment"], result["settings"], result["mixed"]
    lines = [f"**{st['preset']}** shape, {st['layers']} layers, d = {st['hidden_size']}, {max(st['adapters'])} "
             f"adapters of r = {st['rank']} on all seven projections, batch {st['batch']} (row b -> adapter b mod k); "
             f"{describe_machine(env)}, peft {env['peft']}; median of {st['repeats']} repetitions after "
             f"{st['warmup']} warm-up", ""]  # fmt: skip
    keys = list(dict.fromkeys((r["phase"], r["tokens"]) for r in res))
    methods = [m for m in ("zflora-stacked", "lora-mixed") if any(r["method"] == m for r in res)]
    by = {(r["method"], r["adapters"], r["phase"], r["tokens"]): r for r in res}
    head = ["k", *(f"{m} {phase_label({'phase': p, 'tokens': t})} (x base)" for p, t in keys for m in methods)]
    body = [[k, *(f"{by[m, k, p, t]['ratio_to_base']:.3f}" for p, t in keys for m in methods)]
            for k in st["adapters"]]  # fmt: skip
    base_ms = ", ".join(f"{phase_label({'phase': p, 'tokens': t})} {by['base', 0, p, t]['median_ms']:.1f} ms"
                        for p, t in keys)  # fmt: skip
    lines += md_table(head, body) + ["", f"Base model: {base_ms}."]
    return "\n".join(lines + targets_table(result["targets"])) + "\n"


def chart(result: dict[str, Any], path: Any) -> None:
    fig, axes = figure(1, 7)
    ax, res, st = axes[0], result["mixed"], result["settings"]
    for method, style in (("zflora-stacked", "-o"), ("lora-mixed", "--s")):
        for phase, tokens in dict.fromkeys((r["phase"], r["tokens"]) for r in res if r["method"] == method):
            pts = sorted((r["adapters"], r["ratio_to_base"]) for r in res
                         if (r["method"], r["phase"], r["tokens"]) == (method, phase, tokens))  # fmt: skip
            ax.plot(
                *zip(*pts, strict=True), style, label=f"{method}, {phase_label({'phase': phase, 'tokens': tokens})}"
            )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(st["adapters"]), [str(k) for k in st["adapters"]])
    ax.set_xlabel("distinct adapters in the batch (k)")
    ax.set_ylabel("latency / base")
    ax.set_title(f"Mixed-adapter batch of {st['batch']}, {st['preset']} ({st['layers']} layers), r={st['rank']}")
    ax.legend(fontsize=7)
    fig.suptitle(describe_machine(result["environment"]), fontsize=8)
    save_figure(fig, path)


def main(cfg: MixedBenchConfig) -> None:
    print(write_outputs(run(cfg), cfg, markdown, chart))
