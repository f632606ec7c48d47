"""`zflora train` / `zflora eval` end to end on the real stories260K (skipped when it is absent)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import (
    adapted,
)
from safetensors.torch import load_file
from transformers import TrainerCallback

import zflora
from zflora.bench.harness import free_port
from zflora.cli import build_parser, main
from zflora.finetune.config import TrainConfig
from zflora.finetune.data import DataError, load_examples
from zflora.finetune.evaluate import score_responses_file, task_kind
from zflora.finetune.scoring import score_response
from zflora.finetune.tasks import make_task
from zflora.finetune.train import claim_output, last_complete_checkpoint, save_trained, train_model
from zflora.models import load_local_model, load_tokenizer


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
    _, cut = train_model(_cfg(stories_path, task_file, tmp_path / "cut", method=method), callbacks=[StopAt(3)])
    assert cut["steps"] == 3 and last_complete_checkpoint(tmp_path / "cut").name == "checkpoint-3"
    assert cut["resumed_step"] == 0 and cut["tokens_trained"] == cut["tokens_seen"] > 0
    resumed, log = train_model(_cfg(stories_path, task_file, tmp_path / "cut", method=method, resume=True))
    assert log["steps"] == 6 and log["resumed_from"].endswith("checkpoint-3") and log["resumed_step"] == 3
    assert log["tokens_trained"] == log["tokens_seen"] - cut["tokens_seen"] > 0  # this process's, for tokens/s
    a = {n: p for n, p in full.named_parameters() if "zflora_" in n or "lora_" in n}
    b = {n: p for n, p in resumed.named_parameters() if "zflora_" in n or "lora_" in n}
    assert a.keys() == b.keys() and a
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6, msg=n)


class GroupRates(TrainerCallback):
    """The learning rate each trainable parameter had at each optimizer step, by name."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):  # noqa: ANN001
        names = {id(p): n for n, p in model.named_parameters()}
        self.steps.append({names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]})


@pytest.mark.parametrize("method", ["zflora", "lora"])
def test_loraplus_ratio_gives_the_b_matrices_a_multiple_of_the_rate(stories_path, task_file, tmp_path, method):
    """LoRA+: every B learns at ratio x the A's rate (zFLoRA's A_in among the A's), at every step of the schedule;
    ratio 1 trains exactly as one rate for all."""
    rates = GroupRates()
    run = dict(method=method, max_steps=4, save_steps=-1)
    model, _ = train_model(_cfg(stories_path, task_file, tmp_path / "plus", **run, loraplus_lr_ratio=4.0),
                           callbacks=[rates])  # fmt: skip
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(rates.steps) == 4 and all(step.keys() == trainable for step in rates.steps)
    if method == "zflora":
        assert any(n.endswith("zflora_A_in") for n in trainable)
    for step in rates.steps:
        a = {lr for n, lr in step.items() if not n.endswith(("zflora_B", "lora_B.default.weight"))}
        b = {lr for n, lr in step.items() if n.endswith(("zflora_B", "lora_B.default.weight"))}
        assert len(a) == len(b) == 1 and b.pop() == pytest.approx(4 * a.pop())
    assert max(next(iter(step.values())) for step in rates.steps) > 0
    plain, _ = train_model(_cfg(stories_path, task_file, tmp_path / "plain", **run))
    one, _ = train_model(_cfg(stories_path, task_file, tmp_path / "one", **run, loraplus_lr_ratio=1.0))
    a, b, c = (dict(m.named_parameters()) for m in (plain, one, model))
    for n in trainable:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0, msg=n)
    assert any(not torch.equal(a[n], c[n]) for n in trainable if "_B" in n)


@pytest.mark.parametrize("method", ["zflora", "lora"])
def test_targets_choose_the_projections_that_are_adapted(stories_path, task_file, tmp_path, method):
    """`--targets q,k,v,gate,up`: only those projections train (zFLoRA's stream then starts at A_in alone), and
    the saved adapter records them."""
    argv = ["train", "--model", "m", "--data", "d", "--output", "o", "--targets", "q_proj,k,v,gate,up"]
    parsed = build_parser("train").parse_args(argv)
    assert parsed.targets == ["q_proj", "k", "v", "gate", "up"]
    cfg = _cfg(stories_path, task_file, tmp_path / "run", method=method, targets=parsed.targets, max_steps=2)
    model, log = train_model(cfg)
    adapted = {next(part for part in n.split(".") if part.endswith("_proj"))
               for n, p in model.named_parameters() if p.requires_grad and "_proj." in n}  # fmt: skip
    assert adapted == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    assert log["config"]["targets"] == ["q", "k", "v", "gate", "up"]
    final = save_trained(model, load_tokenizer(stories_path), tmp_path / "run", log)
    saved = json.loads(next(final.glob("*config.json")).read_text())
    recorded = saved["target_modules"] if method == "lora" else saved["zflora"]["targets"]
    assert sorted(recorded) == sorted(["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"] if method == "lora"
                                      else ["q", "k", "v", "gate", "up"])  # fmt: skip


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
    assert all(h["grad_norm"] > 0 for h in log["loss"])  # the unclipped norm, logged beside each loss


