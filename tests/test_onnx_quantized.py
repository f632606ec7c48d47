"""Quantized ONNX export (int8 / int4 `MatMulNBits`): ONNX Runtime computes exactly what the PyTorch model with
the same quantized weights computes (`zflora.quantization.simulate`), an adapter's blocks are quantized on
their own, and a swap rewrites adapter bytes only."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import hf_steps, ort_steps, tiny_model, zflora_model

import zflora
from zflora.fusion import base_block, block_of
from zflora.modules import FusedLinear

pytest.importorskip("onnxruntime")

from zflora.cli import main  # noqa: E402 - after the skip
from zflora.export import onnx as zonnx  # noqa: E402
from zflora.quantization import Quantization, block_quantize, simulate  # noqa: E402

pytestmark = pytest.mark.slow  # ONNX exports

BLOCK = 16  # divides the tiny model's d = 48; r = 4 fills a quarter of its own block


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_export_computes_with_the_dequantized_weights(bits, tmp_path) -> None:
    model = zflora_model(tiny_model(), seed=1)
    q = Quantization(bits, BLOCK, accuracy_level=1)  # fp32 activations: the weights are the only rounding
    out = zonnx.export(copy.deepcopy(model), tmp_path / "q", quantization=q)
    manifest = zonnx.read_manifest(out)
    assert manifest["quantization"]["bits"] == bits and manifest["quantization"]["symmetric"]
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(3))
    got = ort_steps(zonnx.session(out), manifest, ids.numpy(), 3)
    want, fp32 = hf_steps(simulate(model, q), ids, 3), hf_steps(model, ids, 3)
    for g, w, f in zip(got, want, fp32, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())
        assert np.abs(g - f).max() > 1e-3  # and it is not the fp32 model: the weights were rounded


@pytest.mark.parametrize(("kind", "shape"), [("in", (40, 48 + 4)), ("out", (40 + 4, 48))])
def test_quantizing_the_parts_equals_quantizing_the_fused_weight(kind, shape) -> None:
    """Base and adapter quantized apart and joined = the fused weight quantized at once, for a rank that
    is not a multiple of the block (the adapter's last block is zero padding, as MatMulNBits pads K)."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for bits in (8, 4):
        q = Quantization(bits, BLOCK)
        whole = block_quantize(w.numpy().T, q)
        parts = [block_quantize(p.numpy().T, q) for p in (base_block(kind, w, 4), block_of(kind, w, 4))]
        axis = 1 if kind == "in" else 0
        for i in range(2):
            np.testing.assert_array_equal(np.concatenate([parts[0][i], parts[1][i]], axis), whole[i])


def test_quantized_swap_writes_adapter_bytes_only_and_equals_a_fresh_export(tmp_path) -> None:
    base = tiny_model()
    q = Quantization(4, BLOCK)
    first, second = zflora_model(base, seed=1), zflora_model(base, seed=7, alpha=3.0)
    out = zonnx.export(copy.deepcopy(first), tmp_path / "swapped", quantization=q)
    fresh = zonnx.export(copy.deepcopy(second), tmp_path / "fresh", quantization=q)
    fp32 = zonnx.export(copy.deepcopy(second), tmp_path / "fp32")
    again = zonnx.quantize_export(fp32, tmp_path / "from-fp32", q)  # quantizing an export = exporting quantized
    for name in (zonnx.GRAPH, zonnx.WEIGHTS, zonnx.ADAPTER):
        assert (again / name).read_bytes() == (fresh / name).read_bytes(), name
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    done = zonnx.swap(out, zflora.save_adapter(second, tmp_path / "second"))
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {zonnx.ADAPTER, zonnx.MANIFEST}  # the graph and the quantized base are byte-identical
    assert done["bytes_written"] == len(after[zonnx.ADAPTER])
    for name in (zonnx.GRAPH, zonnx.WEIGHTS, zonnx.ADAPTER):
        assert after[name] == (fresh / name).read_bytes(), name  # bit for bit a fresh export of the new adapter
    blocks = zonnx.read_manifest(out)["adapter"]["initializers"].values()  # packed uint8, fp32 scales and A_in
    sizes = [np.prod(b["shape"]) * (1 if b.get("part") == "packed" else 4) for b in blocks]
    assert len(after[zonnx.ADAPTER]) == sum(sizes)
    ids = np.random.default_rng(1).integers(0, 97, (1, 5))
    manifest = zonnx.read_manifest(out)
    np.testing.assert_array_equal(zonnx.generate(zonnx.session(out), manifest, ids, 8),
                                  zonnx.generate(zonnx.session(fresh), manifest, ids, 8))  # fmt: skip


def test_quantized_refusals_leave_nothing(tmp_path) -> None:
    model = zflora_model(tiny_model(), seed=1)
    with pytest.raises(ValueError, match="block_size: 32 does not divide the hidden size 48"):
        zonnx.export(copy.deepcopy(model), tmp_path / "q", quantization=Quantization(4, 32))
    with pytest.raises(ValueError, match="needs an fp32 model"):
        zonnx.export(copy.deepcopy(model).to(torch.bfloat16), tmp_path / "q", quantization=Quantization(4, 16))
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="block_size: 24"):
        Quantization(4, 24)
    with pytest.raises(ValueError, match="quantize: 'int3'"):
        Quantization.named("int3")


def test_quantized_export_cli(tmp_path, stories_path, capsys) -> None:
    from zflora.models import load_local_model

    adapter = zflora.save_adapter(zflora_model(load_local_model(stories_path), seed=4), tmp_path / "adapter")
    main(["export", "onnx", "--model", str(stories_path), "--adapter", str(adapter), "--output", str(tmp_path / "x"),
          "--quantize", "int8", "--block-size", "16"])  # fmt: skip
    assert "zflora exported" in capsys.readouterr().out
    assert zonnx.read_manifest(tmp_path / "x")["quantization"]["name"] == "int8"
    main(["export", "swap", "--output", str(tmp_path / "x"), "--adapter", str(adapter)])
    assert "bytes written (adapter.onnx.data only)" in capsys.readouterr().out


def test_simulate_refuses_what_the_export_cannot_be() -> None:
    model = zflora_model(tiny_model(), seed=1)
    with pytest.raises(ValueError, match="needs an fp32 model"):
        simulate(copy.deepcopy(model).to(torch.bfloat16), Quantization(4, BLOCK))
    with pytest.raises(ValueError, match="fuse it first"):
        simulate(zflora.unfuse(copy.deepcopy(model)), Quantization(4, BLOCK))
    tied = simulate(tiny_model(tie=True), Quantization(8, BLOCK))  # a tied LM head gets its own weights
    assert tied.lm_head.weight.data_ptr() != tied.model.embed_tokens.weight.data_ptr()
    assert torch.equal(tied.model.embed_tokens.weight, tiny_model(tie=True).model.embed_tokens.weight)


def test_simulate_can_keep_the_adapter_blocks_exact() -> None:
    model = zflora_model(tiny_model(), seed=1)
    q = Quantization(4, BLOCK)
    both, base_only = simulate(model, q), simulate(model, q, adapter=False)
    for name, m in model.named_modules():
        if isinstance(m, FusedLinear):
            kept, rounded = base_only.get_submodule(name), both.get_submodule(name)
            assert torch.equal(block_of(m.kind, kept.weight, m.r), block_of(m.kind, m.weight, m.r))
            assert torch.equal(base_block(m.kind, kept.weight, m.r), base_block(m.kind, rounded.weight, m.r))
            assert not torch.equal(block_of(m.kind, rounded.weight, m.r), block_of(m.kind, m.weight, m.r))
