"""The second round of fault cases (a hostile user's 377 tries): each test keeps a whole class of bug
closed, and fails without its fix."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from conftest import assert_same_state, randomize_adapter, rewrite_weights, state, tiny_model
from safetensors.torch import load_file
from test_hardening import _header
from test_serve import save_base

import zflora
from zflora.adapter_io import WEIGHTS_NAME, AdapterError, checkpoint_fingerprint
from zflora.cli import main
from zflora.compiled import compile as zcompile
from zflora.finetune.config import TrainConfig
from zflora.finetune.data import DataError
from zflora.finetune.evaluate import score_responses_file
from zflora.finetune.train import claim_output
from zflora.registry import MARKER
from zflora.serve import serve_command


def _saved(tmp_path, dtype=torch.float32, seed=1):
    model = tiny_model(tie=True)
    zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=8))
    randomize_adapter(model, seed=seed)
    zflora.save_adapter(model, tmp_path / "a")
    return tmp_path / "a"


def _set_tensor(path, name, value, dtype=torch.float32):
    file = path / WEIGHTS_NAME
    tensors, header = load_file(file), _header(file)
    tensors[name] = torch.full(tensors[name].shape, value, dtype=dtype)
    rewrite_weights(file.parent, tensors, header)


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
    path = _saved(tmp_path)
    _set_tensor(path, name, value)
    plain = tiny_model(tie=True, dtype=dtype)
    before = state(plain)
    with pytest.raises(AdapterError, match="not finite in the model's dtype"):
        zflora.load_adapter(plain, path)
    assert not zflora.is_zflora(plain)
    assert_same_state(before, state(plain))


def test_a_frozen_compiled_plain_model_is_refused_unchanged(tmp_path):
    """B4: refused as frozen, but the model carried zFLoRA afterwards."""
    path = _saved(tmp_path)
    plain = tiny_model(tie=True)
    before = state(plain)
    zcompile(plain, freeze=True)
    with pytest.raises(AdapterError, match="freeze=True"):
        zflora.load_adapter(plain, path)
    assert not zflora.is_zflora(plain)
    assert_same_state(before, state(plain))


def test_concurrent_saves_into_one_directory_all_succeed(tmp_path):
    """B3: each save deleted every temporary file in the directory, the other writer's in flight included."""
    models = []
    for seed in (1, 2):
        m = tiny_model(tie=True)
        zflora.apply_zflora(m, zflora.ZFLoRAConfig(r=8))
        randomize_adapter(m, seed=seed)
        models.append(m)
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
    loaded = zflora.read_adapter(tmp_path / "shared")  # one whole adapter: the last writer's
    assert any(
        all(torch.equal(loaded.tensors[k], v.detach()) for k, v in zflora.adapter_parameters(m).items()) for m in models
    )


def test_train_refuses_an_output_that_holds_another_run(tmp_path):
    """B5: a finished run's final/ was overwritten and its checkpoints rotated away without a word."""
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    (out / "checkpoint-10").mkdir()
    (out / "train_log.json").write_text("{}")
    cfg = dict(model=tmp_path, data=[tmp_path / "d.json"], output=out)
    with pytest.raises(FileExistsError, match="holds another run .*--resume .*--overwrite"):
        claim_output(TrainConfig(**cfg))
    assert (out / "final").is_dir() and (out / "checkpoint-10").is_dir()
    claim_output(TrainConfig(**cfg, resume=True))  # continuing it is fine and removes nothing
    assert (out / "checkpoint-10").is_dir()
    claim_output(TrainConfig(**cfg, overwrite=True))
    assert not any(out.iterdir())
    with pytest.raises(ValueError, match="resume, overwrite"):
        TrainConfig(**cfg, resume=True, overwrite=True)


@pytest.mark.parametrize("ratio", [1, 5, 1.0, -0.1, float("nan")])
def test_warmup_ratio_is_a_fraction(tmp_path, ratio):
    """B6: --warmup-ratio reached Trainer as warmup_steps, so 1 meant one step and 5 five steps."""
    with pytest.raises(ValueError, match="warmup_ratio"):
        TrainConfig(model=tmp_path, data=[tmp_path], output=tmp_path, warmup_ratio=ratio)
    TrainConfig(model=tmp_path, data=[tmp_path], output=tmp_path, warmup_ratio=0.99)


