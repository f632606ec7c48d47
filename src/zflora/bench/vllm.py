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
    batch B   B requests (prompt 128, T new tokens each) at once: wall time per output token
              (its inverse is the throughput, tokens / s, shown beside it)

Prompts are fresh random token ids every time and prefix caching is off, so
nothing is served from a cache. Medians and interquartile ranges; ratios to base.
"""

from __future__ import annotations

import gc
import os
import random
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..adapter_io import save_adapter, set_adapter
from ..charts import figure, save_figure
from ..config import ZFLoRAConfig, check_alpha
from ..hardware import auto_dtype, describe_machine, environment
from ..methods import lora_config, random_adapter, randomize_lora
from ..models import load_local_model, preset_config, random_model, require_local, torch_dtype
from ..serve import hf_overrides, require_vllm
from ..transform import apply_zflora
from .config import ServeBenchConfig
from .harness import available_bytes, rotated
from .report import Key, bar_chart, md_table, rows, target, targets_table, write_outputs

DECODE_PROMPT = 128


def max_model_len(cfg: ServeBenchConfig) -> int:
    return max(*cfg.prompt_lens, DECODE_PROMPT) + max(cfg.decode_tokens, cfg.batch_tokens) + 1


# --------------------------------------------------------------------------- checkpoints


def prepare_checkpoints(cfg: Any, dtype: torch.dtype, root: Path) -> dict[str, Path]:
    """Write the base checkpoint (for a preset), a PEFT LoRA adapter and a zFLoRA adapter, all non-zero."""
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
    save_adapter(set_adapter(model, random_adapter(model, cfg.seed + 2)), root / "zflora")
    del model, lora
    gc.collect()
    return {"base": base_dir, "lora": root / "lora", "zflora": root / "zflora"}


# --------------------------------------------------------------------------- engines


class Engine:
    """One `vllm.LLM` for one method, with the request that method needs."""

    def __init__(self, method: str, paths: dict[str, Path], cfg: ServeBenchConfig, dtype: str, share: float) -> None:
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=str(paths["base"]),
            skip_tokenizer_init=True,
            dtype=str(torch_dtype(dtype)).removeprefix("torch."),  # vLLM's names: bfloat16, float16, float32
            max_model_len=max_model_len(cfg),
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


def measure(engine: Engine, cfg: ServeBenchConfig, rng: random.Random, out: dict[Key, list[float]]) -> None:
    def prompt(n: int) -> list[int]:
        return [rng.randrange(engine.vocab) for _ in range(n)]

    for p in cfg.prompt_lens:
        ms, _ = engine.generate([prompt(p)], 1)
        out["ttft", p, 1].append(ms)
    wall, res = engine.generate([prompt(DECODE_PROMPT)], 1 + cfg.decode_tokens)
    ms, engine.decode_timing = _decode_ms(res[0], cfg.decode_tokens), "vLLM request timestamps"
    if ms is None:  # a vLLM without per-request timestamps: wall time less a separate request's prefill
        ttft, _ = engine.generate([prompt(DECODE_PROMPT)], 1)
        ms, engine.decode_timing = (wall - ttft) / cfg.decode_tokens, "wall time less a separate request's TTFT"
    out["decode", DECODE_PROMPT, 1].append(ms)
    for b in cfg.batch_sizes:
        ms, _ = engine.generate([prompt(DECODE_PROMPT) for _ in range(b)], cfg.batch_tokens)
        out["batch", DECODE_PROMPT, b].append(ms / (b * cfg.batch_tokens))  # wall ms per output token


def fit_together(cfg: Any, base: Path, kv_cache_gib: float, process_gib: float = 0.0) -> bool:
    """Whether one engine per method in `cfg.methods` fits in memory at once: weights, plus on a CPU each
    engine's KV cache and `process_gib` per engine that runs as a process of its own."""
    weights = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    if torch.cuda.is_available():
        return len(cfg.methods) * weights * 1.2 < 0.5 * available_bytes(torch.device("cuda"))
    per_engine = weights * 1.1 + (kv_cache_gib + process_gib) * (1 << 30)
    return len(cfg.methods) * per_engine < 0.8 * available_bytes(torch.device("cpu"))


class Rounds:
    """The measured rounds of every engine, with the warm-up rounds discarded."""

    def __init__(self, cfg: ServeBenchConfig, bar: tqdm) -> None:
        self.cfg, self.bar, self.rng = cfg, bar, random.Random(cfg.seed)
        self.samples: dict[str, dict[Key, list[float]]] = {m: empty_samples(cfg) for m in cfg.methods}
        self.startup: dict[str, float] = {}
        self.decode_timing: dict[str, str] = {}

    def __call__(self, engine: Engine, method: str, rep: int) -> None:
        into = self.samples[method] if rep >= self.cfg.warmup else empty_samples(self.cfg)
        measure(engine, self.cfg, self.rng, into)
        self.decode_timing[method] = engine.decode_timing
        self.bar.update(1)

    def interleaved(self, paths: dict[str, Path], dtype: str) -> None:
        methods = list(self.cfg.methods)
        engines = {m: Engine(m, paths, self.cfg, dtype, 1 / len(methods)) for m in methods}
        self.startup = {m: e.startup_s for m, e in engines.items()}
        for rep in range(self.cfg.warmup + self.cfg.repeats):
            for m in rotated(methods, rep):
                self(engines[m], m, rep)

    def one_at_a_time(self, paths: dict[str, Path], dtype: str) -> None:
        for m in self.cfg.methods:
            engine = Engine(m, paths, self.cfg, dtype, 1.0)
            self.startup[m] = engine.startup_s
            for rep in range(self.cfg.warmup + self.cfg.repeats):
                self(engine, m, rep)
            del engine
            gc.collect()


