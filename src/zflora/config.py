"""`ZFLoRAConfig`: which projections carry the adapter, its rank and scale; the names every job shares.

This module imports nothing heavy, so the command line can read it to build its flags.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Fine-tuning methods, one name each across training, evaluation and the benchmarks; the adapter methods among them.
METHODS = ("base", "lora", "lora-mha", "zflora", "zflora-mha", "fft")
ADAPTER_METHODS = tuple(m for m in METHODS if m not in ("base", "fft"))
# Ranks by default. Training, evaluation and the demo use r = 16, the rank of the paper's accuracy comparison.
# The latency benchmarks use r = 64, the largest rank the paper times, where an adapter's cost is easiest to
# see (`zflora.bench.config`); the miniature study and the mixed-batch benchmark use r = 8, for a model or a
# model cut so small (d = 64, two layers) that r = 16 would be a quarter of its width.
DEFAULT_RANK = 16
BENCH_RANK = 64
SMALL_RANK = 8
# The real pretrained model the demo and the miniature study use by default (llama2.c's stories260K).
STORIES260K = Path("../shared/models/stories260K")
# dtype names accepted everywhere (flags, configs), with torch's name for each; "auto" picks by hardware.
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# Projection names of the LLaMA family, split by how zFLoRA adapts them.
# Input projections read the residual stream and so can read the adapter state z
# (`W n_h + s B z`); output projections write to the stream and so can write z
# (`[W u ; A u]`).
INPUT_PROJECTIONS = ("q", "k", "v", "gate", "up")
OUTPUT_PROJECTIONS = ("o", "down")
ALL_PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
TARGET_PRESETS = {"all": ALL_PROJECTIONS, "mha": ("q", "k", "v", "o")}


def _normalise_target(name: Any) -> str:
    if not isinstance(name, str):
        raise ValueError(f"targets: entries must be projection names, got {name!r}")
    short = name.removesuffix("_proj")
    if short not in ALL_PROJECTIONS:
        raise ValueError(
            f"targets: unknown projection {name!r}; accepted: "
            f"{', '.join(ALL_PROJECTIONS)} (with or without '_proj'), or 'all' / 'mha'"
        )
    return short


def resolve_targets(targets: Any) -> tuple[str, ...]:
    """The projections an adapter adapts, in model order: a preset ("all", "mha") or a non-empty list of
    projection names (with or without "_proj"). The one reading of `targets` for zFLoRA and PEFT LoRA."""
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            raise ValueError(
                f"targets: unknown preset {targets!r}; accepted: 'all', 'mha' or a list of "
                f"projection names from {', '.join(ALL_PROJECTIONS)}"
            )
        return TARGET_PRESETS[targets]
    if isinstance(targets, list | tuple) and targets:
        chosen = {_normalise_target(t) for t in targets}
        return tuple(p for p in ALL_PROJECTIONS if p in chosen)
    raise ValueError(f"targets: must be 'all', 'mha' or a non-empty list of names, got {targets!r}")


def check_targets(method: str, targets: list[str] | tuple[str, ...] | None) -> list[str] | None:
    """`targets` chosen for `method`, as projection names in model order (None: the method's own). Refused
    where the method has no choice: the -mha methods fix theirs, base and fft have no adapter."""
    if targets is None:
        return None
    if method not in ("lora", "zflora"):
        fixed = "adapts q,k,v,o" if method.endswith("-mha") else "has no adapter"
        raise ValueError(f"targets: {method} {fixed}; choose the projections with lora or zflora")
    if method == "zflora":
        ZFLoRAConfig(targets=targets)  # also refuses a set that nothing would ever read the adapter state from
    return list(resolve_targets(targets))


# Weight quantizations of a deployed model (`zflora.quantization`): block-wise along K, bits per weight.
QUANTIZATIONS = {"int8": 8, "int4": 4}
DEFAULT_BLOCK_SIZE = 32

TRAIN_DTYPES = ("fp32", "bf16")  # what training runs in: fp16 needs loss scaling, which CPUs do not need


def check_dtype(name: str, value: Any, accepted: tuple[str, ...] = ("auto", *DTYPES)) -> None:
    """Validate a dtype name (`DTYPES`, and "auto" where the hardware picks); the error names the field."""
    if value not in accepted:
        raise ValueError(f"{name}: unknown {value!r}; accepted: {', '.join(accepted)}")


def positive_int(name: str, value: Any) -> None:
    """Validate a field that must be a positive integer; the error names the field."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")


