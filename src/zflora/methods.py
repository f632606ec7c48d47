"""One entry point for every fine-tuning method, so training and benchmarks are method-agnostic."""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import ALL_PROJECTIONS, TARGET_PRESETS, ZFLoRAConfig
from .transform import apply_zflora

METHODS = ("base", "lora", "lora-mha", "zflora", "zflora-mha", "fft")


def lora_config(r: int, alpha: float, targets: str = "all") -> Any:
    """PEFT LoRA on the same projections zFLoRA uses (no dropout, no bias)."""
    from peft import LoraConfig

    modules = [f"{p}_proj" for p in TARGET_PRESETS[targets]]
    return LoraConfig(
        r=r, lora_alpha=alpha, target_modules=modules, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"
    )


def prepare_model(model: nn.Module, method: str, r: int = 16, alpha: float = 32.0, **zflora_kwargs: Any) -> nn.Module:
    """Prepare a LLaMA-family causal LM for `method`; returns the model to train or serve.

    base        everything frozen (the reference)
    lora        PEFT LoRA on q,k,v,o,gate,up,down (returns a PeftModel)
    lora-mha    PEFT LoRA on q,k,v,o
    zflora      zFLoRA on q,k,v,o,gate,up,down (in place, training form)
    zflora-mha  zFLoRA on q,k,v,o
    fft         every parameter trainable
    """
    if method not in METHODS:
        raise ValueError(f"method: unknown {method!r}; accepted: {', '.join(METHODS)}")
    if method in ("base", "fft"):
        for p in model.parameters():
            p.requires_grad_(method == "fft")
        return model
    targets = "mha" if method.endswith("-mha") else "all"
    if method.startswith("zflora"):
        return apply_zflora(model, ZFLoRAConfig(r=r, alpha=alpha, targets=targets, **zflora_kwargs))
    from peft import get_peft_model

    ZFLoRAConfig(r=r, alpha=alpha)  # same validation of r and alpha for every method
    return get_peft_model(model, lora_config(r, alpha, targets))


def count_trainable_parameters(model: nn.Module) -> int:
    """Number of parameters that receive gradients (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def zflora_parameter_formula(config: Any, zf: ZFLoRAConfig) -> int:
    """The spec's count: r*(in_o + in_down) + r*(out_q+out_k+out_v+out_gate+out_up) per layer, + r*d once."""
    d, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    size = {"q": q, "k": kv, "v": kv, "gate": inter, "up": inter, "o": q, "down": inter}
    per_layer = sum(zf.r * size[p] for p in ALL_PROJECTIONS if p in zf.target_modules)
    extra = zf.r * d * zf.expand_input + (zf.r * config.vocab_size if zf.lm_head else 0)
    return layers * per_layer + extra
