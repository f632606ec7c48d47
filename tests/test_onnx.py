"""ONNX export: ONNX Runtime equals the Hugging Face model (prefill, decode through the KV cache,
greedy generation), and an adapter swap replaces only the adapter's bytes."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import hf_steps, ort_steps, tiny_model, zflora_model

import zflora
from zflora.adapter_io import AdapterError
from zflora.files import current_umask
from zflora.methods import randomize_lora
from zflora.models import load_local_model

ort = pytest.importorskip("onnxruntime")

from zflora.cli import main  # noqa: E402 - after the skip
from zflora.export import onnx as zonnx  # noqa: E402

pytestmark = pytest.mark.slow  # ONNX exports


def assert_same_logits(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tiny_model()
    model = zflora_model(base, seed=1)
    out = zonnx.export(copy.deepcopy(model), tmp_path_factory.mktemp("onnx") / "zflora")
    return base, model, out


def test_prefill_and_decode_match_the_fused_model(exported) -> None:
    base, model, out = exported
    manifest = zonnx.read_manifest(out)
    assert manifest["inputs"][:4] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"]
    assert manifest["outputs"][:2] == ["logits", "present.0.key"] and manifest["method"] == "zflora"
    assert sorted(p.name for p in out.iterdir()) == sorted([zonnx.GRAPH, zonnx.WEIGHTS, zonnx.ADAPTER, zonnx.MANIFEST])
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    assert_same_logits(ort_steps(zonnx.session(out), manifest, ids.numpy(), 4), hf_steps(model, ids, 4))


def test_adapter_file_holds_exactly_the_adapter(exported) -> None:
    _, model, out = exported
    manifest = zonnx.read_manifest(out)
    blocks = manifest["adapter"]["initializers"]
    expected = sum(p.numel() for p in zflora.adapter_parameters(model).values()) * 4  # fp32 bytes
    assert (out / zonnx.ADAPTER).stat().st_size == expected == sum(4 * np.prod(b["shape"]) for b in blocks.values())
    assert len(blocks) == 2 * 7 + 1  # seven projections per layer, two layers, and A_in
    umask = current_umask()  # the files get the user's umask, not mkdtemp's private modes
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_swap_equals_the_model_with_the_new_adapter(exported, tmp_path) -> None:
    base, _, out = exported
    out = zonnx.export(copy.deepcopy(exported[1]), tmp_path / "swapped")  # its own copy: swapped below
    other = zflora_model(base, seed=7, alpha=3.0)  # another alpha: the scale is folded into the new bytes
    path = zflora.save_adapter(other, tmp_path / "other")
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(4))
    want = hf_steps(other, ids, 2)
    in_memory = zonnx.session(out, adapter=path)  # supplied at session creation, files untouched
    assert_same_logits(ort_steps(in_memory, zonnx.read_manifest(out), ids.numpy(), 2), want)
    graph_bytes = (out / zonnx.WEIGHTS).read_bytes()
    done = zonnx.swap(out, path)
    assert done["bytes_written"] == (out / zonnx.ADAPTER).stat().st_size
    assert (out / zonnx.WEIGHTS).read_bytes() == graph_bytes  # the base weights are never rewritten
    assert_same_logits(ort_steps(zonnx.session(out), zonnx.read_manifest(out), ids.numpy(), 2), want)


def test_bad_swaps_are_refused_and_change_nothing(exported, tmp_path) -> None:
    base, _, out = exported
    before = (out / zonnx.ADAPTER).read_bytes()
    wrong_rank = zflora.apply_zflora(copy.deepcopy(base), zflora.ZFLoRAConfig(r=8))
    with pytest.raises(AdapterError, match="r: adapter 8, model 4"):
        zonnx.swap(out, zflora.save_adapter(wrong_rank, tmp_path / "r8"))
    other_base = zflora_model(tiny_model(seed=5), seed=2)
    with pytest.raises(AdapterError, match="different base model"):
        zonnx.swap(out, zflora.save_adapter(other_base, tmp_path / "other-base"))
    assert (out / zonnx.ADAPTER).read_bytes() == before
    manifest = json.loads((out / zonnx.MANIFEST).read_text())
    (out / zonnx.ADAPTER).write_bytes(before[:-4] + b"\0\0\0\0")  # bytes that are not the manifest's adapter
    try:
        with pytest.raises(AdapterError, match="does not match"):
            zonnx.session(out)
    finally:
        (out / zonnx.ADAPTER).write_bytes(before)
    assert manifest["adapter"]["sha256"]


@pytest.mark.parametrize("method", ["base", "lora"])
def test_base_and_unmerged_lora_export_the_same_way(method, tmp_path) -> None:
    model = tiny_model()
    if method == "lora":
        model = zflora.prepare_model(model, "lora", r=4)
        randomize_lora(model, seed=2, std=0.2)
    out = zonnx.export(model, tmp_path / method)
    manifest = zonnx.read_manifest(out)
    assert manifest["method"] == method and "adapter" not in manifest
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(5))
    assert_same_logits(ort_steps(zonnx.session(out), manifest, ids.numpy(), 2), hf_steps(model, ids, 2))


def test_greedy_generation_on_stories260k(stories_path, tmp_path) -> None:
    base = load_local_model(stories_path)
    model = zflora_model(base, seed=3, alpha=2.0)
    out = zonnx.export(copy.deepcopy(model), tmp_path / "stories")
    ids = torch.tensor([[1, 403, 407, 261, 378]])
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    got = zonnx.generate(zonnx.session(out), zonnx.read_manifest(out), ids.numpy(), 32)
    assert np.array_equal(got, want.numpy())


def test_onnxruntime_bench_smoke(tmp_path) -> None:
    out = tmp_path / "ort.json"
    main(["bench", "--engine", "onnxruntime", "--preset", "tiny", "--rank", "8", "--prompt-lens", "8",
          "--decode-context", "12", "--decode-steps", "2", "--repeats", "1", "--no-progress", "--methods",
          "base,zflora", "--precisions", "fp32,int4,int8-dynamic", "--json", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    precisions = ("fp32", "int4", "int8-dynamic")
    assert {(r["precision"], r["method"]) for r in result["end_to_end"]} == {
        (p, m) for p in precisions for m in ("base", "zflora")
    }
    assert all(r["median_ms"] > 0 and r["ratio_to_base"] > 0 for r in result["end_to_end"])
    assert len(result["targets"]) == 6 and result["settings"]["logits"] == "last position"
    swaps = {(r["precision"], r["operation"]): r for r in result["swap"]}
    assert {p for p, _ in swaps} == {"fp32", "int4"}  # a dynamic int8 export folds the adapter in: no swap
    swap, rebuild = swaps["int4", "zflora export swap (adapter.onnx.data only)"], swaps["int4", "full re-quantization"]
    assert 0 < swap["bytes_written"] < rebuild["bytes_written"]


def test_export_cli(tmp_path, stories_path, capsys) -> None:

    model = zflora_model(load_local_model(stories_path), seed=4)
    adapter = zflora.save_adapter(model, tmp_path / "adapter")
    main(["export", "onnx", "--model", str(stories_path), "--adapter", str(adapter), "--output", str(tmp_path / "x")])
    assert "zflora exported" in capsys.readouterr().out
    main(["export", "swap", "--output", str(tmp_path / "x"), "--adapter", str(adapter)])
    assert "bytes written (adapter.onnx.data only)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["export", "swap", "--output", str(tmp_path / "x")])
    assert e.value.code == 2  # a usage error: swap needs --adapter


# --------------------------------------------------------------------------- refusals and faults


@pytest.mark.parametrize(("content", "match"), [("[1, 2]", "expected a JSON object"), (b"\xff\xfe{", "not valid JSON")])
def test_an_onnx_manifest_that_is_not_an_object_is_named(tmp_path, content, match):
    from zflora.export.onnx import MANIFEST, read_manifest

    (tmp_path / MANIFEST).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(AdapterError, match=match):
        read_manifest(tmp_path)