def test_responses_of_mixed_kinds_are_refused(tmp_path):
    """B7: a responses file was scored with its first record's kind: two right answers scored 50."""
    rows = [{"task": "t", "record": {"instruction": "2+2?", "answer": "4"}, "response": "4"},
            {"task": "t", "record": {"instruction": "x\n\nAnswer format: true/false", "answer": "true"},
             "response": "true"}]  # fmt: skip
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"r.jsonl: task t: record 1 is scored as 'label' but record 0 as 'number'"):
        score_responses_file(path)


def test_two_files_of_one_task_name_are_refused(tmp_path):
    """B8: a/boolq/test.json and b/boolq/test.json both became task 'boolq'; the first was dropped."""
    for d in ("a", "b"):
        (tmp_path / d / "boolq").mkdir(parents=True)
        (tmp_path / d / "boolq" / "test.json").write_text('[{"instruction": "q", "answer": "true"}]')
    with pytest.raises(SystemExit, match="all name the task 'boolq'"):
        main(["eval", "--model", str(tmp_path), "--data", str(tmp_path / "a/boolq/test.json"),
              str(tmp_path / "b/boolq/test.json")])  # fmt: skip


def test_serve_resolves_and_checks_the_model(tmp_path, monkeypatch):
    """B13: a fetched model's name reached vLLM as ./NAME, and a missing model passed a dry run."""
    monkeypatch.setenv("ZFLORA_HOME", str(tmp_path / "home"))
    fetched = tmp_path / "home" / "models" / "smollm2-135m-instruct"
    save_base(fetched)
    (fetched / MARKER).write_text("{}")
    cmd = serve_command("smollm2-135m-instruct", None, [])
    assert cmd[cmd.index("--model") + 1] == str(fetched.resolve())
    with pytest.raises(FileNotFoundError, match="not a local checkpoint directory"):
        serve_command(str(tmp_path / "nonexistent"), None, [])
    with pytest.raises(SystemExit, match="zflora serve: .*nonexistent"):
        main(["serve", "--model", str(tmp_path / "nonexistent"), "--dry-run"])


def test_serve_refuses_an_adapter_from_another_base_of_the_same_shapes(tmp_path):
    """B14: serve compared the adapter with a meta-device base, where the fingerprint finds nothing."""
    model = save_base(tmp_path / "base", seed=0)
    save_base(tmp_path / "other", seed=1)  # same shapes, other weights
    zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=4))
    randomize_adapter(model)
    zflora.save_adapter(model, tmp_path / "ad")
    assert checkpoint_fingerprint(tmp_path / "base", 2) == zflora.adapter_io.base_fingerprint(model)
    serve_command(str(tmp_path / "base"), str(tmp_path / "ad"), [])  # its own base: accepted
    with pytest.raises(AdapterError, match="weights of embed_tokens differ"):
        serve_command(str(tmp_path / "other"), str(tmp_path / "ad"), [])
    with pytest.raises(AdapterError, match="weights of embed_tokens differ"):  # what load_adapter says too
        zflora.load_adapter(zflora.models.load_local_model(tmp_path / "other"), tmp_path / "ad")


# --------------------------------------------------------------------------- weak spots


def test_flipped_bytes_that_still_parse_are_refused(tmp_path):
    """No content checksum: a flipped byte inside a tensor's data loaded silently."""
    path = _saved(tmp_path)
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
    path = _saved(tmp_path)
    other = tiny_model(tie=True)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight[0, :4] += 0.5
    with pytest.raises(AdapterError, match="weights of layers.1.down_proj differ"):
        zflora.load_adapter(other, path)
    assert not zflora.is_zflora(other)


@pytest.mark.parametrize("value", ["abc", 3, ["x"]])
def test_a_fingerprint_of_the_wrong_type_is_refused(tmp_path, value):
    """A fingerprint that was a string turned the base check off."""
    path = _saved(tmp_path)
    meta = json.loads((path / "adapter_config.json").read_text())
    meta["base_model"]["fingerprint"] = value
    (path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="fingerprint must be an object"):
        zflora.load_adapter(tiny_model(tie=True), path)


