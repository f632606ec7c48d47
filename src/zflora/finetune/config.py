"""Configs of the fine-tuning jobs (train, eval, study), validated on construction.

No heavy imports: the command line builds its flags from these dataclasses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import (
    ADAPTER_METHODS,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_RANK,
    METHODS,
    QUANTIZATIONS,
    SMALL_RANK,
    STORIES260K,
    TRAIN_DTYPES,
    check_alpha,
    check_dtype,
    check_targets,
    positive_finite,
    positive_finites,
    positive_int,
    positive_ints,
)

TRAIN_METHODS = tuple(m for m in METHODS if m != "base")


@dataclass
class TrainConfig:
    """`zflora train`: fine-tune with one method on Hugging Face `Trainer`."""

    model: Path = field(metadata={"help": "local Hugging Face checkpoint directory"})
    data: list[Path] = field(metadata={"help": "LLM-Adapters .json / DialogSum .jsonl files"})
    output: Path = field(metadata={"help": "run directory (checkpoints, final/, train_log.json)"})
    method: str = field(default="zflora", metadata={"choices": TRAIN_METHODS})
    rank: int = DEFAULT_RANK
    alpha: float | None = field(default=None, metadata={"help": "default 2 * rank"})
    targets: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "projections lora and zflora adapt, e.g. q,k,v,gate,up (PEFT's target_modules); default: "
                  "all seven (q,k,v,o,gate,up,down); the -mha methods fix theirs (q,k,v,o)"},
    )  # fmt: skip
    lr: float = 2e-4
    epochs: float = 1.0
    max_steps: int = field(default=-1, metadata={"help": "overrides --epochs when > 0"})
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = field(default=512, metadata={"help": "tokens; longer records are truncated (and counted)"})
    warmup_ratio: float = field(
        default=0.03, metadata={"help": "learning-rate warm-up, a fraction of the steps in [0, 1)"}
    )
    weight_decay: float = 0.0
    loraplus_lr_ratio: float | None = field(
        default=None,
        metadata={"help": "LoRA+: the B matrices learn at this multiple of --lr, the A matrices (and zFLoRA's A_in) "
                  "at --lr (PEFT's create_loraplus_optimizer convention); default: one rate for all"},
    )  # fmt: skip
    dtype: str = field(default="fp32", metadata={"choices": TRAIN_DTYPES,
                                                 "help": "bf16 only where the hardware runs it natively"})  # fmt: skip
    gradient_checkpointing: bool = False
    save_steps: int = field(default=0, metadata={"help": "checkpoint every N steps (0: each epoch; < 0: none)"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept"})
    logging_steps: int = 10
    seed: int = 0
    limit: int | None = field(default=None, metadata={"help": "use the first N records of each file"})
    resume: bool = field(default=False, metadata={"help": "continue from the last complete checkpoint in --output"})
    overwrite: bool = field(default=False, metadata={"help": "replace the run already in --output"})
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict, metadata={"help": "JSON object of TrainingArguments"})
    quantized_base: str | None = field(
        default=None,
        metadata={"choices": tuple(QUANTIZATIONS), "help": "train on the base as an int8 / int4 deployment computes "
                  "with it (blocks of 32, QLoRA's recipe): an adapter for a quantized base keeps more of its gain"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.method not in TRAIN_METHODS:
            raise ValueError(f"method: unknown {self.method!r}; accepted: {', '.join(TRAIN_METHODS)}")
        check_dtype("dtype", self.dtype, TRAIN_DTYPES)
        positive_ints(self, "rank", "batch_size", "grad_accum", "max_length", "logging_steps", "save_total_limit")
        self.alpha = check_alpha(self.alpha, self.rank)
        self.targets = check_targets(self.method, self.targets)
        positive_finites(self, "lr", "epochs")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay: must be a finite number >= 0, got {self.weight_decay!r}")
        _warmup_fraction(self.warmup_ratio)
        if self.loraplus_lr_ratio is not None:
            positive_finite("loraplus_lr_ratio", self.loraplus_lr_ratio)
            if self.method == "fft":
                raise ValueError("loraplus_lr_ratio: splits an adapter's A and B matrices; fft has none")
        if self.resume and self.overwrite:
            raise ValueError("resume, overwrite: give one or the other")
        if self.quantized_base is not None and self.quantized_base not in QUANTIZATIONS:
            raise ValueError(f"quantized_base: {self.quantized_base!r}; choose one of {', '.join(QUANTIZATIONS)}")
        if self.quantized_base is not None and self.method == "fft":
            raise ValueError("quantized_base: full fine-tuning trains the base itself; choose an adapter method")
        if self.limit is not None:
            positive_ints(self, "limit")
        if not self.data:
            raise ValueError("data: give at least one data file")


@dataclass
class EvalConfig:
    """`zflora eval`: generate and score on task files, or score saved responses."""

    model: Path | None = field(default=None, metadata={"help": "local checkpoint directory (base, or fft output)"})
    adapter: Path | None = field(default=None, metadata={"help": "a zFLoRA or PEFT LoRA adapter directory"})
    data: list[Path] = field(default_factory=list, metadata={"help": "task files; each task named after its file"})
    responses: Path | None = field(default=None, metadata={"help": "score this responses JSONL; no model needed"})
    output: Path | None = field(default=None, metadata={"help": "results JSON (+ .md table, + .responses.jsonl)"})
    limit: int | None = field(default=None, metadata={"help": "first N records of each task"})
    batch_size: int = 16
    max_new_tokens: int | None = field(default=None, metadata={"help": "default by kind: 32 label, 96 number, "
                                                                       "64 summary"})  # fmt: skip
    compile: bool = field(default=False, metadata={"help": "generate with the model compiled (zflora.compile)"})

    def __post_init__(self) -> None:
        if self.responses is None and not self.data:
            raise ValueError("data: give one or more --data files (or --responses FILE)")
        if self.responses is None and self.model is None:
            raise ValueError("model: give --model PATH (or --responses FILE to score saved responses)")
        positive_ints(self, "batch_size")
        for name in ("limit", "max_new_tokens"):
            if getattr(self, name) is not None:
                positive_ints(self, name)


@dataclass
class StudyConfig:
    """`zflora study`: the miniature accuracy study on stories260K (all methods, several seeds)."""

    model: Path = field(default=STORIES260K, metadata={"help": "local checkpoint directory"})
    rank: int = SMALL_RANK
    seeds: int = 3
    steps: int = 150
    batch_size: int = 16
    lr: float = field(default=3e-3, metadata={"help": "learning rate of the adapters"})
    fft_lr: float = 1e-3
    n_train: int = field(default=600, metadata={"help": "training records per task"})
    n_test: int = field(default=100, metadata={"help": "test records per task"})
    max_length: int = 320  # the longest task record is ~260 tokens
    output: Path | None = field(default=None, metadata={"help": "write study.json and study.md here"})
    progress: bool = True

    def __post_init__(self) -> None:
        positive_ints(self, "rank", "seeds", "steps", "batch_size", "n_train", "n_test", "max_length")
        positive_finites(self, "lr", "fft_lr")


CATEGORIES: dict[str, tuple[list[str], list[str]]] = {
    "commonsense": (
        [f"commonsense/{t}/train.json" for t in ("boolq", "ARC-Challenge", "ARC-Easy", "openbookqa")],
        [f"commonsense/{t}/test.json" for t in ("boolq", "piqa", "social_i_qa", "ARC-Challenge", "ARC-Easy",
                                                  "openbookqa", "winogrande")],
    ),
    "math": (["math/math_train_3k.json"], [f"math/{t}/test.json" for t in ("gsm8k", "SVAMP", "AddSub", "MultiArith",
                                                                             "SingleEq")]),
    "summary": (["dialogsum/dialogsum.dev.jsonl"], ["dialogsum/dialogsum.test.jsonl"]),
}  # fmt: skip
STUDY_METHODS = ("base", *ADAPTER_METHODS, "zflora-matched", "fft")


def _warmup_fraction(value: float) -> None:
    if not 0 <= value < 1:  # transformers reads warmup_steps >= 1 as a count of steps
        raise ValueError(f"warmup_ratio: must be a fraction of the steps in [0, 1), got {value!r}")


def _finite_positive_tuple(name: str, values: tuple, kind: type = float) -> None:
    if not values:
        raise ValueError(f"{name}: give at least one value")
    for v in values:
        (positive_int if kind is int else positive_finite)(name, v)


@dataclass
class AccuracyConfig:
    """`zflora accuracy`: accuracy of every method on a real pretrained model (resumable, committable).

    Finished runs are small files under `output` (results, per-item scores, training logs), read back
    on a rerun on any machine; checkpoints of a run in progress live under `work` on this machine."""

    model: Path = field(default=Path("smollm2-135m-instruct"), metadata={"help": "checkpoint dir or fetched name"})
    data: Path = field(default=Path("../shared/data"), metadata={"help": "the commonsense/, math/, dialogsum/ root"})
    output: Path = field(
        default=Path("docs/results/accuracy-smollm2-135m"),
        metadata={"help": "finished runs (small files); a rerun continues from them"},
    )
    work: Path | None = field(
        default=None,
        metadata={"help": "checkpoints of runs in progress (default: ~/.cache/zflora/accuracy/<output name>)"},
    )
    report: Path | None = field(
        default=Path("docs/results/study-smollm2-135m"), metadata={"help": "write REPORT.json, .md and .png"}
    )
    dtype: str = field(
        default="fp32",
        metadata={
            "choices": TRAIN_DTYPES,
            "help": "fixed when the study "
            "starts: fp32 runs natively everywhere; bf16 only where the CPU has AVX-512 BF16 or AMX",
        },
    )
    rank: int = DEFAULT_RANK
    seeds: int = field(default=3, metadata={"help": "seeds of lora and zflora"})
    other_seeds: int = field(
        default=1,
        metadata={"help": "seeds of lora-mha, zflora-mha, zflora-matched and fft; a finished study may add more"},
    )
    methods: tuple[str, ...] = field(
        default=("base", *ADAPTER_METHODS, "zflora-matched"), metadata={"help": "add fft to fine-tune every weight too"}
    )
    categories: tuple[str, ...] = tuple(CATEGORIES)
    steps: tuple[int, ...] = field(
        default=(200, 100, 57),
        metadata={
            "help": "training steps per category "
            "(57 x 8 = one epoch of the 450 DialogSum dev dialogues left for training)"
        },
    )
    batch_size: int = 8
    max_length: int = 768
    n_val: int = field(default=50, metadata={"help": "held-out training records per category (loss, sweep)"})
    n_test: tuple[int, ...] = field(default=(150, 100, 150), metadata={"help": "test records per task, by category"})
    lrs: tuple[float, ...] = field(
        default=(1e-4, 3e-4, 1e-3, 3e-3),
        metadata={"help": "learning rates swept per method; one value: used as given, no sweep"},
    )
    sweep_steps: int = field(default=30, metadata={"help": "steps of each sweep run (all categories mixed)"})
    warmup_ratio: float = field(
        default=TrainConfig.warmup_ratio, metadata={"help": "learning-rate warm-up of every run and sweep"}
    )
    loraplus_lr_ratio: float | None = field(
        default=None,
        metadata={"help": "LoRA+ for every adapter run and sweep: B matrices at this multiple of the (swept) "
                  "learning rate, which the A matrices keep"},
    )  # fmt: skip
    targets: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "projections of every lora and zflora run and sweep (e.g. q,k,v,gate,up); default all "
                  "seven. Not with the -mha methods or zflora-matched, whose projections are fixed"},
    )  # fmt: skip
    eval_batch_size: int = 16
    new: bool = field(
        default=False,
        metadata={"help": "discard the finished runs in --output made with other settings and start a new study there"},
    )
    progress: bool = True

    def __post_init__(self) -> None:
        positive_ints(self, "rank", "seeds", "other_seeds", "batch_size", "max_length", "n_val", "sweep_steps",
                      "eval_batch_size")  # fmt: skip
        check_dtype("dtype", self.dtype, TRAIN_DTYPES)
        _warmup_fraction(self.warmup_ratio)
        if self.loraplus_lr_ratio is not None:
            positive_finite("loraplus_lr_ratio", self.loraplus_lr_ratio)
        if bad := [m for m in self.methods if m not in STUDY_METHODS]:
            raise ValueError(f"methods: unknown {bad}; accepted: {', '.join(STUDY_METHODS)}")
        if self.targets is not None:
            if fixed := [m for m in self.methods if m in ("lora-mha", "zflora-mha", "zflora-matched")]:
                raise ValueError(
                    f"targets: {', '.join(fixed)} fix their projections; leave them out of --methods "
                    "(e.g. --methods base,lora,zflora)"
                )
            if "zflora" in self.methods:
                check_targets("zflora", self.targets)  # also refuses a set whose stream nothing would read
            self.targets = check_targets("lora", self.targets)
        if bad := [c for c in self.categories if c not in CATEGORIES]:
            raise ValueError(f"categories: unknown {bad}; accepted: {', '.join(CATEGORIES)}")
        for name, kind in (("n_test", int), ("steps", int), ("lrs", float)):
            _finite_positive_tuple(name, getattr(self, name), kind)
        for name in ("n_test", "steps"):
            if len(getattr(self, name)) != len(CATEGORIES):
                raise ValueError(
                    f"{name}: one value per category ({', '.join(CATEGORIES)}), got {len(getattr(self, name))}"
                )


@dataclass
class QuantizedAccuracyConfig:
    """`zflora quantized-accuracy`: how much of a trained adapter's gain a quantized deployment keeps.

    The study's trained zFLoRA and LoRA adapters (one seed, one category) on an int8 / int4 base: zFLoRA
    fused with its blocks quantized on their own, LoRA merged and then quantized whole, and the quantized
    base alone; the fp32 rows are the study's own runs."""

    study: Path = field(
        default=Path("docs/results/accuracy-smollm2-135m"), metadata={"help": "a `zflora accuracy` output directory"}
    )
    category: str = field(default="summary", metadata={"choices": tuple(CATEGORIES)})
    seed: int = field(default=0, metadata={"help": "the study's seed whose adapters are quantized"})
    precisions: tuple[str, ...] = field(default=tuple(QUANTIZATIONS), metadata={"help": "int8 and / or int4"})
    block_size: int = field(default=DEFAULT_BLOCK_SIZE, metadata={"help": "quantization block along K"})
    zflora_adapter: Path | None = field(default=None, metadata={"help": "default: the adapter the study's zflora "
                                                                        "run kept, else its final checkpoint on this "
                                                                        "machine"})  # fmt: skip
    lora_adapter: Path | None = field(default=None, metadata={"help": "default: the study's lora run's"})
    work: Path | None = field(default=None, metadata={"help": "the study's checkpoints (default: as `zflora "
                                                               "accuracy` puts them)"})  # fmt: skip
    data: Path = field(default=Path("../shared/data"), metadata={"help": "the commonsense/, math/, dialogsum/ root"})
    output: Path = field(default=Path("docs/results/quantized-accuracy-smollm2-135m"),
                         metadata={"help": "finished rows (small files; a rerun goes on) and the report"})  # fmt: skip
    eval_batch_size: int = 64
    fp32_adapter: bool = field(default=False, metadata={"help": "also zFLoRA on the quantized base, blocks fp32 "
                                                                "(a diagnosis, not a deployable form)"})  # fmt: skip
    train_on_quantized: tuple[str, ...] = field(
        default=(),
        metadata={"help": "precisions (of --precisions) at which zFLoRA is also trained on the quantized base itself "
                  "(QLoRA's recipe), with the study run's learning rate, steps and seed"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        positive_ints(self, "block_size", "eval_batch_size")
        if self.category not in CATEGORIES:
            raise ValueError(f"category: {self.category!r}; accepted: {', '.join(CATEGORIES)}")
        if bad := [p for p in self.precisions if p not in QUANTIZATIONS] or not self.precisions:
            raise ValueError(f"precisions: from {', '.join(QUANTIZATIONS)}, got {bad or 'none'}")
        if self.seed < 0:
            raise ValueError(f"seed: {self.seed}; a study's seeds count from 0")
        if bad := [p for p in self.train_on_quantized if p not in self.precisions]:
            raise ValueError(f"train_on_quantized: {bad} not among the precisions {list(self.precisions)}")
