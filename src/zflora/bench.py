"""`zflora bench`: the paper's latency study, base vs LoRA vs zFLoRA, on this machine.

Study 1, one projection: base linear; LoRA's four operations (A x, B(.), scale, add);
naive fused LoRA ([W; A] x, split, B(.), scale, add); zFLoRA (one matmul with r more
columns or rows). Study 2, end to end on the transformers model: prefill (time to
first token: logits of the last position only) and per-token decode with the KV
cache, for base, PEFT LoRA (unmerged and merged), LoRA-MHA and fused zFLoRA(-MHA);
plus the adapter switch time of each.

Method (after gpt-fast): warm up and discard; interleave what is compared within
every repetition so drift hits all alike; medians with the interquartile range;
CUDA events on a GPU, `perf_counter` on the CPU; the machine and library versions
recorded beside every figure.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .adapter_io import Adapter, atomic_write, base_identity, load_adapter, save_adapter, set_adapter
from .config import alpha_for
from .methods import prepare_model
from .models import load_local_model, preset_config, random_model
from .transform import adapter_parameters, fuse

E2E_METHODS = ("base", "lora", "lora-merged", "lora-mha", "zflora", "zflora-mha")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def positive(name: str, value: Any) -> None:
    """Validate a config field that must be a positive integer; the error names the field."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")


@dataclass
class BenchConfig:
    preset: str = "llama-3.2-1b"
    model: Path | None = None  # a local checkpoint instead of a preset
    layers: int | None = None  # cut the depth for quick runs
    rank: int = 64
    alpha: float | None = None  # default 2 * rank
    dtype: str = "bf16"
    batch: int = 1
    prompt_lens: tuple[int, ...] = (128, 512)
    decode_context: int = 512
    decode_steps: int = 8  # timed single-token steps per repetition and method
    repeats: int = 5
    warmup: int = 2
    methods: tuple[str, ...] = E2E_METHODS
    proj_tokens: tuple[int, ...] = (1, 16, 128, 512, 2048)
    proj_ranks: tuple[int, ...] = (8, 16, 32, 64, 128)
    proj_repeats: int = 5
    skip_projection: bool = False
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    json_path: Path | None = None
    chart_path: Path | None = None
    markdown_path: Path | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        check_fields(
            self, E2E_METHODS, ("rank", "batch", "decode_context", "decode_steps", "repeats", "proj_repeats"),
            ("prompt_lens", "proj_tokens", "proj_ranks"),
        )  # fmt: skip
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: must be auto, cpu or cuda, got {self.device!r}")


def check_fields(cfg: Any, methods: tuple[str, ...], integers: tuple[str, ...], lists: tuple[str, ...]) -> None:
    """The checks a benchmark config shares: positive integers (and non-empty lists of them),
    layers, warm-up, dtype, methods (base among them) and the preset name."""
    for name in integers:
        positive(name, getattr(cfg, name))
    for name in lists:
        if not getattr(cfg, name):
            raise ValueError(f"{name}: must not be empty")
        for v in getattr(cfg, name):
            positive(name, v)
    if cfg.layers is not None:
        positive("layers", cfg.layers)
    if cfg.warmup < 0:
        raise ValueError(f"warmup: must be >= 0, got {cfg.warmup}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype: unknown {cfg.dtype!r}; accepted: {', '.join(DTYPES)}")
    unknown = [m for m in cfg.methods if m not in methods]
    if unknown or "base" not in cfg.methods:
        raise ValueError(f"methods: must include 'base' and come from {', '.join(methods)}; got {list(cfg.methods)}")
    if cfg.model is None:
        preset_config(cfg.preset)  # validates the name


# --------------------------------------------------------------------------- timing


