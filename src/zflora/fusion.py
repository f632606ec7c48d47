"""The fused layout of zFLoRA, written once: base tensors plus an adapter give the fused tensors.

    input projection (q, k, v, gate, up; the LM head with lm_head)   [W | s B]   (out, d + r)
    output projection (o, down)                                       [W ; A]     (d + r, in)
    an output projection's bias                                       [b ; 0]     (d + r,)
    RMSNorm gain                                                      [g ; 1]     (d + r,)

Stacked adapters (`stacking.py`) put k adapters side by side in one stream
[h ; z_1 ; ... ; z_k], d + r_1 + ... + r_k wide: input projections [W | s_1 B_1 | ...
| s_k B_k], output projections [W ; A_1 ; ... ; A_k], the expansion [A_in_1 ; ... ;
A_in_k]. Routing is a per-row norm gain: for a row routed to adapter j it is
[g ; 0 .. 1 on z_j .. 0] (`routed_gain`), so every input projection of that row reads
n_h and n_{z_j} only and the row computes exactly single-adapter zFLoRA j.

A projection the adapter does not target gets zeros in its block: it reads n_h only
or writes nothing to z. Every engine builds its fused weights here: `zflora.fuse`
(the module route), the fused hot-swap (which rewrites only the adapter block, in
place) and the vLLM loader (`zflora.serve.checkpoint`, as the base checkpoint streams in).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from .config import INPUT_PROJECTIONS

Kind = Literal["in", "out"]


def padding(d: int, r: int, multiple: int | None) -> int:
    """Zero channels that widen the fused stream d + r to the next multiple of `multiple` (0 for None).

    A GEMM kernel can run some widths much faster than others: oneDNN's bf16 kernel runs SmolLM2's
    d + r = 592 (r = 16) 13-25% slower than 576, and 608 as fast as 576. Zero channels after z make the
    stream such a width; they stay zero through every layer (zero columns read them, zero rows write them)."""
    return 0 if multiple is None else -(d + r) % multiple


def kind_of(projection: str) -> Kind:
    """The one rule: an input projection (q, k, v, gate, up) reads z through extra columns s B ("in"),
    an output projection (o, down) writes z through extra rows A ("out")."""
    return "in" if projection in INPUT_PROJECTIONS else "out"


def adapter_tensor(kind: Kind) -> str:
    """The adapter matrix a fused block is made from: `zflora_B` (scaled) for "in", `zflora_A` for "out"."""
    return "zflora_B" if kind == "in" else "zflora_A"


def adapter_block(
    kind: Kind, weight: torch.Tensor, matrix: torch.Tensor | None, scaling: float, r: int
) -> torch.Tensor:
    """The adapter's part of a fused weight, in `weight`'s dtype and device.

    kind "in": s B, the r extra columns, (out, r). kind "out": A, the r extra rows, (r, in).
    `matrix` is B or A as trained (B unscaled); None (an untargeted projection) gives zeros.
    """
    if matrix is None:
        return weight.new_zeros(weight.shape[0], r) if kind == "in" else weight.new_zeros(r, weight.shape[1])
    m = matrix.detach().to(weight.device, weight.dtype)
    return scaling * m if kind == "in" else m


def stacked_weight(
    kind: Kind, weight: torch.Tensor, adapters: Sequence[tuple[torch.Tensor | None, float, int]]
) -> torch.Tensor:
    """[W | s_1 B_1 | ... | s_k B_k] for kind "in", [W ; A_1 ; ... ; A_k] for kind "out", from each
    adapter's (matrix, scaling, r)."""
    w = weight.detach()
    blocks = [adapter_block(kind, w, m, s, r) for m, s, r in adapters]
    return torch.cat([w, *blocks], dim=1 if kind == "in" else 0)


def block_of(kind: Kind, fused: torch.Tensor, r: int, start: int | None = None) -> torch.Tensor:
    """A view of an adapter block inside a fused weight: what a hot-swap rewrites, and nothing else.
    The last r columns ("in") or rows ("out"), or the r from stream channel `start` on (stacked)."""
    index = slice(-r, None) if start is None else slice(start, start + r)
    return fused[:, index] if kind == "in" else fused[index]


def base_block(kind: Kind, fused: torch.Tensor, extra: int) -> torch.Tensor:
    """The inverse of `stacked_weight`: a view of W inside [W | s B] ("in") or [W ; A] ("out"), whose
    adapter block (and zero padding) is `extra` columns or rows wide."""
    return fused[:, :-extra] if kind == "in" else fused[:-extra]


def fused_bias(bias: torch.Tensor, r: int) -> torch.Tensor:
    """An output projection's bias on the d + r stream: [b ; 0]."""
    return torch.cat([bias.detach(), bias.new_zeros(r)])


def fused_gain(gain: torch.Tensor, r: int) -> torch.Tensor:
    """An RMSNorm gain on the d + r stream: [g ; 1] (the z channels are normalised, not scaled)."""
    return torch.cat([gain.detach(), gain.new_ones(r)])


def routed_gain(gain: torch.Tensor, spans: Sequence[tuple[int, int]], adapter_ids: torch.Tensor) -> torch.Tensor:
    """Per-row gains (B, 1, d + R) of a stacked stream from its gain [g ; 1] (d + R,): row b keeps
    g and the ones of z_j's channels `spans[j]` for j = adapter_ids[b], zeros elsewhere (-1: base)."""
    d = spans[0][0]
    keep = torch.zeros(adapter_ids.shape[0], 1, gain.shape[0], dtype=torch.bool, device=gain.device)
    keep[..., :d] = True
    ids = adapter_ids.to(gain.device)
    for j, (start, stop) in enumerate(spans):
        keep[ids == j, :, start:stop] = True
    return gain.detach() * keep


def unfused(fused: torch.Tensor, extra: int) -> torch.Tensor:
    """The inverse of `fused_bias` and `fused_gain`: a view of b in [b ; 0], of g in [g ; 1], where the
    tail is `extra` channels long."""
    return fused[:-extra]
