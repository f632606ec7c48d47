"""Many adapters in one batch: stacked zFLoRA adapters with per-row routing.

`stack_adapters(model, [a_1, ..., a_k])` turns a base model, in place, into one
fused model whose stream is [h ; z_1 ; ... ; z_k] (layout in `fusion.py`). Inside
`with route(model, adapter_ids):` row b of every forward (and `generate`) is served by
adapter `adapter_ids[b]`, or by the base model for -1. The routing is the norms' gain:
each RMSNorm multiplies by a per-row gain that keeps g and the ones of the row's own
z_j only, so every input projection reads n_h and n_{z_j}, and the other blocks z_i are
written but never read. The operators are the base model's; the extra work is
(r_1 + ... + r_k) / d of the projections.

Adapters may differ in rank, targets, alpha, lm_head and expand_input (an untargeted
projection holds zeros in that adapter's block); they must all fit the model's base.
`swap_slot` replaces one slot's adapter in place, rewriting only that slot's blocks.
Every check runs before the first write: on error the model is unchanged.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapter_io import Adapter, AdapterError, check_fits, check_same_base, read_adapter
from .compiled import is_frozen
from .config import ZFLoRAConfig
from .fusion import (
    Kind,
    adapter_block,
    adapter_tensor,
    block_of,
    fused_bias,
    fused_gain,
    kind_of,
    routed_gain,
    stacked_weight,
)
from .models import meta_model
from .modules import FusedRMSNorm, HiddenReadLinear, ZFLoRAEmbedding
from .transform import LAYER_NORMS, apply_zflora, check_supported, install, layer_projections

AdapterLike = Adapter | str | os.PathLike


@dataclass
class Slot:
    """One stacked adapter: its config, where it came from, and its channels [start, stop) in the stream."""

    config: ZFLoRAConfig
    source: str
    start: int

    @property
    def stop(self) -> int:
        return self.start + self.config.r


@dataclass
class Stack:
    """`model.zflora_stack`: the base width d and the slots, in order."""

    d: int
    slots: list[Slot] = field(default_factory=list)

    @property
    def spans(self) -> list[tuple[int, int]]:
        return [(s.start, s.stop) for s in self.slots]


class StackedLinear(nn.Linear):
    """A projection of the stacked stream: a plain `nn.Linear` whose weight is [W | s_1 B_1 | ...] ("in")
    or [W ; A_1 ; ...] ("out"). One matmul, no adapter branch."""

    def __init__(self, base: nn.Linear, kind: Kind, weight: torch.Tensor) -> None:
        nn.Module.__init__(self)
        self.kind = kind
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = base.bias
        if base.bias is not None and kind == "out":
            self.bias = nn.Parameter(fused_bias(base.bias, weight.shape[0] - base.out_features), requires_grad=False)
        self.out_features, self.in_features = weight.shape


class RoutedRMSNorm(FusedRMSNorm):
    """The fused norm with a per-row gain (B, 1, d + R), set by `route`; unusable outside it."""

    row_gain: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gain = self.row_gain
        if gain is None:
            raise RuntimeError("a model with stacked adapters runs inside `with zflora.route(model, adapter_ids):`")
        if x.dim() != 3 or x.shape[0] != gain.shape[0]:
            raise ValueError(
                f"zflora.route was given {gain.shape[0]} adapter ids, the model got a batch of shape "
                f"{tuple(x.shape[:-1])}: give one id per row (beam search and num_return_sequences multiply rows)"
            )
        return gain * self._normalise(x)


# --------------------------------------------------------------------------- checks


def _require_stacked(model: nn.Module) -> Stack:
    stack = getattr(model, "zflora_stack", None)
    if not isinstance(stack, Stack):
        raise ValueError("this model has no stacked adapters: call zflora.stack_adapters(model, adapters) first")
    return stack


def _read(model: nn.Module, item: AdapterLike, check_base: bool, probes: dict) -> Adapter:
    """Read and check one adapter against `model`'s base: the same checks as `load_adapter`."""
    if not isinstance(item, Adapter | str | os.PathLike):
        raise ValueError(f"adapters: each must be an adapter directory or an Adapter, got {type(item).__name__}")
    adapter = item if isinstance(item, Adapter) else read_adapter(item)
    key = repr(adapter.config.to_dict() | {"target_modules": adapter.config.target_modules})
    if key not in probes:  # the adapter's surgery on an empty copy gives the expected names and shapes
        probes[key] = apply_zflora(meta_model(model.config), adapter.config)
    check_fits(probes[key], adapter, check_base_weights=False)
    check_same_base(model, adapter, check_base)
    return adapter


