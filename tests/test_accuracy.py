"""`zflora accuracy`: option parsing on every task file, likelihood scoring against a hand computation (and
lm-evaluation-harness where installed), the paired bootstrap, and a study on stories260K that resumes from its
finished runs, re-runs a tampered one, refuses other settings and a dtype the CPU cannot run natively."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from conftest import SHARED

from zflora.adapter_io import attach_adapter
from zflora.finetune import accuracy, quantized
from zflora.finetune.accuracy_report import _paired_lines, collect, paired_across, sha256
from zflora.finetune.cloze import parse, to_cloze
from zflora.finetune.config import AccuracyConfig, QuantizedAccuracyConfig
from zflora.finetune.data import DataError, load_records
from zflora.finetune.likelihood import encode_pair, loglikelihoods, score_clozes
from zflora.finetune.stats import paired_bootstrap
from zflora.methods import prepare_for_eval
from zflora.models import load_local_model, load_tokenizer

DATA = SHARED / "data"
COMMONSENSE = sorted(DATA.glob("commonsense/*/*.json"))
needs_data = pytest.mark.skipif(not COMMONSENSE, reason=f"real data not available at {DATA}")


@needs_data
@pytest.mark.parametrize("path", COMMONSENSE, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_record_of_every_task_file_parses(path):
    for i, record in enumerate(load_records(path)):
        question, options, gold = parse(record, f"{path}: record {i}")
        words = record["instruction"].rsplit("Answer format:", 1)[1].strip().split("/")
        assert len(options) == len(words) and 0 <= gold < len(options) and question
        assert all(o.strip() and "Answer format" not in o for o in options)
        cloze = to_cloze(record)
        assert len(cloze.contexts) == len(cloze.continuations) == len(cloze.choices) == len(options)


def test_cloze_forms_follow_the_harness():
    arc = {"instruction": "Please choose the correct answer to the question: Which is a gas?\n\nAnswer1: ice "
           "Answer2: steam\n\nAnswer format: answer1/answer2", "answer": "answer2"}  # fmt: skip
    c = to_cloze(arc)
    assert c.contexts == ("Question: Which is a gas?\nAnswer:",) * 2 and c.continuations == (" ice", " steam")
    assert c.gold == 1 and c.example(arc).target == " steam"
    boolq = {"instruction": "Please answer the following question with true or false, question: is ice cold"
             "\n\nAnswer format: true/false", "answer": "true"}  # fmt: skip
    assert to_cloze(boolq).contexts[0] == "Question: is ice cold?\nAnswer:" and to_cloze(boolq).choices[0] == "yes"
    wino = {"instruction": "Please choose the correct answer to fill in the blank to complete the given sentence: "
            "Ann lent Bo a pen because _ had two.\n\nOption1: Ann Option2: Bo Answer format: option1/option2",
            "answer": "option1"}  # fmt: skip
    w = to_cloze(wino)
    assert w.contexts == ("Ann lent Bo a pen because Ann", "Ann lent Bo a pen because Bo")
    assert w.continuations == (" had two.", " had two.") and w.gold == 0


@pytest.mark.parametrize(
    "record",
    [
        {"instruction": "Please choose the correct answer to the question: Q?\n\nAnswer1: a Answer3: c\n\n"
         "Answer format: answer1/answer2", "answer": "answer1"},  # a gap in the numbering
        {"instruction": "Please choose the correct answer to the question: Q?\n\nAnswer1: a Answer2: b", "answer": "a"},
        {"instruction": "Please choose the correct answer to the question: Q?\n\nAnswer1: a Answer2: b\n\n"
         "Answer format: answer1/answer2", "answer": "answer3"},  # gold not among the options
        {"instruction": "Please choose the correct answer to the question: \n\nAnswer1: a Answer2: b\n\n"
         "Answer format: answer1/answer2", "answer": "answer1"},  # no question
    ],
)  # fmt: skip
def test_malformed_records_are_refused_by_name(record):
    with pytest.raises(DataError, match="task.json: record 7"):
        parse(record, "task.json: record 7")


def test_loglikelihoods_equal_a_hand_computation(stories_path):
    """Each pair's log-likelihood equals the sum of log-softmax over the continuation in a plain forward of the
    whole sequence (one sequence at a time, no padding, full logits), and acc / acc_norm follow from them."""
    model, tok = load_local_model(stories_path), load_tokenizer(stories_path)
    records = [[("Tom had a red ball.", " He played"), ("Tom had a red ball.", " The sky was green and")],
               [("Lily went", " to the park"), ("Lily went", " home"), ("Lily went", "xyz qq")]]  # fmt: skip
    got = loglikelihoods(model, tok, records, max_rows=3)  # two batches: padding and batching both exercised
    for pairs, scores in zip(records, got, strict=True):
        for (context, continuation), (ll, greedy) in zip(pairs, scores, strict=True):
            ctx, cont = encode_pair(tok, context, continuation)
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(ids).logits[0, len(ctx) - 1 : -1].float(), -1)
            want = logprobs[torch.arange(len(cont)), torch.tensor(cont)].sum().item()
            assert ll == pytest.approx(want, abs=1e-4)
            assert greedy == bool((logprobs.argmax(-1) == torch.tensor(cont)).all())
    arc = {"instruction": "Please choose the correct answer to the question: Who had a ball?\n\nAnswer1: Tom "
           "Answer2: the green sky over the sea\n\nAnswer format: answer1/answer2", "answer": "answer1"}  # fmt: skip
    (scored,) = score_clozes(model, tok, [to_cloze(arc)])
    ll = scored["ll"]
    assert scored["acc"] == float(ll[0] > ll[1])
    assert scored["acc_norm"] == float(ll[0] / 3 > ll[1] / len("the green sky over the sea"))


def test_loglikelihoods_equal_lm_evaluation_harness(stories_path):
    """The harness's own HFLM on the same in-memory model gives the same numbers."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tok = load_local_model(stories_path), load_tokenizer(stories_path)
    pairs = [("Tom had a red ball.", " He played"), ("Lily went", " to the park"), ("Lily went ", "home")]
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2, add_bos_token=True)
    theirs = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    mine = loglikelihoods(model, tok, [[p] for p in pairs])
    for (ll, greedy), [(my_ll, my_greedy)] in zip(theirs, mine, strict=True):
        assert my_ll == pytest.approx(ll, abs=1e-4) and my_greedy == greedy


