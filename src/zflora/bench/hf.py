"""`zflora bench`: base vs LoRA vs zFLoRA end to end in Hugging Face transformers, on this machine.

Prefill is the time to first token (a fresh KV cache, logits of the last position
only); decode is one token with the KV cache holding `decode_context` tokens. By
default the headline comparison (base, PEFT LoRA unmerged, fused zFLoRA) in the
dtype the hardware runs natively; `--full` adds every method, the one-projection
study (`projection.py`) and more repetitions. Adapter switching (`switch.py`) is
timed for the methods present. `--compile` runs every method compiled (`compiled.py`:
compile time, and swaps under compile instead of the eager switch study). Methods are
interleaved in rotating order within every repetition when they fit in memory
together, else measured one at a time.
"""

from __future__ import annotations

import copy
import gc
import time
from dataclasses import asdict
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .. import weight_only
from ..charts import figure, save_figure
from ..config import check_alpha
from ..hardware import auto_dtype, describe_machine, environment
from ..models import torch_dtype
from ..transform import adapter_parameters
from . import compiled, projection, switch
from .common import Runner, base_model, build_method, empty_samples, inference_state, measure_round, phase_label
from .config import BenchConfig
from .harness import Timer, available_bytes, model_bytes, pick_device, rotated
from .report import bar_chart, md_table, rows, target, targets_table, write_outputs


def describe(method: str, model: nn.Module) -> dict[str, Any]:
    # What the method trains (flags were reset for timing, see inference_state).
    if method.startswith("zflora"):
        trainable = sum(p.numel() for p in adapter_parameters(model).values())
    else:
        trainable = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n and ".other." not in n)
    return {"weights_mb": model_bytes(model) / 2**20, "trainable_parameters": trainable}


class Study:
    """One end-to-end run: its models, samples, memory figures and switch rows."""

    def __init__(self, cfg: BenchConfig, device: torch.device, dtype: torch.dtype, bar: tqdm) -> None:
        self.cfg, self.device, self.dtype, self.bar = cfg, device, dtype, bar
        self.timer = Timer(device)
        self.samples = {m: empty_samples(cfg) for m in cfg.methods}
        self.info: dict[str, dict[str, Any]] = {}
        self.switch: list[dict] = []
        self.compiled: dict[str, dict[str, Any]] = {}
        self.quantize_s: dict[str, float] = {}

    def make_base(self) -> nn.Module:
        return base_model(self.cfg, torch.float32 if self.cfg.quantize else self.dtype, self.device)

    def build(self, base: nn.Module, method: str, keep_base: bool) -> nn.Module:
        """`build_method`, then with --quantize int4 every method quantized from its own fp32 model (merged LoRA
        merged and unloaded first; unmerged LoRA's base layers quantized, its adapter kept in the benchmark's dtype),
        activations in the benchmark's dtype; the seconds that took are recorded."""
        if not self.cfg.quantize:
            return build_method(base, method, self.cfg, keep_base)
        model = build_method(copy.deepcopy(base) if keep_base else base, method, self.cfg, keep_base=False)
        if method == "lora-merged":
            model = model.merge_and_unload()
        started = time.perf_counter()
        weight_only.quantize(model, dtype=self.dtype)
        self.quantize_s[method] = time.perf_counter() - started
        return inference_state(model)

    def fits_together(self, base: nn.Module) -> bool:
        own_copies = sum(m in ("lora-merged", "zflora", "zflora-mha") for m in self.cfg.methods)
        return model_bytes(base) * (1 + own_copies) < 0.7 * available_bytes(self.device)

    def measure(self, method: str, runner: Runner, keep: bool) -> None:
        measure_round(runner, self.timer, self.cfg, self.samples[method] if keep else empty_samples(self.cfg))
        self.bar.update(1)

    def interleaved(self, base: nn.Module) -> None:
        """Every model alive at once; each repetition visits every method in rotating order."""
        cfg = self.cfg
        models = {m: self.build(base, m, keep_base=True) for m in cfg.methods}
        runners = {m: self.prepare(m, models[m]) for m in cfg.methods}
        for rep in range(cfg.warmup + cfg.repeats):
            for m in rotated(list(cfg.methods), rep):
                self.measure(m, runners[m], keep=rep >= cfg.warmup)
        self.swaps(models, runners)

    def prepare(self, method: str, model: nn.Module) -> Runner:
        """Describe the model, compile it (--compile; its first run of every shape is timed), fill its cache."""
        self.info[method] = describe(method, model)
        if method in self.quantize_s:
            self.info[method] |= {"quantize_s": self.quantize_s[method], "bytes": weight_only.quantized_bytes(model)}
        runner = Runner(model, self.cfg, self.device)
        if self.cfg.compile:
            compiled.compile_models({method: model}, self.cfg.rank, self.cfg.freeze)
            self.compiled[method] = compiled.warm_up(runner, self.cfg.prompt_lens)
        runner.fill_context()
        return runner

    def swaps(self, models: dict[str, nn.Module], runners: dict[str, Runner]) -> None:
        if self.cfg.quantize:  # a merged LoRA on an int4 base switches by quantizing again (quantize_s)
            models = {m: v for m, v in models.items() if m == "zflora"}
        if self.cfg.compile:
            self.switch += compiled.swap_rows(models, runners, self.cfg, self.timer)
        else:
            self.switch += switch.switch_study(models, self.cfg.seed, self.timer)

    def one_at_a_time(self, base: nn.Module | None) -> None:
        """Models too big to live together: build, measure and free each method in turn."""
        cfg = self.cfg
        for m in cfg.methods:
            model = self.build(base if base is not None else self.make_base(), m, keep_base=False)
            base = None
            runner = self.prepare(m, model)
            for rep in range(cfg.warmup + cfg.repeats):
                self.measure(m, runner, keep=rep >= cfg.warmup)
            if m in ("zflora", "lora", "lora-merged"):
                self.swaps({m: model}, {m: runner})
            del model, runner
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def run(cfg: BenchConfig) -> dict[str, Any]:
    device = pick_device(cfg.device, cfg.threads)
    dtype_name = auto_dtype(cfg.dtype, device)
    bar = tqdm(total=(cfg.warmup + cfg.repeats) * len(cfg.methods), disable=not cfg.progress,
               desc="zflora bench (end to end)", unit="round")  # fmt: skip
    study = Study(cfg, device, torch_dtype(dtype_name), bar)
    base = study.make_base()
    config, together = base.config, study.fits_together(base)
    settings = asdict(cfg) | {"dtype": dtype_name, "dtype_requested": cfg.dtype, "interleaved_methods": together,
                              "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
                              "alpha": check_alpha(cfg.alpha, cfg.rank), "grad_mode": "no_grad"}  # fmt: skip
    result: dict[str, Any] = {"environment": environment(device, dtype_name), "settings": settings}
    result["projection"] = _projection(cfg, config, study) if cfg.full else []
    study.interleaved(base) if together else study.one_at_a_time(base)
    del base
    bar.close()
    result |= {"end_to_end": rows(study.samples), "memory": study.info, "switch": switch.with_ratios(study.switch),
               "compile": study.compiled}  # fmt: skip
    result["targets"] = check_targets(result, cfg.rank, config.hidden_size)
    return result


