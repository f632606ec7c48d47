"""One entry point for every fine-tuning method, so training and benchmarks are method-agnostic."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .adapter_io import Adapter, base_identity
from .config import ALL_PROJECTIONS, DEFAULT_RANK, METHODS, ZFLoRAConfig, check_alpha, check_targets, resolve_targets
from .models import head_dim, meta_model
from .transform import adapter_parameters, apply_zflora, fuse, is_zflora


def lora_config(r: int, alpha: float | None = None, targets: str | list[str] | tuple[str, ...] = "all") -> Any:
    """PEFT LoRA on the projections zFLoRA would adapt (no dropout, no bias); alpha by the same rule."""
    from peft import LoraConfig

    modules = [f"{p}_proj" for p in resolve_targets(targets)]
    return LoraConfig(
        r=r, lora_alpha=check_alpha(alpha, r), target_modules=modules, lora_dropout=0.0, bias="none",
        task_type="CAUSAL_LM",
    )  # fmt: skip


def prepare_model(
    model: nn.Module,
    method: str,
    r: int = DEFAULT_RANK,
    alpha: float | None = None,
    targets: list[str] | tuple[str, ...] | None = None,
    **zflora_kwargs: Any,
) -> nn.Module:
    """Prepare a LLaMA-family causal LM for `method`; returns the model to train or serve.

    `alpha` None means 2 r for every method (`zflora.config.default_alpha`). `targets`: the projections
    lora or zflora adapt instead of all seven (the -mha methods fix theirs).

    base        everything frozen (the reference)
    lora        PEFT LoRA on q,k,v,o,gate,up,down (returns a PeftModel)
    lora-mha    PEFT LoRA on q,k,v,o
    zflora      zFLoRA on q,k,v,o,gate,up,down (in place, training form)
    zflora-mha  zFLoRA on q,k,v,o
    fft         every parameter trainable
    """
    if method not in METHODS:
        raise ValueError(f"method: unknown {method!r}; accepted: {', '.join(METHODS)}")
    check_targets(method, targets)
    if method in ("base", "fft"):
        for p in model.parameters():
            p.requires_grad_(method == "fft")
        return model
    targets = ("mha" if method.endswith("-mha") else "all") if targets is None else targets
    if method.startswith("zflora"):
        return apply_zflora(model, ZFLoRAConfig(r=r, alpha=alpha, targets=targets, **zflora_kwargs))
    from peft import get_peft_model

    ZFLoRAConfig(r=r, alpha=alpha)  # same validation of r and alpha for every method
    return get_peft_model(model, lora_config(r, alpha, targets))


def random_adapter(model: nn.Module, seed: int = 0, std: float = 0.02) -> Adapter:
    """A non-zero zFLoRA adapter for `model` (B included), for benchmarks and tests that must be able to fail."""
    g = torch.Generator().manual_seed(seed)
    params = adapter_parameters(model)
    tensors = {n: (torch.randn(p.shape, generator=g) * std).to(p.dtype) for n, p in params.items()}
    return Adapter(model.zflora_config, base_identity(model), tensors)


@torch.no_grad()
def randomize_lora(model: nn.Module, seed: int = 0, std: float = 0.02, adapter: str | None = None) -> None:
    """Non-zero PEFT LoRA B matrices (PEFT starts them at zero), for all adapters or the one named."""
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_B" in n and (adapter is None or f".{adapter}." in n):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def count_trainable_parameters(model: nn.Module) -> int:
    """Number of parameters that receive gradients (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def zflora_parameter_formula(config: Any, zf: ZFLoRAConfig) -> int:
    """The spec's count: r*(in_o + in_down) + r*(out_q+out_k+out_v+out_gate+out_up) per layer, + r*d once."""
    d, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * head_dim(config), config.num_key_value_heads * head_dim(config)
    size = {"q": q, "k": kv, "v": kv, "gate": inter, "up": inter, "o": q, "down": inter}
    per_layer = sum(zf.r * size[p] for p in ALL_PROJECTIONS if p in zf.target_modules)
    extra = zf.r * d * zf.expand_input + (zf.r * config.vocab_size if zf.lm_head else 0)
    return layers * per_layer + extra


def matched_rank(model_path: str | os.PathLike, method: str, reference: str, rank: int) -> int:
    """The rank at which `method` trains about as many parameters as `reference` at `rank`."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, local_files_only=True)  # read once, not per candidate rank

    def count(m: str, r: int) -> int:
        return count_trainable_parameters(prepare_model(meta_model(config), m, r=r, alpha=None))

    target = count(reference, rank)
    return min(range(1, 8 * rank + 1), key=lambda k: abs(count(method, k) - target))


def prepare_for_eval(model: nn.Module) -> nn.Module:
    """A trained or loaded model as it is served: zFLoRA fused, PEFT LoRA merged, eval mode. The one
    preparation of `zflora eval`, `zflora study` and `zflora accuracy`."""
    if is_zflora(model):
        fuse(model)
    elif hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.eval()
