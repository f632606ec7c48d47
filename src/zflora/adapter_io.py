"""Adapter files: `save_adapter` / `load_adapter` (PEFT-like directory layout).

    path/adapter_config.json         {"zflora": <ZFLoRAConfig>, "base_model": <identity>, "format": 1,
                                      "save_id": <id>}
    path/adapter_model.safetensors   one tensor per adapter matrix, named like the model's
                                     parameters (`model.layers.0.self_attn.q_proj.zflora_B`),
                                     always in the unfused (training) form; its header
                                     metadata carries the same save_id

Each file is replaced atomically, and both carry the id of the save that wrote
them, so a pair from two saves (a crash between the two renames) is refused.
The base identity holds the shapes, the config fields that change the base's
function (RoPE theta, RMSNorm eps, tied embeddings) and a fingerprint of a few
base weights, so an adapter is refused by another base model of the same shapes.
Loading validates everything before touching the model, so a bad file changes
nothing. On a fused model it rewrites only the r extra rows/columns of each
projection: adapter hot-swap.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from .compiled import is_frozen
from .config import ZFLoRAConfig
from .files import atomic_write, read_json_object, remove_stale, write_json, writer_lock
from .fingerprint import FINGERPRINT_VALUES, base_fingerprint, fingerprinted, leading, recorded
from .fusion import adapter_tensor
from .models import head_dim, meta_model
from .modules import FusedLinear
from .transform import adapter_parameters, apply_zflora, is_zflora
from .weight_only import QuantizedFusedLinear

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
# Config fields that change the base model's function at the same shapes (compared when recorded).
FUNCTION_FIELDS = ("rope_theta", "rms_norm_eps", "tie_word_embeddings")
# Adapter config fields that fix the adapter's tensor shapes (targets normalised); alpha may differ.
SHAPE_FIELDS = ("r", "target_modules", "lm_head", "expand_input")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class AdapterError(ValueError):
    """An adapter directory that cannot be loaded into this model."""


def _rope_theta(cfg: Any) -> float | None:
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
    return None if theta is None else float(theta)


def checkpoint_fingerprint(directory: str | os.PathLike, layers: int) -> dict[str, list[float]] | None:
    """`base_fingerprint` of a checkpoint directory with `layers` layers, read from its safetensors files without
    loading the model (a few hundred bytes per tensor); None where it has no safetensors weights or lacks one
    of the tensors."""
    wanted, found = fingerprinted(layers), {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt") as f:
                names = set(f.keys())
                for short, name in wanted.items():
                    if short not in found and name in names:
                        part = f.get_slice(name)
                        found[short] = leading(part[0:1] if len(part.get_shape()) > 1 else part[:FINGERPRINT_VALUES])
        except SafetensorError as e:
            raise AdapterError(f"{file}: unreadable safetensors file ({e})") from None
    return found if len(found) == len(wanted) else None


def base_identity(model: nn.Module) -> dict[str, Any]:
    cfg = model.config
    ident = {f: getattr(cfg, f, None) for f in IDENTITY_FIELDS} | {"head_dim": head_dim(cfg)}
    ident |= {"rope_theta": _rope_theta(cfg), "rms_norm_eps": getattr(cfg, "rms_norm_eps", None),
              "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False))}  # fmt: skip
    if (record := recorded(model)) is not None:  # a quantized model: its fp32 base's (quantizing unties the head)
        ident["tie_word_embeddings"] = record["tie_word_embeddings"]
    return ident | {"fingerprint": base_fingerprint(model)}


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapter (not the base) into directory `path`, each file atomically.

    The weights first, the config last, both stamped with one save id; saves into one
    directory from several threads or processes take turns, so the last one's pair is
    what stays. Temporary files left by an interrupted earlier save are removed. Other
    files in `path` (a Trainer checkpoint's optimizer state, say) are left alone.
    Non-finite weights are refused.
    """
    _require(model)
    path = Path(path)
    params = adapter_parameters(model)
    tensors = {n: params[n].detach().contiguous().cpu() for n in sorted(params)}  # deterministic file
    bad = [n for n, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise AdapterError(f"{path}: refusing to save non-finite adapter weights ({len(bad)} tensors, e.g. {bad[0]})")
    save_id = uuid.uuid4().hex
    meta = {
        "format": FORMAT_VERSION,
        "library": "zflora",
        "save_id": save_id,
        "zflora": model.zflora_config.to_dict(),
        "base_model": base_identity(model),
        "name_or_path": getattr(model.config, "_name_or_path", "") or "",
    }
    blob = save(tensors, metadata={"format": "pt", "zflora_save_id": save_id})
    meta["weights_sha256"] = hashlib.sha256(blob).hexdigest()  # checked at load: flipped bytes that still parse
    path.mkdir(parents=True, exist_ok=True)
    with writer_lock(path):  # two saves into one directory: each writes its pair whole, never interleaved
        remove_stale([*path.glob(f".{WEIGHTS_NAME}.*.tmp"), *path.glob(f".{CONFIG_NAME}.*.tmp")])  # killed saves
        atomic_write(path / WEIGHTS_NAME, lambda tmp: tmp.write_bytes(blob))
        write_json(path / CONFIG_NAME, meta, indent=2)
    return path


def _require(model: nn.Module) -> None:
    if hasattr(model, "zflora_stack"):
        raise AdapterError(
            "this model holds stacked adapters: each slot's adapter has its own directory already (the stack "
            "is built from them); swap a slot with zflora.swap_slot"
        )
    if not is_zflora(model):
        raise AdapterError(
            "this model has no zFLoRA adapter: load_adapter(model, path) applies the adapter's own config "
            "to a plain model, or call zflora.apply_zflora(model, config) first"
        )


def read_adapter_config(path: str | os.PathLike) -> tuple[ZFLoRAConfig, dict[str, Any], str | None]:
    """Parse and validate `path/adapter_config.json`; return the config, the base identity and the save id."""
    path = Path(path)
    if path.is_file():
        raise AdapterError(f"{path}: is a file; pass the adapter directory (holding {CONFIG_NAME})")
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {path}")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: missing (an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    meta = read_json_object(cfg_file, AdapterError)
    if not isinstance(meta.get("zflora"), dict):
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
    save_id = meta.get("save_id")
    return config, ident, save_id if isinstance(save_id, str) else None


def _weights_digest(path: Path) -> str | None:
    """The weights file's sha256 recorded at save (None for adapters saved before it was recorded)."""
    digest = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8")).get("weights_sha256")
    if digest is not None and not isinstance(digest, str):
        raise AdapterError(f"{path / CONFIG_NAME}: weights_sha256 must be a string")
    return digest


@dataclass
class Adapter:
    """An adapter read into memory: its config, the base it was trained on, its tensors."""

    config: ZFLoRAConfig
    base_model: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    source: str = ""


def _read_tensors(file: Path, save_id: str | None, digest: str | None = None) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing")
    try:
        with safe_open(file, framework="pt") as f:
            written_by = (f.metadata() or {}).get("zflora_save_id")
            tensors = {k: f.get_tensor(k) for k in sorted(f.keys())}
    except (SafetensorError, TypeError, ValueError) as e:
        raise AdapterError(f"{file}: unreadable or truncated safetensors file ({e})") from None
    if save_id is not None and written_by != save_id:
        raise AdapterError(
            f"{file}: written by another save than {CONFIG_NAME} beside it (save ids {written_by!r} and "
            f"{save_id!r}): a save was interrupted between its two files; save the adapter again"
        )
    # after the diagnoses above, which say more than a mismatch
    if digest is not None and hashlib.sha256(file.read_bytes()).hexdigest() != digest:
        raise AdapterError(
            f"{file}: content differs from the sha256 recorded at save ({CONFIG_NAME}); the file was changed or damaged"
        )
    for name, t in tensors.items():
        _require_float(file, name, t)
        if not torch.isfinite(t).all():
            raise AdapterError(f"{file}: {name} holds non-finite values (inf or NaN)")
    return tensors


def _require_float(where: Any, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:  # before any arithmetic: isfinite is not implemented for float8
        raise AdapterError(f"{where}: {name} is {t.dtype}; adapter tensors must be float32, float16 or bfloat16")


def read_adapter(path: str | os.PathLike, model: nn.Module | None = None, check_base: bool = True) -> Adapter:
    """Read and validate an adapter directory; with `model`, also check that it fits that model."""
    path = Path(path)
    config, ident, save_id = read_adapter_config(path)
    adapter = Adapter(config, ident, _read_tensors(path / WEIGHTS_NAME, save_id, _weights_digest(path)), str(path))
    if model is not None:
        check_fits(model, adapter, check_base)
    return adapter


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _fingerprint_differs(mine: dict[str, list[float]] | None, theirs: Any, where: str) -> list[str]:
    if theirs is not None and not isinstance(theirs, dict):
        raise AdapterError(f"{where}: base_model.fingerprint must be an object, got {type(theirs).__name__}")
    if not mine or not theirs:
        return []  # a meta model, or an adapter saved before fingerprints: nothing to compare
    out = []
    for name, values in mine.items():
        if name not in theirs:
            continue  # fingerprinted by an older version (three tensors): compared where both have values
        other = theirs[name]
        if not isinstance(other, list) or len(other) != len(values):
            out.append(name)
            continue
        a, b = torch.tensor(values), torch.tensor(other, dtype=torch.float32)
        if not torch.allclose(a, b, rtol=2e-2, atol=1e-3 * float(a.abs().max().clamp(min=1e-6))):  # dtype rounding
            out.append(name)
    return out


def check_same_base(model: nn.Module | dict[str, Any], adapter: Adapter, weights: bool = True) -> None:
    """Raise AdapterError unless `adapter` was trained on `model`'s base (a model, or its `base_identity`): the
    shapes always; with `weights`, the function-changing config fields and the weight fingerprint recorded."""
    mine = model if isinstance(model, dict) else base_identity(model)
    where, ident = adapter.source or "adapter", adapter.base_model
    diff = [f"{k}: adapter {ident.get(k)!r}, model {mine[k]!r}" for k in IDENTITY_FIELDS if ident.get(k) != mine[k]]
    if weights:
        diff += [f"{k}: adapter {ident[k]!r}, model {mine[k]!r}" for k in FUNCTION_FIELDS
                 if ident.get(k) is not None and mine[k] is not None and not _same(ident[k], mine[k])]  # fmt: skip
        differs = _fingerprint_differs(mine["fingerprint"], ident.get("fingerprint"), where)
        diff += [f"weights of {n} differ" for n in differs]
    if diff:
        hint = "" if not weights else " (check_base=False loads it anyway, for those who know it fits)"
        raise AdapterError(f"{where}: adapter was trained on a different base model ({'; '.join(diff)}){hint}")


def check_fits(model: nn.Module, adapter: Adapter, check_base_weights: bool = True) -> dict[str, torch.Tensor]:
    """Raise AdapterError unless `adapter` fits zFLoRA `model`: its base, shape fields, tensor names and
    shapes, and values that stay finite in the model's dtype. Return the tensors to write, by parameter
    name, already cast: everything is checked before the first write."""
    _require(model)
    where, config, current = adapter.source or "adapter", adapter.config, model.zflora_config
    check_same_base(model, adapter, check_base_weights)
    diff = [f"{k.replace('target_modules', 'targets')}: adapter {getattr(config, k)!r}, model "
            f"{getattr(current, k)!r}" for k in SHAPE_FIELDS if getattr(config, k) != getattr(current, k)]  # fmt: skip
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
    cast = {}
    for name, t in adapter.tensors.items():
        p = params[name]
        if tuple(t.shape) != tuple(p.shape):
            raise AdapterError(f"{where}: {name} has shape {tuple(t.shape)}, the model expects {tuple(p.shape)}")
        _require_float(where, name, t)
        c = t.detach().to(p.dtype)  # on its own device: a meta probe checks the values too
        scaled = c * config.scaling if name.endswith(adapter_tensor("in")) else c  # what a fused block will hold
        if not torch.isfinite(scaled).all():
            raise AdapterError(f"{where}: {name} is not finite in the model's dtype {p.dtype} (overflow or NaN)")
        cast[name] = c if p.is_meta else c.to(p.device)
    return cast


def _require_swappable(model: nn.Module) -> None:
    if is_frozen(model):
        raise AdapterError(
            "this model was compiled with freeze=True: its weights are constants of the compiled code and a swap "
            "would not be seen; compile without freeze to hot-swap adapters"
        )


@torch.no_grad()
def set_adapter(model: nn.Module, adapter: Adapter, check_base: bool = True) -> nn.Module:
    """Write an in-memory adapter into a zFLoRA model, in either form (hot-swap when fused).

    Checks everything first (base, rank, targets, tensor names, shapes and values): on
    error the model is unchanged. Only the adapter matrices and, when fused, the r
    extra rows/columns of each projection are written; base blocks are never touched.
    `check_base=False` skips the base weight fingerprint and function-field checks.
    """
    _require_swappable(model)
    params = adapter_parameters(model) if is_zflora(model) else {}
    for name, t in check_fits(model, adapter, check_base).items():
        params[name].copy_(t)
    model.zflora_config.alpha = adapter.config.alpha  # the one place every module reads the scale from
    for m in model.modules():
        if isinstance(m, (FusedLinear, QuantizedFusedLinear)):  # the adapter's block (bytes) only
            m.refresh_adapter()
    return model


def adapter_kind(path: str | os.PathLike) -> str:
    """What an adapter directory holds, by one rule for every command: "zflora" (its config has a `zflora`
    object) or "peft" (a `peft_type`); anything else is an error naming the file."""
    cfg = Path(path) / CONFIG_NAME
    if not cfg.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME}; pass a zFLoRA or PEFT adapter directory")
    meta = read_json_object(cfg, AdapterError)
    if isinstance(meta.get("zflora"), dict):
        return "zflora"
    if "peft_type" in meta:
        return "peft"
    raise AdapterError(f"{cfg}: neither a zFLoRA adapter (a 'zflora' object) nor a PEFT one (a 'peft_type')")


def attach_adapter(model: nn.Module, path: str | os.PathLike, check_base: bool = True) -> nn.Module:
    """Any adapter directory onto a base model: zFLoRA through `load_adapter` (in place), PEFT LoRA through
    `PeftModel.from_pretrained` (unmerged; returns the PEFT model). An adapter that does not fit is an
    AdapterError naming the directory, for both kinds."""
    if adapter_kind(path) == "zflora":
        return load_adapter(model, path, check_base)
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, path)
    except (RuntimeError, KeyError, ValueError) as e:  # size mismatches: an adapter of another base
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise AdapterError(f"{path}: this PEFT adapter does not fit the model ({first})") from None


def load_adapter(model: nn.Module, path: str | os.PathLike, check_base: bool = True) -> nn.Module:
    """Load an adapter saved by `save_adapter`, as `PeftModel.from_pretrained` does for LoRA.

    Into a zFLoRA model, in either form (a hot-swap when fused); into a plain model, by
    first applying the adapter's own config. Raises FileNotFoundError (missing directory
    or file), AdapterError (another base model, another rank or set of targets,
    missing/extra/misshapen tensors, a corrupt or mixed-up file) or UnsupportedModelError
    before anything is written: on error the model is unchanged. The adapter's alpha may
    differ from the model's; the scaling follows the adapter.
    """
    adapter = read_adapter(path)
    _require_swappable(model)  # before the surgery below, which a refusal must not leave behind
    if not is_zflora(model):
        dtype = next(model.parameters()).dtype  # values are checked for overflow in the model's own dtype
        probe = meta_model(model.config).to(dtype)  # the same surgery on an empty copy: every check first
        apply_zflora(probe, adapter.config)
        check_fits(probe, adapter, check_base_weights=False)
        check_same_base(model, adapter, check_base)
        apply_zflora(model, adapter.config)
    return set_adapter(model, adapter, check_base)