def test_paired_bootstrap():
    same = paired_bootstrap({"a": [0.0] * 30, "b": [0.0] * 10})
    assert same["diff"] == same["ci_low"] == same["ci_high"] == 0 and same["items"] == 40
    shifted = paired_bootstrap({"a": [2.0] * 30, "b": [4.0] * 10})  # the mean over tasks, not over items
    assert shifted["diff"] == shifted["ci_low"] == shifted["ci_high"] == 3.0
    noisy = paired_bootstrap({"a": [1.0, -1.0] * 50})
    assert noisy["ci_low"] < 0 < noisy["ci_high"] and noisy["diff"] == 0
    better = paired_bootstrap({"a": [1.0] * 40 + [0.0] * 60})
    assert 0.2 < better["ci_low"] < 0.4 < better["ci_high"] < 0.6  # about 0.4 ± 2 standard errors (0.05)
    with pytest.raises(ValueError):
        paired_bootstrap({"a": []})


def quick(stories_path, tmp_path, **kw) -> AccuracyConfig:
    settings = dict(model=stories_path, data=DATA, output=tmp_path / "study", work=tmp_path / "work",
                    report=tmp_path / "report", categories=("commonsense", "math"),
                    methods=("base", "lora", "zflora"), seeds=2, steps=(2, 1, 1), sweep_steps=1, lrs=(1e-3, 3e-3),
                    n_val=4, n_test=(2, 1, 2), max_length=1024, eval_batch_size=8, progress=False)  # fmt: skip
    return AccuracyConfig(**settings | kw)