def empty_samples(cfg: ServeBenchConfig) -> dict[Key, list[float]]:
    keys = [("ttft", p, 1) for p in cfg.prompt_lens] + [("decode", DECODE_PROMPT, 1)]
    return {k: [] for k in keys + [("batch", DECODE_PROMPT, b) for b in cfg.batch_sizes]}


def run(cfg: ServeBenchConfig) -> dict[str, Any]:
    require_vllm()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine on a CPU; ample for these requests
    import vllm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = auto_dtype(cfg.dtype, device)
    bar = tqdm(total=(cfg.warmup + cfg.repeats) * len(cfg.methods), desc="serve-bench", disable=not cfg.progress)
    rounds = Rounds(cfg, bar)
    with tempfile.TemporaryDirectory(prefix="zflora-serve-bench-", dir=cfg.workdir) as tmp:
        paths = prepare_checkpoints(cfg, torch_dtype(dtype), Path(tmp))
        together = fit_together(cfg, paths["base"], float(os.environ["VLLM_CPU_KVCACHE_SPACE"]))
        rounds.interleaved(paths, dtype) if together else rounds.one_at_a_time(paths, dtype)
    bar.close()
    result_rows = rows(rounds.samples)
    env = environment(device, dtype) | {"vllm": vllm.__version__, "engine": "vLLM"}
    settings = asdict(cfg) | {"dtype": dtype, "dtype_requested": cfg.dtype, "alpha": check_alpha(cfg.alpha, cfg.rank)}
    return {"settings": settings, "environment": env, "interleaved": together, "startup_s": rounds.startup,
            "decode_timing": rounds.decode_timing, "rows": result_rows,
            "targets": check_targets(result_rows)}  # fmt: skip


def check_targets(result_rows: list[dict[str, Any]], limit: float = 1.05) -> list[dict[str, Any]]:
    """zFLoRA within 5% of base for time to first token and per-token decode."""
    return [target(f"zflora {r['phase']} {r['tokens']} tokens / base", r["ratio_to_base"], limit)
            for r in result_rows if r["method"] == "zflora" and r["phase"] in ("ttft", "decode")]  # fmt: skip


# --------------------------------------------------------------------------- reports

PHASE_NAMES = {"ttft": "time to first token, prompt {tokens}", "decode": "decode per token, after {tokens}",
               "batch": "batch {batch}: ms per output token (tokens/s)"}  # fmt: skip


def _cell(r: dict[str, Any]) -> str:
    cell = f"{r['median_ms']:.1f} ms"
    if r["phase"] == "batch":
        cell = f"{r['median_ms']:.1f} ms ({1e3 / r['median_ms']:.1f}/s)"
    return cell if r["method"] == "base" else f"{cell}, {r['ratio_to_base']:.3f}x"


def markdown(result: dict[str, Any]) -> str:
    st, env = result["settings"], result["environment"]
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    keys = list(dict.fromkeys((r["phase"], r["tokens"], r["batch"]) for r in result["rows"]))
    by = {(r["method"], r["phase"], r["tokens"], r["batch"]): r for r in result["rows"]}
    body = [[PHASE_NAMES[p].format(tokens=t, batch=b), *(_cell(by[m, p, t, b]) for m in methods)] for p, t, b in keys]
    order = "Interleaved" if result["interleaved"] else "One engine after another"
    lines = [
        f"# zflora serve-bench: {st['model'] or st['preset']}, r={st['rank']} ({st['targets']}), vLLM {env['vllm']}",
        "",
        f"{describe_machine(env)}; {env['date']}. {order}, {st['repeats']} repetitions after {st['warmup']} "
        "warm-up; medians (quartiles and every sample in the JSON); x = method / base, higher is slower.",
        "",
        *md_table(["measure", *methods], body),
        "",
        "Engine start-up (s): " + ", ".join(f"{m} {s:.1f}" for m, s in result["startup_s"].items()),
    ]  # fmt: skip
    sources = sorted(set(result.get("decode_timing", {}).values()))
    if sources:
        lines += ["", f"Decode per token from: {'; '.join(sources)}."]
    return "\n".join(lines + targets_table(result["targets"])) + "\n"


def chart(result: dict[str, Any], path: Path) -> None:
    fig, (ax,) = figure(1, 9)
    shown = [r for r in result["rows"] if r["method"] != "base"]
    bar_chart(
        ax,
        shown,
        lambda r: f"{r['phase']}\n{r['tokens'] if r['phase'] != 'batch' else r['batch']}",
        log=max(r["ratio_to_base"] for r in shown) > 3,
    )  # LoRA on a CPU is off by 10x: keep zFLoRA readable
    ax.axhline(1.05, color="grey", linewidth=0.8, linestyle=":")
    st, env = result["settings"], result["environment"]
    ax.set_title(f"vLLM {env['vllm']}: {st['model'] or st['preset']}, r={st['rank']} ({st['targets']}), {st['dtype']}")
    fig.suptitle(describe_machine(env), fontsize=8)
    save_figure(fig, path)


def main(cfg: ServeBenchConfig) -> None:
    print(write_outputs(run(cfg), cfg, markdown, chart))
