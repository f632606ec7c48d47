"""Fault cases found by trying the library as a hostile user would; each test names its case and fails
without its fix. The README's table of fault cases lists them."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch
from conftest import assert_same_state, randomize_adapter, rewrite_weights, state, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file

import zflora
from zflora.adapter_io import CONFIG_NAME, WEIGHTS_NAME, Adapter, AdapterError, base_identity
from zflora.cli import main
from zflora.files import STALE_S
from zflora.finetune.data import DataError, load_examples
from zflora.finetune.evaluate import task_kind
from zflora.finetune.scoring import score_response

# --------------------------------------------------------------------------- adapter files


def _adapted(seed: int = 1, model: torch.nn.Module | None = None, **kwargs) -> torch.nn.Module:
    model = model if model is not None else tiny_model(tie=True)
    zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=8, **kwargs))
    randomize_adapter(model, seed=seed)
    return model


def _refused(model: torch.nn.Module, path, match: str, **kwargs) -> None:
    before = state(model)
    with pytest.raises(AdapterError, match=match):
        zflora.load_adapter(model, path, **kwargs)
    assert_same_state(before, state(model))


def _header(file) -> dict:
    with safe_open(file, framework="pt") as f:
        return f.metadata()


def test_files_from_two_saves_are_refused(tmp_path):
    """Broken promise 1: a crash between the two renames left new weights beside the old config."""
    zflora.save_adapter(_adapted(seed=1), tmp_path / "old")
    zflora.save_adapter(_adapted(seed=2, alpha=4.0), tmp_path / "new")
    shutil.copy(tmp_path / "new" / WEIGHTS_NAME, tmp_path / "old" / WEIGHTS_NAME)
    _refused(_adapted(seed=3), tmp_path / "old", "written by another save")


def test_save_removes_temporaries_of_a_crashed_save(tmp_path):
    """Broken promise 1: temporary files of a killed save stay behind and pile up."""
    path = tmp_path / "a"
    zflora.save_adapter(_adapted(), path)
    (path / f".{WEIGHTS_NAME}.abc123.tmp").write_bytes(b"")
    (path / f".{CONFIG_NAME}.def456.tmp").write_text("{")
    for stale in path.glob(".*.tmp"):  # an hour old: no writer is still at them
        os.utime(stale, (time.time() - 2 * STALE_S,) * 2)
    (path / f".{WEIGHTS_NAME}.inflight.tmp").write_bytes(b"")  # another writer's, just created: kept
    (path / "optimizer.pt").write_bytes(b"kept")  # a Trainer checkpoint's own files are left alone
    zflora.save_adapter(_adapted(seed=2), path)
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
    zflora.save_adapter(_adapted(), tmp_path / "a")
    model = other()
    _refused(model, tmp_path / "a", match)
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
    model = _adapted(model=tiny_model(tie=True, dtype=torch.bfloat16))
    zflora.fuse(model)
    adapter = Adapter(model.zflora_config, {**base_identity(model), "fingerprint": fp32}, {})
    zflora.adapter_io.check_same_base(model, adapter)  # bf16 rounding and the fused layout: still the same base


@pytest.mark.parametrize("preset, names", [("all", ["q", "k", "v", "o", "gate", "up", "down"]),
                                           ("mha", ["q_proj", "k_proj", "v_proj", "o_proj"])])  # fmt: skip
def test_target_list_equal_to_a_preset_loads(tmp_path, preset, names):
    """Broken promise 3: the same projections, named as a list, were refused."""
    zflora.save_adapter(_adapted(targets=names), tmp_path / "a")
    model = _adapted(seed=2, targets=preset)
    zflora.load_adapter(model, tmp_path / "a")


@pytest.mark.parametrize(
    "dtype, value, file_dtype", [(torch.float32, 1e300, torch.float64), (torch.float16, 1e5, torch.float32)]
)
def test_values_that_overflow_the_model_dtype_are_refused(tmp_path, dtype, value, file_dtype):
    """Broken promise 4: finite in the file, inf once cast to the model's dtype."""
    zflora.save_adapter(_adapted(), tmp_path / "a")
    file = tmp_path / "a" / WEIGHTS_NAME
    tensors, header = load_file(file), _header(file)
    name = "model.layers.0.self_attn.o_proj.zflora_A"
    tensors[name] = torch.full(tensors[name].shape, value, dtype=file_dtype)
    rewrite_weights(file.parent, tensors, header)
    _refused(_adapted(seed=2, model=tiny_model(tie=True, dtype=dtype)), tmp_path / "a", "not finite in the model")


def test_float8_tensor_is_named(tmp_path):
    """Broken promise 5: float8 raised NotImplementedError from torch.isfinite."""
    zflora.save_adapter(_adapted(), tmp_path / "a")
    file = tmp_path / "a" / WEIGHTS_NAME
    tensors, header = load_file(file), _header(file)
    name = "model.layers.1.mlp.down_proj.zflora_A"
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    rewrite_weights(file.parent, tensors, header)
    _refused(_adapted(seed=2), tmp_path / "a", r"down_proj.zflora_A is torch.float8_e4m3fn")