def test_an_older_three_tensor_fingerprint_still_loads(tmp_path, ids):
    path = _saved(tmp_path)
    meta = json.loads((path / "adapter_config.json").read_text())
    fp = meta["base_model"]["fingerprint"]
    meta["base_model"]["fingerprint"] = {k: fp[k] for k in ("embed_tokens", "layers.0.q_proj", "norm")}
    (path / "adapter_config.json").write_text(json.dumps(meta))
    zflora.load_adapter(tiny_model(tie=True), path)


@pytest.mark.parametrize(
    ("extra", "match"),
    [({"learning_rate": 1.0}, "learning_rate set by zflora train"), ({"no_such_field": 1}, "no_such_field is not")],
)
def test_extra_training_arguments_are_checked(tmp_path, extra, match):
    from zflora.finetune.train import check_extra

    with pytest.raises(ValueError, match=match):
        check_extra(extra, {"learning_rate": 1e-3})


def test_damaged_scheduler_or_rng_state_falls_back_a_checkpoint(tmp_path):
    """Checkpoint fallback checked the optimizer and the adapter, not scheduler.pt or rng_state.pth."""
    from zflora.finetune.train import COMPLETE, checkpoint_problem

    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text("{}")
    (ckpt / COMPLETE).write_text("complete\n")
    torch.save({"lr": [1.0]}, ckpt / "scheduler.pt")
    assert checkpoint_problem(ckpt) is None
    for name in ("scheduler.pt", "rng_state.pth"):
        (ckpt / name).write_bytes(b"\x80\x02truncated")
        assert checkpoint_problem(ckpt) is not None
        (ckpt / name).unlink()


@pytest.mark.parametrize(("content", "match"), [("[1, 2]", "expected a JSON object"), (b"\xff\xfe{", "not valid JSON")])
def test_an_onnx_manifest_that_is_not_an_object_is_named(tmp_path, content, match):
    from zflora.export.onnx import MANIFEST, read_manifest

    (tmp_path / MANIFEST).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(AdapterError, match=match):
        read_manifest(tmp_path)


def test_deeply_nested_data_is_a_one_line_error(tmp_path):
    from zflora.finetune.data import load_records

    for name in ("deep.json", "deep.jsonl"):
        (tmp_path / name).write_text("[" * 100_000 + "]" * 100_000 + "\n")
        with pytest.raises(DataError, match="nested too deeply"):
            load_records(tmp_path / name)


def test_stack_api_edges_are_explained(tmp_path):
    """route("0") / route(None) gave torch's messages, stack_adapters([None]) a TypeError, swap_slot(True) took
    slot 1, save_adapter on a stack said it had no adapter, and a frozen compiled stack accepted a swap."""
    path = _saved(tmp_path)
    model = zflora.stack_adapters(tiny_model(tie=True), [path, path])
    for ids in ("0", None, 3):
        with pytest.raises(ValueError, match="adapter_ids"), zflora.route(model, ids):
            pass
    with pytest.raises(ValueError, match="slot: must be an integer"):
        zflora.swap_slot(model, True, path)
    with pytest.raises(AdapterError, match="holds stacked adapters"):
        zflora.save_adapter(model, tmp_path / "out")
    with pytest.raises(ValueError, match="each must be an adapter directory or an Adapter, got NoneType"):
        zflora.stack_adapters(tiny_model(tie=True), [None])
    zcompile(model, freeze=True)
    before = state(model)
    with pytest.raises(AdapterError, match="freeze=True"):
        zflora.swap_slot(model, 0, path)
    assert_same_state(before, state(model))


def test_eval_output_that_is_a_directory_is_refused_before_generating(tmp_path, stories_path):
    """eval --output DIR failed only after all generation, leaving DIR.responses.jsonl behind."""
    (tmp_path / "out").mkdir()
    data = tmp_path / "t.json"
    data.write_text('[{"instruction": "q", "answer": "true"}]')
    with pytest.raises(SystemExit, match="is a directory"):
        main(["eval", "--model", str(stories_path), "--data", str(data), "--output", str(tmp_path / "out")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "t.json"]