@needs_data
def test_study_reports_resumes_and_refuses(stories_path, tmp_path, monkeypatch):
    cfg = quick(stories_path, tmp_path)
    out = accuracy.run(cfg)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved == json.loads(json.dumps(out)) and (tmp_path / "report.png").is_file()
    assert saved["model"] == "stories260K" and saved["dtype"] == "fp32"
    runs = {(r["method"], r["seed"]) for r in saved["runs"]}
    assert runs == {("base", 0), ("lora", 0), ("lora", 1), ("zflora", 0), ("zflora", 1)}
    for r in saved["runs"]:
        assert set(r["category_avg"]) == {"commonsense", "math"} == set(r["heldout_loss"])
        assert len(r["scores"]) == 12 and len(r["generation"]) == 7
    assert set(saved["paired"]) == {"commonsense", "math"} and saved["paired"]["commonsense"]["seeds"] == [0, 1]
    assert saved["baselines"]["boolq"]["chance"] == 50.0 and saved["baselines"]["ARC-Easy"]["chance"] == 25.0
    assert {s["method"] for s in saved["sweeps"]} == {"lora", "zflora"}
    report = (tmp_path / "report.md").read_text()
    assert "| majority class |" in report and report.count("(the grid's edge: ") == 2  # 2 rates: both are edges
    # Each small adapter is kept with its run, as trained: reloaded, it gives the run's held-out loss again.
    tokenizer = load_tokenizer(stories_path)
    _, val = accuracy.train_split(cfg, "math", tokenizer, cfg.steps[1] * cfg.batch_size)  # the same for both
    for method in ("lora", "zflora"):
        run = cfg.output / "runs" / f"{method}-r16-s1" / "math"
        model = prepare_for_eval(attach_adapter(accuracy.load_model(cfg), run / accuracy.ADAPTER))
        loss = accuracy.heldout_loss(model, tokenizer, val, cfg.max_length)
        assert loss == pytest.approx(json.loads((run / "result.json").read_text())["heldout_loss"], rel=1e-5)
    assert not (cfg.output / "runs" / "base-s0" / "math" / accuracy.ADAPTER).exists()

    # A new machine: the committed study directory alone, no work directory. Nothing is trained again.
    shutil.rmtree(tmp_path / "work")
    monkeypatch.setattr(accuracy, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    monkeypatch.setattr(accuracy, "evaluate_category", lambda *a, **k: pytest.fail("a finished run was re-evaluated"))
    assert accuracy.run(cfg)["runs"] == out["runs"]
    # A record from before the study gained a setting reads as the value it ran with (warm-up 3%).
    record = json.loads((cfg.output / "study.json").read_text())
    del record["settings"]["warmup_ratio"], record["settings"]["loraplus_lr_ratio"], record["settings"]["targets"]
    (cfg.output / "study.json").write_text(json.dumps(record))
    assert accuracy.run(cfg)["runs"] == out["runs"]

    # A run whose items lost a line is named and run again, not re-scored on fewer records.
    items = cfg.output / "runs" / "zflora-r16-s1" / "math" / "items.jsonl"
    items.write_text(items.read_text().splitlines()[0] + "\n")
    with pytest.raises(pytest.fail.Exception, match="trained again"):
        accuracy.run(cfg)
    assert not (items.parent / "result.json").exists() and not (items.parent / accuracy.ADAPTER).exists()

    # Other settings are refused, with the study left as it was; --new starts over.
    before = (cfg.output / "study.json").read_text()
    with pytest.raises(ValueError, match=r"steps \[2, 1, 1\] -> \[3, 1, 1\]"):
        accuracy.run(quick(stories_path, tmp_path, steps=(3, 1, 1)))
    with pytest.raises(ValueError, match=r"warmup_ratio 0.03 -> 0.1"):
        accuracy.run(quick(stories_path, tmp_path, warmup_ratio=0.1))
    with pytest.raises(ValueError, match=r"loraplus_lr_ratio None -> 4.0"):
        accuracy.run(quick(stories_path, tmp_path, loraplus_lr_ratio=4.0))
    with pytest.raises(ValueError, match=r"targets None -> \['q', 'up'\]"):
        accuracy.run(quick(stories_path, tmp_path, methods=("base", "lora", "zflora"), targets=("up", "q_proj")))
    assert (cfg.output / "study.json").read_text() == before and (cfg.output / "runs").is_dir()
    monkeypatch.undo()
    accuracy.open_study(quick(stories_path, tmp_path, steps=(3, 1, 1), new=True))
    assert not (cfg.output / "runs").exists() and json.loads((cfg.output / "study.json").read_text())["settings"][
        "steps"
    ] == [3, 1, 1]


@needs_data
def test_quantized_accuracy_reads_the_study_and_goes_on_where_it_stopped(stories_path, tmp_path, monkeypatch):
    split, asked = accuracy.train_split, set()
    monkeypatch.setattr(accuracy, "train_split", lambda cfg, c, *a: asked.add(c) or split(cfg, c, *a))
    accuracy.run(quick(stories_path, tmp_path, categories=("math",), seeds=1, report=None))
    assert asked == {"commonsense", "math", "summary"}  # the sweep fixes the study's lr: all categories, always
    monkeypatch.undo()
    cfg = QuantizedAccuracyConfig(study=tmp_path / "study", category="math", precisions=("int4",), block_size=16,
                                  data=DATA, work=tmp_path / "work", output=tmp_path / "quantized",
                                  eval_batch_size=8)  # fmt: skip
    runs = tmp_path / "study" / "runs"
    shutil.rmtree(runs / "lora-r16-s0" / "math" / accuracy.ADAPTER)  # as if over KEEP_ADAPTER_BYTES
    out = quantized.run(cfg)
    rows = {(r["precision"], r["method"]): r for r in out["rows"]}
    assert set(rows) == {(p, m) for p in ("fp32", "int4") for m in ("base", "lora", "zflora")}
    assert rows["fp32", "zflora"]["source"] == str(tmp_path / "study" / "runs" / "zflora-r16-s0" / "math")
    for m in ("lora", "zflora"):
        gain = rows["int4", m]["score"] - rows["int4", "base"]["score"]
        assert rows["int4", m]["gain"] == pytest.approx(gain)
    q = json.loads((tmp_path / "quantized" / "math" / "int4-zflora-s0" / "result.json").read_text())
    assert q["quantization"]["bits"] == 4 and q["adapter"] == str(runs / "zflora-r16-s0" / "math" / accuracy.ADAPTER)
    lora = json.loads((tmp_path / "quantized" / "math" / "int4-lora-s0" / "result.json").read_text())
    assert lora["adapter"] == str(tmp_path / "work" / "lora-r16-s0" / "math" / "checkpoint-1")
    assert "| int4 | zFLoRA, blocks apart |" in (tmp_path / "quantized" / "math.md").read_text()
    diagnosis = quantized.run(dataclasses.replace(cfg, fp32_adapter=True))  # the base quantized, the blocks not
    assert {(r["precision"], r["method"]) for r in diagnosis["rows"]} - set(rows) == {("int4", "zflora-fp32-adapter")}
    trained = quantized.run(dataclasses.replace(cfg, train_on_quantized=("int4",)))  # QLoRA's recipe, then deployed
    (row,) = [r for r in trained["rows"] if r["method"] == quantized.ON_QUANTIZED]
    assert row["precision"] == "int4" and row["gain"] is not None
    result = json.loads(
        (tmp_path / "quantized" / "math" / f"int4-{quantized.ON_QUANTIZED}-s0" / "result.json").read_text()
    )
    assert result["adapter"] == str(tmp_path / "work" / "quantized" / f"int4-{quantized.ON_QUANTIZED}-s0" / "math")
    assert result["steps"] == 1 and result["tokens_seen"] > 0 and result["train_wall_s"] > 0
    # Finished rows are read back, never evaluated again, and need no adapter; a row still to run does, and
    # without it the command says where it looked before evaluating anything.
    monkeypatch.setattr(quantized, "evaluate_category", lambda *a, **k: pytest.fail("a finished row was re-run"))
    assert quantized.run(cfg)["rows"] == out["rows"]
    shutil.rmtree(tmp_path / "work")
    assert quantized.run(cfg)["rows"] == out["rows"]
    with pytest.raises(FileNotFoundError, match=r"kept no adapter .*; pass --lora-adapter DIR"):
        quantized.run(dataclasses.replace(cfg, precisions=("int8",)))
    assert not (tmp_path / "quantized" / "math" / "int8-base-s0").exists()
    with pytest.raises(ValueError, match="precisions: from int8, int4, got \\['int3'\\]"):
        QuantizedAccuracyConfig(precisions=("int3",))
    with pytest.raises(ValueError, match="train_on_quantized: \\['int8'\\] not among"):
        QuantizedAccuracyConfig(precisions=("int4",), train_on_quantized=("int8",))


def test_quantized_accuracy_reads_a_study_that_chose_its_projections(tmp_path):
    study = AccuracyConfig(output=tmp_path / "study", methods=("lora", "zflora"), targets=("q", "v"), rank=4)
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "study.json").write_text(json.dumps({"settings": accuracy.settings(study)}))
    read = quantized.study_config(QuantizedAccuracyConfig(study=tmp_path / "study"))
    assert (read.targets, read.rank, read.methods) == (["q", "v"], 4, quantized.METHODS)


