"""Adapter files: round trip, fused hot-swap, and bad input that must change nothing."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    adapted,
    assert_same_state,
    randomize_adapter,
    refused_unchanged,
    rewrite_weights,
    safetensors_header,
    saved_adapter,
    set_adapter_tensor,
    state,
    tiny_model,
)
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

import zflora
from zflora.adapter_io import CONFIG_NAME, WEIGHTS_NAME, Adapter, AdapterError, base_identity
from zflora.compiled import compile as zcompile
from zflora.files import STALE_S
from zflora.modules import ZFLoRALinear


def test_round_trip_exact(tmp_path, ids):
    src = adapted(seed=1, lm_head=True)
    zflora.save_adapter(src, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    meta = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert meta["zflora"]["r"] == 8 and meta["base_model"]["hidden_size"] == 48
    dst = adapted(seed=2, lm_head=True)
    zflora.load_adapter(dst, tmp_path / "a")
    assert torch.equal(dst(ids).logits, src(ids).logits)
    for n, p in zflora.adapter_parameters(src).items():
        assert torch.equal(zflora.adapter_parameters(dst)[n], p)


def test_save_from_fused_equals_save_from_unfused(tmp_path, ids):
    model = adapted(seed=1)
    zflora.save_adapter(model, tmp_path / "u")
    zflora.fuse(model)
    zflora.save_adapter(model, tmp_path / "f")
    unfused, fused = load_file(tmp_path / "u" / WEIGHTS_NAME), load_file(tmp_path / "f" / WEIGHTS_NAME)
    assert list(unfused) == list(fused)
    assert all(torch.equal(unfused[k], fused[k]) for k in unfused)


def test_save_replaces_existing_atomically(tmp_path):
    zflora.save_adapter(adapted(seed=1), tmp_path / "a")
    zflora.save_adapter(adapted(seed=2), tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary left behind


def test_fused_hot_swap_a_b_a(tmp_path, ids):
    zflora.save_adapter(adapted(seed=1), tmp_path / "a")
    b = adapted(seed=2, targets="all")
    b.zflora_config.alpha = 24.0  # another alpha (scale 3): the scaling follows the adapter
    assert all(m.scaling == 3.0 for m in b.modules() if isinstance(m, ZFLoRALinear))  # one place holds it
    zflora.save_adapter(b, tmp_path / "b")
    with torch.no_grad():
        logits_b_unfused = b(ids).logits

    model = adapted(seed=3)
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
    zflora.save_adapter(adapted(seed=1), tmp_path / "a")
    model = adapted(seed=2)
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
    zflora.save_adapter(adapted(seed=1), tmp_path / "a")
    model = adapted(seed=2)
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
    model = adapted(seed=1)
    with pytest.raises(zflora.UnsupportedModelError, match="already carries"):
        zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=4))
    with pytest.raises(ValueError, match="no zFLoRA adapter"):
        zflora.fuse(tiny_model())


# --------------------------------------------------------------------------- refusals and faults


def test_files_from_two_saves_are_refused(tmp_path):
    """Broken promise 1: a crash between the two renames left new weights beside the old config."""
    zflora.save_adapter(adapted(seed=1), tmp_path / "old")
    zflora.save_adapter(adapted(seed=2, alpha=4.0), tmp_path / "new")
    shutil.copy(tmp_path / "new" / WEIGHTS_NAME, tmp_path / "old" / WEIGHTS_NAME)
    refused_unchanged(adapted(seed=3), tmp_path / "old", "written by another save")


def test_save_removes_temporaries_of_a_crashed_save(tmp_path):
    """Broken promise 1: temporary files of a killed save stay behind and pile up."""
    path = tmp_path / "a"
    zflora.save_adapter(adapted(), path)
    (path / f".{WEIGHTS_NAME}.abc123.tmp").write_bytes(b"")
    (path / f".{CONFIG_NAME}.def456.tmp").write_text("{")
    for stale in path.glob(".*.tmp"):  # an hour old: no writer is still at them
        os.utime(stale, (time.time() - 2 * STALE_S,) * 2)
    (path / f".{WEIGHTS_NAME}.inflight.tmp").write_bytes(b"")  # another writer's, just created: kept
    (path / "optimizer.pt").write_bytes(b"kept")  # a Trainer checkpoint's own files are left alone
    zflora.save_adapter(adapted(seed=2), path)
    assert sorted(p.name for p in path.iterdir()) == [
        f".{WEIGHTS_NAME}.inflight.tmp",
        CONFIG_NAME,
        WEIGHTS_NAME,
        "optimizer.pt",
    ]


@pytest.mark.parametrize(
    "other, match",
    [
        (lambda: tiny_model(tie=True, seed=5), "weights of embed_tokens differ"),  # same shapes, other weights
        (lambda: _with_config(rope_theta=1234.0), "rope_theta"),
        (lambda: _with_config(rms_norm_eps=1e-3), "rms_norm_eps"),
        (lambda: tiny_model(tie=False), "tie_word_embeddings"),
    ],
    ids=["other-weights", "rope-theta", "rms-eps", "untied"],
)
def test_another_base_of_the_same_shapes_is_refused(tmp_path, other, match):
    """Broken promise 2, and the override for those who know the adapter fits."""
    zflora.save_adapter(adapted(), tmp_path / "a")
    model = other()
    refused_unchanged(model, tmp_path / "a", match)
    zflora.load_adapter(model, tmp_path / "a", check_base=False)  # explicit override
    assert zflora.is_zflora(model)


def _with_config(**fields) -> torch.nn.Module:
    model = tiny_model(tie=True)
    for k, v in fields.items():
        setattr(model.config, k, v)
        if k == "rope_theta" and getattr(model.config, "rope_parameters", None):
            model.config.rope_parameters["rope_theta"] = v
    return model


def test_base_fingerprint_survives_dtype_and_fusion():
    fp32 = base_identity(tiny_model(tie=True))["fingerprint"]
    model = adapted(model=tiny_model(tie=True, dtype=torch.bfloat16))
    zflora.fuse(model)
    adapter = Adapter(model.zflora_config, {**base_identity(model), "fingerprint": fp32}, {})
    zflora.adapter_io.check_same_base(model, adapter)  # bf16 rounding and the fused layout: still the same base


@pytest.mark.parametrize("preset, names", [("all", ["q", "k", "v", "o", "gate", "up", "down"]),
                                           ("mha", ["q_proj", "k_proj", "v_proj", "o_proj"])])  # fmt: skip
def test_target_list_equal_to_a_preset_loads(tmp_path, preset, names):
    """Broken promise 3: the same projections, named as a list, were refused."""
    zflora.save_adapter(adapted(targets=names), tmp_path / "a")
    model = adapted(seed=2, targets=preset)
    zflora.load_adapter(model, tmp_path / "a")


@pytest.mark.parametrize(
    "dtype, value, file_dtype", [(torch.float32, 1e300, torch.float64), (torch.float16, 1e5, torch.float32)]
)
def test_values_that_overflow_the_model_dtype_are_refused(tmp_path, dtype, value, file_dtype):
    """Broken promise 4: finite in the file, inf once cast to the model's dtype."""
    zflora.save_adapter(adapted(), tmp_path / "a")
    file = tmp_path / "a" / WEIGHTS_NAME
    tensors, header = load_file(file), safetensors_header(file)
    name = "model.layers.0.self_attn.o_proj.zflora_A"
    tensors[name] = torch.full(tensors[name].shape, value, dtype=file_dtype)
    rewrite_weights(file.parent, tensors, header)
    refused_unchanged(
        adapted(seed=2, model=tiny_model(tie=True, dtype=dtype)), tmp_path / "a", "not finite in the model"
    )