def test_train_on_a_quantized_base_gives_an_adapter_of_the_fp32_base(stories_path, task_file, tmp_path):
    """QLoRA's recipe: the frozen base holds the int4 deployment's weights; the adapter belongs to the fp32 base
    (its fingerprint) and loads onto it, or onto its quantization."""
    pytest.importorskip("onnxruntime")
    from zflora.quantization import Quantization, simulate

    cfg = _cfg(stories_path, task_file, tmp_path / "run", max_steps=1, quantized_base="int4")
    model, log = train_model(cfg)
    fp32 = load_local_model(stories_path, torch.float32)
    want = simulate(fp32, Quantization(4)).model.layers[0].self_attn.q_proj.weight
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, want)  # trained against the int4 weights
    assert not torch.equal(want, fp32.model.layers[0].self_attn.q_proj.weight)
    assert log["config"]["quantized_base"] == "int4"
    saved = zflora.save_adapter(model, tmp_path / "adapter")
    zflora.load_adapter(fp32, saved)  # the fp32 base's adapter: the fingerprint matches
    zflora.load_adapter(simulate(load_local_model(stories_path, torch.float32), Quantization(4)), saved)
    with pytest.raises(ValueError, match="quantized_base: full fine-tuning"):
        _cfg(stories_path, task_file, tmp_path / "fft", method="fft", quantized_base="int4")


@pytest.mark.slow
def test_two_processes_train_like_one_and_only_the_main_one_writes(stories_path, tmp_path):
    """torchrun with 2 CPU processes (gloo): one writer, and the adapter of a single process with the same
    global batch (records of equal length, so the mean over tokens equals the mean over processes)."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Tom has {i} apples. How many?", "response": f"{i}"}) + "\n"
                            for i in range(1, 9)))  # fmt: skip
    common = ["train", "--model", str(stories_path), "--data", str(data), "--rank", "4", "--lr", "1e-2",
              "--max-steps", "2", "--max-length", "64", "--save-steps", "-1", "--no-progress"]  # fmt: skip
    port = free_port()
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


# --------------------------------------------------------------------------- refusals and faults


def test_eval_file_validated_before_generating(tmp_path):
    """A mixed-kind file (kind was taken from record 0) and a summary without gold, found before generation."""
    records = [{"instruction": "q", "answer": "3"}, {"instruction": "Pick. (A) 1 (B) 2", "answer": "B"}]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match="record 1 is scored as 'choice' but record 0 as 'number'"):
        task_kind("mixed", load_examples(path))


def _exit_code(argv: list[str]) -> int | str:
    with pytest.raises(SystemExit) as done:
        main(argv)
    return done.value.code


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--alpha", "inf"], "alpha: must be a positive finite number"),  # broken promise 6
        (["--alpha", "0"], "alpha: must be a positive finite number"),  # broken promise 7
        (["--lr", "inf"], "lr: must be a positive finite number"),
        (["--epochs", "0"], "epochs: must be a positive finite number"),
        (["--batch-size", "0"], "batch_size: must be a positive integer"),
        (["--limit", "-1"], "limit: must be a positive integer"),
        (["--loraplus-lr-ratio", "0"], "loraplus_lr_ratio: must be a positive finite number"),
        (["--method", "fft", "--loraplus-lr-ratio", "4"], "loraplus_lr_ratio: splits an adapter's A and B"),
        (["--targets", "q,qq"], "targets: unknown projection 'qq'"),
        (["--method", "lora-mha", "--targets", "q"], "targets: lora-mha adapts q,k,v,o"),
        (["--method", "fft", "--targets", "q"], "targets: fft has no adapter"),
        (["--targets", "o,down"], "has no input projection"),  # zflora: nothing would read its stream
    ],
)
def test_train_refuses_bad_hyper_parameters_with_usage_exit(tmp_path, capsys, flags, match):
    argv = ["train", "--model", str(tmp_path), "--data", str(tmp_path / "d.json"), "--output", str(tmp_path / "o")]
    assert _exit_code(argv + flags) == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--limit", "0"], ["--batch-size", "0"], ["--max-new-tokens", "0"]])
def test_eval_refuses_zero_counts(tmp_path, capsys, flags):
    """Broken promise 8: --limit 0 ended in an IndexError traceback."""
    assert _exit_code(["eval", "--model", str(tmp_path), "--data", str(tmp_path / "d.json"), *flags]) == 2
    assert "must be a positive integer" in capsys.readouterr().err


def test_data_and_model_errors_are_one_line_with_exit_1(tmp_path, stories_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert "no records" in _exit_code(["eval", "--model", str(stories_path), "--data", str(empty)])
    gpt2 = tmp_path / "gpt2"
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    zflora.save_adapter(adapted(), tmp_path / "a")
    code = _exit_code(["eval", "--model", str(gpt2), "--adapter", str(tmp_path / "a"), "--data", str(empty)])
    assert isinstance(code, str) and "no records" in code  # data checked before the model is even loaded
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "q", "answer": "1"}]))
    code = _exit_code(["eval", "--model", str(gpt2), "--adapter", str(tmp_path / "a"), "--data", str(data)])
    assert isinstance(code, str) and "GPT2LMHeadModel" in code
    bad = tmp_path / "bad"
    shutil.copytree(stories_path, bad)
    (bad / "config.json").write_text("{")
    code = _exit_code(["eval", "--model", str(bad), "--data", str(data)])
    assert isinstance(code, str) and code.startswith("zflora eval:")


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
    with pytest.raises(FileExistsError, match="finished .*nothing to resume"):  # it trained one more step
        claim_output(TrainConfig(**cfg, resume=True))
    (out / "train_log.json").unlink()  # an unfinished run: continuing it is fine and removes nothing
    claim_output(TrainConfig(**cfg, resume=True))
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


def test_eval_output_that_is_a_directory_is_refused_before_generating(tmp_path, stories_path):
    """eval --output DIR failed only after all generation, leaving DIR.responses.jsonl behind."""
    (tmp_path / "out").mkdir()
    data = tmp_path / "t.json"
    data.write_text('[{"instruction": "q", "answer": "true"}]')
    with pytest.raises(SystemExit, match="is a directory"):
        main(["eval", "--model", str(stories_path), "--data", str(data), "--output", str(tmp_path / "out")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "t.json"]
