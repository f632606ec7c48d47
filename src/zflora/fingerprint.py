"""The base model's fingerprint: a few leading values of a few base weights, which an adapter records when it is
saved and is checked against when it is loaded (`adapter_io`), so that an adapter is refused by another base of
the same shapes.

A model whose projections hold a quantized copy of the base (`quantization.simulate`, `weight_only.quantize`)
records the fp32 base it was quantized from (`record_base`: its fingerprint, and whether its LM head was tied to
the embedding, which quantizing unties): an adapter trained on it belongs to that base, and loads onto it or onto
any quantization of it.
"""

from __future__ import annotations

import torch
from torch import nn

FINGERPRINT_VALUES = 16  # leading values of each fingerprinted base tensor
RECORDED = "zflora_base"  # the model attribute a quantized model keeps its fp32 base's record in


def fingerprinted(layers: int) -> dict[str, str]:
    """The base tensors fingerprinted, by their names in a Hugging Face checkpoint: the embedding, the final
    norm, and every layer's q and down projections, so a base that differs in any layer is caught."""
    names = {"embed_tokens": "model.embed_tokens.weight", "norm": "model.norm.weight"}
    for i in range(layers):
        names[f"layers.{i}.q_proj"] = f"model.layers.{i}.self_attn.q_proj.weight"
        names[f"layers.{i}.down_proj"] = f"model.layers.{i}.mlp.down_proj.weight"
    return names


def leading(t: torch.Tensor) -> list[float]:
    """The fingerprint of one tensor: the leading values of its first row (of the vector itself). A fused
    weight keeps its base block first in both directions, so these are base values in either form."""
    return (t[0] if t.dim() > 1 else t).detach()[:FINGERPRINT_VALUES].float().cpu().tolist()


def base_fingerprint(model: nn.Module) -> dict[str, list[float]] | None:
    """The leading values of the `fingerprinted` base tensors: cheap, the same in either zFLoRA form and,
    within rounding, in any dtype; a quantized model's recorded one. None for a model on the meta device."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if (record := recorded(inner)) is not None:
        return record["fingerprint"]
    tensors = {"embed_tokens": inner.model.embed_tokens.weight, "norm": inner.model.norm.weight}
    for i, layer in enumerate(inner.model.layers):
        tensors[f"layers.{i}.q_proj"] = layer.self_attn.q_proj.weight
        tensors[f"layers.{i}.down_proj"] = layer.mlp.down_proj.weight
    if any(t.is_meta for t in tensors.values()):
        return None
    return {k: leading(t) for k, t in tensors.items()}


def recorded(model: nn.Module) -> dict[str, object] | None:
    """A quantized model's record of its fp32 base ({"fingerprint", "tie_word_embeddings"}); None for others."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, RECORDED, None)


def record_base(quantized: nn.Module, source: nn.Module) -> None:
    """Give `quantized` (a quantized copy of `source`, or `source` itself about to be quantized in place) the
    record of `source`'s unquantized base."""
    record = recorded(source) or {
        "fingerprint": base_fingerprint(source),
        "tie_word_embeddings": bool(getattr(source.config, "tie_word_embeddings", False)),
    }
    setattr(quantized.get_base_model() if hasattr(quantized, "get_base_model") else quantized, RECORDED, record)