@pytest.mark.parametrize("alpha", ["Infinity", "NaN", "0", "-1"])
def test_non_finite_alpha_in_a_file_is_refused(tmp_path, alpha):
    """Broken promise 6: alpha = Infinity in adapter_config.json was accepted."""
    zflora.save_adapter(_adapted(), tmp_path / "a")
    cfg = tmp_path / "a" / CONFIG_NAME
    meta = json.loads(cfg.read_text())
    cfg.write_text(json.dumps(meta).replace(f'"alpha": {meta["zflora"]["alpha"]}', f'"alpha": {alpha}'))
    _refused(_adapted(seed=2), tmp_path / "a", "alpha: must be a positive finite number")


def test_save_refuses_non_finite_weights(tmp_path):
    """Broken promise 6: an all-NaN adapter was written."""
    model = _adapted()
    with torch.no_grad():
        next(iter(zflora.adapter_parameters(model).values())).fill_(float("nan"))
    with pytest.raises(AdapterError, match="non-finite adapter weights"):
        zflora.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a" / CONFIG_NAME).exists()


def test_adapter_api_misuse_is_explained(tmp_path):
    """Unclear errors: a plain model, a path that is a file, a deeply nested config, NaN in memory."""
    zflora.save_adapter(_adapted(), tmp_path / "a")
    with pytest.raises(AdapterError, match="no zFLoRA adapter"):
        zflora.read_adapter(tmp_path / "a", model=tiny_model(tie=True))
    with pytest.raises(AdapterError, match="is a file; pass the adapter directory"):
        zflora.read_adapter(tmp_path / "a" / CONFIG_NAME)
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / CONFIG_NAME).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AdapterError, match="not valid JSON"):
        zflora.read_adapter(deep)
    model = _adapted(seed=2)
    adapter = zflora.read_adapter(tmp_path / "a")
    last = sorted(adapter.tensors)[-1]  # NaN in the last tensor: nothing may have been written before it
    adapter.tensors[last] = torch.full_like(adapter.tensors[last], float("nan"))
    before = state(model)
    with pytest.raises(AdapterError, match="not finite"):
        zflora.set_adapter(model, adapter)
    assert_same_state(before, state(model))


def test_load_adapter_into_a_plain_model_applies_its_config(tmp_path, ids):
    """The one-call path PEFT users know (`PeftModel.from_pretrained`)."""
    src = _adapted(targets="mha", lm_head=True)
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


# --------------------------------------------------------------------------- data


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("empty.json", "[]", "empty.json: no records"),
        ("empty.jsonl", "\n\n", "empty.jsonl: no records"),
        ("latin1.json", b'[{"instruction": "caf\xe9", "answer": "1"}]', "line 1: not UTF-8"),
        ("prompt.jsonl", '{"prompt": "", "response": ""}\n', r"record 0: field 'prompt' is empty"),
    ],
)
def test_data_errors_name_file_and_record(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=match):
        load_examples(path)


def test_upper_case_jsonl_suffix_is_jsonl(tmp_path):
    path = tmp_path / "d.JSONL"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n')
    assert len(load_examples(path)) == 2


def test_eval_file_validated_before_generating(tmp_path):
    """A mixed-kind file (kind was taken from record 0) and a summary without gold, found before generation."""
    records = [{"instruction": "q", "answer": "3"}, {"instruction": "Pick. (A) 1 (B) 2", "answer": "B"}]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match="record 1 is scored as 'choice' but record 0 as 'number'"):
        task_kind("mixed", load_examples(path))


# --------------------------------------------------------------------------- the command line


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
    zflora.save_adapter(_adapted(), tmp_path / "a")
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


# --------------------------------------------------------------------------- scorers


@pytest.mark.parametrize(
    "record, response",
    [
        ({"instruction": "Pick. (A) 1 (B) 2 (C) 3 (D) 4 (E) 5", "answer": "C"}, "The answer is C, not E."),
        ({"instruction": "Pick. (A) 1 (B) 2 (C) 3 (D) 4 (E) 5", "answer": "C"}, "The answer is (C). A quick check."),
        ({"instruction": "Pick. (A) 1 (B) 2 (C) 3 (D) 4 (E) 5", "answer": "C"}, "the answer is (c)"),
        ({"instruction": "q", "answer": "5"}, "The answer is 5. Check: 5 + 3 = 8."),
        ({"instruction": "q", "answer": "18"}, "The answer is 18 dollars (2 per egg)."),
        ({"instruction": "q", "answer": "-5"}, "The temperature fell to \u22125."),
        ({"instruction": "q", "answer": "2.5"}, "She ate 2 1/2 pies."),
        ({"instruction": "q\n\nAnswer format: option1/option2", "answer": "option2"}, "I choose Option 2."),
        ({"instruction": "q\n\nAnswer format: answer1/answer2/answer3", "answer": "answer1"}, "It is answer 1."),
        ({"instruction": "q\n\nAnswer format: true/false", "answer": "true"},  # a base model's real output
         "True.  The answer is true.  The answer is true.  ### Response: False.  The answer is false."),
        ({"instruction": "q\n\nAnswer format: true/false", "answer": "false"}, "The answer is false, not true."),
    ],
)  # fmt: skip
def test_scorer_takes_the_stated_answer(record, response):
    assert score_response(record, response) == 1.0


def test_llm_adapters_rule_stays_available():
    record = {"instruction": "q", "answer": "5"}
    assert score_response(record, "The answer is 5. Check: 5 + 3 = 8.", rule="llm-adapters") == 0.0  # last number
    with pytest.raises(ValueError, match="rule: unknown"):
        score_response(record, "5", rule="mine")