def test_a_bf16_study_refuses_a_cpu_without_native_bf16(stories_path, tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy, "native_bf16", lambda *a: False)
    with pytest.raises(ValueError, match="does not run natively"):
        accuracy.open_study(quick(stories_path, tmp_path, dtype="bf16"))
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize(
    ("field", "value"),
    [("n_test", (-1, -1, -1)), ("n_test", (5, 5)), ("lrs", (float("nan"),)), ("lrs", (-1e-3,)), ("steps", (0, 1, 1)),
     ("methods", ("dora",)), ("dtype", "fp16"), ("warmup_ratio", 1.0), ("loraplus_lr_ratio", 0.0),
     ("targets", ("q", "qq")), ("other_seeds", 0)],
)  # fmt: skip
def test_bad_settings_are_refused_up_front(field, value, tmp_path):
    with pytest.raises(ValueError, match=field):
        AccuracyConfig(output=tmp_path, **({"methods": ("lora", "zflora")} | {field: value}))


@needs_data
def test_a_study_takes_more_seeds_of_the_other_methods_later(stories_path, tmp_path):
    methods = ("base", "lora", "zflora", "lora-mha", "zflora-mha", "zflora-matched")
    ranks = {"lora": 16, "zflora": 16, "lora-mha": 16, "zflora-mha": 16, "zflora-matched": 26}
    accuracy.open_study(quick(stories_path, tmp_path, methods=methods))
    more = quick(stories_path, tmp_path, methods=methods, other_seeds=2)
    accuracy.open_study(more)  # not a defining setting: the study continues
    assert accuracy.plan(more, ranks) == [
        ("base", None, 0), ("lora", 16, 0), ("zflora", 16, 0), ("lora", 16, 1), ("zflora", 16, 1),
        ("lora-mha", 16, 0), ("zflora-mha", 16, 0), ("zflora-matched", 26, 0),
        ("lora-mha", 16, 1), ("zflora-mha", 16, 1), ("zflora-matched", 26, 1)]  # fmt: skip