EXPANSION = "model.embed_tokens.zflora_A_in"


def _tensor(module: str, kind: Kind) -> str:
    return f"{module}.{adapter_tensor(kind)}"


def _block(kind: Kind, like: torch.Tensor, adapter: Adapter, tensor: str) -> torch.Tensor:
    """One adapter's block from its tensor `tensor` (zeros when it has none), in the model's dtype;
    refused if it overflows there. The expansion A_in is an "out" block of the embedding (r, d)."""
    cfg = adapter.config
    return _finite(adapter_block(kind, like, adapter.tensors.get(tensor), cfg.scaling, cfg.r), adapter, tensor)


def _finite(block: torch.Tensor, adapter: Adapter, tensor: str) -> torch.Tensor:
    if not torch.isfinite(block).all():
        raise AdapterError(f"{adapter.source or 'adapter'}: {tensor} is not finite in the model's dtype {block.dtype}")
    return block


def _projections(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, Kind]]:
    """(qualified name, parent, attribute, kind) of every layer projection."""
    for name, proj, parent, attr in layer_projections(model):
        yield name, parent, attr, kind_of(proj)


# --------------------------------------------------------------------------- API


@torch.no_grad()
def stack_adapters(model: nn.Module, adapters: Sequence[AdapterLike], check_base: bool = True) -> nn.Module:
    """Turn a base model, in place, into a fused model that serves every adapter in `adapters` (directories
    written by `save_adapter` or in-memory `Adapter`s), each in its own slot 0..k-1; route rows with `route`.

    Every adapter is read and checked first (its base, tensor names and shapes, finite values in the
    model's dtype); on error the model is unchanged.
    """
    check_supported(model)
    if isinstance(adapters, str | os.PathLike | Adapter) or not adapters:
        raise ValueError("adapters: give a non-empty list of adapter directories or Adapter objects")
    probes: dict = {}
    read = [_read(model, a, check_base, probes) for a in adapters]
    inner = model.model
    d = inner.embed_tokens.embedding_dim
    stack, start = Stack(d), d
    for a in read:
        stack.slots.append(Slot(a.config, a.source, start))
        start += a.config.r
    width = start - d

    def weight(kind: Kind, base: torch.Tensor, module: str) -> torch.Tensor:
        tensor = _tensor(module, kind)
        w = stacked_weight(kind, base, [(a.tensors.get(tensor), a.config.scaling, a.config.r) for a in read])
        for a, slot in zip(read, stack.slots, strict=True):
            _finite(block_of(kind, w, a.config.r, slot.start), a, tensor)
        return w

    # Build every replacement first, then swap: nothing is half-done on failure.
    embedding = ZFLoRAEmbedding(inner.embed_tokens, width, expand_input=True)
    a_in = [_block("out", embedding.weight, a, EXPANSION) for a in read]
    embedding.zflora_A_in = nn.Parameter(torch.cat(a_in), requires_grad=False)
    swaps: list[tuple[nn.Module, str, nn.Module]] = [(inner, "embed_tokens", embedding)]
    for owner in [inner, *inner.layers]:
        for attr in ("norm",) if owner is inner else LAYER_NORMS:
            norm = getattr(owner, attr)
            gain = nn.Parameter(fused_gain(norm.weight, width), requires_grad=False)
            swaps.append((owner, attr, RoutedRMSNorm(gain, norm.variance_epsilon, d, width)))
    for name, parent, attr, kind in _projections(model):
        base = getattr(parent, attr)
        swaps.append((parent, attr, StackedLinear(base, kind, weight(kind, base.weight, name))))
    if any(a.config.lm_head for a in read):
        head: nn.Module = StackedLinear(model.lm_head, "in", weight("in", model.lm_head.weight, "lm_head"))
    else:
        head = HiddenReadLinear(model.lm_head)  # reads n_h: a tied head stays tied
    swaps.append((model, "lm_head", head))
    return install(model, swaps, "zflora_stack", stack)


