"""zFLoRA modules: the pieces that make a LLaMA-family model carry an adapter state.

zFLoRA (Gowda, Song, Goka, Lee, "zFLoRA: Zero-Latency Fused Low-Rank Adapters",
EMNLP 2025, arXiv 2510.25784). Notation: d hidden size, r rank, s = alpha / r.

The residual stream is widened once, at the embedding, from h (d channels) to
x = [h ; z] (d + r channels), and narrowed once, at the LM head. In between:

    embedding      h0 = E[tok],  z0 = A_in h0                    (ZFLoRAEmbedding)
    RMSNorm        n = [g * h ; z] * rsqrt(mean(h^2) + eps)      (ZFLoRARMSNorm / FusedRMSNorm)
    q,k,v,gate,up  P'(n) = W_P n_h + s * B_P n_z                 (ZFLoRALinear kind "in")
                   fused: [W_P | s B_P] n, one matmul            (FusedLinear)
    o, down        Q'(u) = [W_Q u ; A_Q u]                       (ZFLoRALinear kind "out")
                   fused: [W_Q ; A_Q] u, one matmul              (FusedLinear)
    untargeted     input projections read n_h only               (HiddenReadLinear)
                   output projections write [W u ; 0]            (ZFLoRALinear / FusedLinear)
    LM head        logits = W_lm n_h (+ s * B_lm n_z)            (HiddenReadLinear / ZFLoRALinear)

The norm takes its statistic over the base channels only, so with every B = 0
the base channels, and hence the logits, are exactly those of the base model.
B is initialised to 0, A (and A_in) Kaiming-uniform as in LoRA. The statistic
and the `mean` run on a slice (a view); the fused forward adds no operator per
layer. The base weight keeps its original attribute name (`weight`) and the
adapter matrices are named `zflora_*`; that prefix decides what is trainable
and what is saved. The scale s lives in one place, the model's `ZFLoRAConfig`,
which every projection module holds a reference to. The fused layout itself is
written in `fusion.py`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import ZFLoRAConfig
from .fusion import adapter_block, base_block, block_of, fused_bias, stacked_weight, unfused

ADAPTER_PREFIX = "zflora_"


def _kaiming_(t: torch.Tensor) -> torch.Tensor:
    # Same initialisation as loralib / PEFT use for LoRA's A.
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` on a (possibly strided) slice of the stream, always as one 2-D matmul.

    PyTorch's matmul folds a 3-D input into a matrix only when that is a view, or when
    the weight requires grad. Otherwise (a frozen weight and, say, the last-position
    slice that `logits_to_keep` makes) it broadcasts the weight to a batch and copies
    all of it: 3 s per prefill for LLaMA-3.2-1B's LM head on a CPU. Flattening the
    leading dims first is a view here, or at worst a copy of the few activation rows.
    """
    if x.dim() <= 2:
        return F.linear(x, weight, bias)
    return F.linear(x.flatten(0, -2), weight, bias).unflatten(0, x.shape[:-1])


def _adapter(shape: tuple[int, int], like: torch.Tensor, zero: bool) -> nn.Parameter:
    t = torch.empty(shape, dtype=like.dtype, device=like.device)
    return nn.Parameter(t.zero_() if zero else _kaiming_(t))


class ZFLoRAEmbedding(nn.Module):
    """Input expansion, once per forward: ids -> [h0 ; z0], z0 = A_in h0 (or 0)."""

    def __init__(self, embedding: nn.Embedding, r: int, expand_input: bool) -> None:
        super().__init__()
        self.weight = embedding.weight  # the base table, shared (keeps a tied LM head tied)
        self.padding_idx = embedding.padding_idx
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.r = r
        self.pad = 0  # zero channels after z in a padded fused form (`zflora.fuse(model, pad_to=...)`)
        self.zflora_A_in = _adapter((r, self.embedding_dim), self.weight, zero=False) if expand_input else None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = F.embedding(input_ids, self.weight, self.padding_idx)  # (B, T, d)
        if self.zflora_A_in is None:
            return F.pad(h, (0, self.r + self.pad))  # (B, T, d + r), z0 = 0
        x = torch.cat([h, F.linear(h, self.zflora_A_in)], dim=-1)  # (B, T, d + r)
        return F.pad(x, (0, self.pad)) if self.pad else x  # once per forward, not per layer

    def extra_repr(self) -> str:
        pad = f"+{self.pad}" if self.pad else ""
        return f"{self.num_embeddings}, {self.embedding_dim} -> {self.embedding_dim}+{self.r}{pad}"


class _StreamRMSNorm(nn.Module):
    """RMSNorm over a d + r stream whose statistic comes from the first d channels."""

    def __init__(self, weight: nn.Parameter, eps: float, d: int, r: int) -> None:
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps
        self.d, self.r = d, r

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        # Same arithmetic as transformers' LlamaRMSNorm, so base channels match bit for bit.
        dtype = x.dtype
        xf = x.to(torch.float32)
        variance = xf.narrow(-1, 0, self.d).pow(2).mean(-1, keepdim=True)  # statistic of h only (a view)
        return (xf * torch.rsqrt(variance + self.variance_epsilon)).to(dtype)  # (..., d + r)

    def extra_repr(self) -> str:
        return f"{self.d}+{self.r}, eps={self.variance_epsilon}"