def test_float8_tensor_is_named(tmp_path):
    """Broken promise 5: float8 raised NotImplementedError from torch.isfinite."""
    zflora.save_adapter(adapted(), tmp_path / "a")
    file = tmp_path / "a" / WEIGHTS_NAME
    tensors, header = load_file(file), safetensors_header(file)
    name = "model.layers.1.mlp.down_proj.zflora_A"
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    rewrite_weights(file.parent, tensors, header)
    refused_unchanged(adapted(seed=2), tmp_path / "a", r"down_proj.zflora_A is torch.float8_e4m3fn")


@pytest.mark.parametrize("alpha", ["Infinity", "NaN", "0", "-1"])
def test_non_finite_alpha_in_a_file_is_refused(tmp_path, alpha):
    """Broken promise 6: alpha = Infinity in adapter_config.json was accepted."""
    zflora.save_adapter(adapted(), tmp_path / "a")
    cfg = tmp_path / "a" / CONFIG_NAME
    meta = json.loads(cfg.read_text())
    cfg.write_text(json.dumps(meta).replace(f'"alpha": {meta["zflora"]["alpha"]}', f'"alpha": {alpha}'))
    refused_unchanged(adapted(seed=2), tmp_path / "a", "alpha: must be a positive finite number")


def test_save_refuses_non_finite_weights(tmp_path):
    """Broken promise 6: an all-NaN adapter was written."""
    model = adapted()
    with torch.no_grad():
        next(iter(zflora.adapter_parameters(model).values())).fill_(float("nan"))
    with pytest.raises(AdapterError, match="non-finite adapter weights"):
        zflora.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a" / CONFIG_NAME).exists()


