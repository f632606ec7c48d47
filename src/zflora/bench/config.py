"""Benchmark configs, validated on construction. No heavy imports: the CLI builds its flags from these."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import BENCH_RANK, DTYPES, METHODS, SMALL_RANK, check_alpha, check_dtype, positive_int
from ..presets import PRESETS

# `zflora bench`: every method it can run, and the headline comparison it runs by default.
E2E_METHODS = ("base", "lora", "lora-merged", "lora-mha", "zflora", "zflora-mha")
HEADLINE_METHODS = ("base", "lora", "zflora")
COMPILE_METHODS = ("base", "lora", "lora-merged", "zflora", "zflora-mha")  # `zflora bench --compile`
ONNX_METHODS = ("base", "lora", "lora-merged", "zflora", "zflora-mha")  # `zflora bench --engine onnxruntime`
INT4_METHODS = ("base", "lora", "lora-merged", "zflora", "zflora-mha")  # `zflora bench --quantize int4`
ONNX_PRECISIONS = ("fp32", "int8", "int4", "int8-dynamic")
ENGINES = ("transformers", "onnxruntime")
# `zflora serve-bench`: vLLM's base, vLLM's own LoRA, the zFLoRA plugin.
SERVE_METHODS = ("base", "lora", "zflora")
# `zflora mixed-bench`: many adapters in one batch.
MIXED_METHODS = ("base", "zflora-stacked", "lora-mixed")
assert set(E2E_METHODS) - {"lora-merged"} <= set(METHODS)


def check_common(cfg: Any, methods: tuple[str, ...], integers: tuple[str, ...], lists: tuple[str, ...]) -> None:
    """Checks every benchmark config shares: positive integers (and non-empty lists of them), layers,
    warm-up, dtype, alpha, methods (base among them) and the preset name."""
    for name in integers:
        positive_int(name, getattr(cfg, name))
    for name in lists:
        if not getattr(cfg, name):
            raise ValueError(f"{name}: must not be empty")
        for v in getattr(cfg, name):
            positive_int(name, v)
    if cfg.layers is not None:
        positive_int("layers", cfg.layers)
    if cfg.warmup < 0:
        raise ValueError(f"warmup: must be >= 0, got {cfg.warmup}")
    check_dtype("dtype", cfg.dtype)
    check_alpha(cfg.alpha, cfg.rank)
    unknown = [m for m in cfg.methods if m not in methods]
    if unknown or "base" not in cfg.methods:
        raise ValueError(f"methods: must include 'base' and come from {', '.join(methods)}; got {list(cfg.methods)}")
    if cfg.model is None and cfg.preset not in PRESETS:
        raise ValueError(f"preset: unknown {cfg.preset!r}; accepted: {', '.join(PRESETS)}")


@dataclass
class ModelShape:
    """The model every benchmark measures: a preset shape with random weights, or a local checkpoint."""

    preset: str = field(default="llama-3.2-1b", metadata={"help": "real model shape, random weights",
                                                          "choices": tuple(PRESETS)})  # fmt: skip
    model: Path | None = field(default=None, metadata={"help": "a local checkpoint instead of a preset"})
    layers: int | None = field(default=None, metadata={"help": "cut the depth to N layers (recorded)"})
    rank: int = BENCH_RANK
    alpha: float | None = field(default=None, metadata={"help": "default 2 * rank"})
    dtype: str = field(default="auto", metadata={"help": "auto: bf16 where the hardware runs it natively, else fp32",
                                                 "choices": ("auto", *DTYPES)})  # fmt: skip


@dataclass
class Outputs:
    """What a benchmark writes (each optional, atomically) and how it runs: seed, progress bar."""

    seed: int = 0
    json_path: Path | None = field(default=None, metadata={"flag": "json", "help": "every raw sample, the machine"})
    chart_path: Path | None = field(default=None, metadata={"flag": "chart", "help": "a PNG chart"})
    markdown_path: Path | None = field(default=None, metadata={"flag": "markdown", "help": "the tables"})
    progress: bool = True


@dataclass
class BenchConfig(Outputs, ModelShape):
    """`zflora bench`: base vs LoRA vs zFLoRA latency in Hugging Face transformers."""

    batch: int = 1
    prompt_lens: tuple[int, ...] = field(default=(128, 512), metadata={"help": "prefill lengths"})
    decode_context: int = field(default=512, metadata={"help": "KV-cache length for the decode steps"})
    decode_steps: int = field(default=8, metadata={"help": "timed decode steps per repetition and method"})
    repeats: int = 3
    warmup: int = field(default=1, metadata={"help": "untimed repetitions first"})
    full: bool = field(default=False, metadata={"help": "the full study: every method, the one-projection "
                                                        "sweep, 5 repetitions after 2 warm-up"})  # fmt: skip
    methods: tuple[str, ...] = field(default=(), metadata={"help": f"default {','.join(HEADLINE_METHODS)} "
                                                                   f"(--full: {','.join(E2E_METHODS)}; --compile: "
                                                                   f"{','.join(COMPILE_METHODS)})"})  # fmt: skip
    engine: str = field(
        default="transformers",
        metadata={
            "choices": ENGINES,
            "help": "onnxruntime: each method exported to ONNX, run on its CPU execution provider",
        },
    )
    precisions: tuple[str, ...] = field(
        default=("fp32", "int8", "int4"),
        metadata={"help": "onnxruntime: fp32, int8 / int4 (block-wise MatMulNBits, adapter-only swaps), "
                          "int8-dynamic (quantize_dynamic)"},
    )  # fmt: skip
    accuracy_level: int | None = field(default=None, metadata={"help": "onnxruntime int8 / int4: MatMulNBits "
                                                                       "accuracy_level (default: 4 for int8, 1 "
                                                                       "for int4)"})  # fmt: skip
    quantize: str | None = field(default=None, metadata={"choices": ("int4",), "help": "transformers: every "
                                                         "method's projections int4 weight-only on PyTorch's CPU "
                                                         "kernel (zflora.weight_only), activations in --dtype; "
                                                         f"methods from {','.join(INT4_METHODS)}"})  # fmt: skip
    compile: bool = field(default=False, metadata={"help": "every method compiled (zflora.compile); compile time and "
                                                           "adapter swaps under compile"})  # fmt: skip
    freeze: bool = field(default=False, metadata={"help": "with --compile: inductor weight freezing (no swaps)"})
    pad_to: int | None = field(default=None, metadata={"help": "fused zFLoRA: widen the stream with zero channels "
                                                               "to a multiple of N (a faster GEMM width)"})  # fmt: skip
    proj_tokens: tuple[int, ...] = (1, 16, 128, 512, 2048)
    proj_ranks: tuple[int, ...] = (8, 16, 32, 64, 128)
    proj_repeats: int = 5
    device: str = field(default="auto", metadata={"choices": ("auto", "cpu", "cuda")})
    threads: int | None = field(default=None, metadata={"help": "CPU threads (default: all cores)"})

    def __post_init__(self) -> None:
        if self.full:
            self.methods = self.methods or E2E_METHODS
            self.repeats, self.warmup = max(self.repeats, 5), max(self.warmup, 2)
        if self.freeze and not self.compile:
            raise ValueError("freeze: only with compile")
        if self.engine not in ENGINES:
            raise ValueError(f"engine: must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        onnx = self.engine == "onnxruntime"
        if onnx and (self.compile or self.full):
            raise ValueError("engine: onnxruntime runs the end-to-end comparison only (no --compile, no --full)")
        if self.pad_to is not None:
            positive_int("pad_to", self.pad_to)
        if onnx and self.pad_to is not None:
            raise ValueError("pad_to: an ONNX export is fused unpadded (see zflora.fuse)")
        if onnx and self.dtype not in ("auto", "fp32"):  # honoured or refused, never ignored
            raise ValueError(f"dtype: onnxruntime exports run in fp32 (int8 by --precisions), not {self.dtype}")
        if bad := [p for p in self.precisions if p not in ONNX_PRECISIONS] or not self.precisions:
            raise ValueError(f"precisions: from {', '.join(ONNX_PRECISIONS)}, got {bad or 'none'}")
        if onnx and (bad := [m for m in self.methods if m not in ONNX_METHODS]):
            raise ValueError(f"methods: onnxruntime runs {', '.join(ONNX_METHODS)}; got {bad}")
        if self.quantize is not None:
            if onnx or self.compile or self.full or self.pad_to is not None:
                raise ValueError(
                    "quantize: the transformers engine's end-to-end comparison only (no --engine "
                    "onnxruntime, --compile, --full or --pad-to: quantize pads the stream itself)"
                )
            if bad := [m for m in self.methods if m not in INT4_METHODS]:
                raise ValueError(f"methods: --quantize int4 runs {', '.join(INT4_METHODS)}; got {bad}")
        default = ONNX_METHODS if onnx else COMPILE_METHODS if self.compile else HEADLINE_METHODS
        default = ("base", "lora", "lora-merged", "zflora") if self.quantize else default
        self.methods = tuple(self.methods) or default
        check_common(
            self, E2E_METHODS, ("rank", "batch", "decode_context", "decode_steps", "repeats", "proj_repeats"),
            ("prompt_lens", "proj_tokens", "proj_ranks"),
        )  # fmt: skip
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: must be auto, cpu or cuda, got {self.device!r}")
        if self.threads is not None:
            positive_int("threads", self.threads)


@dataclass
class VllmMethods:
    """What both vLLM benchmarks (`serve-bench`, `serve-load`) compare and how vLLM runs them."""

    targets: str = field(default="all", metadata={"help": "projections, the same for LoRA and zFLoRA",
                                                  "choices": ("all", "mha")})  # fmt: skip
    methods: tuple[str, ...] = SERVE_METHODS
    enforce_eager: bool = field(default=False, metadata={"help": "no torch.compile / CUDA graphs (every method)"})
    workdir: Path | None = field(default=None, metadata={"help": "where to write checkpoints, adapters and logs"})

    def check_targets(self) -> None:
        if self.targets not in ("all", "mha"):
            raise ValueError(f"targets: must be 'all' or 'mha', got {self.targets!r}")


@dataclass
class ServeBenchConfig(VllmMethods, Outputs, ModelShape):
    """`zflora serve-bench`: base vs vLLM LoRA vs the zFLoRA plugin, in one vLLM build."""

    prompt_lens: tuple[int, ...] = field(default=(128, 512), metadata={"help": "time-to-first-token prompt lengths"})
    decode_tokens: int = field(default=16, metadata={"help": "timed decode tokens per request"})
    batch_sizes: tuple[int, ...] = field(default=(1, 4), metadata={"help": "throughput batch sizes"})
    batch_tokens: int = field(default=8, metadata={"help": "new tokens per request in batches"})
    repeats: int = 5
    warmup: int = field(default=1, metadata={"help": "untimed rounds first"})

    def __post_init__(self) -> None:
        check_common(self, SERVE_METHODS, ("rank", "decode_tokens", "batch_tokens", "repeats"),
                     ("prompt_lens", "batch_sizes"))  # fmt: skip
        self.check_targets()


@dataclass
class ServeLoadConfig(VllmMethods, Outputs, ModelShape):
    """`zflora serve-load`: base vs vLLM LoRA vs the zFLoRA plugin behind vLLM's OpenAI server, under load from
    concurrent clients (vLLM's own load generator), on a checkpoint with a tokenizer."""

    model: Path | None = field(
        default=Path("smollm2-135m-instruct"),
        metadata={"help": "a local checkpoint with its tokenizer, or a fetched model's name"},
    )
    rank: int = 16
    concurrency: tuple[int, ...] = field(default=(1, 4, 16), metadata={"help": "concurrent clients (one run each)"})
    requests_per_client: int = field(default=4, metadata={"help": "requests per client in a run"})
    input_len: int = field(default=128, metadata={"help": "prompt tokens per request (random, the same for all)"})
    output_len: int = field(default=64, metadata={"help": "output tokens per request (EOS ignored)"})
    repeats: int = 3
    warmup: int = field(default=1, metadata={"help": "untimed rounds first"})
    pad_to: int | None = field(default=None, metadata={"help": "zFLoRA's stream widened with zero channels to a "
                                                               "multiple of N (a faster GEMM width)"})  # fmt: skip
    kv_cache_gib: int = field(default=1, metadata={"help": "CPU: each server's KV cache (VLLM_CPU_KVCACHE_SPACE)"})
    startup_timeout: int = field(default=900, metadata={"help": "seconds a server may take to answer /health"})

    def __post_init__(self) -> None:
        if self.model is None:
            raise ValueError("model: serve-load needs a checkpoint with its tokenizer (the OpenAI server takes "
                             "text), e.g. --model smollm2-135m-instruct")  # fmt: skip
        if self.layers is not None:
            raise ValueError("layers: serve-load serves the whole checkpoint")
        check_common(self, SERVE_METHODS, ("rank", "requests_per_client", "input_len", "output_len", "repeats",
                                           "kv_cache_gib", "startup_timeout"), ("concurrency",))  # fmt: skip
        self.check_targets()
        if self.pad_to is not None:
            positive_int("pad_to", self.pad_to)


# `zflora bench-engines`: the engines it compares, each run by its own benchmark in a process of its own.
ENGINE_RUNS = ("eager", "compile", "onnxruntime", "vllm")


@dataclass
class EnginesConfig(Outputs, ModelShape):
    """`zflora bench-engines`: one table of base, merged and unmerged LoRA, zFLoRA and zFLoRA-MHA in every engine
    (eager transformers, torch.compile, ONNX Runtime, vLLM) at several batch sizes, from one command."""

    rank: int = 16
    engines: tuple[str, ...] = field(
        default=(), metadata={"help": f"from {','.join(ENGINE_RUNS)} (default: every engine installed)"}
    )
    batches: tuple[int, ...] = field(default=(1, 8), metadata={"help": "batch sizes (one run per engine and batch)"})
    precisions: tuple[str, ...] = field(default=("fp32", "int8"), metadata={"help": "ONNX Runtime precisions"})
    prompt_lens: tuple[int, ...] = field(default=(128, 512), metadata={"help": "time-to-first-token prompt lengths"})
    decode_context: int = field(default=512, metadata={"help": "KV-cache length for the decode steps"})
    decode_steps: int = field(default=8, metadata={"help": "timed decode steps per repetition and method"})
    repeats: int = 3
    warmup: int = field(default=1, metadata={"help": "untimed repetitions first"})
    vllm_python: Path | None = field(default=None, metadata={"help": "the Python of an environment with vLLM "
                                                                     "(default: this one if it has vLLM, else "
                                                                     ".venv-vllm/bin/python if present)"})  # fmt: skip
    threads: int | None = field(default=None, metadata={"help": "CPU threads (default: all cores)"})

    def __post_init__(self) -> None:
        if bad := [e for e in self.engines if e not in ENGINE_RUNS]:
            raise ValueError(f"engines: from {', '.join(ENGINE_RUNS)}, got {bad}")
        if bad := [p for p in self.precisions if p not in ONNX_PRECISIONS] or not self.precisions:
            raise ValueError(f"precisions: from {', '.join(ONNX_PRECISIONS)}, got {bad or 'none'}")
        onnx = not self.engines or "onnxruntime" in self.engines
        if onnx and self.dtype not in ("auto", "fp32"):  # every engine honours the dtype or the run is refused
            raise ValueError(f"dtype: ONNX Runtime runs fp32 (and int8 / int4), not {self.dtype}; choose --engines "
                             "without onnxruntime, or --dtype auto / fp32")  # fmt: skip
        self.methods = ONNX_METHODS
        integers = ("rank", "decode_context", "decode_steps", "repeats")
        check_common(self, E2E_METHODS, integers, ("batches", "prompt_lens"))
        if self.threads is not None:
            positive_int("threads", self.threads)
        if self.vllm_python is not None and not Path(self.vllm_python).is_file():
            raise ValueError(f"vllm_python: {self.vllm_python} is not a file")


@dataclass
class MixedBenchConfig(Outputs, ModelShape):
    """`zflora mixed-bench`: one batch of requests for k different adapters; stacked zFLoRA vs PEFT's
    mixed-batch LoRA (`adapter_names=`) vs the base model, in Hugging Face transformers."""

    rank: int = SMALL_RANK
    layers: int | None = field(default=2, metadata={"help": "cut the depth to N layers (recorded)"})
    adapters: tuple[int, ...] = field(default=(1, 2, 4, 8), metadata={"help": "numbers k of distinct adapters"})
    batch: int = field(default=8, metadata={"help": "requests per batch; row b goes to adapter b mod k"})
    prompt_lens: tuple[int, ...] = field(default=(128,), metadata={"help": "prefill lengths"})
    decode_context: int = field(default=256, metadata={"help": "KV-cache length for the decode steps"})
    decode_steps: int = field(default=8, metadata={"help": "timed decode steps per repetition and method"})
    repeats: int = 6
    warmup: int = field(default=1, metadata={"help": "untimed repetitions first"})
    methods: tuple[str, ...] = MIXED_METHODS
    threads: int | None = field(default=None, metadata={"help": "CPU threads (default: all cores)"})

    def __post_init__(self) -> None:
        check_common(self, MIXED_METHODS, ("rank", "batch", "decode_context", "decode_steps", "repeats"),
                     ("adapters", "prompt_lens"))  # fmt: skip
        if self.threads is not None:
            positive_int("threads", self.threads)