class ZFLoRARMSNorm(_StreamRMSNorm):
    """Training form: gain g (the base norm's own parameter) on h, identity on z."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self._normalise(x)
        return torch.cat([self.weight * n[..., : self.d], n[..., self.d :]], dim=-1)


class FusedRMSNorm(_StreamRMSNorm):
    """Fused form: one multiply by the concatenated gain [g ; 1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * self._normalise(x)


class HiddenReadLinear(nn.Linear):
    """A base projection that reads only the base channels n_h of the stream.

    Used for untargeted input projections and the plain LM head (the output
    merge). The slice is a view, so this is the base matmul with a strided input.
    """

    def __init__(self, base: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x.narrow(-1, 0, self.in_features), self.weight, self.bias)  # reads n_h


class ZFLoRALinear(nn.Module):
    """Training form of one projection in the d + r stream.

    kind "in"  (q, k, v, gate, up; the LM head with lm_head=True): reads [n_h ; n_z],
               y = W n_h + s * B n_z, B: (out, r) zero-initialised.
    kind "out" (o, down): writes [y ; z'], y = W u, z' = A u (A: (r, in), Kaiming)
               or z' = 0 when the projection is not targeted.
    `config` is the model's ZFLoRAConfig (shared, not copied): r and s come from it.
    """

    def __init__(self, base: nn.Linear, kind: Literal["in", "out"], config: ZFLoRAConfig, targeted: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.kind, self.config = kind, config
        self.zflora_A = self.zflora_B = None
        if targeted and kind == "in":
            self.zflora_B = _adapter((self.out_features, config.r), self.weight, zero=True)
        elif targeted:
            self.zflora_A = _adapter((config.r, self.in_features), self.weight, zero=False)

    @property
    def r(self) -> int:
        return self.config.r

    @property
    def scaling(self) -> float:
        return self.config.scaling

    @property
    def adapter_matrix(self) -> nn.Parameter | None:
        return self.zflora_B if self.kind == "in" else self.zflora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "in":
            y = linear(x.narrow(-1, 0, self.in_features), self.weight, self.bias)  # W n_h: (..., out)
            if self.zflora_B is not None:
                y = y + self.scaling * linear(x.narrow(-1, self.in_features, self.r), self.zflora_B)  # + s B n_z
            return y
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        if self.zflora_A is None:
            return F.pad(y, (0, self.r))  # (..., out + r), writes nothing to z
        return torch.cat([y, F.linear(x, self.zflora_A)], dim=-1)  # (..., out + r)

    def extra_repr(self) -> str:
        adapter = "A" if self.zflora_A is not None else "B" if self.zflora_B is not None else "none"
        return f"{self.kind}, {self.in_features} -> {self.out_features}, r={self.r}, adapter={adapter}"


class FusedLinear(nn.Linear):
    """Fused form: a plain `nn.Linear` whose weight is [W | s B] ("in") or [W ; A] ("out").

    Its forward is `nn.Linear.forward`: one matmul, no adapter branch. It keeps the
    unfused adapter matrix (same Parameter) so that `unfuse` is exact and a hot-swap
    can rewrite the r extra columns/rows without touching the base block.
    """

    def __init__(self, src: ZFLoRALinear, pad: int = 0) -> None:
        nn.Module.__init__(self)
        self.kind, self.config, self.pad = src.kind, src.config, pad
        self.base_in, self.base_out = src.in_features, src.out_features
        self.zflora_A, self.zflora_B = src.zflora_A, src.zflora_B
        blocks = [(src.adapter_matrix, self.scaling, self.r)] + ([(None, 0.0, pad)] if pad else [])
        fused = stacked_weight(self.kind, src.weight, blocks)  # [W | s B (| 0)] or [W ; A (; 0)]
        self.weight = nn.Parameter(fused, requires_grad=False)
        self.bias = src.bias
        if src.bias is not None and self.kind == "out":
            self.bias = nn.Parameter(fused_bias(src.bias, self.extra), requires_grad=False)
        self.out_features, self.in_features = fused.shape

    r = ZFLoRALinear.r
    scaling = ZFLoRALinear.scaling
    adapter_matrix = ZFLoRALinear.adapter_matrix

    @property
    def extra(self) -> int:
        """Columns ("in") or rows ("out") after the base block: the adapter's r and any zero padding."""
        return self.r + self.pad

    @torch.no_grad()
    def refresh_adapter(self) -> None:
        """Rewrite only the adapter block of the fused weight from the stored adapter matrix and scale."""
        if self.adapter_matrix is not None:
            start = self.base_in if self.kind == "in" else self.base_out  # right after the base block
            block_of(self.kind, self.weight, self.r, start).copy_(
                adapter_block(self.kind, self.weight, self.adapter_matrix, self.scaling, self.r)
            )

    def to_unfused(self) -> ZFLoRALinear:
        base_w = base_block(self.kind, self.weight.detach(), self.extra)
        base = nn.Linear(self.base_in, self.base_out, bias=False, device="meta")
        base.weight = nn.Parameter(base_w.clone(), requires_grad=False)
        bias = self.bias
        if bias is not None and self.kind == "out":
            bias = nn.Parameter(unfused(bias.detach(), self.extra).clone(), requires_grad=False)
        base.bias = bias
        m = ZFLoRALinear(base, self.kind, self.config, targeted=False)
        m.zflora_A, m.zflora_B = self.zflora_A, self.zflora_B
        return m

    def extra_repr(self) -> str:
        pad = f", pad={self.pad}" if self.pad else ""
        return f"fused {self.kind}, {self.in_features} -> {self.out_features}, r={self.r}{pad}"