def test_targets_are_refused_with_methods_whose_projections_are_fixed(tmp_path):
    with pytest.raises(ValueError, match="targets: lora-mha, zflora-mha, zflora-matched fix their projections"):
        AccuracyConfig(output=tmp_path, targets=("q", "v"))  # the default methods include them
    with pytest.raises(ValueError, match="targets: .* has no input projection"):  # zflora: its stream unread
        AccuracyConfig(output=tmp_path, methods=("lora", "zflora"), targets=("o", "down"))
    assert AccuracyConfig(output=tmp_path, methods=("lora",), targets=("o", "down")).targets == ["o", "down"]


@needs_data
def test_a_sweep_cut_short_goes_on_from_its_finished_rates_on_a_new_machine(stories_path, tmp_path, monkeypatch):
    cfg, trained, train = quick(stories_path, tmp_path, lrs=(1e-3, 3e-3, 1e-2)), [], accuracy.train

    def cut_after_two(*args, **kw):
        if len(trained) == 2:
            raise KeyboardInterrupt  # the sitting ends during the third rate
        trained.append(args[3])
        return train(*args, **kw)

    monkeypatch.setattr(accuracy, "train", cut_after_two)
    with pytest.raises(KeyboardInterrupt):
        accuracy.sweep(cfg, "lora", 4, tmp_path / "work")
    rates = cfg.output / "sweeps" / "lora-r4"
    assert sorted(p.name for p in rates.iterdir()) == ["0.001.json", "0.003.json"]
    first = json.loads((rates / "0.001.json").read_text())["heldout_loss"]
    shutil.rmtree(tmp_path / "work")  # a new machine: the committed files only
    trained.clear()
    monkeypatch.setattr(accuracy, "train", lambda *a, **k: trained.append(a[3]) or train(*a, **k))
    done = accuracy.sweep(cfg, "lora", 4, tmp_path / "work")
    assert trained == [1e-2] and list(done["heldout_loss"]) == ["0.001", "0.003", "0.01"]
    assert done["heldout_loss"]["0.001"] == first
    assert not rates.exists() and json.loads((cfg.output / "sweeps" / "lora-r4.json").read_text()) == done


