"""`zflora serve-bench`: base vs vLLM LoRA vs zFLoRA, all in the same vLLM engine build.

Each method is a `vllm.LLM` on the same base checkpoint (a real model shape with
random weights, or a local checkpoint): base; vLLM's LoRA (`enable_lora`, the
same rank and target projections, a PEFT adapter with non-zero B); and the
zFLoRA plugin (`ZFLoRALlamaForCausalLM`, adapter fused at load). All engines are
alive together and measured in rotating order within every repetition, so drift
hits all alike (when they do not fit in memory together, one after another).

    ttft      one request of P prompt tokens, max_tokens=1: wall time of generate()
    decode    one request (prompt 128), 1 + N tokens; per-token decode is
              (time of that request - its own time to first token) / N, from
              vLLM's per-request timestamps (engine-core clock)
    batch B   B requests (prompt 128, T new tokens each) at once: output tokens / s

Prompts are fresh random token ids every time and prefix caching is off, so
nothing is served from a cache. Medians and interquartile ranges; ratios to base.
"""

from __future__ import annotations

import gc
import os
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import bench
from .adapter_io import atomic_write, save_adapter
from .bench import DTYPES, available_bytes, check_fields, environment, randomize_lora, rotated, summarize
from .config import ZFLoRAConfig, alpha_for
from .methods import lora_config
from .models import load_local_model, preset_config, random_model, require_local
from .serve import hf_overrides, require_vllm
from .transform import adapter_parameters, apply_zflora

METHODS = ("base", "lora", "zflora")
DECODE_PROMPT = 128


@dataclass
class ServeBenchConfig:
    preset: str = "llama-3.2-1b"
    model: Path | None = None  # a local checkpoint instead of a preset
    layers: int | None = None
    rank: int = 64
    alpha: float | None = None  # default 2 * rank
    targets: str = "all"  # "all" or "mha", the same for LoRA and zFLoRA
    dtype: str = "bf16"
    prompt_lens: tuple[int, ...] = (128, 512)
    decode_tokens: int = 16
    batch_sizes: tuple[int, ...] = (1, 4)
    batch_tokens: int = 8
    repeats: int = 5
    warmup: int = 1
    methods: tuple[str, ...] = METHODS
    enforce_eager: bool = False
    workdir: Path | None = None  # where the checkpoint and adapters are written (a temporary dir if None)
    seed: int = 0
    json_path: Path | None = None
    chart_path: Path | None = None
    markdown_path: Path | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        integers = ("rank", "decode_tokens", "batch_tokens", "repeats")
        check_fields(self, METHODS, integers, ("prompt_lens", "batch_sizes"))
        if self.targets not in ("all", "mha"):
            raise ValueError(f"targets: must be 'all' or 'mha', got {self.targets!r}")
        if self.alpha is None:
            self.alpha = alpha_for(self.rank)

    @property
    def max_model_len(self) -> int:
        return max(*self.prompt_lens, DECODE_PROMPT) + max(self.decode_tokens, self.batch_tokens) + 1


# --------------------------------------------------------------------------- checkpoints


def prepare_checkpoints(cfg: ServeBenchConfig, root: Path) -> dict[str, Path]:
    """Write the base checkpoint (for a preset), a PEFT LoRA adapter and a zFLoRA adapter, all non-zero."""
    dtype = DTYPES[cfg.dtype]
    if cfg.model is not None:
        base_dir = require_local(cfg.model)
        model = load_local_model(base_dir, dtype)
    else:
        base_dir = root / "base"
        model = random_model(preset_config(cfg.preset, cfg.layers), dtype, seed=cfg.seed)
        model.save_pretrained(base_dir)
    from peft import get_peft_model

    lora = get_peft_model(model, lora_config(cfg.rank, cfg.alpha, cfg.targets))
    randomize_lora(lora, cfg.seed + 1)
    lora.save_pretrained(root / "lora")
    model = lora.unload()
    apply_zflora(model, ZFLoRAConfig(r=cfg.rank, alpha=cfg.alpha, targets=cfg.targets))
    g = torch.Generator().manual_seed(cfg.seed + 2)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    save_adapter(model, root / "zflora")
    del model, lora
    gc.collect()
    return {"base": base_dir, "lora": root / "lora", "zflora": root / "zflora"}


# --------------------------------------------------------------------------- engines


