"""Block-wise weight quantization as ONNX Runtime's `MatMulNBits` stores it (int8 or int4), with a fused
zFLoRA projection's base and adapter blocks quantized apart. Written once for every route: the ONNX
export (`zflora.export.quantize`) and the PyTorch model that computes with exactly its weights
(`simulate`, what the accuracy of a quantized deployment is measured on).

A weight is quantized along its reduction axis K in blocks of `block_size` values: one scale per block
and output channel, symmetric (no zero points), rounded to nearest by ONNX Runtime's own quantizer
(`onnxruntime.quantization.matmul_nbits_quantizer`):
- an output projection `[W ; A]`: A's rows are extra output channels, blocks of their own for any r;
- an input projection `[W | s B]`: s B's columns extend K; with `d % block_size == 0` they fill blocks
  of their own (the last one zero-padded when r is not a multiple of the block size, which is exactly
  how `MatMulNBits` pads a K that is not a multiple of it).
So quantizing the parts apart gives the fused weight's quantization block for block, and a new adapter
changes only its own blocks and scales: the base's quantized bytes never change.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import DEFAULT_BLOCK_SIZE, QUANTIZATIONS
from .fingerprint import record_base
from .fusion import base_block, block_of
from .modules import FusedLinear, ZFLoRALinear

# MatMulNBits's compute type for the activations, by bits: int4 at 1 (fp32: the exact quantized weights, and
# the faster prefill on the CPU measured), int8 at 4 (int8 activations: the only fast int8 path on CPU;
# fp32 compute dequantizes every call, 8x slower decode). See docs/on-device.md.
DEFAULT_ACCURACY_LEVEL = {8: 4, 4: 1}


@dataclass(frozen=True)
class Quantization:
    """How the weights are quantized: `bits` 8 or 4, `block_size` along K (a power of 2, at least 16),
    and `MatMulNBits`'s `accuracy_level` (the compute type of the activations: 1 fp32, 4 int8)."""

    bits: int
    block_size: int = DEFAULT_BLOCK_SIZE
    accuracy_level: int | None = None  # None: DEFAULT_ACCURACY_LEVEL[bits]

    def __post_init__(self) -> None:
        if self.bits not in QUANTIZATIONS.values():
            raise ValueError(f"bits: {self.bits}; choose 8 or 4")
        if self.accuracy_level is None:
            object.__setattr__(self, "accuracy_level", DEFAULT_ACCURACY_LEVEL[self.bits])
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size: {self.block_size}; choose a power of 2, at least 16")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level: {self.accuracy_level}; choose 0 to 4 (MatMulNBits)")

    @classmethod
    def named(cls, name: str, block_size: int = DEFAULT_BLOCK_SIZE, accuracy_level: int | None = None
              ) -> Quantization:  # fmt: skip
        if name not in QUANTIZATIONS:
            raise ValueError(f"quantize: {name!r}; choose one of {', '.join(QUANTIZATIONS)}")
        return cls(QUANTIZATIONS[name], block_size, accuracy_level)

    def to_dict(self) -> dict[str, Any]:
        name = next(k for k, v in QUANTIZATIONS.items() if v == self.bits)
        return {"name": name, "bits": self.bits, "block_size": self.block_size, "symmetric": True,
                "accuracy_level": self.accuracy_level, "operator": "com.microsoft.MatMulNBits",
                "quantizer": "onnxruntime DefaultWeightOnlyQuantizer (round to nearest)"}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Quantization:
        return cls(int(d["bits"]), int(d["block_size"]), int(d["accuracy_level"]))


def block_quantize(weight_kn: np.ndarray, q: Quantization) -> tuple[np.ndarray, np.ndarray]:
    """A (K, N) fp32 weight as `MatMulNBits` stores it: packed (N, ceil(K / block), block * bits / 8) uint8
    and scales (N, ceil(K / block)) fp32, by ONNX Runtime's quantizer."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(block_size=q.block_size, is_symmetric=True, bits=q.bits)
    packed, scales, _ = DefaultWeightOnlyQuantizer(config).qbits_block_quant(
        np.ascontiguousarray(weight_kn, dtype=np.float32)
    )
    return packed, scales


def adapter_parts(block: np.ndarray, q: Quantization) -> dict[str, np.ndarray]:
    """An adapter block in PyTorch's (out, in) layout (`s B` or `A`), quantized as
    its share of the fused projection's `MatMulNBits` weight: {"packed": ..., "scales": ...}."""
    packed, scales = block_quantize(np.asarray(block, dtype=np.float32).T, q)  # either kind: its (K, N) view
    return {"packed": packed, "scales": scales}


def dequantize(packed: np.ndarray, scales: np.ndarray, k: int, bits: int) -> np.ndarray:
    """The (K, N) fp32 weight that `MatMulNBits` computes with (symmetric: zero point 2^(bits-1))."""
    n, blocks, _ = packed.shape
    if bits == 8:
        q = packed.astype(np.int16)
    else:  # two values per byte, the low nibble first
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, -1).astype(np.int16)
    w = (q - (1 << (bits - 1))).astype(np.float32) * scales[:, :, None]
    return w.reshape(n, -1)[:, :k].T


def round_trip(weight: torch.Tensor, q: Quantization) -> torch.Tensor:
    """An (out, in) weight as the quantized kernel computes with it: quantized, then dequantized (fp32)."""
    w = weight.detach().float()
    packed, scales = block_quantize(w.numpy().T, q)
    return torch.from_numpy(dequantize(packed, scales, w.shape[1], q.bits).T.copy())


@torch.no_grad()
def simulate(model: nn.Module, q: Quantization, adapter: bool = True) -> nn.Module:
    """A copy of `model` (fp32) whose every projection weight, the LM head's included, is what the quantized
    export computes with: a fused zFLoRA projection's base and adapter block each quantized on their own,
    every other `nn.Linear` whole. Embeddings and norms stay fp32, as in the export; a tied LM head gets its
    own weight. Equal to the ONNX export at `accuracy_level=1` (fp32 activations; tested). With
    `adapter=False` the adapter blocks stay fp32: a diagnosis of where a quantized adapter loses accuracy,
    not a form the export can take (one `MatMulNBits` has one precision)."""
    if (dtype := next(model.parameters()).dtype) != torch.float32:
        raise ValueError(f"quantization needs an fp32 model to quantize from; this one is {dtype}")
    out = copy.deepcopy(model)
    record_base(out, model)  # an adapter trained on the copy belongs to the fp32 base
    for m in out.modules():
        if isinstance(m, FusedLinear):
            if m.pad:
                raise ValueError("a padded fused model (fuse(model, pad_to=...)): unfuse it and fuse it unpadded")
            block = block_of(m.kind, m.weight, m.r)
            parts = [round_trip(base_block(m.kind, m.weight, m.r), q), round_trip(block, q) if adapter else block]
            m.weight.copy_(torch.cat(parts, 1 if m.kind == "in" else 0))
        elif isinstance(m, ZFLoRALinear):
            raise ValueError("an unfused zFLoRA model: fuse it first (zflora.fuse), as it is exported")
        elif isinstance(m, nn.Linear):  # the base's projections, a merged LoRA's, the LM head
            m.weight = nn.Parameter(round_trip(m.weight, q), requires_grad=False)  # unties a tied LM head
    if getattr(out.config, "tie_word_embeddings", False):
        out.config.tie_word_embeddings = False  # the LM head now has weights of its own
    return out
