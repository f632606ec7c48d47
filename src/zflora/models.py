"""Models to work on: real model shapes with random weights, local checkpoints, dtypes by hardware.

Latency does not depend on weight values, so benchmarks build the preset shapes
(`presets.py`) with random weights; nothing is ever downloaded.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from .config import DTYPES, check_dtype
from .presets import PRESETS


def preset_config(name: str, layers: int | None = None) -> LlamaConfig:
    if name not in PRESETS:
        raise ValueError(f"preset: unknown {name!r}; accepted: {', '.join(PRESETS)}")
    fields = dict(PRESETS[name], rms_norm_eps=1e-5, max_position_embeddings=131072, rope_theta=500000.0)
    if layers is not None:
        if layers <= 0:
            raise ValueError(f"layers: must be positive, got {layers}")
        fields["num_hidden_layers"] = layers
    return LlamaConfig(**fields)


def head_dim(config: Any) -> int:
    """Attention head size: `head_dim` when the config sets it, else hidden_size / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def torch_dtype(name: str) -> torch.dtype:
    """A dtype by the names every flag and config uses (`zflora.config.DTYPES`)."""
    check_dtype("dtype", name, tuple(DTYPES))
    return getattr(torch, DTYPES[name])


def meta_model(config: Any) -> nn.Module:
    """A causal LM of `config`'s architecture with no storage, for counting parameters instantly."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@torch.no_grad()
def random_model(
    config: LlamaConfig, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", seed: int = 0
) -> LlamaForCausalLM:
    """A model of `config`'s shape with random weights, built in seconds even at 8B.

    Weights are uniform in +-0.035 (std 0.02, as transformers initialises), tiled from
    one random block (drawing billions of numbers one by one takes a minute on a CPU;
    the values do not matter for latency, only that they are not zeros); norm gains are 1.
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model.to_empty(device=device)
    model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)  # buffers lost by to_empty
    g = torch.Generator(device="cpu").manual_seed(seed)
    block = (torch.rand(1 << 22, generator=g) * 0.07 - 0.035).to(dtype=dtype, device=device)
    offset = 0
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
            continue
        flat = p.view(-1)
        for start in range(0, flat.numel(), block.numel()):
            n = min(block.numel(), flat.numel() - start)
            k = offset % (block.numel() - n + 1)  # rotate, so layers are not identical
            flat[start : start + n].copy_(block[k : k + n])
            offset += 7919
    return model.eval()


def require_local(path: str | os.PathLike) -> Path:
    """`path` as a local checkpoint directory (or the name of a fetched registry model, `zflora models
    list`), or an error that says how to provide one."""
    from .registry import resolve

    if not Path(path).is_dir() and (fetched := resolve(str(path))) is not None:
        return fetched
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        hint = " (this looks like a hub id)" if not path.exists() and str(path).count("/") == 1 else ""
        raise FileNotFoundError(
            f"{path}: not a local checkpoint directory{hint}. zflora reads local models only: a directory "
            "with config.json, *.safetensors and the tokenizer files (for example one made by "
            "`huggingface-cli download MODEL --local-dir DIR` on a connected machine)"
        )
    return path


def load_local_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a local Hugging Face checkpoint directory; the hubs are never contacted."""
    path = require_local(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, local_files_only=True).eval()


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The checkpoint's tokenizer, set up for batched generation (left padding, a pad token)."""
    from transformers import AutoTokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from Trainer's data loading
    tok = AutoTokenizer.from_pretrained(require_local(path), local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    tok.padding_side = "left"
    return tok


def cache_kwarg(model: nn.Module) -> str:
    """The keyword the model's forward takes its KV cache by: `cache` (transformers >= 5.24) or
    `past_key_values` (earlier). A name the model does not know is swallowed by its **kwargs, and
    decode would silently run without its context."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT passes kwargs on
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