class Engine:
    """One `vllm.LLM` for one method, with the request that method needs."""

    def __init__(self, method: str, paths: dict[str, Path], cfg: ServeBenchConfig, share: float) -> None:
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=str(paths["base"]),
            skip_tokenizer_init=True,
            dtype=str(DTYPES[cfg.dtype]).removeprefix("torch."),  # vLLM's names: bfloat16, float16, float32
            max_model_len=cfg.max_model_len,
            max_num_seqs=max(cfg.batch_sizes),
            enable_prefix_caching=False,
            enforce_eager=cfg.enforce_eager,
            disable_log_stats=False,  # per-request timestamps
            seed=cfg.seed,
        )
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = 0.85 * share  # engines that live together split the GPU
        self.lora = None
        self.decode_timing = ""
        if method == "lora":
            from vllm.lora.request import LoRARequest

            kwargs.update(enable_lora=True, max_lora_rank=cfg.rank, max_loras=1)
            self.lora = LoRARequest("bench", 1, str(paths["lora"]))
        elif method == "zflora":
            kwargs["hf_overrides"] = hf_overrides(paths["zflora"], paths["base"])
        t = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.startup_s = time.perf_counter() - t
        self.vocab = self.llm.llm_engine.model_config.get_vocab_size()

    def generate(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[Any]]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t = time.perf_counter()
        out = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompts], params, lora_request=self.lora, use_tqdm=False
        )
        return (time.perf_counter() - t) * 1e3, out


def _decode_ms(output: Any, n: int) -> float | None:
    """Per-token decode time of a request of 1 + n tokens from vLLM's per-request (engine-core) timestamps."""
    m = getattr(output, "metrics", None)
    if m is not None and getattr(m, "last_token_ts", 0) > getattr(m, "first_token_ts", 0) > 0:
        return (m.last_token_ts - m.first_token_ts) * 1e3 / n
    return None


def measure(engine: Engine, cfg: ServeBenchConfig, rng: random.Random, out: dict[tuple, list[float]]) -> None:
    def prompt(n: int) -> list[int]:
        return [rng.randrange(engine.vocab) for _ in range(n)]

    for p in cfg.prompt_lens:
        ms, _ = engine.generate([prompt(p)], 1)
        out[("ttft", p)].append(ms)
    wall, res = engine.generate([prompt(DECODE_PROMPT)], 1 + cfg.decode_tokens)
    ms, engine.decode_timing = _decode_ms(res[0], cfg.decode_tokens), "vLLM request timestamps"
    if ms is None:  # a vLLM without per-request timestamps: wall time less a separate request's prefill
        ttft, _ = engine.generate([prompt(DECODE_PROMPT)], 1)
        ms, engine.decode_timing = (wall - ttft) / cfg.decode_tokens, "wall time less a separate request's TTFT"
    out[("decode", 1)].append(ms)
    for b in cfg.batch_sizes:
        ms, _ = engine.generate([prompt(DECODE_PROMPT) for _ in range(b)], cfg.batch_tokens)
        out[("throughput", b)].append(b * cfg.batch_tokens / (ms / 1e3))  # output tokens / s


def _fit_together(cfg: ServeBenchConfig, base: Path) -> bool:
    """Whether one engine per method fits in memory at once (weights, plus the KV cache on a CPU)."""
    weights = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    if torch.cuda.is_available():
        return len(cfg.methods) * weights * 1.2 < 0.5 * available_bytes(torch.device("cuda"))
    kv = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")) * (1 << 30)
    return len(cfg.methods) * (weights * 1.1 + kv) < 0.8 * available_bytes(torch.device("cpu"))


def run(cfg: ServeBenchConfig) -> dict[str, Any]:
    require_vllm()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine on a CPU; ample for these requests
    import vllm

    with tempfile.TemporaryDirectory(prefix="zflora-serve-bench-", dir=cfg.workdir) as tmp:
        paths = prepare_checkpoints(cfg, Path(tmp))
        together = _fit_together(cfg, paths["base"])
        samples: dict[str, dict[tuple, list[float]]] = {}
        startup: dict[str, float] = {}
        decode_timing: dict[str, str] = {}
        rng = random.Random(cfg.seed)
        rounds = cfg.warmup + cfg.repeats
        bar = tqdm(total=rounds * len(cfg.methods), desc="serve-bench", disable=not cfg.progress)

        def measured(engine: Engine, method: str, rep: int) -> None:
            into = samples.setdefault(method, _empty(cfg))
            measure(engine, cfg, rng, into if rep >= cfg.warmup else _empty(cfg))
            decode_timing[method] = engine.decode_timing
            bar.update(1)

        if together:
            engines = {m: Engine(m, paths, cfg, 1 / len(cfg.methods)) for m in cfg.methods}
            startup = {m: e.startup_s for m, e in engines.items()}
            for rep in range(rounds):
                for m in rotated(list(cfg.methods), rep):
                    measured(engines[m], m, rep)
            del engines
        else:
            for m in cfg.methods:
                engine = Engine(m, paths, cfg, 1.0)
                startup[m] = engine.startup_s
                for rep in range(rounds):
                    measured(engine, m, rep)
                del engine
                gc.collect()
        bar.close()
    rows = _rows(samples)
    env = environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"), cfg.dtype)
    env.update(vllm=vllm.__version__, engine="vLLM")
    return {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "environment": env,
        "interleaved": together,
        "startup_s": startup,
        "decode_timing": decode_timing,
        "rows": rows,
        "targets": check_targets(rows),
        "samples": {m: {f"{k[0]}@{k[1]}": v for k, v in s.items()} for m, s in samples.items()},
    }


