"""Compiled inference: `zflora.compile(model)`, and adapter hot-swap in a compiled model.

`compile` wraps the model's forward in `torch.compile` (inductor; CUDA graphs with
mode="reduce-overhead" on a GPU), so `model(...)` and `model.generate(...)` run the
compiled code. Without freezing, inductor takes the parameters as graph inputs: a
fused zFLoRA hot-swap (`set_adapter` / `load_adapter`) writes new values into the same
tensors in place (same shapes, dtypes, data pointers) and the scale is folded into
those values, never read by the fused forward, so the compiled code serves the new
adapter at once, at any alpha, and nothing recompiles.

What does recompile or is refused:
- another rank or another set of targets changes the weights' shapes: `set_adapter`
  refuses it before writing anything (stack a fresh model and compile that);
- `lm_head=True` keeps the LM head unfused and reads the scale there: an adapter with
  another alpha recompiles that graph once;
- dynamo keeps 8 graphs per code object by default, and every model of a class shares
  its forward's: `compile` raises that limit to 64, so a few models compiled in one
  process (a benchmark) do not fall back to eager without a word;
- `freeze=True` (inductor freezing) folds the weights into constants and prepacks them:
  faster on some CPUs, but a write into the weights would not be seen, so `set_adapter`
  refuses a frozen model. We chose swappable (no freezing) by default.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

RECOMPILE_LIMIT = 64  # graphs per code object (dynamo's default: 8)


def compile(  # noqa: A001 - the name users look for, as torch.compile
    model: nn.Module, *, freeze: bool = False, mode: str | None = None, dynamic: bool | None = None
) -> nn.Module:
    """Compile `model`'s forward in place (any model: base, PEFT, fused zFLoRA); returns the model.

    `mode` is torch.compile's ("reduce-overhead": CUDA graphs on a GPU; "max-autotune");
    `freeze` turns on inductor's weight freezing (no adapter swap afterwards).
    """
    if not isinstance(freeze, bool):
        raise ValueError(f"freeze: must be true or false, got {freeze!r}")
    if getattr(model, "zflora_compiled", None) is not None:
        raise ValueError("this model is already compiled")
    options: dict[str, Any] | None = None
    if freeze:
        options = {**(torch._inductor.list_mode_options(mode) if mode else {}), "freezing": True}
        mode = None  # torch.compile takes a mode or options, not both: the mode's options are merged above
    # Every model of one class shares its forward's code object, and dynamo keeps 8 graphs per code object
    # by default: the ninth (a second model compiled in the same process, say) would silently run eager.
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
    model.forward = torch.compile(model.forward, mode=mode, dynamic=dynamic, options=options)
    model.zflora_compiled = {"freeze": freeze, "mode": mode, "dynamic": dynamic}
    return model


def is_frozen(model: nn.Module) -> bool:
    """Compiled with weight freezing: the weights are constants of the compiled code."""
    return bool((getattr(model, "zflora_compiled", None) or {}).get("freeze"))


def compile_count() -> int:
    """Graphs compiled so far in this process (dynamo's count): the difference around a swap is its recompiles."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
