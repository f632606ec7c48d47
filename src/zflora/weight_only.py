"""Int4 weight-only inference in PyTorch, with adapter swaps that never re-quantize the base.

`quantize(model)` replaces every projection (the decoder's and the LM head) by a `QuantizedLinear`, which
runs PyTorch's own int4 weight-only CPU kernel, `aten._weight_int4pack_mm_for_cpu` (the kernel torchao's
and gpt-fast's int4 CPU paths call). The kernel holds W in groups of `block_size` values along K, one
scale per group and output channel: `MatMulNBits`'s layout. The integers and scales come from the same
quantizer as the ONNX export (`zflora.quantization.block_quantize`, ONNX Runtime's), so this model
computes with exactly the weights of `zflora export onnx --quantize int4` (`simulate` computes with them
in fp32).

The kernel packs a weight in tiles of 64 output channels by all of K. In a fused zFLoRA projection the
adapter still has bytes and scales of its own:
- input projection [W | s B]: s B's columns are K positions of every tile, and they fill groups of their
  own when d is a multiple of the block and the stream is padded to one (`fuse(model, pad_to=block)`,
  which `quantize` does);
- output projection [W ; A]: A's rows start a tile of their own when the base's output size is a multiple
  of 64 (every LLaMA-family hidden size is).
`QuantizedLinear.refresh_adapter` (what `zflora.set_adapter` / `load_adapter` call, as for the fp32 fused
form) quantizes the new adapter block and writes exactly those bytes and scales; the rest of the packed
weight, the base's, is never written. Embeddings, norms and zFLoRA's A_in stay in floating point.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .config import DEFAULT_BLOCK_SIZE
from .fingerprint import record_base
from .fusion import Kind, adapter_block
from .modules import ADAPTER_PREFIX, FusedLinear, HiddenReadLinear, ZFLoRALinear
from .quantization import Quantization, block_quantize
from .transform import fuse, fused_padding, is_fused, is_zflora, unfuse

KERNEL_GROUPS = (32, 64, 128, 256)  # the group sizes the CPU kernel takes
N_MULTIPLE = 16  # the kernel packs output channels in multiples of 16
TILE_N = 64  # output channels per tile of the kernel's packed layout
_LAYOUTS_CHECKED: set[tuple] = set()  # (kind, N, K, base in, base out) whose adapter bytes are its own


def available() -> bool:
    """Whether this PyTorch has the int4 weight-only CPU kernel (torch 2.6 and later)."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def int4_values(weight: torch.Tensor, q: Quantization) -> tuple[torch.Tensor, torch.Tensor]:
    """An (out, in) weight as `MatMulNBits` int4 holds it: the integers 0..15 (zero point 8) as int32
    (out, in padded to the block), and the scales (out, blocks) fp32, by ONNX Runtime's quantizer."""
    packed, scales = block_quantize(weight.detach().float().numpy().T, q)  # (N, blocks, block / 2) uint8
    n = packed.shape[0]
    ints = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1)  # the low nibble first
    return torch.from_numpy(ints.astype(np.int32)), torch.from_numpy(scales)


