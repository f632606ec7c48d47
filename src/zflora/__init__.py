"""zflora: zero-latency fused low-rank adapters (zFLoRA) for Hugging Face LLaMA-family models."""

from .adapter_io import Adapter, AdapterError, load_adapter, read_adapter, save_adapter, set_adapter
from .config import ZFLoRAConfig
from .methods import METHODS, count_trainable_parameters, prepare_model
from .scoring import score_response
from .transform import (
    SUPPORTED_ARCHITECTURES,
    UnsupportedModelError,
    adapter_parameters,
    apply_zflora,
    fuse,
    is_fused,
    is_zflora,
    unfuse,
)

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "SUPPORTED_ARCHITECTURES",
    "Adapter",
    "AdapterError",
    "UnsupportedModelError",
    "ZFLoRAConfig",
    "adapter_parameters",
    "apply_zflora",
    "count_trainable_parameters",
    "fuse",
    "is_fused",
    "is_zflora",
    "load_adapter",
    "prepare_model",
    "read_adapter",
    "save_adapter",
    "score_response",
    "set_adapter",
    "unfuse",
]
