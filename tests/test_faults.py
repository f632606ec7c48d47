"""The second round of fault cases (a hostile user's 377 tries): each test keeps a whole class of bug
closed, and fails without its fix."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from conftest import assert_same_state, randomize_adapter, state, tiny_model
from safetensors.torch import load_file, save_file
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
    save_file(tensors, file, metadata=header)


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
    assert checkpoint_fingerprint(tmp_path / "base") == zflora.adapter_io.base_fingerprint(model)
    serve_command(str(tmp_path / "base"), str(tmp_path / "ad"), [])  # its own base: accepted
    with pytest.raises(AdapterError, match="weights of embed_tokens differ"):
        serve_command(str(tmp_path / "other"), str(tmp_path / "ad"), [])
    with pytest.raises(AdapterError, match="weights of embed_tokens differ"):  # what load_adapter says too
        zflora.load_adapter(zflora.models.load_local_model(tmp_path / "other"), tmp_path / "ad")