def _pack(ints: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(ints.contiguous(), 1)


class QuantizedLinear(nn.Module):
    """y = x W^T (+ b), W int4 in groups of `block_size` along K, on PyTorch's CPU kernel.

    Buffers: `packed` (the kernel's tiled uint8 layout) and `scales_and_zeros` (K / block, N, 2) in the
    activations' dtype; zero points are 0 (symmetric: W = (q - 8) * scale). `read` = d makes it read the
    base channels n_h of a wider stream, as `HiddenReadLinear` does. Output channels are padded to a
    multiple of 16 for the kernel, and the padding sliced off.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, q: Quantization, dtype: torch.dtype,
                 read: int | None = None) -> None:  # fmt: skip
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.block_size, self.read = q.block_size, read
        self._padded_out = -(-self.out_features // N_MULTIPLE) * N_MULTIPLE
        ints, scales = int4_values(self._with_padded_rows(weight.detach().float()), q)
        self.register_buffer("packed", _pack(ints))
        self.register_buffer("scales_and_zeros", self._scales_and_zeros(scales).to(dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    def _with_padded_rows(self, w: torch.Tensor) -> torch.Tensor:
        return torch.cat([w, w.new_zeros(self._padded_out - w.shape[0], w.shape[1])]) if self._padded else w

    @property
    def _padded(self) -> bool:
        return self._padded_out != self.out_features

    @staticmethod
    def _scales_and_zeros(scales: torch.Tensor) -> torch.Tensor:
        sz = torch.zeros(scales.shape[1], scales.shape[0], 2)  # (K / block, N, 2): scale, zero
        sz[..., 0] = scales.T
        return sz

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.read is not None:
            x = x.narrow(-1, 0, self.read)  # n_h of the stream
        flat = x.reshape(-1, x.shape[-1]).contiguous()  # the kernel takes a contiguous matrix
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.block_size, self.scales_and_zeros)
        if self._padded:
            y = y[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.unflatten(0, x.shape[:-1])

    def extra_repr(self) -> str:
        read = f", reads {self.read}" if self.read is not None else ""
        return f"int4, {self.in_features} -> {self.out_features}, block={self.block_size}{read}"


class QuantizedFusedLinear(QuantizedLinear):
    """A fused zFLoRA projection ([W | s B] or [W ; A], `FusedLinear`) in int4, whose adapter block has
    bytes and scales of its own: a swap (`refresh_adapter`) writes those and nothing else. Keeps the
    adapter matrices (the same Parameters) so that `save_adapter` and the adapter checks see them."""

    def __init__(self, src: FusedLinear, q: Quantization, dtype: torch.dtype) -> None:
        super().__init__(src.weight, src.bias, q, dtype)
        self.kind: Kind = src.kind
        self.config, self.pad = src.config, src.pad
        self.base_in, self.base_out = src.base_in, src.base_out
        self.zflora_A, self.zflora_B = src.zflora_A, src.zflora_B
        self.quantization = q
        self._check_layout()

    r = ZFLoRALinear.r
    scaling = ZFLoRALinear.scaling
    adapter_matrix = ZFLoRALinear.adapter_matrix
    extra = FusedLinear.extra

    def _adapter_shape(self) -> tuple[int, int]:
        """(rows, columns) of the adapter block with its zero padding: (N, r + pad) or (r + pad, K)."""
        if self.kind == "in":
            return self._padded_out, self.in_features - self.base_in
        return self._padded_out - self.base_out, self.in_features

    def _adapter_views(self, packed: torch.Tensor, alone: bool) -> list[torch.Tensor]:
        """Views of the adapter's bytes in a packed weight (`alone`: in the adapter block packed by itself).
        The kernel's layout: output channels in tiles of 64 (the last one the remainder), each tile's bytes
        (K, tile / 2) in order. So A's rows are the tiles after the base's, and s B's columns are the last
        r + pad rows of every tile (checked on construction, `_check_layout`)."""
        flat = packed.view(-1)
        if self.kind == "out":
            return [flat] if alone else [flat[self.base_out * self.in_features // 2 :]]
        k = self.in_features - self.base_in if alone else self.in_features
        views, offset = [], 0
        for n in [TILE_N] * (self._padded_out // TILE_N) + (
            [self._padded_out % TILE_N] if self._padded_out % TILE_N else []
        ):
            tile = flat[offset : offset + k * n // 2].view(k, n // 2)
            views.append(tile if alone else tile[self.base_in :])
            offset += k * n // 2
        return views

    def _write_adapter(self, packed: torch.Tensor, ints: torch.Tensor) -> int:
        """Pack the adapter block's integers by themselves and write them through the views: the bytes written."""
        written = 0
        for dst, src in zip(self._adapter_views(packed, False), self._adapter_views(_pack(ints), True), strict=True):
            dst.copy_(src)
            written += dst.numel()
        return written

    def _check_layout(self) -> None:
        """The adapter has bytes of its own: a weight packed whole equals its base packed with the adapter zeroed,
        then the adapter packed by itself written through the views (base values non-zero, so that a byte the
        two shared would differ). The layout depends on the shapes alone, so each is checked once."""
        shape = (self.kind, self._padded_out, self.in_features, self.base_in, self.base_out)
        if shape in _LAYOUTS_CHECKED:
            return
        g = torch.Generator().manual_seed(0)
        whole = torch.randint(1, 16, (self._padded_out, self.in_features), generator=g, dtype=torch.int32)
        rows, cols = self._adapter_shape()
        adapter = whole[-rows:] if self.kind == "out" else whole[:, -cols:]
        base = whole.clone()
        (base[-rows:] if self.kind == "out" else base[:, -cols:]).zero_()
        packed = _pack(base)
        self._write_adapter(packed, adapter)
        if not torch.equal(packed, _pack(whole)):
            raise ValueError(f"{self.kind} projection {self.base_in} -> {self.base_out}: the int4 kernel's tiles "
                             "would mix base and adapter bytes (an output projection's base size must be a "
                             "multiple of 64), so a swap could not leave the base's bytes alone")  # fmt: skip
        _LAYOUTS_CHECKED.add(shape)

    def _adapter_scales(self) -> torch.Tensor:
        """A view of the adapter's scales: its groups along K ("in"), or its output channels ("out")."""
        if self.kind == "in":
            return self.scales_and_zeros[self.base_in // self.block_size :, :, 0]
        return self.scales_and_zeros[:, self.base_out :, 0]

    def adapter_bytes(self) -> int:
        """What a swap writes: the adapter's packed bytes and its scales."""
        packed = sum(v.numel() for v in self._adapter_views(self.packed, False))
        scales = self._adapter_scales()
        return packed + scales.numel() * scales.element_size()

    @torch.no_grad()
    def refresh_adapter(self) -> int:
        """Quantize the adapter block (from the stored matrix and scale) and write its packed bytes and
        scales, nothing else. Returns the bytes written."""
        like = torch.zeros(()).expand(self.out_features, self.in_features)  # adapter_block's shape and dtype only
        block = adapter_block(self.kind, like, self.adapter_matrix, self.scaling, self.r)  # s B (out, r) or A (r, in)
        values = torch.zeros(self._adapter_shape())  # the stream's zero channels quantize to the zero point
        values[: block.shape[0], : block.shape[1]] = block
        ints, scales = int4_values(values, self.quantization)
        written = self._write_adapter(self.packed, ints[:, : values.shape[1]])
        target = self._adapter_scales()
        target.copy_(scales.T)
        return written + target.numel() * target.element_size()

    def extra_repr(self) -> str:
        pad = f", pad={self.pad}" if self.pad else ""
        shape = f"{self.in_features} -> {self.out_features}"
        return f"int4 fused {self.kind}, {shape}, r={self.r}{pad}, block={self.block_size}"


def _check(model: nn.Module, q: Quantization) -> None:
    if not available():
        raise RuntimeError(f"int4 weight-only inference needs PyTorch's CPU int4 kernel (torch >= 2.6); this is "
                           f"torch {torch.__version__}")  # fmt: skip
    if q.bits != 4:
        raise ValueError(f"bits: {q.bits}; the PyTorch route runs int4 (PyTorch's int8 weight-only kernel has one "
                         "scale per output channel, which an adapter's columns would share with the base)")  # fmt: skip
    if q.block_size not in KERNEL_GROUPS:
        groups = ", ".join(map(str, KERNEL_GROUPS))
        raise ValueError(f"block_size: {q.block_size}; PyTorch's int4 kernel takes {groups}")
    if getattr(model, "zflora_quantization", None) is not None:
        raise ValueError("this model is quantized already")
    if (dtype := next(model.parameters()).dtype) != torch.float32:
        raise ValueError(f"quantization needs an fp32 model to quantize from; this one is {dtype}")
    if (device := next(model.parameters()).device).type != "cpu":
        raise ValueError(f"the int4 kernel here is PyTorch's CPU kernel; the model is on {device}")
    d = model.config.hidden_size
    if is_zflora(model) and d % q.block_size:
        raise ValueError(f"block_size {q.block_size} does not divide the hidden size {d}, so the adapter's columns "
                         f"would share groups with the base; choose a block size that divides {d}")  # fmt: skip
    if isinstance(getattr(model, "lm_head", None), ZFLoRALinear):
        raise ValueError("an adapter on the LM head (lm_head=True) is not quantized by this route yet")
    for name, m in _base_projections(model):
        if not isinstance(m, FusedLinear) and m.in_features % q.block_size:
            raise ValueError(f"{name}: its input size {m.in_features} is not a multiple of block_size {q.block_size}")


def _base_projections(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every `nn.Linear` but an unmerged PEFT LoRA's own `lora_A` / `lora_B` (its base layers are quantized, its
    adapter stays in floating point, as LoRA runs on a quantized base at runtime)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".lora_" not in n]


@torch.no_grad()
def quantize(model: nn.Module, bits: int = 4, block_size: int = DEFAULT_BLOCK_SIZE,
             dtype: torch.dtype = torch.bfloat16) -> nn.Module:  # fmt: skip
    """Quantize a model's projections to int4 in place, for PyTorch's int4 CPU kernel; returns the model.

    From an fp32 model: a plain Hugging Face model (every `nn.Linear`), a PEFT LoRA model (its base layers; the
    unmerged adapter stays in `dtype`, as runtime LoRA on a quantized base runs), or a zFLoRA model, which is fused
    first with its stream padded to a multiple of `block_size` so that the adapter's columns fill groups of
    their own. The activations (embeddings, norms, scales) run in `dtype`: bf16 is the kernel's fast path
    (fp32 activations are exact but dequantize every call, over 20x slower). Everything is checked before
    anything changes. A tied LM head is untied (it is quantized; the embedding is not).
    """
    q = Quantization(bits, block_size, accuracy_level=1)
    _check(model, q)
    record_base(model, model)  # of the fp32 base, before its weights are replaced
    if is_zflora(model):
        if is_fused(model) and (model.zflora_config.r + fused_padding(model)) % block_size:
            unfuse(model)
        fuse(model, pad_to=block_size)
    for name, m in _base_projections(model):
        if isinstance(m, FusedLinear):
            new: nn.Module = QuantizedFusedLinear(m, q, dtype)
        else:
            read = m.in_features if isinstance(m, HiddenReadLinear) else None
            new = QuantizedLinear(m.weight, m.bias, q, dtype, read)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # the LM head now has weights of its own
    _cast(model, dtype)
    model.zflora_quantization = q.to_dict() | {"engine": "pytorch", "kernel": "aten._weight_int4pack_mm_for_cpu"}
    return model


def _cast(model: nn.Module, dtype: torch.dtype) -> None:
    """The activations' dtype for every floating-point parameter (embeddings, norms, biases, A_in; the scales
    are built in it). The matrices a quantized projection keeps for swaps stay fp32: a new adapter is quantized
    from fp32 values, as a fresh `quantize` of it would be."""
    for module in model.modules():
        keep = isinstance(module, QuantizedFusedLinear)
        for name, p in module.named_parameters(recurse=False):
            if p.is_floating_point() and not (keep and name.startswith(ADAPTER_PREFIX)):
                p.data = p.data.to(dtype)


def quantized_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes in memory: the packed int4 weights, their scales (and the kernel's zero points), what a swap
    writes (the adapter's packed bytes and scales), and every floating-point parameter."""
    packed = scales = swap = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            packed += m.packed.numel()
            scales += m.scales_and_zeros.numel() * m.scales_and_zeros.element_size()
            if isinstance(m, QuantizedFusedLinear):
                swap += m.adapter_bytes()
    floats = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"packed": packed, "scales_and_zeros": scales, "swap_writes": swap, "float": floats,
            "total": packed + scales + floats}  # fmt: skip