@needs_data
def test_one_learning_rate_is_used_as_given_without_a_sweep(stories_path, tmp_path):
    cfg = quick(stories_path, tmp_path, methods=("lora",), categories=("math",), seeds=1, lrs=(3e-3,),
                loraplus_lr_ratio=4.0)  # fmt: skip
    (run,) = accuracy.run(cfg)["runs"]
    assert run["lr"] == 3e-3 and not (cfg.output / "sweeps").exists()
    report = (tmp_path / "report.md").read_text()
    assert "learning rate 0.003 for every method, as given" in report
    assert "LoRA+ (the B matrices at 4 x the lr column, the A matrices at it)" in report
    assert "adapters on" not in report  # every projection: the usual recipe, nothing to say


@needs_data
def test_a_run_resumed_from_its_checkpoint_is_timed_over_the_steps_it_trained(stories_path, tmp_path):
    """A run resumed near its end once reported every token over the last process's seconds (20,000 tok/s)."""
    cfg = quick(stories_path, tmp_path, methods=("lora",), categories=("math",), seeds=1, lrs=(3e-3,), steps=(2, 2, 1))
    seen, _ = accuracy.train_split(cfg, "math", load_tokenizer(cfg.model), 2 * cfg.batch_size)
    _, first = accuracy.train(cfg, "lora", cfg.rank, 3e-3, 0, seen, 1, cfg.work / "lora-r16-s0" / "math")
    accuracy.run(cfg)  # goes on from that run's checkpoint-1
    run = cfg.output / "runs" / "lora-r16-s0" / "math"
    log, result = (json.loads((run / f).read_text()) for f in ("train_log.json", "result.json"))
    assert log["resumed_step"] == 1 and log["steps"] == 2
    assert log["tokens_trained"] == log["tokens_seen"] - first["tokens_seen"] > 0
    assert result["resumed_at_step"] == 1 and result["tokens_per_s"] == log["tokens_trained"] / log["wall_s"]
    assert " min after resuming at step 1, " in (tmp_path / "report.md").read_text()


@needs_data
def test_a_full_fine_tune_keeps_no_adapter_however_small(stories_path, tmp_path):
    cfg = quick(stories_path, tmp_path, methods=("fft",), categories=("math",), seeds=1, lrs=(1e-3,), report=None)
    accuracy.run(cfg)  # stories260K whole is under KEEP_ADAPTER_BYTES: a model, still not an adapter
    (run,) = (cfg.output / "runs").glob("fft*/math")
    assert (run / "result.json").is_file() and not (run / accuracy.ADAPTER).exists()


