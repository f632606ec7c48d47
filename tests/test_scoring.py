"""Scoring: extraction rules, and on every real dataset gold scores 100% while shuffled scores near chance."""

from __future__ import annotations

import random
import statistics
from pathlib import Path

import pytest
from conftest import (
    SHARED,
)

from zflora.finetune.data import load_records
from zflora.finetune.evaluate import score_task, table
from zflora.finetune.scoring import extract_choice, extract_number, infer_kind, references, score_response

DATA = SHARED / "data"
FILES = sorted(DATA.glob("*/*/test.json")) + sorted(DATA.glob("dialogsum/*.jsonl"))


def gold_response(record: dict, kind: str) -> str:
    """What a perfect model would answer, in each format's own style."""
    if kind == "rouge":
        return references(record)[-1]  # the last reference: with several, any one is a perfect answer
    if kind == "number":
        return f"Some reasoning with 12 and 3.5 first. The answer is {record['answer']}."
    if kind == "choice":
        return f"Looking at the options, the answer is ({record['answer']})."
    return f"the correct answer is {record['answer']}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_gold_scores_full_and_shuffled_near_chance(path: Path):
    records = load_records(path)[:400]
    kind = infer_kind(records[0])
    assert (
        kind
        == {"math": "number", "commonsense": "label", "dialogsum": "rouge"}[path.parts[-3 if kind != "rouge" else -2]]
    )
    golds = [gold_response(r, kind) for r in records]
    assert statistics.fmean(score_response(r, g) for r, g in zip(records, golds, strict=True)) == 1.0
    shuffled = golds[:]
    random.Random(0).shuffle(shuffled)
    score = statistics.fmean(score_response(r, g) for r, g in zip(records, shuffled, strict=True))
    if kind == "label":  # chance: the share of the most common label, or less
        labels = [r["answer"] for r in records]
        assert score <= max(labels.count(x) for x in set(labels)) / len(labels) + 0.08
    elif kind == "number":
        assert score < 0.15
    else:
        assert score < 0.4


@pytest.mark.skipif(not FILES, reason=f"real data not available at {DATA}")
def test_real_data_present():
    assert len(FILES) >= 13


@pytest.mark.parametrize(
    "response, value",
    [
        ("so 1,234 apples", 1234.0),
        ("she lost -5 points", -5.0),
        ("about .5 of it", 0.5),
        ("3/4 of the cake", 0.75),
        ("first 2 then 17.25.", 17.25),
        ("12 + 30 = 42", 42.0),
        ("no number here", None),
    ],
)
def test_extract_number(response, value):
    assert extract_number(response) == value


def test_number_tolerance_and_forms():
    record = {"instruction": "q", "output": "", "answer": "576.0"}
    assert score_response(record, "The answer is 576") == 1.0
    assert score_response(record, "The answer is 576.0004") == 1.0
    assert score_response(record, "The answer is 577") == 0.0
    assert score_response({"instruction": "q", "answer": "1234"}, "a total of 1,234.") == 1.0
    assert score_response({"instruction": "q", "answer": "0.75"}, "that is 3/4") == 1.0


def test_choice_letters():
    record = {"instruction": "Pick one. Answer Choices: (A) 1 (B) 2 (C) 3 (D) 4 (E) 5", "answer": "C"}
    assert infer_kind(record) == "choice"
    assert extract_choice("A train goes... So the answer is (C).") == "C"
    assert score_response(record, "At first I thought B, but the answer is C") == 1.0
    assert score_response(record, "The answer is (B)") == 0.0


def test_label_uses_answer_format_line():
    record = {"instruction": "x?\n\nAnswer format: answer1/answer2/answer3", "answer": "answer2"}
    assert score_response(record, "the correct answer is answer2, not answer1") == 1.0
    assert score_response(record, "answer1 or maybe answer2") == 0.0
    assert score_response({"instruction": "q", "answer": "true"}, "False.") == 0.0


def test_rouge_and_kind_errors():
    record = {"dialogue": "#Person1#: hi", "summary": "Two people greet each other."}
    assert score_response(record, "Two people greet each other.") == 1.0
    assert 0 < score_response(record, "People greet.") < 1
    with pytest.raises(ValueError, match="kind: unknown 'bleu'"):
        score_response(record, "x", kind="bleu")


def test_multi_reference_summary_takes_best_match():
    record = {"dialogue": "#Person1#: hi", "summary1": "They greet.", "summary2": "Two people say hello to each other."}
    assert references(record) == ["They greet.", "Two people say hello to each other."]
    assert infer_kind(record) == "rouge"
    assert score_response(record, "Two people say hello to each other.") == 1.0
    assert score_response(record, "They greet.") == 1.0
    single = score_response({"dialogue": "x", "summary": "They greet."}, "Two people say hello to each other.")
    assert single < 0.5  # against summary1 alone the same answer scores low
    result = score_task([record, record], ["They greet.", "Two people greet."])
    assert result["references"] == 2 and result["rougeL"] > result["rouge2"]
    assert "best of 2 references" in table({"dialogsum.test": result})


@pytest.mark.skipif(not (DATA / "dialogsum/dialogsum.test.jsonl").is_file(), reason="DialogSum test set absent")
def test_dialogsum_test_set_has_three_references():
    records = load_records(DATA / "dialogsum/dialogsum.test.jsonl")
    assert all(len(references(r)) == 3 for r in records)


# --------------------------------------------------------------------------- refusals and faults


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