class Timer:
    """Milliseconds of one call: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any], inner: int = 1) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / inner
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t) * 1e3 / inner


def summarize(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else [samples[0]] * 3
    return {"median_ms": statistics.median(samples), "p25_ms": q[0], "p75_ms": q[2], "n": len(samples)}


def rotated(items: list[str], rep: int) -> list[str]:
    """The order for repetition `rep`: rotated, so no item always follows the same one."""
    k = rep % len(items)
    return items[k:] + items[:k]


def interleaved(
    timer: Timer, fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, bar: tqdm, min_ms: float = 10.0
) -> dict[str, list[float]]:
    """Time every fn once per repetition, in rotating order; calls shorter than `min_ms` are looped."""
    inner = {}
    for name, fn in fns.items():  # warm-up, discarded; also sizes the inner loop
        t = min(timer(fn) for _ in range(max(warmup, 1)))
        inner[name] = max(1, math.ceil(min_ms / max(t, 1e-3)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(repeats):
        for name in rotated(list(fns), rep):
            samples[name].append(timer(fns[name], inner[name]))
            bar.update(1)
    return samples


# --------------------------------------------------------------------------- study 1


def projection_shapes(config: Any) -> list[tuple[str, str, int, int]]:
    """(name, kind, in, out) of the preset's distinct projections; kind as in zFLoRA."""
    d, inter = config.hidden_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    return [
        ("q", "in", d, q),
        ("k/v", "in", d, kv),
        ("o", "out", q, d),
        ("gate/up", "in", d, inter),
        ("down", "out", inter, d),
    ]


LORA_SCALE = 2.0


def _lora(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    return F.linear(x, w) + F.linear(F.linear(x, a), b) * s  # PEFT's order: A x, B (.), scale, add


def _naive_fused(x: torch.Tensor, wa: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    y, t = F.linear(x, wa).split([b.shape[0], wa.shape[0] - b.shape[0]], dim=-1)  # [W x ; A x], split
    return y + F.linear(t, b) * s


@torch.no_grad()
def projection_study(cfg: BenchConfig, config: Any, device: torch.device, timer: Timer, bar: tqdm) -> list[dict]:
    dtype = DTYPES[cfg.dtype]
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) / math.sqrt(shape[-1])).to(dtype=dtype, device=device)

    rows = []
    for name, kind, fin, fout in projection_shapes(config):
        w = rand(fout, fin)
        for tokens in cfg.proj_tokens:
            x = rand(cfg.batch * tokens, fin)
            fns: dict[str, Callable[[], Any]] = {"base": partial(F.linear, x, w)}
            for r in cfg.proj_ranks:
                a, b = rand(r, fin), rand(fout, r)
                wa = torch.cat([w, a])  # naive fusion of the down-projection: (out + r, in)
                fns[f"lora r={r}"] = partial(_lora, x, w, a, b, LORA_SCALE)
                fns[f"naive-fused r={r}"] = partial(_naive_fused, x, wa, b, LORA_SCALE)
                if kind == "in":  # [W | s B] on the d + r stream
                    wz, xz = torch.cat([w, LORA_SCALE * b], dim=1), torch.cat([x, rand(x.shape[0], r)], dim=1)
                    fns[f"zflora r={r}"] = partial(F.linear, xz, wz)
                else:  # [W ; A]
                    fns[f"zflora r={r}"] = partial(F.linear, x, wa)
            samples = interleaved(timer, fns, cfg.proj_repeats, cfg.warmup, bar)
            base_ms = statistics.median(samples["base"])
            for key, ss in samples.items():
                variant, _, rank = key.partition(" r=")
                rows.append(
                    {
                        "projection": name,
                        "kind": kind,
                        "in": fin,
                        "out": fout,
                        "tokens": tokens,
                        "rank": int(rank) if rank else None,
                        "variant": variant,
                        **summarize(ss),
                        "ratio_to_base": statistics.median(ss) / base_ms,
                        "samples_ms": ss,
                    }
                )
    return rows


# --------------------------------------------------------------------------- study 2


