"""The vLLM loader's half of fusing: a base checkpoint's tensors in the fused form, as they stream in.

vLLM builds the model from the base checkpoint one tensor at a time; `fuse_state_dict` turns each
into its fused form with `zflora.fusion`'s layout, so the engine never holds the unfused model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

from ..adapter_io import Adapter
from ..fusion import Kind, adapter_tensor, fused_bias, fused_gain, kind_of, stacked_weight

_PROJECTION = re.compile(r"(model\.layers\.\d+\.(?:self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj)\.(weight|bias)")
_NORM = re.compile(r"model\.(?:layers\.\d+\.(?:input|post_attention)_layernorm|norm)\.weight")


def fuse_state_dict(
    weights: Iterable[tuple[str, torch.Tensor]], adapter: Adapter, tie_word_embeddings: bool, pad: int = 0
) -> Iterator[tuple[str, torch.Tensor]]:
    """A base checkpoint's tensors (Hugging Face names) in the fused form, one at a time, as they stream in.

    Projections and norms as in `zflora.fusion`'s table; the LM head [W | s B] when the adapter
    adapts it (made from the embedding when tied); the embedding's A_in comes last as
    `model.zflora_A_in`. With `pad`, the stream carries `pad` zero channels after z (zero columns,
    rows and A_in rows). The tensors equal those of `zflora.fuse(model, pad_to=...)` on the Hugging
    Face model, where an untargeted input projection reads a view of n_h instead of zero columns.
    """
    cfg, t = adapter.config, adapter.tensors
    r, s = cfg.r, cfg.scaling
    zeros: list[tuple[torch.Tensor | None, float, int]] = [(None, 0.0, pad)] if pad else []

    def fused(kind: Kind, w: torch.Tensor, matrix: torch.Tensor | None) -> torch.Tensor:
        return stacked_weight(kind, w, [(matrix, s, r), *zeros])

    for name, w in weights:
        if m := _PROJECTION.fullmatch(name):
            key, proj, part = m.groups()
            kind = kind_of(proj)
            if part == "weight":
                w = fused(kind, w, t.get(f"{key}.{adapter_tensor(kind)}"))
            elif kind == "out":
                w = fused_bias(w, r + pad)
        elif _NORM.fullmatch(name):
            w = fused_gain(w, r + pad)
        elif name == "lm_head.weight" and cfg.lm_head:
            if tie_word_embeddings:
                continue  # made from the embedding below
            w = fused("in", w, t.get("lm_head.zflora_B"))
        yield name, w
        if name == "model.embed_tokens.weight" and cfg.lm_head and tie_word_embeddings:
            yield "lm_head.weight", fused("in", w, t.get("lm_head.zflora_B"))
    if cfg.expand_input:
        a_in = t["model.embed_tokens.zflora_A_in"]
        yield "model.zflora_A_in", torch.cat([a_in, a_in.new_zeros(pad, a_in.shape[1])])
