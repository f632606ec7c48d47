"""Serving zFLoRA with vLLM: the plugin entry point, load-time fusion, `zflora serve`.

vLLM runs a zFLoRA model as its own architecture, `ZFLoRALlamaForCausalLM`
(`zflora.vllm_model`), registered in every vLLM process by the package entry
point `vllm.general_plugins: zflora = zflora.serve:register`. A user points vLLM
at the base checkpoint and names the adapter in the config overrides:

    LLM(model=BASE, hf_overrides=zflora.serve.hf_overrides(ADAPTER, BASE))
    zflora serve --model BASE --adapter ADAPTER        # OpenAI-compatible server

Nothing is exported or copied: the model reads the adapter directory (the same
one `save_adapter` writes) and fuses it into the base weights as they stream in
(`fuse_checkpoint`), so the engine holds only the fused form.

This module does not import vLLM, so the fusion and validation are tested
without it; `zflora.vllm_model` does.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from .adapter_io import Adapter, AdapterError, read_adapter, read_adapter_config
from .config import INPUT_PROJECTIONS
from .models import meta_model, require_local
from .transform import UnsupportedModelError, apply_zflora

ARCHITECTURE = "ZFLoRALlamaForCausalLM"
MODEL_CLASS = "zflora.vllm_model:ZFLoRALlamaForCausalLM"
ADAPTER_FIELD = "zflora_adapter"  # the config override that names the adapter directory
MODEL_TYPES = ("llama",)  # vLLM's LlamaForCausalLM layers; other families have their own vLLM classes

_PROJECTION = re.compile(r"(model\.layers\.\d+\.(?:self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj)\.(weight|bias)")
_NORM = re.compile(r"model\.(?:layers\.\d+\.(?:input|post_attention)_layernorm|norm)\.weight")


def register() -> None:
    """vLLM plugin entry point: make `ZFLoRALlamaForCausalLM` known to this vLLM process."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)  # lazy: imported when a model is built


def read_for_config(config: Any, path: str | os.PathLike) -> Adapter:
    """Read adapter directory `path` and check that it fits a base model of HF `config`.

    The check builds the base on the meta device (no memory) and applies the
    adapter's config to it, so it is the same check `load_adapter` makes: base
    shapes, tensor names and shapes. Raises before any weight is touched.
    """
    if getattr(config, "model_type", None) not in MODEL_TYPES:
        raise UnsupportedModelError(
            f"the vLLM zFLoRA model supports model_type {', '.join(MODEL_TYPES)}; "
            f"got {getattr(config, 'model_type', None)!r}"
        )
    base = meta_model(config)
    apply_zflora(base, read_adapter_config(path)[0])
    return read_adapter(path, model=base)


def hf_overrides(adapter: str | os.PathLike, model: str | os.PathLike | None = None) -> dict[str, Any]:
    """vLLM `hf_overrides` that serve base checkpoint `model` with the zFLoRA adapter in directory `adapter`.

    With `model`, the adapter is checked against the base's config.json first, so a
    mismatch is reported here rather than inside a vLLM worker.
    """
    path = Path(adapter).resolve()
    if model is not None:
        from transformers import AutoConfig

        read_for_config(AutoConfig.from_pretrained(require_local(model), local_files_only=True), path)
    else:
        read_adapter(path)
    return {"architectures": [ARCHITECTURE], ADAPTER_FIELD: str(path)}


def fuse_checkpoint(
    weights: Iterable[tuple[str, torch.Tensor]], adapter: Adapter, tie_word_embeddings: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """Turn a base checkpoint's tensors (Hugging Face names) into the fused zFLoRA form, one at a time.

    q/k/v/gate/up become [W | s B] (zeros where untargeted), o/down [W ; A] (zeros
    where untargeted; a bias gets r zeros), every RMSNorm gain [g ; 1], and, when
    the adapter adapts the LM head, lm_head [W | s B] (made from the embedding when
    tied). The embedding's A_in comes last as `model.zflora_A_in`. These are the
    tensors of `zflora.fuse` applied to the Hugging Face model, with its
    `HiddenReadLinear`s written as zero columns.
    """
    cfg, t = adapter.config, adapter.tensors
    r, s = cfg.r, cfg.scaling

    def read_z(w: torch.Tensor, key: str) -> torch.Tensor:  # [W | s B]
        b = t.get(f"{key}.zflora_B")
        extra = w.new_zeros(w.shape[0], r) if b is None else s * b.to(w.device, w.dtype)
        return torch.cat([w, extra], dim=1)

    for name, w in weights:
        if m := _PROJECTION.fullmatch(name):
            key, proj, kind = m.groups()
            if proj in INPUT_PROJECTIONS:
                w = read_z(w, key) if kind == "weight" else w
            elif kind == "weight":
                a = t.get(f"{key}.zflora_A")
                w = torch.cat([w, w.new_zeros(r, w.shape[1]) if a is None else a.to(w.device, w.dtype)], dim=0)
            else:
                w = torch.cat([w, w.new_zeros(r)])
        elif _NORM.fullmatch(name):
            w = torch.cat([w, w.new_ones(r)])
        elif name == "lm_head.weight" and cfg.lm_head:
            if tie_word_embeddings:
                continue  # made from the embedding below
            w = read_z(w, "lm_head")
        yield name, w
        if name == "model.embed_tokens.weight" and cfg.lm_head and tie_word_embeddings:
            yield "lm_head.weight", read_z(w, "lm_head")
    if cfg.expand_input:
        yield "model.zflora_A_in", t["model.embed_tokens.zflora_A_in"]


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def require_vllm() -> None:
    if not vllm_available():
        raise SystemExit(
            "vLLM is not installed in this environment. `make vllm-setup` makes .venv-vllm with vLLM "
            "(CPU build) and zflora; on a GPU machine, `pip install 'zflora[vllm]'`."
        )


def serve_command(model: str, adapter: str | None, vllm_args: list[str]) -> list[str]:
    """The command line of vLLM's OpenAI-compatible server for base `model` (+ zFLoRA `adapter`)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(Path(model).resolve())]
    if adapter is not None:
        overrides = hf_overrides(adapter, model)
        cmd += ["--hf-overrides", json.dumps(overrides)]
        if "--served-model-name" not in vllm_args:
            cmd += ["--served-model-name", Path(adapter).resolve().name]
    return cmd + vllm_args


def serve(model: str, adapter: str | None, vllm_args: list[str], dry_run: bool = False) -> int:
    try:
        cmd = serve_command(model, adapter, vllm_args)
    except (FileNotFoundError, AdapterError, UnsupportedModelError) as e:
        raise SystemExit(f"zflora serve: {e}") from None
    if dry_run:
        print(shlex.join(cmd))
        return 0
    require_vllm()
    return subprocess.call(cmd)
