"""Data loading: formats, template, label masking, truncation, and errors that name file and record."""

from __future__ import annotations

import json

import pytest

from zflora.finetune.data import PROMPT_NO_INPUT, DataError, Example, load_examples, to_example, tokenize


class CharTokenizer:
    """A stand-in tokenizer: one id per character, BOS 1, EOS 2."""

    eos_token_id = 2

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": ([1] if add_special_tokens else []) + [3 + ord(c) % 200 for c in text]}


def test_formats_and_template(tmp_path):
    adapters = {"instruction": "Add 2 and 3.", "input": "", "output": "The answer is 5.", "answer": "5"}
    assert to_example(adapters, "x").prompt == PROMPT_NO_INPUT.format(instruction="Add 2 and 3.")
    assert to_example(adapters, "x").target == "The answer is 5."
    mawps = {"instruction": "Add 2 and 3.", "input": "", "output": "", "answer": 5}
    assert to_example(mawps, "x").target == "5"
    ex = to_example({"dialogue": "#Person1#: hi", "summary": "They greet."}, "x")
    assert "### Input:\n#Person1#: hi" in ex.prompt and ex.target == "They greet."
    multi = {"dialogue": "#Person1#: hi", "summary1": "They greet.", "summary2": "Hello.", "summary3": "Hi."}
    assert to_example(multi, "x").target == "They greet."  # first reference trains; all of them score
    file = tmp_path / "d.jsonl"
    file.write_text(json.dumps({"prompt": "Q: 1+1?", "response": "2"}) + "\n\n")
    assert load_examples(file)[0] == Example("Q: 1+1?", "2", {"prompt": "Q: 1+1?", "response": "2"})


@pytest.mark.parametrize(
    "content, match",
    [
        ("[1, 2]", r"d.json: record 0: a record must be a JSON object"),
        ('[{"instruction": "a", "output": "b"}, {"instruction": 3.5j}]', "not valid JSON"),
        (
            '[{"instruction": "a", "output": "b"}, {"instruction": ["x"], "output": "y"}]',
            r"record 1: field 'instruction'",
        ),
        ('[{"instruction": "a", "output": "", "answer": ""}]', r"record 0: neither 'output' nor 'answer'"),
        ('[{"question": "a"}]', r"record 0: unknown record format"),
        ('[{"dialogue": "a", "summary1": "b"}, {"dialogue": "a", "summary1": ""}]', r"record 1: no gold summary"),
        ('{"instruction": "a"}', "expected a JSON list"),
    ],
)
def test_malformed_records_name_file_and_index(tmp_path, content, match):
    (tmp_path / "d.json").write_text(content)
    with pytest.raises(DataError, match=match):
        load_examples(tmp_path / "d.json")


def test_jsonl_bad_line_and_missing_file(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"d.jsonl: line 2: not valid JSON"):
        load_examples(tmp_path / "d.jsonl")
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_examples(tmp_path / "none.json")


def test_prompt_masked_and_truncation_counted():
    tok = CharTokenizer()
    short = Example("ab", "cd", {})
    long_target = Example("ab", "x" * 50, {})
    long_prompt = Example("p" * 40, "y", {})
    out = tokenize([short, long_target, long_prompt], tok, max_length=20)
    assert out.truncated == 2 and out.dropped == 1 and len(out.features) == 2
    f = out.features[0]
    assert f["input_ids"] == [1, *tok("ab", False)["input_ids"], *tok("cd", False)["input_ids"], 2]
    assert f["labels"][:3] == [-100, -100, -100] and f["labels"][3:] == f["input_ids"][3:]
    assert len(out.features[1]["input_ids"]) == 20


# --------------------------------------------------------------------------- refusals and faults


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


def test_deeply_nested_data_is_a_one_line_error(tmp_path):
    from zflora.finetune.data import load_records

    for name in ("deep.json", "deep.jsonl"):
        (tmp_path / name).write_text("[" * 100_000 + "]" * 100_000 + "\n")
        with pytest.raises(DataError, match="nested too deeply"):
            load_records(tmp_path / name)
