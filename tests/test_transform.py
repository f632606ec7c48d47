"""The method's invariants: exact at initialisation, fused equals unfused, no extra operator per layer."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import ARCHS, assert_same_state, randomize_adapter, state, tiny_model

import zflora
from zflora.transform import count_operators

# Max |fused - unfused| over the logits, relative to max |logits|, per dtype. Measured on these tiny
# models (deliberately large weights): fp32 7e-7; bf16 2.8e-2 and fp16 4e-3, where each form on its own is
# already 3-5% (bf16) and ~1% (fp16) away from an fp32 evaluation of the same weights. A wrong fusion
# (say, a missing scale) moves the logits by more than their own scale and fails by far.
FUSED_TOL = {torch.float32: 1e-5, torch.bfloat16: 6e-2, torch.float16: 1.5e-2}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("targets", ["all", "mha"])
@pytest.mark.parametrize("tie", [False, True])
def test_exact_at_init(arch, targets, tie, ids):
    model = tiny_model(arch, tie=tie)
    with torch.no_grad():
        ref = model(ids).logits
        zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=8, alpha=16, targets=targets))
        out = model(ids).logits
    assert torch.equal(out, ref)  # bit for bit in fp32
    assert zflora.adapter_parameters(model)  # something was added


def test_exact_at_init_with_generate(ids):
    model = tiny_model(tie=True)
    ref = model.generate(ids[:1], max_new_tokens=12, do_sample=False)
    zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=4, alpha=8, lm_head=True))
    assert torch.equal(model.generate(ids[:1], max_new_tokens=12, do_sample=False), ref)
    zflora.fuse(model)
    assert torch.equal(model.generate(ids[:1], max_new_tokens=12, do_sample=False), ref)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("dtype", list(FUSED_TOL), ids=str)
@pytest.mark.parametrize("targets", ["all", "mha", ["q", "v"]])
def test_fused_equals_unfused(arch, dtype, targets, ids):
    model = tiny_model(arch, dtype=dtype)
    with torch.no_grad():
        base = model(ids).logits.float()
        zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=8, alpha=16, targets=targets))
        randomize_adapter(model)
        unfused = model(ids).logits.float()
        zflora.fuse(model)
        assert zflora.is_fused(model)
        fused = model(ids).logits.float()
    scale = unfused.abs().max()
    assert (unfused - base).abs().max() > 10 * FUSED_TOL[dtype] * scale  # the adapter really acts
    assert (fused - unfused).abs().max() <= FUSED_TOL[dtype] * scale
    out = model.generate(ids[:1], max_new_tokens=5, do_sample=False)  # generate runs in every dtype
    assert out.shape == (1, ids.shape[1] + 5)


def test_fused_generate_equals_unfused(ids):
    model = tiny_model(tie=True, layers=3)
    zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=8, alpha=16, lm_head=True))
    randomize_adapter(model)
    unfused = model.generate(ids, max_new_tokens=16, do_sample=False)
    zflora.fuse(model)
    assert torch.equal(model.generate(ids, max_new_tokens=16, do_sample=False), unfused)


def test_unfuse_restores_exactly_and_is_idempotent(ids):
    model = tiny_model(tie=True)
    zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=8, alpha=12))
    randomize_adapter(model)
    before, logits = state(model), model(ids).logits
    zflora.fuse(zflora.fuse(model))
    fused_state = state(model)
    assert fused_state["model.layers.0.self_attn.q_proj.weight"].shape == (48, 56)  # [W | s B]
    assert fused_state["model.layers.0.mlp.down_proj.weight"].shape == (56, 80)  # [W ; A]
    zflora.unfuse(zflora.unfuse(model))
    assert not zflora.is_fused(model)
    assert_same_state(before, state(model))
    assert torch.equal(model(ids).logits, logits)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tying survives


@pytest.mark.parametrize("targets", ["all", "mha"])
def test_fused_forward_has_no_extra_operator_per_layer(targets, ids):
    counts = {}
    for layers in (2, 4):
        for method in ("base", "zflora"):
            model = tiny_model(layers=layers)
            if method == "zflora":
                zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=8, alpha=16, targets=targets))
                zflora.fuse(model)
            counts[method, layers] = count_operators(model, ids)
    per_layer = {m: counts[m, 4] - counts[m, 2] for m in ("base", "zflora")}
    assert per_layer["zflora"] == per_layer["base"]  # same operators, same number, in every layer
    extra = counts["zflora", 2] - counts["base", 2]
    assert counts["base", 2] - counts["zflora", 2] == Counter()
    # Once per forward: the input expansion z0 = A_in h0 (a linear) and the concat [h0 ; z0].
    assert extra["cat"] == 1 and extra["mm"] == 1
    assert sum(extra.values()) <= 4, extra  # linear -> matmul -> mm, cat


# --------------------------------------------------------------------------- the padded fused form


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize(
    "kwargs", [{}, {"targets": "mha"}, {"lm_head": True}, {"expand_input": False}, {"targets": ["q", "v"]}]
)
def test_padded_fused_equals_unfused(arch, kwargs, ids):
    """fuse(model, pad_to=32): the stream 48 + 8 = 56 wide becomes 64, zero channels after z; same function."""
    model = tiny_model(arch, tie=True)
    zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=8, **kwargs))
    randomize_adapter(model)
    with torch.no_grad():
        ref = model(ids).logits
        zflora.fuse(model, pad_to=32)
        out = model(ids).logits
    assert zflora.fused_padding(model) == 8
    assert model.model.layers[0].self_attn.q_proj.in_features == 64
    assert model.model.layers[0].mlp.down_proj.out_features == 64
    assert (out - ref).abs().max() <= FUSED_TOL[torch.float32] * ref.abs().max()


def test_padded_fused_hot_swap_unfuse_and_operators(ids, tmp_path):
    """A hot-swap into the padded form equals a fresh padded fuse of the new adapter, writes nothing into
    the padding, unfuse restores the training form bit for bit, and no layer gains an operator."""
    a, b = tiny_model(), tiny_model()
    for m, seed in ((a, 1), (b, 2)):
        zflora.apply_zflora(m, zflora.ZFLoRAConfig(r=8))
        randomize_adapter(m, seed=seed)
    zflora.save_adapter(b, tmp_path / "b")
    training = state(a)
    zflora.fuse(a, pad_to=32)
    zflora.load_adapter(a, tmp_path / "b")
    zflora.fuse(b, pad_to=32)
    assert_same_state(state(a), state(b))
    down = a.model.layers[1].mlp.down_proj.weight
    assert torch.count_nonzero(down[-8:]) == 0  # the padding rows
    zflora.unfuse(b)
    zflora.unfuse(a)
    assert zflora.fused_padding(a) == 0
    zflora.load_adapter(a, tmp_path / "b")
    assert_same_state(state(a), state(b))
    assert state(b).keys() == training.keys()

    def per_layer(pad_to):
        counts = []
        for layers in (1, 2):
            m = tiny_model(layers=layers)
            zflora.apply_zflora(m, zflora.ZFLoRAConfig(r=8))
            counts.append(count_operators(zflora.fuse(m, pad_to=pad_to), ids))
        return counts[1] - counts[0]

    assert per_layer(32) == per_layer(None)


def test_padding_is_refused_where_it_does_not_apply(tmp_path):
    model = tiny_model()
    zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=8))
    with pytest.raises(ValueError, match="pad_to: must be a positive integer"):
        zflora.fuse(model, pad_to=0)
    assert not zflora.is_fused(model)
    zflora.fuse(model, pad_to=16)
    assert zflora.fused_padding(model) == 8  # 56 -> 64
    from zflora.export.onnx import export

    with pytest.raises(ValueError, match="padded fused model"):
        export(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
