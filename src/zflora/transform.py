"""Model transforms: `apply_zflora` (module surgery), `fuse` and `unfuse`.

The Hugging Face decoder code runs unchanged: only the embedding, the RMSNorms,
the seven projections of every layer and the LM head are replaced, so the
residual stream it carries is simply d + r wide. `generate()`, the KV cache,
the attention implementations, `Trainer` and `accelerate` keep working.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator

import torch
from torch import nn

from .config import INPUT_PROJECTIONS, ZFLoRAConfig, positive_int
from .fusion import fused_gain, kind_of, padding, unfused
from .modules import (
    ADAPTER_PREFIX,
    FusedLinear,
    FusedRMSNorm,
    HiddenReadLinear,
    ZFLoRAEmbedding,
    ZFLoRALinear,
    ZFLoRARMSNorm,
)

# Architectures whose decoder is LLaMA's: pre-norm RMSNorm, q/k/v/o attention, SwiGLU MLP.
# Each one is covered by the test suite.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
PROJECTION_PATHS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


class UnsupportedModelError(TypeError, ValueError):
    """The model is not a LLaMA-family causal LM that zFLoRA can be applied to (a TypeError, and a
    ValueError so that commands report it as a bad input)."""


def check_supported(model: nn.Module) -> None:
    name = type(model).__name__
    if hasattr(model, "zflora_config"):
        raise UnsupportedModelError("this model already carries a zFLoRA adapter; use load_adapter to swap it")
    if hasattr(model, "zflora_stack"):
        raise UnsupportedModelError("this model carries stacked adapters; use zflora.swap_slot to replace one")
    if name not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"zFLoRA supports {', '.join(SUPPORTED_ARCHITECTURES)}; got {name}. "
            "(A PEFT-wrapped model must be unwrapped first.)"
        )
    inner = model.model

    def expect(obj: object, what: str, cls: type | None = None) -> None:
        ok = isinstance(obj, cls) if cls else hasattr(obj, "weight") and hasattr(obj, "variance_epsilon")
        if not ok:
            raise UnsupportedModelError(f"{name}: {what} is {type(obj).__name__}, not the expected LLaMA module")

    expect(inner.embed_tokens, "model.embed_tokens", nn.Embedding)
    expect(inner.norm, "model.norm")
    expect(model.lm_head, "lm_head", nn.Linear)
    for i, layer in enumerate(inner.layers):
        for norm in LAYER_NORMS:
            expect(getattr(layer, norm, None), f"model.layers.{i}.{norm}")
        for path in PROJECTION_PATHS.values():
            expect(layer.get_submodule(path), f"model.layers.{i}.{path}", nn.Linear)


def layer_projections(model: nn.Module) -> Iterator[tuple[str, str, nn.Module, str]]:
    """(qualified name, projection name, parent module, attribute) of the seven projections of every layer."""
    for i, layer in enumerate(model.model.layers):
        for proj, path in PROJECTION_PATHS.items():
            parent_path, attr = path.split(".")
            yield f"model.layers.{i}.{path}", proj, layer.get_submodule(parent_path), attr


def apply_zflora(model: nn.Module, config: ZFLoRAConfig) -> nn.Module:
    """Give `model` a zFLoRA adapter, in place, in the training form; freeze the base.

    Validates the whole model before changing anything: an unsupported model is
    left untouched. Afterwards the adapter parameters (`zflora_*`) are the only
    trainable ones. The model gets its own copy of `config` (`model.zflora_config`),
    shared by all its zFLoRA modules: the one place that holds r and the scale.
    """
    if not isinstance(config, ZFLoRAConfig):
        raise TypeError(f"config must be a ZFLoRAConfig, got {type(config).__name__}")
    check_supported(model)
    config = dataclasses.replace(config)
    inner, r = model.model, config.r
    d = inner.embed_tokens.embedding_dim

    def stream_norm(norm: nn.Module) -> ZFLoRARMSNorm:
        return ZFLoRARMSNorm(norm.weight, norm.variance_epsilon, d, r)

    # Build every replacement first, then swap: nothing is half-done on failure.
    swaps: list[tuple[nn.Module, str, nn.Module]] = [
        (inner, "embed_tokens", ZFLoRAEmbedding(inner.embed_tokens, r, config.expand_input)),
        (inner, "norm", stream_norm(inner.norm)),
    ]
    for layer in inner.layers:
        swaps += [(layer, norm, stream_norm(getattr(layer, norm))) for norm in LAYER_NORMS]
    for _, proj, parent, attr in layer_projections(model):
        base = getattr(parent, attr)
        targeted = proj in config.target_modules
        if proj in INPUT_PROJECTIONS and not targeted:
            new: nn.Module = HiddenReadLinear(base)
        else:
            new = ZFLoRALinear(base, kind_of(proj), config, targeted)
        swaps.append((parent, attr, new))
    head = ZFLoRALinear(model.lm_head, "in", config, True) if config.lm_head else HiddenReadLinear(model.lm_head)
    swaps.append((model, "lm_head", head))
    return install(model, swaps, "zflora_config", config)


def install(model: nn.Module, swaps: list[tuple[nn.Module, str, nn.Module]], name: str, value: object) -> nn.Module:
    """The last step of a surgery built in full beforehand: freeze the base, swap every module in, and
    mark the model (`model.<name> = value`). Nothing in here can fail half-way on a bad input."""
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, attr, new in swaps:
        setattr(parent, attr, new)
    setattr(model, name, value)
    return model


def is_zflora(model: nn.Module) -> bool:
    return isinstance(getattr(model, "zflora_config", None), ZFLoRAConfig)


def _require_zflora(model: nn.Module) -> None:
    if not is_zflora(model):
        raise ValueError("this model has no zFLoRA adapter: call zflora.apply_zflora(model, config) first")


def is_fused(model: nn.Module) -> bool:
    _require_zflora(model)
    return isinstance(model.model.norm, FusedRMSNorm)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)


def _layer_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    # The LM head (kept unfused: it is the once-per-forward output merge) is excluded.
    for name, module in list(model.named_modules()):
        if module is not model.lm_head:
            yield name, module


@torch.no_grad()
def fuse(model: nn.Module, pad_to: int | None = None) -> nn.Module:
    """Switch to the fused inference form: one matmul per projection, concatenated norm gains.

    Idempotent. Each base weight is replaced by its concatenation, so memory grows
    by the adapter block only (about r/d of the projections). With `pad_to`, the stream
    is widened with zero channels to the next multiple of `pad_to` (`fusion.padding`), for
    a GEMM kernel that runs such widths faster; the function is the same.
    """
    if is_fused(model):
        return model
    if pad_to is not None:
        positive_int("pad_to", pad_to)
        if hasattr(model, "zflora_stack"):
            raise ValueError("pad_to: a stack of adapters has its own layout; fuse a single adapter to pad it")
    pad = padding(model.config.hidden_size, model.zflora_config.r, pad_to)
    for name, m in _layer_modules(model):
        if isinstance(m, ZFLoRARMSNorm):
            gain = nn.Parameter(fused_gain(m.weight, m.r + pad), requires_grad=False)  # [g ; 1], (d + r + pad,)
            _replace(model, name, FusedRMSNorm(gain, m.variance_epsilon, m.d, m.r + pad))
        elif isinstance(m, ZFLoRALinear):
            _replace(model, name, FusedLinear(m, pad))
    model.model.embed_tokens.pad = pad
    return model


@torch.no_grad()
def unfuse(model: nn.Module) -> nn.Module:
    """Back to the training form; base weights and adapter matrices are restored exactly. Idempotent."""
    if not is_fused(model):
        return model
    if getattr(model, "zflora_quantization", None) is not None:
        raise ValueError("a quantized model (zflora.weight_only.quantize) has no fp32 base weights to unfuse to; "
                         "load the base again for training")  # fmt: skip
    for name, m in _layer_modules(model):
        if isinstance(m, FusedRMSNorm):
            gain = nn.Parameter(unfused(m.weight.detach(), m.r).clone(), requires_grad=False)
            _replace(model, name, ZFLoRARMSNorm(gain, m.variance_epsilon, m.d, model.zflora_config.r))
        elif isinstance(m, FusedLinear):
            _replace(model, name, m.to_unfused())
    model.model.embed_tokens.pad = 0
    return model


def fused_padding(model: nn.Module) -> int:
    """The zero channels a fused model's stream carries after z (`fuse(model, pad_to=...)`); 0 if none."""
    return getattr(model.model.embed_tokens, "pad", 0)


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter's own parameters by qualified name (`...q_proj.zflora_B`), in either form."""
    _require_zflora(model)
    return {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1].startswith(ADAPTER_PREFIX)}


# ATen operators that only make views: they launch no kernel and move no data.
VIEW_OPS = frozenset({
    "view", "slice", "t", "transpose", "reshape", "_unsafe_view", "as_strided", "expand", "unsqueeze", "squeeze",
    "select", "permute", "alias", "detach", "_reshape_alias", "view_as", "resolve_conj", "narrow", "flatten",
    "unflatten",
})  # fmt: skip


def count_operators(model: nn.Module, input_ids: torch.Tensor) -> Counter:
    """The compute operators (ATen ops that are not views) of one forward pass, by name."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(input_ids)
    names = (e.name.removeprefix("aten::") for e in prof.events() if e.name.startswith("aten::"))
    return Counter(n for n in names if n not in VIEW_OPS)