@torch.no_grad()
def swap_slot(model: nn.Module, slot: int, adapter: AdapterLike, check_base: bool = True) -> nn.Module:
    """Replace the adapter in `slot` in place (a hot-swap): only that slot's blocks are rewritten.

    The new adapter must have the slot's rank (another rank changes every shape: stack again)
    and may adapt the LM head only if the stack's head reads z. Other targets, alpha and
    expand_input may differ. Checked before the first write: on error the model is unchanged.
    """
    stack = _require_stacked(model)
    if is_frozen(model):
        raise AdapterError("this model was compiled with freeze=True: a swap would not be seen; compile without freeze")
    if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < len(stack.slots):
        raise ValueError(f"slot: must be an integer in 0..{len(stack.slots) - 1}, got {slot!r}")
    new = _read(model, adapter, check_base, {})
    old = stack.slots[slot]
    where = new.source or "adapter"
    if new.config.r != old.config.r:
        raise AdapterError(
            f"{where}: rank {new.config.r} does not fit slot {slot} (rank {old.config.r}); a slot's rank fixes "
            "every weight's shape: call stack_adapters on a fresh base model with the new set"
        )
    if new.config.lm_head and not isinstance(model.lm_head, StackedLinear):
        raise AdapterError(f"{where}: adapts the LM head, which no adapter of this stack does: stack again")

    embedding = model.model.embed_tokens
    rows = slice(old.start - stack.d, old.stop - stack.d)
    writes = [(embedding.zflora_A_in[rows], _block("out", embedding.weight, new, EXPANSION))]
    modules = [(name, getattr(parent, attr), kind) for name, parent, attr, kind in _projections(model)]
    if isinstance(model.lm_head, StackedLinear):
        modules.append(("lm_head", model.lm_head, "in"))
    for name, module, kind in modules:
        block = _block(kind, module.weight, new, _tensor(name, kind))
        writes.append((block_of(kind, module.weight, old.config.r, old.start), block))
    for target, value in writes:
        target.copy_(value)
    stack.slots[slot] = Slot(new.config, new.source, old.start)
    return model


@contextlib.contextmanager
def route(model: nn.Module, adapter_ids: torch.Tensor | Sequence[int]) -> Iterator[nn.Module]:
    """Serve row b of every forward inside the block by slot `adapter_ids[b]` (-1: the base model).

    One id per batch row; the batch must keep that size (no beam search). Routes nest; the
    previous one is restored on exit.
    """
    stack = _require_stacked(model)
    if not isinstance(adapter_ids, torch.Tensor) and (
        isinstance(adapter_ids, str | bytes) or not isinstance(adapter_ids, Sequence)
    ):
        raise ValueError(f"adapter_ids: a sequence or 1-D tensor of slot ids, got {type(adapter_ids).__name__}")
    ids = torch.as_tensor(adapter_ids)
    if ids.dim() != 1 or ids.numel() == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(
            f"adapter_ids: a 1-D integer tensor, one id per row, got {ids.dtype} of shape {tuple(ids.shape)}"
        )
    if bad := sorted({int(i) for i in ids if not -1 <= int(i) < len(stack.slots)}):
        raise ValueError(f"adapter_ids: {bad} out of range; slots are 0..{len(stack.slots) - 1}, -1 is the base model")
    norms = [m for m in model.modules() if isinstance(m, RoutedRMSNorm)]
    previous = [m.row_gain for m in norms]
    gains = [routed_gain(m.weight, stack.spans, ids) for m in norms]  # all built before any is set
    try:
        for m, g in zip(norms, gains, strict=True):
            m.row_gain = g
        yield model
    finally:
        for m, g in zip(norms, previous, strict=True):
            m.row_gain = g
