"""zflora: zero-latency fused low-rank adapters (zFLoRA) for Hugging Face LLaMA-family models.

The core: `config` (ZFLoRAConfig), `modules` (the zFLoRA modules), `fusion` (the
fused layout), `transform` (apply_zflora, fuse, unfuse), `adapter_io` (adapter
files), `methods` (every fine-tuning method behind one call), `stacking` (many
adapters in one batch, routed per row), `quantization` (the int8 / int4 block
format) and `weight_only` (int4 inference in PyTorch, adapter-only swaps). The jobs built on it, each a subpackage:
`bench`, `finetune`, `serve`. Names below are imported on first use, so `import
zflora` (and the `zflora` command's help) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Adapter": "adapter_io",
    "AdapterError": "adapter_io",
    "load_adapter": "adapter_io",
    "read_adapter": "adapter_io",
    "save_adapter": "adapter_io",
    "set_adapter": "adapter_io",
    "compile": "compiled",
    "ZFLoRAConfig": "config",
    "METHODS": "config",
    "count_trainable_parameters": "methods",
    "prepare_model": "methods",
    "random_adapter": "methods",
    "score_response": "finetune.scoring",
    "route": "stacking",
    "stack_adapters": "stacking",
    "swap_slot": "stacking",
    "SUPPORTED_ARCHITECTURES": "transform",
    "UnsupportedModelError": "transform",
    "adapter_parameters": "transform",
    "apply_zflora": "transform",
    "fuse": "transform",
    "fused_padding": "transform",
    "is_fused": "transform",
    "is_zflora": "transform",
    "unfuse": "transform",
}
__all__ = [
    "METHODS", "SUPPORTED_ARCHITECTURES", "Adapter", "AdapterError", "UnsupportedModelError", "ZFLoRAConfig",
    "adapter_parameters", "apply_zflora", "compile", "count_trainable_parameters", "fuse", "fused_padding", "is_fused",
    "is_zflora",
    "load_adapter", "prepare_model", "random_adapter", "read_adapter", "route", "save_adapter", "score_response",
    "set_adapter", "stack_adapters", "swap_slot", "unfuse",
]  # fmt: skip

if TYPE_CHECKING:
    from .adapter_io import Adapter, AdapterError, load_adapter, read_adapter, save_adapter, set_adapter
    from .compiled import compile
    from .config import METHODS, ZFLoRAConfig
    from .finetune.scoring import score_response
    from .methods import count_trainable_parameters, prepare_model, random_adapter
    from .stacking import route, stack_adapters, swap_slot
    from .transform import (
        SUPPORTED_ARCHITECTURES,
        UnsupportedModelError,
        adapter_parameters,
        apply_zflora,
        fuse,
        fused_padding,
        is_fused,
        is_zflora,
        unfuse,
    )


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'zflora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