def _projection(cfg: BenchConfig, config: Any, study: Study) -> list[dict]:
    n = len(projection.projection_shapes(config)) * len(cfg.proj_tokens) * cfg.proj_repeats
    with tqdm(total=n, disable=not cfg.progress, desc="zflora bench (one projection)", unit="round") as bar:
        return projection.projection_study(cfg, config, study.dtype, study.device, study.timer, lambda: bar.update(1))


def check_targets(result: dict[str, Any], rank: int, d: int) -> list[dict[str, Any]]:
    """Targets evaluated on this run's numbers (reported, never asserted): zFLoRA within r/d + 1 point."""
    bound = 1 + rank / d + 0.01
    out = [target(f"zflora {r['phase']} {r['tokens']} / base (1 + r/d + 0.01)", r["ratio_to_base"], bound)
           for r in result["end_to_end"] if r["method"] == "zflora"]  # fmt: skip
    out += compiled.check_targets(result["switch"]) if result.get("compile") else switch.check_target(result["switch"])
    return out + projection.check_target(result["projection"])


def markdown(result: dict[str, Any]) -> str:
    env, st = result["environment"], result["settings"]
    layout = "" if st["interleaved_methods"] else " (methods measured one at a time: too big to fit together)"
    pad = f" (zFLoRA's stream padded to a multiple of {st['pad_to']})" if st.get("pad_to") else ""
    if st.get("quantize"):
        pad = (f"; every projection int4 weight-only (blocks of 32 along K, PyTorch's "
               f"_weight_int4pack_mm_for_cpu), activations {st['dtype']}")  # fmt: skip
    lines = [f"**{st['model'] or st['preset']}** shape, {st['layers']} layers, d = {st['hidden_size']}, "
             f"r = {st['rank']}{pad}, batch {st['batch']}; {describe_machine(env)}, peft {env['peft']}; "
             f"median of {st['repeats']} repetitions after {st['warmup']} warm-up{layout}", ""]  # fmt: skip
    e2e = result["end_to_end"]
    keys = list(dict.fromkeys((r["phase"], r["tokens"]) for r in e2e))
    labels = [phase_label({"phase": p, "tokens": t}) for p, t in keys]
    head = ["method", *(f"{x} (x base)" for x in labels), *(f"{x} ms" for x in labels), "trainable params",
            "weights MB"]  # fmt: skip
    body = []
    for m in dict.fromkeys(r["method"] for r in e2e):
        by = {(r["phase"], r["tokens"]): r for r in e2e if r["method"] == m}
        mem = result["memory"][m]
        body.append([m, *(f"{by[k]['ratio_to_base']:.3f}" for k in keys),
                     *(f"{by[k]['median_ms']:.1f} ({by[k]['p25_ms']:.1f}-{by[k]['p75_ms']:.1f})" for k in keys),
                     f"{mem['trainable_parameters']:,}", f"{mem['weights_mb']:.1f}"])  # fmt: skip
    lines += md_table(head, body)
    if result.get("compile"):
        lines += compiled.markdown(result["compile"], result["switch"])
    else:
        lines += switch.markdown(result["switch"])
    if result["projection"]:
        lines += projection.markdown(result["projection"])
    return "\n".join(lines + targets_table(result["targets"])) + "\n"


def chart(result: dict[str, Any], path: Any) -> None:
    proj = result["projection"]
    fig, axes = figure(2 if proj else 1, 13 if proj else 7)
    bar_chart(axes[0], result["end_to_end"], phase_label)
    st = result["settings"]
    name = st["model"] or st["preset"]
    axes[0].set_title(f"End to end, {name} ({st['layers']} layers), r={st['rank']}, {st['dtype']}")
    if proj:
        projection.plot(axes[1], proj)
    fig.suptitle(describe_machine(result["environment"]), fontsize=8)
    save_figure(fig, path)


def main(cfg: BenchConfig) -> None:
    print(write_outputs(run(cfg), cfg, markdown, chart))