def randomize_lora(model: nn.Module, seed: int, adapter: str | None = None) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n and (adapter is None or f".{adapter}." in n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _random_zflora(model: nn.Module, seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    params = adapter_parameters(model)
    tensors = {n: (torch.randn(p.shape, generator=g) * 0.02).to(p.dtype) for n, p in params.items()}
    return Adapter(model.zflora_config, base_identity(model), tensors)


def build_method(base: nn.Module, method: str, cfg: BenchConfig, keep_base: bool) -> nn.Module:
    """Derive `method`'s model from `base`: PEFT LoRA (random non-zero B), merged, or fused zFLoRA.

    With `keep_base` the base stays intact: unmerged LoRA shares its weights (PEFT leaves
    them unchanged), the others get their own copy. Without it, `base` itself is changed.
    """
    if method == "base":
        return _inference_state(base)
    model = base
    if keep_base:
        shared = method in ("lora", "lora-mha")
        memo = {id(t): t for t in [*base.parameters(), *base.buffers()]} if shared else {}
        model = copy.deepcopy(base, memo)
    rank, alpha = cfg.rank, alpha_for(cfg.rank, cfg.alpha)
    if method.startswith("lora"):
        model = prepare_model(model, "lora-mha" if method == "lora-mha" else "lora", r=rank, alpha=alpha)
        randomize_lora(model, cfg.seed + 1)
        if method == "lora-merged":
            model.merge_adapter()
    else:
        prepare_model(model, method, r=rank, alpha=alpha)
        set_adapter(model, _random_zflora(model, cfg.seed + 1))
        fuse(model)
    return _inference_state(model)


def _inference_state(model: nn.Module) -> nn.Module:
    """Every method measured alike: eval mode, parameters as `from_pretrained` leaves them.

    Under `torch.no_grad` the requires_grad flag changes no arithmetic, but PyTorch's
    matmul uses it to pick a path: a *frozen* LM head fed HF's last-position slice
    (`logits_to_keep=1`) makes it copy the whole head weight (about 3 s of a 1B prefill
    on a CPU). PEFT freezes the base, so leaving flags as each method sets them would
    charge LoRA for that artifact. zFLoRA's own modules avoid it either way.
    """
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()


class Runner:
    """Prefill and decode of one model, with its own KV cache at the decode context."""

    def __init__(self, model: nn.Module, cfg: BenchConfig, vocab: int, device: torch.device) -> None:
        from transformers import DynamicCache

        self.model, self.cfg, self.config = model, cfg, model.config
        self.new_cache = lambda: DynamicCache(config=self.config)
        g = torch.Generator().manual_seed(cfg.seed)
        longest = max(*cfg.prompt_lens, cfg.decode_context)
        self.ids = torch.randint(3, vocab, (cfg.batch, longest), generator=g).to(device)
        self.step_ids = self.ids[:, :1]
        self.cache = self.new_cache()

    @torch.no_grad()
    def prefill(self, length: int) -> None:
        self.model(input_ids=self.ids[:, :length], cache=self.new_cache(), use_cache=True, logits_to_keep=1)

    @torch.no_grad()
    def fill_context(self) -> None:
        self.cache = self.new_cache()
        self.model(input_ids=self.ids[:, : self.cfg.decode_context], cache=self.cache, use_cache=True, logits_to_keep=1)

    @torch.no_grad()
    def decode_step(self) -> None:
        self.model(input_ids=self.step_ids, cache=self.cache, use_cache=True, logits_to_keep=1)

    def rewind(self) -> None:
        extra = self.cache.get_seq_length() - self.cfg.decode_context
        if extra > 0:
            self.cache.crop(-extra)  # drop the tokens the last decode steps appended


def model_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def measure_round(runner: Runner, timer: Timer, cfg: BenchConfig, out: dict[tuple[str, int], list[float]]) -> None:
    """One repetition of one method: each prompt length once, then `decode_steps` decode steps."""
    for length in cfg.prompt_lens:
        out["prefill", length].append(timer(lambda length=length: runner.prefill(length)))
    runner.rewind()
    for _ in range(cfg.decode_steps):
        out["decode", cfg.decode_context].append(timer(runner.decode_step))


def switch_study(models: dict[str, nn.Module], cfg: BenchConfig, timer: Timer, repeats: int = 5) -> list[dict]:
    """Adapter switch: zFLoRA fused hot-swap vs merged LoRA (unmerge + merge) vs PEFT set_adapter."""
    rows: list[dict] = []
    if "zflora" in models:
        m = models["zflora"]
        current = {n: p.detach().clone() for n, p in adapter_parameters(m).items()}
        adapters = [Adapter(m.zflora_config, base_identity(m), current), _random_zflora(m, cfg.seed + 2)]
        rows.append(
            _time_switch(
                "zflora", "fused hot-swap, adapter in memory", timer, repeats, lambda i: set_adapter(m, adapters[i % 2])
            )
        )
        with tempfile.TemporaryDirectory() as tmp:
            paths = [save_adapter(set_adapter(m, a), Path(tmp) / f"a{i}") for i, a in enumerate(adapters)]
            rows.append(
                _time_switch(
                    "zflora",
                    "fused hot-swap, load_adapter from disk",
                    timer,
                    repeats,
                    lambda i: load_adapter(m, paths[i % 2]),
                )
            )
    operations = {"lora-merged": "merged LoRA: unmerge + merge another", "lora": "PEFT set_adapter (unmerged)"}
    for method, what in operations.items():
        if method in models:
            model, merged = models[method], method == "lora-merged"
            if "other" not in model.peft_config:  # a second adapter, loaded once, before timing
                with warnings.catch_warnings():  # PEFT unmerges here, and says so
                    warnings.simplefilter("ignore")
                    model.add_adapter("other", copy.deepcopy(model.peft_config["default"]))
                randomize_lora(model, cfg.seed + 3, adapter="other")
                _switch_lora(model, 1, merged=False)
                if merged:
                    model.merge_adapter()
            switch = partial(_switch_lora, model, merged=merged)
            rows.append(_time_switch(method, what, timer, repeats, switch))
            switch(1)  # leave the default adapter active (and merged)
    return rows


@torch.no_grad()
def _switch_lora(model: nn.Module, i: int, merged: bool) -> None:
    if merged:
        model.unmerge_adapter()
    model.set_adapter(("other", "default")[i % 2])
    if merged:
        model.merge_adapter()


def _switch_ratios(rows: list[dict]) -> list[dict]:
    merged = [r["median_ms"] for r in rows if r["method"] == "lora-merged"]
    for r in rows:
        r["ratio_to_merged_lora"] = r["median_ms"] / merged[0] if merged else None
    return rows


@torch.no_grad()
def _time_switch(method: str, operation: str, timer: Timer, repeats: int, fn: Callable[[int], Any]) -> dict:
    fn(1)  # warm-up, discarded
    samples = [timer(partial(fn, i)) for i in range(repeats)]
    return {"method": method, "operation": operation, **summarize(samples), "samples_ms": samples}


# --------------------------------------------------------------------------- driver


def environment(device: torch.device, dtype: str) -> dict[str, Any]:
    import peft
    import transformers

    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = platform.processor() or "cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    hardware = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {
        "device": device.type,
        "hardware": hardware,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "dtype": dtype,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def run(cfg: BenchConfig) -> dict[str, Any]:
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if cfg.device == "auto" else cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    dtype, timer = DTYPES[cfg.dtype], Timer(device)

    def make_base() -> nn.Module:
        if cfg.model is None:
            return random_model(preset_config(cfg.preset, cfg.layers), dtype, device, cfg.seed)
        model = load_local_model(cfg.model, dtype).to(device)
        if cfg.layers is not None:
            del model.model.layers[cfg.layers :]
            model.config.num_hidden_layers = len(model.model.layers)
        return model

    base = make_base()
    config = base.config
    d = config.hidden_size
    n_proj = len(projection_shapes(config)) * len(cfg.proj_tokens) * (1 + 3 * len(cfg.proj_ranks))
    n_e2e = (cfg.repeats + cfg.warmup) * len(cfg.methods) * (len(cfg.prompt_lens) + cfg.decode_steps)
    total = (0 if cfg.skip_projection else n_proj * cfg.proj_repeats) + n_e2e
    bar = tqdm(total=total, disable=not cfg.progress, desc="zflora bench", unit="sample")

    # Interleave methods only if every model fits at once; else one at a time (recorded in the output).
    own_copies = sum(m in ("lora-merged", "zflora", "zflora-mha") for m in cfg.methods)
    interleave = model_bytes(base) * (1 + own_copies) < 0.7 * available_bytes(device)

    settings = asdict(cfg)
    settings |= {"interleaved_methods": interleave, "layers": config.num_hidden_layers, "hidden_size": d}
    settings |= {"alpha": alpha_for(cfg.rank, cfg.alpha), "parameters_require_grad": True, "grad_mode": "no_grad"}
    result: dict[str, Any] = {"environment": environment(device, cfg.dtype), "settings": settings}
    result["projection"] = [] if cfg.skip_projection else projection_study(cfg, config, device, timer, bar)

    samples: dict[str, dict[tuple[str, int], list[float]]] = {m: {} for m in cfg.methods}
    for m in cfg.methods:
        for length in cfg.prompt_lens:
            samples[m]["prefill", length] = []
        samples[m]["decode", cfg.decode_context] = []
    info: dict[str, dict[str, Any]] = {}

    def measure(method: str, runner: Runner, rounds: int, keep: bool) -> None:
        store = samples[method] if keep else {k: [] for k in samples[method]}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        for _ in range(rounds):
            measure_round(runner, timer, cfg, store)
            bar.update(len(cfg.prompt_lens) + cfg.decode_steps)
        if device.type == "cuda" and keep:
            peak = torch.cuda.max_memory_allocated(device) - before
            info[method]["activation_peak_mb"] = max(info[method].get("activation_peak_mb", 0), peak / 2**20)

    def describe(method: str, model: nn.Module) -> None:
        # What the method trains (flags were reset for timing, see _inference_state).
        if method.startswith("zflora"):
            trainable = sum(p.numel() for p in adapter_parameters(model).values())
        else:
            trainable = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n and ".other." not in n)
        info[method] = {"weights_mb": model_bytes(model) / 2**20, "trainable_parameters": trainable}

    if interleave:
        models = {m: build_method(base, m, cfg, keep_base=True) for m in cfg.methods}
        runners = {m: Runner(models[m], cfg, config.vocab_size, device) for m in cfg.methods}
        for m in cfg.methods:
            describe(m, models[m])
            runners[m].fill_context()
        for rep in range(cfg.warmup + cfg.repeats):
            for m in rotated(list(cfg.methods), rep):  # every repetition visits every method
                measure(m, runners[m], 1, keep=rep >= cfg.warmup)
        result["switch"] = _switch_ratios(switch_study(models, cfg, timer))
        del models, runners
    else:
        switch_rows: list[dict] = []
        for i, m in enumerate(cfg.methods):
            model = build_method(base if i == 0 else make_base(), m, cfg, keep_base=False)
            describe(m, model)
            runner = Runner(model, cfg, config.vocab_size, device)
            runner.fill_context()
            measure(m, runner, cfg.warmup, keep=False)
            measure(m, runner, cfg.repeats, keep=True)
            if m in ("zflora", "lora", "lora-merged"):
                switch_rows += switch_study({m: model}, cfg, timer)
            del model, runner
            base = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result["switch"] = _switch_ratios(switch_rows)
    bar.close()

    rows = []
    for m in cfg.methods:
        for (phase, tokens), ss in samples[m].items():
            base_median = statistics.median(samples["base"][phase, tokens])
            rows.append(
                {
                    "method": m,
                    "phase": phase,
                    "tokens": tokens,
                    **summarize(ss),
                    "ratio_to_base": statistics.median(ss) / base_median,
                    "samples_ms": ss,
                }
            )
    result["end_to_end"] = rows
    result["memory"] = info
    result["targets"] = check_targets(result, cfg.rank, d)
    return result


def check_targets(result: dict[str, Any], rank: int, d: int) -> list[dict[str, Any]]:
    """The issue's targets, evaluated on this run's numbers (reported, never asserted)."""
    out = []
    bound = 1 + rank / d + 0.01
    for row in result["end_to_end"]:
        if row["method"] == "zflora":
            out.append(
                {
                    "target": f"zflora {row['phase']} {row['tokens']} <= {bound:.3f}x base (r/d + 1 point)",
                    "value": row["ratio_to_base"],
                    "met": row["ratio_to_base"] <= bound,
                }
            )
    big = [r for r in result["projection"] if r["variant"] == "zflora" and r["rank"] <= 64]
    base_ms = {(r["projection"], r["tokens"]): r["median_ms"] for r in result["projection"] if r["variant"] == "base"}
    big = [r for r in big if base_ms[r["projection"], r["tokens"]] >= 0.5]
    if big:
        worst = max(big, key=lambda r: r["ratio_to_base"])
        out.append(
            {
                "target": "one projection: zflora <= 1.05x base where base >= 0.5 ms, r <= 64",
                "value": worst["ratio_to_base"],
                "met": worst["ratio_to_base"] <= 1.05,
                "worst_case": f"{worst['projection']} tokens={worst['tokens']} r={worst['rank']}",
                "share_met": sum(r["ratio_to_base"] <= 1.05 for r in big) / len(big),
            }
        )
    sw = {r["operation"]: r for r in result["switch"]}
    hot, merged = sw.get("fused hot-swap, adapter in memory"), sw.get("merged LoRA: unmerge + merge another")
    if hot and merged:
        ratio = hot["median_ms"] / merged["median_ms"]
        out.append({"target": "zflora hot-swap <= 5% of merged-LoRA switch", "value": ratio, "met": ratio <= 0.05})
    return out


# --------------------------------------------------------------------------- report


def markdown(result: dict[str, Any]) -> str:
    env, st = result["environment"], result["settings"]
    name = st["model"] or st["preset"]
    lines = [
        f"**{name}** shape, {st['layers']} layers, d = {st['hidden_size']}, "
        f"r = {st['rank']}, {st['dtype']}, batch {st['batch']}; {env['hardware']} ({env['device']}, "
        f"{env['threads']} threads); torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}; "
        f"median of {st['repeats']} repetitions"
        + (
            ""
            if st["interleaved_methods"]
            else " (methods measured one at a time: they did not fit in memory together)"
        ),
        "",
    ]
    e2e = result["end_to_end"]
    phases = list(dict.fromkeys((r["phase"], r["tokens"]) for r in e2e))
    label = {p: f"prefill {p[1]}" if p[0] == "prefill" else f"decode @{p[1]}" for p in phases}
    head = [label[p] + " (x base)" for p in phases] + [label[p] + " ms" for p in phases]
    lines += ["| method | " + " | ".join(head) + " | trainable params | weights MB |", "|---" * (len(head) + 3) + "|"]
    for m in dict.fromkeys(r["method"] for r in e2e):
        by = {(r["phase"], r["tokens"]): r for r in e2e if r["method"] == m}
        ratios = [f"{by[p]['ratio_to_base']:.3f}" for p in phases]
        ms = [f"{by[p]['median_ms']:.1f} ({by[p]['p25_ms']:.1f}-{by[p]['p75_ms']:.1f})" for p in phases]
        mem = result["memory"][m]
        lines.append(
            f"| {m} | " + " | ".join(ratios + ms) + f" | {mem['trainable_parameters']:,} | {mem['weights_mb']:.1f} |"
        )
    if result["switch"]:
        lines += ["", "| adapter switch | median ms (IQR) | x merged-LoRA switch |", "|---|---|---|"]
        for r in result["switch"]:
            ratio = f"{r['ratio_to_merged_lora']:.4f}" if r["ratio_to_merged_lora"] is not None else "-"
            spread = f"{r['median_ms']:.2f} ({r['p25_ms']:.2f}-{r['p75_ms']:.2f})"
            lines.append(f"| {r['method']}: {r['operation']} | {spread} | {ratio} |")
    proj = result["projection"]
    if proj:
        ranks = sorted({r["rank"] for r in proj if r["rank"]})
        show = 64 if 64 in ranks else ranks[-1]
        lines += [
            "",
            f"One projection, r = {show}: median ms of base, then x base for each variant",
            "",
            "| projection | tokens | base ms | lora (4 ops) | naive fused | zflora |",
            "|---|---|---|---|---|---|",
        ]
        for name, tokens in dict.fromkeys((r["projection"], r["tokens"]) for r in proj):
            cell = {
                r["variant"]: r
                for r in proj
                if r["projection"] == name and r["tokens"] == tokens and r["rank"] in (None, show)
            }
            lines.append(
                f"| {name} | {tokens} | {cell['base']['median_ms']:.3f} | {cell['lora']['ratio_to_base']:.3f} | "
                f"{cell['naive-fused']['ratio_to_base']:.3f} | {cell['zflora']['ratio_to_base']:.3f} |"
            )
    if result["targets"]:
        lines += ["", "| target | value | met |", "|---|---|---|"]
        for t in result["targets"]:
            extra = f" (worst: {t['worst_case']}; met in {t['share_met']:.0%} of cases)" if "worst_case" in t else ""
            lines.append(f"| {t['target']} | {t['value']:.3f}{extra} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e2e, proj = result["end_to_end"], result["projection"]
    fig, axes = plt.subplots(1, 2 if proj else 1, figsize=(13 if proj else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    phases = list(dict.fromkeys((r["phase"], r["tokens"]) for r in e2e))
    methods = list(dict.fromkeys(r["method"] for r in e2e))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        vals = [
            next(r["ratio_to_base"] for r in e2e if r["method"] == m and (r["phase"], r["tokens"]) == p) for p in phases
        ]
        ax.bar([j + i * width for j in range(len(phases))], vals, width, label=m)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(phases))], [f"{p} {t}" for p, t in phases])
    ax.set_ylabel("latency / base")
    st = result["settings"]
    name = st["model"] or st["preset"]
    ax.set_title(f"End to end, {name} ({st['layers']} layers), r={st['rank']}, {st['dtype']}")
    ax.legend(fontsize=8)
    if proj:
        ax = axes[0][1]
        ranks = sorted({r["rank"] for r in proj if r["rank"]})
        show = 64 if 64 in ranks else ranks[-1]
        names = list(dict.fromkeys(r["projection"] for r in proj))
        colors = dict(zip(names, plt.get_cmap("tab10").colors, strict=False))  # colour: projection
        for variant, style in (("lora", "-"), ("naive-fused", ":"), ("zflora", "--")):  # style: variant
            for name in names:
                rows = [r for r in proj if (r["variant"], r["rank"], r["projection"]) == (variant, show, name)]
                xs, ys = [r["tokens"] for r in rows], [r["ratio_to_base"] for r in rows]
                ax.plot(xs, ys, style, color=colors[name], marker="o", markersize=3, label=f"{variant} {name}")
        ax.set_xscale("log")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("tokens")
        ax.set_ylabel("time / base linear")
        ax.set_title(f"One projection, r={show}")
        ax.legend(fontsize=6, ncol=3)
    env = result["environment"]
    fig.suptitle(f"{env['hardware']}, {env['threads']} threads, torch {env['torch']}", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_outputs(
    result: dict[str, Any],
    cfg: Any,
    render: Callable[[dict[str, Any]], str] | None = None,
    draw: Callable[[dict[str, Any], Path], None] | None = None,
) -> str:
    """Write what `cfg` asks for (JSON, Markdown, PNG chart), each atomically; return the Markdown."""
    text = (render or markdown)(result)
    if cfg.json_path:
        atomic_write(cfg.json_path, lambda tmp: tmp.write_text(json.dumps(result, indent=1, default=str) + "\n"))
    if cfg.markdown_path:
        atomic_write(cfg.markdown_path, lambda tmp: tmp.write_text(text))
    if cfg.chart_path:
        (draw or chart)(result, cfg.chart_path)
    return text
