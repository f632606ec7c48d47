"""`zflora export`'s options (light: the command line builds its flags from this)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import DEFAULT_BLOCK_SIZE, QUANTIZATIONS


@dataclass
class ExportConfig:
    """Export to ONNX (base, zFLoRA fused, or PEFT LoRA unmerged), or swap an exported model's adapter."""

    action: str = field(metadata={"positional": True, "choices": ("onnx", "swap"),
                                  "help": "onnx: export --model [--adapter] to --output; swap: put --adapter into "
                                          "the export at --output, rewriting only its adapter file"})  # fmt: skip
    output: Path = field(metadata={"help": "the export directory (model.onnx, model.onnx.data, adapter.onnx.data)"})
    model: Path | None = field(default=None, metadata={"help": "checkpoint dir or fetched name (onnx)"})
    adapter: Path | None = field(default=None, metadata={"help": "a zFLoRA adapter (fused export) or a PEFT LoRA "
                                                                 "adapter (unmerged export) directory"})  # fmt: skip
    check_base: bool = field(default=True, metadata={"help": "check the adapter's base fingerprint"})
    last_logits: bool = field(default=False, metadata={"help": "logits of the last position only (generation)"})
    quantize: str | None = field(default=None, metadata={"choices": tuple(QUANTIZATIONS),
                                 "help": "onnx: projection weights as block-wise int8 / int4 (MatMulNBits), the "
                                         "adapter's blocks quantized on their own, in adapter.onnx.data"})  # fmt: skip
    block_size: int = field(default=DEFAULT_BLOCK_SIZE,
                            metadata={"help": "quantization block along the reduction axis (a power of 2, >= 16, "
                                              "dividing the hidden size)"})  # fmt: skip
    accuracy_level: int | None = field(default=None, metadata={"help": "MatMulNBits accuracy_level: 1 fp32 "
                                                                       "activations (default for int4), 4 int8 "
                                                                       "activations (default for int8)"})  # fmt: skip

    def __post_init__(self) -> None:
        if self.action == "onnx" and self.model is None:
            raise ValueError("model: `zflora export onnx` needs --model DIR")
        if self.action == "swap" and self.adapter is None:
            raise ValueError("adapter: `zflora export swap` needs --adapter DIR")
        if self.action == "swap" and self.quantize is not None:
            raise ValueError("quantize: a swap keeps the export's own quantization; drop --quantize")