def test_adapter_api_misuse_is_explained(tmp_path):
    """Unclear errors: a plain model, a path that is a file, a deeply nested config, NaN in memory."""
    zflora.save_adapter(adapted(), tmp_path / "a")
    with pytest.raises(AdapterError, match="no zFLoRA adapter"):
        zflora.read_adapter(tmp_path / "a", model=tiny_model(tie=True))
    with pytest.raises(AdapterError, match="is a file; pass the adapter directory"):
        zflora.read_adapter(tmp_path / "a" / CONFIG_NAME)
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / CONFIG_NAME).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AdapterError, match="not valid JSON"):
        zflora.read_adapter(deep)
    model = adapted(seed=2)
    adapter = zflora.read_adapter(tmp_path / "a")
    last = sorted(adapter.tensors)[-1]  # NaN in the last tensor: nothing may have been written before it
    adapter.tensors[last] = torch.full_like(adapter.tensors[last], float("nan"))
    before = state(model)
    with pytest.raises(AdapterError, match="not finite"):
        zflora.set_adapter(model, adapter)
    assert_same_state(before, state(model))


def test_load_adapter_into_a_plain_model_applies_its_config(tmp_path, ids):
    """The one-call path PEFT users know (`PeftModel.from_pretrained`)."""
    src = adapted(targets="mha", lm_head=True)
    zflora.save_adapter(src, tmp_path / "a")
    model = zflora.load_adapter(tiny_model(tie=True), tmp_path / "a")
    assert model.zflora_config.target_modules == ("q", "k", "v", "o") and model.zflora_config.lm_head
    with torch.no_grad():
        assert torch.equal(model(ids).logits, src(ids).logits)
    qwen = tiny_model("qwen2")  # refused before anything changes
    before = state(qwen)
    with pytest.raises(AdapterError, match="model_type"):
        zflora.load_adapter(qwen, tmp_path / "a")
    assert_same_state(before, state(qwen))
    assert not zflora.is_zflora(qwen)


@pytest.mark.parametrize(
    ("dtype", "name", "value"),
    [
        (torch.float32, "model.layers.0.self_attn.q_proj.zflora_B", 3e38),  # B1: the scale 2 doubles it to inf
        (torch.float16, "model.layers.0.self_attn.q_proj.zflora_B", 1e5),  # B2: inf once cast to fp16
        (torch.float16, "model.layers.1.mlp.down_proj.zflora_A", 1e5),
    ],
)
def test_a_refused_load_leaves_a_plain_model_plain(tmp_path, dtype, name, value):
    """B1, B2: every check, finiteness in the model's dtype included, runs before zFLoRA is applied."""
    path = saved_adapter(tmp_path)
    set_adapter_tensor(path, name, value)
    plain = tiny_model(tie=True, dtype=dtype)
    before = state(plain)
    with pytest.raises(AdapterError, match="not finite in the model's dtype"):
        zflora.load_adapter(plain, path)
    assert not zflora.is_zflora(plain)
    assert_same_state(before, state(plain))


def test_a_frozen_compiled_plain_model_is_refused_unchanged(tmp_path):
    """B4: refused as frozen, but the model carried zFLoRA afterwards."""
    path = saved_adapter(tmp_path)
    plain = tiny_model(tie=True)
    before = state(plain)
    zcompile(plain, freeze=True)
    with pytest.raises(AdapterError, match="freeze=True"):
        zflora.load_adapter(plain, path)
    assert not zflora.is_zflora(plain)
    assert_same_state(before, state(plain))