def _empty(cfg: ServeBenchConfig) -> dict[tuple, list[float]]:
    keys = [("ttft", p) for p in cfg.prompt_lens] + [("decode", 1)] + [("throughput", b) for b in cfg.batch_sizes]
    return {k: [] for k in keys}


def _rows(samples: dict[str, dict[tuple, list[float]]]) -> list[dict[str, Any]]:
    rows = []
    base = {k: statistics.median(v) for k, v in samples["base"].items()}
    for method, by_key in samples.items():
        for (phase, size), values in by_key.items():
            s = summarize(values)
            unit = "tokens/s" if phase == "throughput" else "ms"
            # Latency ratios: method / base (higher is slower). Throughput: base / method, so that
            # every ratio reads the same way: 1.10 means 10% slower than base.
            ratio = s["median_ms"] / base[(phase, size)]
            if phase == "throughput":
                ratio = 1.0 / ratio
            rows.append({
                "method": method, "phase": phase, "size": size, "unit": unit, "median": s["median_ms"],
                "p25": s["p25_ms"], "p75": s["p75_ms"], "n": s["n"], "slowdown_vs_base": ratio,
            })  # fmt: skip
    return rows


def check_targets(rows: list[dict[str, Any]], limit: float = 1.05) -> list[dict[str, Any]]:
    """The issue's targets: zFLoRA within 5% of base for time to first token and per-token decode."""
    out = []
    for r in rows:
        if r["method"] == "zflora" and r["phase"] in ("ttft", "decode"):
            what = f"zflora {r['phase']} {'prompt ' if r['phase'] == 'ttft' else 'batch '}{r['size']}"
            out.append({"target": f"{what} <= {limit:.2f}x base", "value": r["slowdown_vs_base"],
                        "met": r["slowdown_vs_base"] <= limit})  # fmt: skip
    return out


# --------------------------------------------------------------------------- reports

PHASE_NAMES = {"ttft": "time to first token, prompt {}", "decode": "decode per token, batch {}",
               "throughput": "throughput, batch {}"}  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    st, env = result["settings"], result["environment"]
    name = st["model"] or st["preset"]
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    lines = [
        f"# zflora serve-bench: {name}, r={st['rank']} ({st['targets']}), {st['dtype']}, vLLM {env['vllm']}",
        "",
        f"{env['hardware']} ({env['cpu_count']} CPUs), torch {env['torch']}, {env['date']}. "
        f"{'Interleaved' if result['interleaved'] else 'One engine after another'}, "
        f"{st['repeats']} repetitions after {st['warmup']} warm-up; medians (quartiles and every sample in the "
        "JSON); x base = slowdown (throughput: base / method).",
        "",
        "| measure | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    keys = list(dict.fromkeys((r["phase"], r["size"]) for r in result["rows"]))
    for phase, size in keys:
        cells = []
        for m in methods:
            r = next(x for x in result["rows"] if (x["method"], x["phase"], x["size"]) == (m, phase, size))
            fmt = "{:.1f}" if r["unit"] == "tokens/s" else "{:.1f} ms"
            cell = fmt.format(r["median"])
            cells.append(cell if m == "base" else f"{cell} ({r['slowdown_vs_base']:.3f}x)")
        unit = " (tokens/s)" if phase == "throughput" else ""
        lines.append(f"| {PHASE_NAMES[phase].format(size)}{unit} | " + " | ".join(cells) + " |")
    lines += ["", "Engine start-up (s): " + ", ".join(f"{m} {s:.1f}" for m, s in result["startup_s"].items()), ""]
    sources = sorted(set(result.get("decode_timing", {}).values()))
    if sources:
        lines += [f"Decode per token from: {'; '.join(sources)}.", ""]
    lines += ["Targets:", ""]
    lines += [f"- {t['target']}: {t['value']:.3f} -> {'met' if t['met'] else 'MISSED'}" for t in result["targets"]]
    return "\n".join(lines) + "\n"


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["method"] != "base"]
    keys = list(dict.fromkeys((r["phase"], r["size"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        vals = [next(r["slowdown_vs_base"] for r in rows if r["method"] == m and (r["phase"], r["size"]) == k)
                for k in keys]  # fmt: skip
        bars = ax.bar([j + i * width for j in range(len(keys))], vals, width, label=f"vLLM {m}")
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    if max(r["slowdown_vs_base"] for r in rows) > 3:
        ax.set_yscale("log")  # LoRA on a CPU is an order of magnitude off; keep zFLoRA's bars readable
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(1.05, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], [f"{p}\n{s}" for p, s in keys])
    ax.set_ylabel("slowdown vs vLLM base")
    st, env = result["settings"], result["environment"]
    ax.set_title(f"vLLM {env['vllm']}: {st['model'] or st['preset']}, r={st['rank']} ({st['targets']}), {st['dtype']}")
    ax.legend(fontsize=8)
    fig.suptitle(f"{env['hardware']}, torch {env['torch']}", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_outputs(result: dict[str, Any], cfg: ServeBenchConfig) -> str:
    return bench.write_outputs(result, cfg, markdown, chart)