def test_every_run_trains_with_the_study_warm_up_and_learning_rates(stories_path, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(accuracy, "train_model", lambda tc, **kw: seen.append(tc) or (None, {}))
    cfg = quick(stories_path, tmp_path, warmup_ratio=0.25, loraplus_lr_ratio=4.0, methods=("lora", "zflora", "fft"),
                targets=("q", "v"))  # fmt: skip
    for method in ("zflora", "lora", "fft"):
        accuracy.train(cfg, method, 4, 1e-3, 0, [], 1, tmp_path / method)
    assert [(tc.warmup_ratio, tc.loraplus_lr_ratio, tc.targets) for tc in seen] == [
        (0.25, 4.0, ["q", "v"]), (0.25, 4.0, ["q", "v"]), (0.25, None, None)]  # fmt: skip


def _study(root, settings: dict, method: str, seed: int, exact: list[float], items=None, tasks=("a",)) -> None:
    """A study directory with one finished math run: per task, `exact` of item 0, 1, ... (or of `items`)."""
    run = root / "runs" / f"{method}-r4-s{seed}" / "math"
    run.mkdir(parents=True, exist_ok=True)
    (root / "study.json").write_text(json.dumps({"settings": {"model": "/x/m", "dtype": "fp32"} | settings}))
    rows = [{"task": t, "item": i, "exact": e} for t in tasks for i, e in zip(items or range(len(exact)), exact,
                                                                                  strict=True)]  # fmt: skip
    (run / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "result.json").write_text(json.dumps({"method": method, "rank": 4, "seed": seed, "lr": 1e-3,
                                                 "category": "math", "heldout_loss": 1.5,
                                                 "items_sha256": sha256(run / "items.jsonl")}))  # fmt: skip


def test_report_reads_the_study_directory_alone(tmp_path):
    """collect() needs nothing but the directory: the committed files are the whole record."""
    _study(tmp_path, {}, "lora", 0, [1.0, 0.0], tasks=("a", "b"))
    out = collect(tmp_path)
    (r,) = out["runs"]
    assert r["scores"] == {"a": 50.0, "b": 50.0} and r["category_avg"] == {"math": 50.0} and out["model"] == "m"


def test_paired_across_two_studies_pairs_items_and_seeds_and_names_what_differs(tmp_path):
    """An ablation's zFLoRA against the main study's LoRA: the same items, the seeds both ran."""
    main, ablation = tmp_path / "main", tmp_path / "ablation"
    for seed, (z, lo) in enumerate([([1, 1, 0, 0], [1, 0, 0, 0]), ([1, 1, 1, 0], [0, 0, 0, 0])]):
        _study(main, {"warmup_ratio": 0.03}, "lora", seed, lo)
        _study(main, {"warmup_ratio": 0.03}, "zflora", seed, [0, 0, 0, 0])  # the main study's zFLoRA: not read
        _study(ablation, {"warmup_ratio": 0.1}, "zflora", seed, z)
    _study(ablation, {"warmup_ratio": 0.1}, "zflora", 2, [1, 1, 1, 1])  # a seed the other study lacks: not paired
    out = paired_across(ablation, main)
    assert out["differing_settings"] == {"warmup_ratio": [0.1, 0.03]}
    p = out["paired"]["math"]
    assert p["seeds"] == [0, 1] and p["items"] == 4
    assert p["diff"] == pytest.approx(100 * (1 / 4 + 3 / 4) / 2)  # per item, averaged over the two seeds
    assert paired_across(main, main)["paired"] == collect(main)["paired"]  # a study against itself: its own
    _study(ablation, {"warmup_ratio": 0.1}, "zflora", 1, [1, 1, 1, 0], items=[0, 1, 2, 9])
    with pytest.raises(ValueError, match="math seed 1 scored other test items"):
        paired_across(ablation, main)


def test_the_report_pairs_zflora_mha_with_lora_mha_too(tmp_path):
    """The paper's attention-only pair gets its own paired interval, beside zFLoRA − LoRA."""
    _study(tmp_path, {}, "lora", 0, [1, 0, 0, 0])
    _study(tmp_path, {}, "zflora", 0, [1, 1, 0, 0])
    _study(tmp_path, {}, "lora-mha", 0, [1, 1, 1, 0])
    _study(tmp_path, {}, "zflora-mha", 0, [1, 0, 0, 0])
    out = collect(tmp_path)
    assert out["paired"]["math"]["diff"] == pytest.approx(25.0)
    assert out["paired_mha"]["math"]["diff"] == pytest.approx(-50.0) and out["paired_mha"]["math"]["seeds"] == [0]
    lines = "\n".join(_paired_lines(out))
    assert "## zFLoRA − LoRA, paired" in lines and "| math | +25.00 |" in lines
    assert "## zFLoRA-MHA − LoRA-MHA, paired" in lines and "| math | -50.00 |" in lines
    assert [r["method"] for r in out["runs"]] == ["lora", "lora-mha", "zflora", "zflora-mha"]  # the study's order


def test_lead2_takes_the_first_two_utterances_without_speakers():
    dialogue = "#Person1#: Hi, Tom.\n#Person2#: Hello: how are you?\n#Person1#: Fine."
    assert accuracy.lead2(dialogue) == "Hi, Tom. Hello: how are you?"


def test_a_checkpoint_killed_while_being_written_never_blocks_a_restart(stories_path, tmp_path):
    """B10: a run killed while writing its first checkpoint could never be resumed, nor started again."""
    from zflora.finetune.data import Example

    work = tmp_path / "work" / "run"
    (work / "checkpoint-1").mkdir(parents=True)  # half written: no completion marker
    (work / "checkpoint-1" / "trainer_state.json").write_text("{")
    examples = [Example("Once upon a time", " there was a cat.", {})] * 8
    model, log = accuracy.train(quick(stories_path, tmp_path), "zflora", 4, 1e-3, 0, examples, 1, work)
    assert log["steps"] == 1 and log["resumed_from"] is None