def positive_finite(name: str, value: Any) -> None:
    """Validate a field that must be a positive finite number; the error names the field."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"{name}: must be a positive finite number, got {value!r}")


def positive_ints(cfg: Any, *names: str) -> None:
    """`positive_int` on each named field of `cfg`."""
    for name in names:
        positive_int(name, getattr(cfg, name))


def positive_finites(cfg: Any, *names: str) -> None:
    """`positive_finite` on each named field of `cfg`."""
    for name in names:
        positive_finite(name, getattr(cfg, name))


def default_alpha(r: int) -> float:
    """The one alpha rule, for the library and every command: alpha = 2 r (scaling s = 2) unless given."""
    return 2.0 * r


def check_alpha(alpha: Any, r: int) -> float:
    """`alpha` validated (a positive, finite number), or the default for rank `r` when it is None."""
    if alpha is None:
        return default_alpha(r)
    try:
        positive_finite("alpha", alpha)
    except ValueError as e:
        raise ValueError(f"{e} (or omit it for 2 * r)") from None
    return float(alpha)


@dataclass
class ZFLoRAConfig:
    """Configuration of a zFLoRA adapter.

    r: adapter rank, the width of the adapter state z carried beside the hidden state.
    alpha: scale numerator; up-projections are multiplied by `alpha / r` (as in LoRA). Omitted
        (None): 2 r, the rule every entry point uses. The model's config is the one place that
        holds it: every zFLoRA module reads `scaling` from it.
    targets: "all" (q,k,v,o,gate,up,down), "mha" (q,k,v,o) or a list of projection names.
    lm_head: also let the LM head read z (`logits += s * B_lm z`), B_lm initialised to 0.
    expand_input: z0 = A_in h0 at the embedding (True, the paper's choice) or z0 = 0. With
        z0 = 0 the first layer's input projections can never see an adapter signal.
    """

    r: int = DEFAULT_RANK
    alpha: float | None = None
    targets: str | list[str] | tuple[str, ...] = "all"
    lm_head: bool = False
    expand_input: bool = True
    target_modules: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        positive_int("r", self.r)
        self.alpha = check_alpha(self.alpha, self.r)
        for name in ("lm_head", "expand_input"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be true or false, got {getattr(self, name)!r}")
        modules = resolve_targets(self.targets)
        if not isinstance(self.targets, str):
            self.targets = list(modules)
        if not self.lm_head and not any(p in INPUT_PROJECTIONS for p in modules):
            raise ValueError(
                f"targets: {list(modules)} has no input projection ({', '.join(INPUT_PROJECTIONS)}) and "
                "lm_head is false, so nothing would ever read the adapter state"
            )
        self.target_modules = modules
        object.__setattr__(self, "_built", True)

    # Fields that fix the shapes of a model's adapter: changing one on a built config would leave every
    # module disagreeing with it. alpha stays settable: loading an adapter with another alpha sets it here.
    _SHAPE = frozenset({"r", "targets", "target_modules", "lm_head", "expand_input"})

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._SHAPE and getattr(self, "_built", False):
            raise AttributeError(f"ZFLoRAConfig.{name} is fixed once built (it sets the adapter's shapes); make "
                                 "another ZFLoRAConfig and apply it to a fresh base model")  # fmt: skip
        if name == "alpha" and getattr(self, "_built", False):
            value = check_alpha(value, self.r)
        super().__setattr__(name, value)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("target_modules")
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ZFLoRAConfig:
        known = {"r", "alpha", "targets", "lm_head", "expand_input"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown zFLoRA config field(s): {', '.join(sorted(unknown))}")
        return cls(**data)