def test_concurrent_saves_into_one_directory_all_succeed(tmp_path, monkeypatch):
    """B3: each save deleted every temporary file in the directory, the other writer's in flight included.
    And two saves' weights and configs interleaved, leaving one save's weights beside the other's config."""
    models = []
    for seed in (1, 2):
        m = tiny_model(tie=True)
        zflora.apply_zflora(m, zflora.ZFLoRAConfig(r=8))
        randomize_adapter(m, seed=seed)
        models.append(m)
    events, io = [], zflora.adapter_io
    write_weights, write_config = io.atomic_write, io.write_json

    def logged(write, pause):
        def call(path, *a, **k):
            events.append((threading.get_ident(), Path(path).name))
            time.sleep(pause)  # in the middle of a save: the other writer would write its file here
            return write(path, *a, **k)

        return call

    monkeypatch.setattr(io, "atomic_write", logged(write_weights, 0.002))
    monkeypatch.setattr(io, "write_json", logged(write_config, 0))
    errors: list[BaseException] = []

    def writer(model):
        try:
            for _ in range(25):
                zflora.save_adapter(model, tmp_path / "shared")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    pairs = [events[i : i + 2] for i in range(0, len(events), 2)]  # each save's weights, then its own config
    assert all(w[0] == c[0] and (w[1], c[1]) == (WEIGHTS_NAME, CONFIG_NAME) for w, c in pairs)
    loaded = zflora.read_adapter(tmp_path / "shared")  # one whole adapter: the last writer's
    assert any(
        all(torch.equal(loaded.tensors[k], v.detach()) for k, v in zflora.adapter_parameters(m).items()) for m in models
    )


def test_flipped_bytes_that_still_parse_are_refused(tmp_path):
    """No content checksum: a flipped byte inside a tensor's data loaded silently."""
    path = saved_adapter(tmp_path)
    file = path / WEIGHTS_NAME
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x01  # the last tensor's data: the file still parses
    file.write_bytes(bytes(data))
    zflora.adapter_io._read_tensors(file, None)  # it does parse
    model = tiny_model(tie=True)
    with pytest.raises(AdapterError, match="differs from the sha256 recorded at save"):
        zflora.load_adapter(model, path)
    assert not zflora.is_zflora(model)


def test_a_base_that_differs_in_a_later_layer_is_refused(tmp_path):
    """The fingerprint covered 3 tensors of the first layer; now every layer's q and down projections."""
    path = saved_adapter(tmp_path)
    other = tiny_model(tie=True)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight[0, :4] += 0.5
    with pytest.raises(AdapterError, match="weights of layers.1.down_proj differ"):
        zflora.load_adapter(other, path)
    assert not zflora.is_zflora(other)


@pytest.mark.parametrize("value", ["abc", 3, ["x"]])
def test_a_fingerprint_of_the_wrong_type_is_refused(tmp_path, value):
    """A fingerprint that was a string turned the base check off."""
    path = saved_adapter(tmp_path)
    meta = json.loads((path / "adapter_config.json").read_text())
    meta["base_model"]["fingerprint"] = value
    (path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="fingerprint must be an object"):
        zflora.load_adapter(tiny_model(tie=True), path)


def test_an_older_three_tensor_fingerprint_still_loads(tmp_path, ids):
    path = saved_adapter(tmp_path)
    meta = json.loads((path / "adapter_config.json").read_text())
    fp = meta["base_model"]["fingerprint"]
    meta["base_model"]["fingerprint"] = {k: fp[k] for k in ("embed_tokens", "layers.0.q_proj", "norm")}
    (path / "adapter_config.json").write_text(json.dumps(meta))
    zflora.load_adapter(tiny_model(tie=True), path)


def test_a_built_config_keeps_its_shape_fields(ids):
    """Mutating model.zflora_config.r broke the model; alpha stays settable and validated."""
    model = adapted()
    for name, value in (("r", 4), ("lm_head", True), ("expand_input", False), ("targets", "mha")):
        with pytest.raises(AttributeError, match=f"ZFLoRAConfig.{name} is fixed"):
            setattr(model.zflora_config, name, value)
    with pytest.raises(ValueError, match="alpha"):
        model.zflora_config.alpha = float("inf")
    model.zflora_config.alpha = 8.0
    assert model.zflora_config.scaling == 1.0
    with torch.no_grad():
        model(ids)
