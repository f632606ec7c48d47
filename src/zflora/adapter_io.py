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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import ZFLoRAConfig
from .files import atomic_write
from .models import head_dim
from .modules import FusedLinear
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
    return {f: getattr(cfg, f, None) for f in IDENTITY_FIELDS} | {"head_dim": head_dim(cfg)}


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapter (not the base) into directory `path`, each file atomically.

    Each file is written to a temporary name beside it and renamed into place, the
    weights first and the config last; other files in `path` (a Trainer checkpoint's
    optimizer state, say) are left alone.
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
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(path / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
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


@dataclass
class Adapter:
    """An adapter read into memory: its config, the base it was trained on, its tensors."""

    config: ZFLoRAConfig
    base_model: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    source: str = ""


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing")
    try:
        with safe_open(file, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in sorted(f.keys())}
    except SafetensorError as e:
        raise AdapterError(f"{file}: unreadable or truncated safetensors file ({e})") from None
    for name, t in tensors.items():
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise AdapterError(f"{file}: {name} holds non-finite or non-float values")
    return tensors


def read_adapter(path: str | os.PathLike, model: nn.Module | None = None) -> Adapter:
    """Read and validate an adapter directory; with `model`, also check that it fits that model."""
    path = Path(path)
    config, ident = read_adapter_config(path)
    adapter = Adapter(config, ident, _read_tensors(path / WEIGHTS_NAME), str(path))
    if model is not None:
        check_fits(model, adapter)
    return adapter


def check_fits(model: nn.Module, adapter: Adapter) -> dict[str, nn.Parameter]:
    """Raise AdapterError unless `adapter` fits zFLoRA `model` (base, shape fields, tensor names and shapes);
    return the model's adapter parameters by name."""
    where = adapter.source or "adapter"
    mine = base_identity(model)
    ident, config = adapter.base_model, adapter.config
    diff = [f"{k}: adapter {ident.get(k)!r}, model {mine[k]!r}" for k in IDENTITY_FIELDS if ident.get(k) != mine[k]]
    if diff:
        raise AdapterError(f"{where}: adapter was trained on a different base model ({'; '.join(diff)})")
    current = model.zflora_config
    diff = [
        f"{k}: adapter {getattr(config, k)!r}, model {getattr(current, k)!r}"
        for k in SHAPE_FIELDS
        if getattr(config, k) != getattr(current, k)
    ]
    if diff:
        raise AdapterError(
            f"{where}: adapter shape does not match the model's zFLoRA config ({'; '.join(diff)}); "
            "apply zFLoRA with the adapter's config to a fresh base model instead"
        )
    params = adapter_parameters(model)
    missing, extra = sorted(set(params) - set(adapter.tensors)), sorted(set(adapter.tensors) - set(params))
    if missing or extra:
        raise AdapterError(
            f"{where}: tensors do not match the model's adapter"
            + (f"; missing {len(missing)}: {', '.join(missing[:3])}" if missing else "")
            + (f"; unexpected {len(extra)}: {', '.join(extra[:3])}" if extra else "")
        )
    for name, t in adapter.tensors.items():
        if tuple(t.shape) != tuple(params[name].shape):
            raise AdapterError(
                f"{where}: {name} has shape {tuple(t.shape)}, the model expects {tuple(params[name].shape)}"
            )
    return params


@torch.no_grad()
def set_adapter(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Write an in-memory adapter into a zFLoRA model, in either form (hot-swap when fused).

    Checks that it fits first (base, rank, targets, tensor names and shapes): on
    error the model is unchanged. Only the adapter matrices and, when fused, the r
    extra rows/columns of each projection are written; base blocks are never touched.
    """
    _require_zflora(model)
    params = check_fits(model, adapter)
    for name, t in adapter.tensors.items():
        params[name].copy_(t)
    model.zflora_config.alpha = adapter.config.alpha  # the one place every module reads the scale from
    for m in model.modules():
        if isinstance(m, FusedLinear):
            m.refresh_adapter()
    return model


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter saved by `save_adapter` into a zFLoRA model, in either form.

    Raises FileNotFoundError (missing directory or file) or AdapterError (another
    base model, another rank or set of targets, missing/extra/misshapen tensors,
    a corrupt file) before anything is written: on error the model is unchanged.
    The adapter's alpha may differ from the model's; the scaling follows the adapter.
    """
    return set_adapter(model, read_adapter(path))  # set_adapter checks the fit before writing
