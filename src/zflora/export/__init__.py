"""`zflora export`: the fused model for other runtimes. `onnx.py`: ONNX Runtime (CPU here; QNN, NNAPI,
CoreML execution providers on phones), with the adapter's bytes in their own file for swapping."""

from __future__ import annotations

from .config import ExportConfig


def main(cfg: ExportConfig) -> None:
    from ..quantization import Quantization
    from . import onnx

    if cfg.action == "swap":
        done = onnx.swap(cfg.output, cfg.adapter, cfg.check_base)
        print(f"{cfg.output}: adapter {cfg.adapter} swapped in: {done['bytes_written']:,} bytes written "
              f"({onnx.ADAPTER} only) in {done['seconds'] * 1e3:.1f} ms")  # fmt: skip
        return
    quantization = Quantization.named(cfg.quantize, cfg.block_size, cfg.accuracy_level) if cfg.quantize else None
    model = _load(cfg)
    out = onnx.export(
        model, cfg.output, source=str(cfg.adapter or ""), last_logits=cfg.last_logits, quantization=quantization
    )
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MB" for p in sorted(out.iterdir()))
    print(f"{out}: {onnx.read_manifest(out)['method']} exported ({sizes})")


def _load(cfg: ExportConfig):  # noqa: ANN202 - a model
    from ..adapter_io import attach_adapter
    from ..models import load_local_model, require_local

    model = load_local_model(require_local(cfg.model))
    if cfg.adapter is None:
        return model
    return attach_adapter(model, cfg.adapter, cfg.check_base).eval()  # a PEFT LoRA is exported unmerged
