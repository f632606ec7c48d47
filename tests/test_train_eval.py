"""`zflora train` / `zflora eval` end to end on the real stories260K (skipped when it is absent)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from zflora import score_response
from zflora.cli import main
from zflora.finetune.config import TrainConfig
from zflora.finetune.tasks import make_task
from zflora.finetune.train import last_complete_checkpoint, save_trained, train_model
from zflora.models import load_tokenizer


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "math.json"
    path.write_text(json.dumps(make_task("story-math", 24, seed=0)))
    return path


def _cfg(stories_path, task_file, out, **kw) -> TrainConfig:
    base = dict(model=stories_path, data=[task_file], output=out, method="zflora", rank=4, lr=3e-3, max_steps=6,
                batch_size=4, max_length=256, save_steps=3, logging_steps=1, progress=False)  # fmt: skip
    return TrainConfig(**(base | kw))


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


@pytest.mark.parametrize("method", ["zflora", "lora"])
def test_resume_equals_uninterrupted(stories_path, task_file, tmp_path, method):
    full, _ = train_model(_cfg(stories_path, task_file, tmp_path / "full", method=method))
    _, log = train_model(_cfg(stories_path, task_file, tmp_path / "cut", method=method), callbacks=[StopAt(3)])
    assert log["steps"] == 3 and last_complete_checkpoint(tmp_path / "cut").name == "checkpoint-3"
    resumed, log = train_model(_cfg(stories_path, task_file, tmp_path / "cut", method=method, resume=True))
    assert log["steps"] == 6 and log["resumed_from"].endswith("checkpoint-3")
    a = {n: p for n, p in full.named_parameters() if "zflora_" in n or "lora_" in n}
    b = {n: p for n, p in resumed.named_parameters() if "zflora_" in n or "lora_" in n}
    assert a.keys() == b.keys() and a
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("damage", ["optimizer.pt", "trainer_state.json", "adapter_model.safetensors"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(stories_path, task_file, tmp_path, capsys, damage):
    out = tmp_path / "run"
    train_model(_cfg(stories_path, task_file, out, max_steps=9), callbacks=[StopAt(6)])
    assert last_complete_checkpoint(out).name == "checkpoint-6"
    file = out / "checkpoint-6" / damage
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])  # truncated, marker still there
    _, log = train_model(_cfg(stories_path, task_file, out, max_steps=9, resume=True))
    assert log["resumed_from"].endswith("checkpoint-3") and log["steps"] == 9
    assert "checkpoint-6 is damaged" in capsys.readouterr().err
    only = tmp_path / "only"
    train_model(_cfg(stories_path, task_file, only), callbacks=[StopAt(3)])
    (only / "checkpoint-3" / "optimizer.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no complete, undamaged checkpoint"):
        train_model(_cfg(stories_path, task_file, only, resume=True))


def test_incomplete_checkpoint_is_not_resumed(stories_path, task_file, tmp_path):
    train_model(_cfg(stories_path, task_file, tmp_path / "run"), callbacks=[StopAt(3)])
    (tmp_path / "run" / "checkpoint-5").mkdir()  # a save that died half way: no completion marker
    assert last_complete_checkpoint(tmp_path / "run").name == "checkpoint-3"


def test_train_cli_then_eval_cli(stories_path, task_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--rank", "4", "--max-steps", "4", "--batch-size", "4", "--max-length", "256", "--save-steps", "2"]
    main(
        ["train", "--model", str(stories_path), "--data", str(task_file), "--output", str(out), *args, "--no-progress"]
    )
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 4 and len(log["step_time_s"]) == 4
    assert log["loss"] and log["trainable_parameters"] > 0
    assert log["data"] == {"records": 24, "trained": 24, "truncated": 0, "dropped": 0}
    assert set(load_file(out / "final" / "adapter_model.safetensors")) == set(
        load_file(out / "checkpoint-4" / "adapter_model.safetensors")
    )
    assert "wrote" in capsys.readouterr().out

    results = tmp_path / "eval" / "results.json"
    main(["eval", "--model", str(stories_path), "--adapter", str(out / "final"), "--data", str(task_file),
          "--limit", "6", "--output", str(results), "--max-new-tokens", "8"])  # fmt: skip
    scored = json.loads(results.read_text())["math"]
    assert scored["n"] == 6 and scored["kind"] == "number"
    responses = results.with_suffix(".responses.jsonl")
    rows = [json.loads(line) for line in responses.read_text().splitlines()]
    assert len(rows) == 6  # the score is the mean of the saved responses' scores, each scored independently here
    assert scored["score"] == pytest.approx(100 * sum(score_response(r["record"], r["response"]) for r in rows) / 6)
    again = tmp_path / "again.json"
    main(["eval", "--responses", str(responses), "--output", str(again)])
    assert json.loads(again.read_text())["math"]["score"] == scored["score"]


def test_fft_and_lora_outputs(stories_path, task_file, tmp_path):
    for method in ("fft", "lora-mha"):
        model, log = train_model(_cfg(stories_path, task_file, tmp_path / method, method=method, max_steps=2))
        final = save_trained(model, load_tokenizer(stories_path), tmp_path / method, log)
        expected = "model.safetensors" if method == "fft" else "adapter_model.safetensors"
        assert (final / expected).is_file()


def test_hub_id_is_refused_with_a_hint(tmp_path, task_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="looks like a hub id.*local"):
        main(["train", "--model", "meta-llama/Llama-3.2-1B", "--data", str(task_file), "--output", "o"])


def test_real_data_end_to_end(stories_path, tmp_path):
    """Train on real BoolQ, evaluate on BoolQ, GSM8K and DialogSum: formats end to end (scores near chance)."""
    data = stories_path.parents[1] / "data"
    boolq, gsm8k, dialogsum = (
        data / "commonsense/boolq",
        data / "math/gsm8k/test.json",
        data / "dialogsum/dialogsum.dev.jsonl",
    )
    if not boolq.is_dir():
        pytest.skip(f"real data not available at {data}")
    out = tmp_path / "run"
    main(["train", "--model", str(stories_path), "--data", str(boolq / "train.json"), "--output", str(out),
          "--limit", "8", "--max-steps", "2", "--batch-size", "4", "--max-length", "384", "--no-progress"])  # fmt: skip
    log = json.loads((out / "train_log.json").read_text())
    assert log["data"]["records"] == 8 and log["data"]["truncated"] + log["data"]["trained"] >= 8
    results = tmp_path / "eval.json"
    main(["eval", "--model", str(stories_path), "--adapter", str(out / "final"), "--data", str(boolq / "test.json"),
          str(gsm8k), str(dialogsum), "--limit", "3", "--max-new-tokens", "8", "--output", str(results)])  # fmt: skip
    scored = json.loads(results.read_text())
    assert {k: v["kind"] for k, v in scored.items()} == {"boolq": "label", "gsm8k": "number", "dialogsum.dev": "rouge"}
    assert all(v["n"] == 3 for v in scored.values())


@pytest.mark.parametrize("options", [["--dtype", "bf16"], ["--gradient-checkpointing"], ["--method", "lora-mha"]])
def test_train_options(stories_path, task_file, tmp_path, options):
    out = tmp_path / "run"
    base = ["--max-steps", "2", "--batch-size", "4", "--max-length", "256", "--no-progress"]
    main(["train", "--model", str(stories_path), "--data", str(task_file), "--output", str(out), *base, *options])
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in log["loss"])


@pytest.mark.slow
def test_two_processes_train_like_one_and_only_the_main_one_writes(stories_path, tmp_path):
    """torchrun with 2 CPU processes (gloo): one writer, and the adapter of a single process with the same
    global batch (records of equal length, so the mean over tokens equals the mean over processes)."""
    import socket

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Tom has {i} apples. How many?", "response": f"{i}"}) + "\n"
                            for i in range(1, 9)))  # fmt: skip
    common = ["train", "--model", str(stories_path), "--data", str(data), "--rank", "4", "--lr", "1e-2",
              "--max-steps", "2", "--max-length", "64", "--save-steps", "-1", "--no-progress"]  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         "-m", "zflora.cli", *common, "--batch-size", "4", "--output", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("trained zflora") == 1  # one summary, from the main process
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["final", "train_log.json"]
    main([*common, "--batch-size", "8", "--output", str(tmp_path / "one")])
    one = load_file(tmp_path / "one" / "final" / "adapter_model.safetensors")
    both = load_file(tmp_path / "two" / "final" / "adapter_model.safetensors")
    assert one.keys() == both.keys()
    for k in one:
        torch.testing.assert_close(both[k], one[k], rtol=1e-4, atol=1e-6)
