"""Scoring of generated responses against gold records (pure functions, no model).

Kinds, after LLM-Adapters' evaluation (Hu et al., 2023) and DialogSum:
    label   commonsense: the first answer word of the record's "Answer format: a/b/..." line
            found in the response (true/false, solution1.., answer1.., option1.., ending1..)
    number  math: the last number in the response (commas, signs, decimals, fractions),
            equal to the gold number within a small tolerance
    choice  multiple choice (AQuA): the last option letter A-E in the response
    rouge   summaries: ROUGE-L F1 against the gold summary (ROUGE-1/2 reported beside it). A
            record with several references (DialogSum's test set: summary1..summary3) is
            scored against all of them, keeping the best match per ROUGE type, as
            `rouge_score`'s `score_multi` does
"""

from __future__ import annotations

import re
from fractions import Fraction
from functools import cache
from typing import Any

KINDS = ("label", "number", "choice", "rouge")
LABEL_WORDS = re.compile(r"\b(true|false|solution[12]|answer[1-5]|option[12]|ending[1-4])\b", re.IGNORECASE)
FORMAT_LINE = re.compile(r"answer format:\s*([A-Za-z0-9_/ ]+)", re.IGNORECASE)
NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?")
OPTION_LETTER = re.compile(r"\(([A-E])\)|\b([A-E])\b(?![a-z'])")
# DialogSum: `summary` (train/dev) or `summary1`, `summary2`, ... (the test set's human references).
SUMMARY_KEY = re.compile(r"summary\d*")


def summary_references(record: dict[str, Any]) -> list[str]:
    """A summary record's gold references, in key order (`summary`, then `summary1`, `summary2`, ...)."""
    keys = sorted((k for k in record if SUMMARY_KEY.fullmatch(k)), key=lambda k: (len(k), k))
    return [record[k].strip() for k in keys if isinstance(record[k], str) and record[k].strip()]


def is_summary_record(record: dict[str, Any]) -> bool:
    return "dialogue" in record or any(SUMMARY_KEY.fullmatch(k) for k in record)


def _gold(record: dict[str, Any]) -> str:
    for key in ("answer", "summary", "output"):
        if isinstance(record.get(key), str | int | float) and str(record[key]).strip():
            return str(record[key]).strip()
    raise ValueError("record has no gold answer (expected 'answer', or 'summary' for summaries)")


def references(record: dict[str, Any]) -> list[str]:
    """Every gold reference of a record: several for a multi-reference summary, else one."""
    return summary_references(record) or [_gold(record)]


def infer_kind(record: dict[str, Any]) -> str:
    """The scoring kind a record calls for, from its fields."""
    if is_summary_record(record):
        return "rouge"
    gold = _gold(record)
    if re.fullmatch(r"[A-E]", gold):
        return "choice"
    if parse_number(gold) is not None:
        return "number"
    if LABEL_WORDS.fullmatch(gold) or FORMAT_LINE.search(str(record.get("instruction", ""))):
        return "label"
    return "rouge"


def parse_number(text: str) -> float | None:
    """A whole string as a number: '1,234', '-5', '.5', '3/4', '576.0'. None if it is not one."""
    text = text.strip().rstrip(".").replace(" ", "")
    if not text or not NUMBER.fullmatch(text):
        return None
    try:
        if "/" in text:
            num, den = text.split("/")
            return float(Fraction(num.replace(",", "")) / Fraction(den))
        return float(text.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def extract_number(response: str) -> float | None:
    """The last number in a response."""
    for match in reversed([m.group(0) for m in NUMBER.finditer(response) if re.search(r"\d", m.group(0))]):
        value = parse_number(match)
        if value is not None:
            return value
    return None


def _answer_words(record: dict[str, Any]) -> list[str]:
    found = FORMAT_LINE.findall(str(record.get("instruction", "")))
    if found:
        return [w.strip().lower() for w in found[-1].split("/") if w.strip()]
    return []


def extract_label(response: str, record: dict[str, Any]) -> str | None:
    """The first of the record's answer words (or any known label word) in the response."""
    words = _answer_words(record)
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE) if words else LABEL_WORDS
    match = pattern.search(response)
    return match.group(1).lower() if match else None


def extract_choice(response: str) -> str | None:
    """The last option letter: '(B)', 'answer is B', a standalone capital A-E."""
    letters = [a or b for a, b in OPTION_LETTER.findall(response)]
    return letters[-1] if letters else None


@cache
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge_scores(refs: list[str], response: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 of `response`, each the best over the references (`score_multi`)."""
    scores = _rouge().score_multi(refs, response)
    return {k: v.fmeasure for k, v in scores.items()}


def score_response(record: dict[str, Any], response: str, kind: str | None = None) -> float:
    """Score one response: 1.0/0.0 for label, number and choice; ROUGE-L F1 for summaries
    (the best over the record's references when it has several)."""
    kind = kind or infer_kind(record)
    if kind not in KINDS:
        raise ValueError(f"kind: unknown {kind!r}; accepted: {', '.join(KINDS)}")
    if kind == "rouge":
        return rouge_scores(references(record), response)["rougeL"]
    gold = _gold(record)
    if kind == "number":
        want, got = parse_number(gold), extract_number(response)
        if want is None:
            raise ValueError(f"gold answer {gold!r} is not a number")
        return float(got is not None and abs(got - want) <= max(1e-3, 1e-6 * abs(want)))
    if kind == "choice":
        return float(extract_choice(response) == gold.upper())
    return float(extract_label(response, record) == gold.lower())
