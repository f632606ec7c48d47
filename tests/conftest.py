"""Tiny in-process models and shared helpers for the test suite."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import zflora
from zflora.adapter_io import WEIGHTS_NAME, AdapterError
from zflora.models import cache_kwarg

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def tiny_model(
    arch: str = "llama",
    *,
    tie: bool = False,
    layers: int = 2,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    hidden: int = 48,
    mlp: int = 80,
) -> torch.nn.Module:
    """A random LLaMA-family causal LM: d=48, 6 heads of 8, 2 KV heads (GQA), MLP 80, vocab 97 (by default;
    `hidden` sets d, in heads of 8)."""
    config_cls, model_cls = ARCHS[arch]
    cfg = config_cls(
        vocab_size=97,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 8,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        initializer_range=0.2,  # larger than default so that errors are visible in the logits
    )
    torch.manual_seed(seed)
    return model_cls(cfg).to(dtype).eval()


def randomize_adapter(model: torch.nn.Module, seed: int = 1, std: float = 0.2) -> None:
    """Non-zero adapters (B included), so that equivalence checks can fail. Keeps fused blocks in sync."""
    zflora.set_adapter(model, zflora.random_adapter(model, seed, std))


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="session")
def stories_path() -> Path:
    if not (STORIES / "config.json").is_file():
        pytest.skip(f"real model not available at {STORIES}")
    return STORIES


def rewrite_weights(directory: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write an adapter's weights file by hand and record its sha256 in the config, as a save would: the load's
    deeper checks (names, shapes, values, save id) are then what must refuse it."""
    file = Path(directory) / zflora.adapter_io.WEIGHTS_NAME
    save_file(tensors, file, metadata=metadata)
    cfg = Path(directory) / zflora.adapter_io.CONFIG_NAME
    meta = json.loads(cfg.read_text())
    meta["weights_sha256"] = hashlib.sha256(file.read_bytes()).hexdigest()
    cfg.write_text(json.dumps(meta))


def adapted(seed: int = 1, model: torch.nn.Module | None = None, **kwargs) -> torch.nn.Module:
    model = model if model is not None else tiny_model(tie=True)
    zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=8, **kwargs))
    randomize_adapter(model, seed=seed)
    return model


def refused_unchanged(model: torch.nn.Module, path, match: str, **kwargs) -> None:
    before = state(model)
    with pytest.raises(AdapterError, match=match):
        zflora.load_adapter(model, path, **kwargs)
    assert_same_state(before, state(model))


def safetensors_header(file) -> dict:
    with safe_open(file, framework="pt") as f:
        return f.metadata()


def saved_adapter(tmp_path, dtype=torch.float32, seed=1):
    model = tiny_model(tie=True)
    zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=8))
    randomize_adapter(model, seed=seed)
    zflora.save_adapter(model, tmp_path / "a")
    return tmp_path / "a"


def set_adapter_tensor(path, name, value, dtype=torch.float32):
    file = path / WEIGHTS_NAME
    tensors, header = load_file(file), safetensors_header(file)
    tensors[name] = torch.full(tensors[name].shape, value, dtype=dtype)
    rewrite_weights(file.parent, tensors, header)


# --------------------------------------------------------------------------- ONNX exports


def zflora_model(base: torch.nn.Module, seed: int, alpha: float = 8.0, **kw) -> torch.nn.Module:
    model = zflora.apply_zflora(copy.deepcopy(base), zflora.ZFLoRAConfig(r=4, alpha=alpha, **kw))
    return zflora.fuse(zflora.set_adapter(model, zflora.random_adapter(model, seed, std=0.2)))


def hf_steps(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> list[np.ndarray]:
    """Logits of the prompt, then of `steps` single-token steps through the KV cache (fixed tokens)."""
    from transformers import DynamicCache

    cache, out = {cache_kwarg(model): DynamicCache(config=model.config)}, []
    with torch.no_grad():
        out.append(model(ids, use_cache=True, **cache).logits.float().numpy())
        for t in range(steps):
            out.append(model(ids[:, t : t + 1], use_cache=True, **cache).logits.float().numpy())
    return out


def ort_steps(sess, manifest: dict, ids: np.ndarray, steps: int) -> list[np.ndarray]:
    """The same through an ONNX Runtime session of an export."""
    from zflora.export import onnx as zonnx

    logits, *past = sess.run(None, zonnx.feeds(manifest, ids, None, 0))
    out, past_len = [logits], ids.shape[1]
    for t in range(steps):
        logits, *past = sess.run(None, zonnx.feeds(manifest, ids[:, t : t + 1], past, past_len))
        out.append(logits)
        past_len += 1
    return out
