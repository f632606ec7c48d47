"""Int4 weight-only inference in PyTorch (`zflora.weight_only`): the model computes with exactly the quantized
weights of the ONNX export (`simulate`), the adapter of a fused zFLoRA projection has bytes and scales of its
own, and a swap writes those and nothing else."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import assert_same_state, hf_steps, refused_unchanged, state, tiny_model, zflora_model

import zflora
from zflora import weight_only
from zflora.quantization import Quantization, simulate
from zflora.weight_only import QuantizedFusedLinear, QuantizedLinear

pytest.importorskip("onnxruntime")  # the quantizer (ONNX Runtime's, so both routes hold the same integers)
pytestmark = pytest.mark.skipif(not weight_only.available(), reason="this torch has no int4 CPU kernel")

BLOCK = 32  # the kernel's smallest group; divides d = 64
Q = Quantization(4, BLOCK, accuracy_level=1)


def base(arch: str = "llama") -> torch.nn.Module:
    return tiny_model(arch, hidden=64, mlp=128)  # the kernel wants K a multiple of its group; vocab 97 pads to 112


def ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(seed))


def close(got: list[np.ndarray], want: list[np.ndarray], rtol: float) -> None:
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * np.abs(w).max())


def quantized_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("packed", "scales_and_zeros"))}


def adapter_mask(m: QuantizedFusedLinear) -> torch.Tensor:
    mark = torch.zeros_like(m.packed)
    for view in m._adapter_views(mark, alone=False):
        view.fill_(1)
    return mark.bool()


@pytest.mark.parametrize(("arch", "adapter"), [("llama", False), ("llama", True), ("qwen2", True)])
def test_int4_model_computes_with_the_exported_quantized_weights(arch, adapter) -> None:
    """fp32 activations: the rounding of the weights is the only difference from the fp32 model, and the weights
    are `simulate`'s (= the ONNX export's); the zFLoRA model is padded to the block, `simulate`'s is not. Qwen2:
    biases on q, k and v."""
    model = zflora_model(base(arch), seed=1) if adapter else base(arch)
    want, fp32 = hf_steps(simulate(model, Q), ids(), 3), hf_steps(model, ids(), 3)
    quantized = weight_only.quantize(copy.deepcopy(model), dtype=torch.float32)
    assert sum(isinstance(m, QuantizedFusedLinear) for m in quantized.modules()) == (14 if adapter else 0)
    assert sum(isinstance(m, QuantizedLinear) for m in quantized.modules()) == 15  # 7 per layer + the LM head
    got = hf_steps(quantized, ids(), 3)
    close(got, want, 1e-4)
    assert max(np.abs(g - f).max() for g, f in zip(got, fp32, strict=True)) > 1e-3  # the weights were rounded


def test_bf16_activations_stay_close_and_generate() -> None:
    model = zflora_model(base(), seed=1)
    want = hf_steps(simulate(model, Q), ids(), 2)
    quantized = weight_only.quantize(copy.deepcopy(model))  # bf16: the kernel's fast path
    assert quantized.model.embed_tokens.weight.dtype == torch.bfloat16
    got = hf_steps(quantized, ids(), 2)
    close(got, want, 3e-2)  # bf16 activations and scales
    out = quantized.generate(ids(), max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 11)


def test_swap_writes_adapter_bytes_only_and_equals_a_fresh_quantization(tmp_path) -> None:
    first, second = zflora_model(base(), seed=1), zflora_model(base(), seed=7, alpha=3.0)
    model = weight_only.quantize(copy.deepcopy(first), dtype=torch.float32)
    fresh = weight_only.quantize(copy.deepcopy(second), dtype=torch.float32)
    before = quantized_buffers(model)
    masks = {n: adapter_mask(m) for n, m in model.named_modules() if isinstance(m, QuantizedFusedLinear)}
    zflora.load_adapter(model, zflora.save_adapter(second, tmp_path / "second"))
    after = quantized_buffers(model)
    for name, m in model.named_modules():
        if not isinstance(m, QuantizedLinear):
            continue
        packed, sz = f"{name}.packed", f"{name}.scales_and_zeros"
        assert torch.equal(after[packed], fresh.get_buffer(packed)), name  # bit for bit a fresh quantization
        assert torch.equal(after[sz], fresh.get_buffer(sz)), name
        if name not in masks:  # the LM head: no adapter, untouched
            assert torch.equal(after[packed], before[packed]) and torch.equal(after[sz], before[sz])
            continue
        adapter = masks[name]
        base_bytes = ~adapter
        assert 0 < adapter.sum() < 0.5 * adapter.numel()  # r + pad = 32 of d + 32 = 96
        assert torch.equal(after[packed][base_bytes], before[packed][base_bytes]), name  # the base's bytes
        assert not torch.equal(after[packed][adapter], before[packed][adapter]), name  # the adapter's changed
        base_scales = (
            (slice(None, m.base_in // BLOCK), slice(None)) if m.kind == "in" else (slice(None), slice(None, m.base_out))
        )
        assert torch.equal(after[sz][base_scales], before[sz][base_scales]), name
    close(hf_steps(model, ids(), 2), hf_steps(fresh, ids(), 2), 1e-6)
    close(hf_steps(model, ids(), 2), hf_steps(simulate(second, Q), ids(), 2), 1e-4)


def test_a_refused_swap_leaves_the_quantized_model_unchanged(tmp_path) -> None:
    model = weight_only.quantize(zflora_model(base(), seed=1), dtype=torch.float32)
    other = zflora.apply_zflora(base(), zflora.ZFLoRAConfig(r=8))  # another rank
    before = state(model)
    refused_unchanged(model, zflora.save_adapter(other, tmp_path / "r8"), "r: adapter 8, model 4")
    saved = zflora.read_adapter(zflora.save_adapter(model, tmp_path / "again"))  # the fp32 adapter, saved back
    zflora.set_adapter(model, saved)  # its base fingerprint is the fp32 base's
    assert_same_state(before, state(model))


def test_refusals_change_nothing() -> None:
    model = zflora_model(base(), seed=1)
    before = state(model)
    for kwargs, match in [({"block_size": 16}, "block_size: 16"), ({"block_size": 128}, "does not divide"),
                          ({"bits": 8}, "bits: 8")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            weight_only.quantize(model, **kwargs)
    with pytest.raises(ValueError, match="fp32 model"):
        weight_only.quantize(copy.deepcopy(model).to(torch.bfloat16))
    assert_same_state(before, state(model))
    weight_only.quantize(model)
    with pytest.raises(ValueError, match="quantized already"):
        weight_only.quantize(model)
    with pytest.raises(ValueError, match="no fp32 base weights"):
        zflora.unfuse(model)


@pytest.mark.slow  # an ONNX export
def test_int4_model_equals_the_int4_onnx_export(tmp_path) -> None:
    """Output parity with the ONNX route: the same integers and scales, so the same logits (fp32 activations,
    accuracy level 1), prefill and decode steps through the KV cache."""
    from conftest import ort_steps

    from zflora.export import onnx as zonnx

    model = zflora_model(base(), seed=1)
    out = zonnx.export(copy.deepcopy(model), tmp_path / "int4", quantization=Q)
    want = ort_steps(zonnx.session(out), zonnx.read_manifest(out), ids().numpy(), 3)
    close(hf_steps(weight_only.quantize(model, dtype=torch.float32), ids(), 3), want, 1e-4)


def test_bytes_count_what_a_swap_writes() -> None:
    model = weight_only.quantize(zflora_model(base(), seed=1))
    counted = weight_only.quantized_bytes(model)
    before = quantized_buffers(model)
    zflora.set_adapter(model, zflora.random_adapter(model, 5))
    changed = sum(int((before[k] != v).sum()) * v.element_size() for k, v in quantized_buffers(model).items())
    written = sum(m.refresh_adapter() for m in model.modules() if isinstance(m, QuantizedFusedLinear))
    assert counted["swap_writes"] == written >= changed > 0  # a byte may be rewritten with the value it had
    assert counted["packed"] == sum(m.packed.numel() for m in model.modules() if isinstance(m, QuantizedLinear))


def test_unmerged_lora_runs_on_the_int4_base_with_its_adapter_in_floating_point() -> None:
    """The comparison runtime LoRA makes on a quantized base: PEFT's base layers int4, its lora_A / lora_B not."""
    from zflora.methods import prepare_model, randomize_lora
    from zflora.quantization import round_trip

    lora = prepare_model(base(), "lora", r=4, alpha=8.0)
    randomize_lora(lora, 1)
    fp32 = hf_steps(lora, ids(), 1)
    want = copy.deepcopy(lora)  # the base layers' weights rounded as the kernel holds them, the adapter as it is
    for name, m in want.named_modules():
        if isinstance(m, torch.nn.Linear) and ".lora_" not in name:
            m.weight.data = round_trip(m.weight, Q)
    quantized = weight_only.quantize(lora, dtype=torch.float32)
    layer = quantized.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, QuantizedLinear) and isinstance(layer.lora_A["default"], torch.nn.Linear)
    got = hf_steps(quantized, ids(), 1)
    close(got, hf_steps(want, ids(), 1), 1e-4)
    assert max(np.abs(g - f).max() for g, f in zip(got, fp32, strict=True)) > 1e-3
