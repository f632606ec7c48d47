"""Adapter files: `save_adapter` / `load_adapter` (PEFT-like directory layout).

    path/adapter_config.json         {"zflora": <ZFLoRAConfig>, "base_model": <identity>, "format": 1}
    path/adapter_model.safetensors   one tensor per adapter matrix, named like the model's
                                     parameters (`model.layers.0.self_attn.q_proj.zflora_B`),
                                     always in the unfused (training) form

Loading validates everything before touching the model, so a bad file changes
nothing. On a fused model it rewrites only the r extra rows/columns of each
projection: adapter hot-swap.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import ZFLoRAConfig
from .modules import FusedLinear, ZFLoRALinear
from .transform import _require_zflora, adapter_parameters

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1
# Config fields that fix the shapes of the base model an adapter was trained on.
IDENTITY_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
)
# Adapter config fields that fix the adapter's tensor shapes; alpha may differ.
SHAPE_FIELDS = ("r", "targets", "lm_head", "expand_input")


class AdapterError(ValueError):
    """An adapter directory that cannot be loaded into this model."""


def base_identity(model: nn.Module) -> dict[str, Any]:
    cfg = model.config
    ident = {f: getattr(cfg, f, None) for f in IDENTITY_FIELDS}
    if ident["head_dim"] is None:
        ident["head_dim"] = cfg.hidden_size // cfg.num_attention_heads
    return ident


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapter (not the base) to directory `path`, atomically.

    The files are written to a temporary directory beside `path` and moved into
    place at the end; an existing adapter at `path` is replaced only then.
    """
    _require_zflora(model)
    path = Path(path)
    params = adapter_parameters(model)
    tensors = {n: params[n].detach().contiguous().cpu() for n in sorted(params)}  # deterministic file
    meta = {
        "format": FORMAT_VERSION,
        "library": "zflora",
        "zflora": model.zflora_config.to_dict(),
        "base_model": base_identity(model),
        "name_or_path": getattr(model.config, "_name_or_path", "") or "",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt", "library": "zflora"})
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_adapter_config(path: str | os.PathLike) -> tuple[ZFLoRAConfig, dict[str, Any]]:
    """Parse and validate `path/adapter_config.json`; return the config and the base identity."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {path}")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: missing (an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        meta = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("zflora"), dict):
        raise AdapterError(f"{cfg_file}: no 'zflora' object; is this a zFLoRA adapter?")
    if meta.get("format") != FORMAT_VERSION:
        raise AdapterError(f"{cfg_file}: format {meta.get('format')!r} is not supported (expected {FORMAT_VERSION})")
    try:
        config = ZFLoRAConfig.from_dict(meta["zflora"])
    except (ValueError, TypeError) as e:
        raise AdapterError(f"{cfg_file}: {e}") from None
    ident = meta.get("base_model")
    if not isinstance(ident, dict):
        raise AdapterError(f"{cfg_file}: no 'base_model' object")
    return config, ident


def _read_tensors(file: Path, expected: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing")
    try:
        with safe_open(file, framework="pt") as f:
            keys = set(f.keys())
            missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
            if missing or extra:
                raise AdapterError(
                    f"{file}: tensors do not match the model's adapter"
                    + (f"; missing {len(missing)}: {', '.join(missing[:3])}" if missing else "")
                    + (f"; unexpected {len(extra)}: {', '.join(extra[:3])}" if extra else "")
                )
            tensors = {k: f.get_tensor(k) for k in sorted(keys)}
    except SafetensorError as e:
        raise AdapterError(f"{file}: unreadable or truncated safetensors file ({e})") from None
    for name, t in tensors.items():
        want = expected[name]
        if tuple(t.shape) != tuple(want.shape):
            raise AdapterError(f"{file}: {name} has shape {tuple(t.shape)}, the model expects {tuple(want.shape)}")
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise AdapterError(f"{file}: {name} holds non-finite or non-float values")
    return tensors


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter saved by `save_adapter` into a zFLoRA model, in either form.

    Raises FileNotFoundError (missing directory or file) or AdapterError (another
    base model, another rank or set of targets, missing/extra/misshapen tensors,
    a corrupt file) before anything is written: on error the model is unchanged.
    The adapter's alpha may differ from the model's; the scaling follows the adapter.
    """
    _require_zflora(model)
    path = Path(path)
    config, ident = read_adapter_config(path)
    mine = base_identity(model)
    diff = [f"{k}: adapter {ident.get(k)!r}, model {mine[k]!r}" for k in IDENTITY_FIELDS if ident.get(k) != mine[k]]
    if diff:
        raise AdapterError(f"{path}: adapter was trained on a different base model ({'; '.join(diff)})")
    current = model.zflora_config
    diff = [
        f"{k}: adapter {getattr(config, k)!r}, model {getattr(current, k)!r}"
        for k in SHAPE_FIELDS
        if getattr(config, k) != getattr(current, k)
    ]
    if diff:
        raise AdapterError(
            f"{path}: adapter shape does not match the model's zFLoRA config ({'; '.join(diff)}); "
            "apply zFLoRA with the adapter's config to a fresh base model instead"
        )
    params = adapter_parameters(model)
    tensors = _read_tensors(path / WEIGHTS_NAME, params)

    # Everything is validated: write. Only adapter tensors (and the fused blocks) change.
    for name, t in tensors.items():
        params[name].copy_(t)
    for m in model.modules():
        if isinstance(m, ZFLoRALinear | FusedLinear):  # not LlamaAttention.scaling
            m.scaling = config.scaling
        if isinstance(m, FusedLinear):
            m.refresh_adapter()
    model.zflora_config = config
    return model
