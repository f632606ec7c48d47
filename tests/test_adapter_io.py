"""Adapter files: round trip, fused hot-swap, and bad input that must change nothing."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_same_state, randomize_adapter, rewrite_weights, state, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

import zflora
from zflora.adapter_io import CONFIG_NAME, WEIGHTS_NAME
from zflora.modules import ZFLoRALinear


def _adapted(seed: int, **kwargs) -> torch.nn.Module:
    model = tiny_model(tie=True)
    zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=8, alpha=16, **kwargs))
    randomize_adapter(model, seed=seed)
    return model


def test_round_trip_exact(tmp_path, ids):
    src = _adapted(seed=1, lm_head=True)
    zflora.save_adapter(src, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    meta = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert meta["zflora"]["r"] == 8 and meta["base_model"]["hidden_size"] == 48
    dst = _adapted(seed=2, lm_head=True)
    zflora.load_adapter(dst, tmp_path / "a")
    assert torch.equal(dst(ids).logits, src(ids).logits)
    for n, p in zflora.adapter_parameters(src).items():
        assert torch.equal(zflora.adapter_parameters(dst)[n], p)


def test_save_from_fused_equals_save_from_unfused(tmp_path, ids):
    model = _adapted(seed=1)
    zflora.save_adapter(model, tmp_path / "u")
    zflora.fuse(model)
    zflora.save_adapter(model, tmp_path / "f")
    unfused, fused = load_file(tmp_path / "u" / WEIGHTS_NAME), load_file(tmp_path / "f" / WEIGHTS_NAME)
    assert list(unfused) == list(fused)
    assert all(torch.equal(unfused[k], fused[k]) for k in unfused)


def test_save_replaces_existing_atomically(tmp_path):
    zflora.save_adapter(_adapted(seed=1), tmp_path / "a")
    zflora.save_adapter(_adapted(seed=2), tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary left behind


def test_fused_hot_swap_a_b_a(tmp_path, ids):
    zflora.save_adapter(_adapted(seed=1), tmp_path / "a")
    b = _adapted(seed=2, targets="all")
    b.zflora_config.alpha = 24.0  # another alpha (scale 3): the scaling follows the adapter
    assert all(m.scaling == 3.0 for m in b.modules() if isinstance(m, ZFLoRALinear))  # one place holds it
    zflora.save_adapter(b, tmp_path / "b")
    with torch.no_grad():
        logits_b_unfused = b(ids).logits

    model = _adapted(seed=3)
    zflora.load_adapter(model, tmp_path / "a")
    zflora.fuse(model)
    with torch.no_grad():
        logits_a = model(ids).logits
    base_blocks = {n: t for n, t in state(model).items() if "zflora_" not in n}
    d, r = 48, 8

    def base_block(name: str, t: torch.Tensor) -> torch.Tensor:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            return t[: t.shape[0] - r]
        if name.endswith("proj.weight"):
            return t[:, : t.shape[1] - r]
        return t[:d] if name.endswith("layernorm.weight") or name == "model.norm.weight" else t

    zflora.load_adapter(model, tmp_path / "b")
    with torch.no_grad():
        logits_b = model(ids).logits
    assert not torch.allclose(logits_b, logits_a)
    assert (logits_b - logits_b_unfused).abs().max() <= 1e-5 * logits_b_unfused.abs().max()
    zflora.load_adapter(model, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits_a)
    after = state(model)
    for n, t in base_blocks.items():
        assert torch.equal(base_block(n, after[n]), base_block(n, t)), n


def _check_rejected(tmp_path, model, exc, match):
    before = state(model)
    with pytest.raises(exc, match=match):
        zflora.load_adapter(model, tmp_path / "a")
    assert_same_state(before, state(model))


@pytest.mark.parametrize("fused", [False, True])
def test_bad_adapter_files_change_nothing(tmp_path, fused):
    zflora.save_adapter(_adapted(seed=1), tmp_path / "a")
    model = _adapted(seed=2)
    if fused:
        zflora.fuse(model)
    weights, cfg = tmp_path / "a" / WEIGHTS_NAME, tmp_path / "a" / CONFIG_NAME
    good_weights, good_cfg = weights.read_bytes(), cfg.read_text()

    weights.write_bytes(good_weights[: len(good_weights) // 2])
    _check_rejected(tmp_path, model, zflora.AdapterError, "truncated")
    weights.write_bytes(b"\x00" * 64)
    _check_rejected(tmp_path, model, zflora.AdapterError, "truncated")
    weights.unlink()
    _check_rejected(tmp_path, model, FileNotFoundError, "adapter_model.safetensors: missing")
    weights.write_bytes(good_weights)

    cfg.write_text("{not json")
    _check_rejected(tmp_path, model, zflora.AdapterError, "not valid JSON")
    for field, value, match in [
        ("r", 4, r"adapter shape does not match.*r: adapter 4, model 8"),
        ("targets", "mha", "targets: adapter"),
        ("r", -1, "r: must be a positive integer"),
    ]:
        meta = json.loads(good_cfg)
        meta["zflora"][field] = value
        cfg.write_text(json.dumps(meta))
        _check_rejected(tmp_path, model, zflora.AdapterError, match)
    meta = json.loads(good_cfg)
    meta["base_model"]["hidden_size"] = 2048
    cfg.write_text(json.dumps(meta))
    _check_rejected(tmp_path, model, zflora.AdapterError, "different base model.*hidden_size: adapter 2048, model 48")
    cfg.unlink()
    _check_rejected(tmp_path, model, FileNotFoundError, "adapter_config.json: missing")
    (tmp_path / "a").rename(tmp_path / "gone")
    _check_rejected(tmp_path, model, FileNotFoundError, "adapter directory not found")


def test_missing_or_extra_tensors_change_nothing(tmp_path):
    zflora.save_adapter(_adapted(seed=1), tmp_path / "a")
    model = _adapted(seed=2)
    file = tmp_path / "a" / WEIGHTS_NAME
    tensors = load_file(file)
    with safe_open(file, framework="pt") as f:
        header = f.metadata()  # kept, so that only the tensors are wrong
    dropped = dict(tensors)
    dropped.pop("model.layers.1.mlp.up_proj.zflora_B")
    rewrite_weights(file.parent, dropped, header)
    _check_rejected(tmp_path, model, zflora.AdapterError, "missing 1: model.layers.1.mlp.up_proj.zflora_B")
    rewrite_weights(file.parent, {**tensors, "model.layers.9.extra": torch.zeros(2)}, header)
    _check_rejected(tmp_path, model, zflora.AdapterError, "unexpected 1: model.layers.9.extra")
    name = "model.layers.0.self_attn.q_proj.zflora_B"
    bad = {**tensors, name: torch.full_like(tensors[name], float("nan"))}
    rewrite_weights(file.parent, bad, header)
    _check_rejected(tmp_path, model, zflora.AdapterError, "q_proj.zflora_B holds non-finite")
    rewrite_weights(file.parent, tensors)  # the right tensors, but not from the save that wrote the config
    _check_rejected(tmp_path, model, zflora.AdapterError, "written by another save")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 0}, "r: must be a positive integer"),
        ({"r": 2.5}, "r: must be a positive integer"),
        ({"r": True}, "r: must be a positive integer"),
        ({"alpha": 0}, "alpha: must be a positive finite number"),
        ({"alpha": -3.0}, "alpha: must be a positive finite number"),
        ({"alpha": float("inf")}, "alpha: must be a positive finite number"),
        ({"alpha": float("nan")}, "alpha: must be a positive finite number"),
        ({"targets": "everything"}, "targets: unknown preset 'everything'"),
        ({"targets": ["q", "w_proj"]}, "targets: unknown projection 'w_proj'"),
        ({"targets": []}, "targets: must be"),
        ({"targets": ["o", "down"]}, "no input projection"),
        ({"lm_head": "yes"}, "lm_head: must be true or false"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        zflora.ZFLoRAConfig(**kwargs)


def test_targets_normalised():
    assert zflora.ZFLoRAConfig(targets=["v_proj", "q"]).targets == ["q", "v"]
    assert zflora.ZFLoRAConfig(targets=["o", "down"], lm_head=True).target_modules == ("o", "down")


def test_unsupported_architecture_untouched():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16))
    before = state(gpt2)
    flags = [p.requires_grad for p in gpt2.parameters()]
    with pytest.raises(zflora.UnsupportedModelError, match="got GPT2LMHeadModel"):
        zflora.apply_zflora(gpt2, zflora.ZFLoRAConfig(r=4))
    assert_same_state(before, state(gpt2))
    assert flags == [p.requires_grad for p in gpt2.parameters()]


def test_apply_twice_and_fuse_without_adapter_rejected():
    model = _adapted(seed=1)
    with pytest.raises(zflora.UnsupportedModelError, match="already carries"):
        zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=4))
    with pytest.raises(ValueError, match="no zFLoRA adapter"):
        zflora.fuse(tiny_model())
