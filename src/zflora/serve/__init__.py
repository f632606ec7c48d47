"""Serving zFLoRA with vLLM: the plugin entry point, load-time fusion, `zflora serve`.

vLLM runs a zFLoRA model as its own architecture, `ZFLoRALlamaForCausalLM`
(`zflora.serve.vllm_model`), registered in every vLLM process by the package entry
point `vllm.general_plugins: zflora = zflora.serve:register`. A user points vLLM
at the base checkpoint and names the adapter in the config overrides:

    LLM(model=BASE, hf_overrides=zflora.serve.hf_overrides(ADAPTER, BASE))
    zflora serve --model BASE --adapter ADAPTER        # OpenAI-compatible server

Nothing is exported or copied: the model reads the adapter directory (the same
one `save_adapter` writes) once per process and fuses it into the base weights as
they stream in (`zflora.serve.checkpoint.fuse_state_dict`), so the engine holds only the
fused form.

This module does not import vLLM, so the validation is tested without it;
`zflora.serve.vllm_model` does.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from ..adapter_io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    Adapter,
    base_identity,
    check_fits,
    check_same_base,
    checkpoint_fingerprint,
    read_adapter,
)
from ..config import positive_int
from ..models import meta_model, require_local
from ..transform import UnsupportedModelError, apply_zflora
from .config import ServeConfig

ARCHITECTURE = "ZFLoRALlamaForCausalLM"
MODEL_CLASS = "zflora.serve.vllm_model:ZFLoRALlamaForCausalLM"
ADAPTER_FIELD = "zflora_adapter"  # the config override that names the adapter directory
PAD_FIELD = "zflora_pad_to"  # the config override that pads the stream (`zflora.fuse(model, pad_to=...)`)
CPU_KVCACHE_GIB = 4  # zflora serve's KV cache on a CPU unless VLLM_CPU_KVCACHE_SPACE says otherwise
MODEL_TYPES = ("llama",)  # vLLM's LlamaForCausalLM layers; other families have their own vLLM classes


def register() -> None:
    """vLLM plugin entry point: make `ZFLoRALlamaForCausalLM` known to this vLLM process."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)  # lazy: imported when a model is built


def read_once(path: str) -> Adapter:
    """Adapter directory `path`, read and validated once per process while its files stay the same
    (vLLM builds the model layer by layer, and each layer needs the adapter's config)."""
    files = [Path(path) / CONFIG_NAME, Path(path) / WEIGHTS_NAME]
    stamp = tuple((f.stat().st_mtime_ns, f.stat().st_size) if f.is_file() else None for f in files)
    return _read_cached(str(Path(path).resolve()), stamp)


@functools.lru_cache(maxsize=4)
def _read_cached(path: str, stamp: tuple) -> Adapter:
    return read_adapter(path)


def read_for_config(config: Any, path: str | os.PathLike, base: str | os.PathLike | None = None) -> Adapter:
    """Adapter directory `path`, checked to fit a base model of HF `config` (checkpoint directory `base`).

    The check builds the base on the meta device (no memory) and applies the
    adapter's config to it, so it is the same check `load_adapter` makes: base
    shapes, tensor names and shapes. With `base`, the base weights' fingerprint too,
    read from its safetensors. Raises before any weight is touched.
    """
    if getattr(config, "model_type", None) not in MODEL_TYPES:
        raise UnsupportedModelError(
            f"the vLLM zFLoRA model supports model_type {', '.join(MODEL_TYPES)}; "
            f"got {getattr(config, 'model_type', None)!r}"
        )
    adapter = read_once(str(path))
    model = meta_model(config)
    if base is not None:  # the meta model has no values: the fingerprint comes from the checkpoint's files
        fingerprint = checkpoint_fingerprint(base, config.num_hidden_layers)
        check_same_base(base_identity(model) | {"fingerprint": fingerprint}, adapter)
    apply_zflora(model, adapter.config)
    check_fits(model, adapter)
    return adapter


def hf_overrides(
    adapter: str | os.PathLike, model: str | os.PathLike | None = None, pad_to: int | None = None
) -> dict[str, Any]:
    """vLLM `hf_overrides` that serve base checkpoint `model` with the zFLoRA adapter in directory `adapter`.

    With `model`, the adapter is checked against the base's config.json first, so a
    mismatch is reported here rather than inside a vLLM worker. With `pad_to`, the fused
    stream is widened with zero channels to a multiple of it, as `zflora.fuse(model, pad_to=...)`
    does (a GEMM width the kernel runs faster; the function is unchanged).
    """
    if pad_to is not None:
        positive_int("pad_to", pad_to)
    path = Path(adapter).resolve()
    if model is not None:
        from transformers import AutoConfig

        base = require_local(model)
        read_for_config(AutoConfig.from_pretrained(base, local_files_only=True), path, base)
    else:
        read_adapter(path)
    return {"architectures": [ARCHITECTURE], ADAPTER_FIELD: str(path)} | ({PAD_FIELD: pad_to} if pad_to else {})


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


def serve_command(model: str, adapter: str | None, vllm_args: list[str], pad_to: int | None = None) -> list[str]:
    """The command line of vLLM's OpenAI-compatible server for base `model` (+ zFLoRA `adapter`)."""
    base = require_local(model)  # a fetched model's name, as every command takes; checked with or without adapter
    if pad_to is not None and adapter is None:
        raise ValueError("pad_to: pads a zFLoRA adapter's stream; name the adapter too")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base.resolve())]
    if adapter is not None:
        overrides = hf_overrides(adapter, base, pad_to)
        cmd += ["--hf-overrides", json.dumps(overrides)]
        if "--served-model-name" not in vllm_args:
            cmd += ["--served-model-name", Path(adapter).resolve().name]
    return cmd + vllm_args


def main(cfg: ServeConfig) -> None:
    """`zflora serve`: check the adapter, then run vLLM's server (its exit code is ours)."""
    try:
        cmd = serve_command(str(cfg.model), None if cfg.adapter is None else str(cfg.adapter), cfg.vllm_args,
                            cfg.pad_to)  # fmt: skip
    except UnsupportedModelError as e:
        raise ValueError(str(e)) from None
    if cfg.dry_run:
        print(shlex.join(cmd))
        return
    require_vllm()
    if not torch_cuda_available():
        # vLLM's CPU build otherwise sizes its KV cache to demand 92% of memory free, and fails to start.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KVCACHE_GIB))
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # this process becomes vLLM's server: signals (Ctrl-C, SIGTERM) reach it directly


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
