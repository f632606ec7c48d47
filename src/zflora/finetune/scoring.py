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


RULES = ("explicit", "llm-adapters")
# "The answer is X", "the final answer is X", "Answer: X": what follows is the model's stated answer.
EXPLICIT = re.compile(r"(?:\b(?:the\s+)?(?:final\s+|correct\s+)?answer\s+is\b|\banswer\s*:)\s*", re.IGNORECASE)
MIXED_NUMBER = re.compile(r"(?<![\w./])(\d+)\s+(\d+)\s*/\s*(\d+)(?![\w/])")  # 2 1/2
SPACED_LABEL = re.compile(r"\b(option|answer|solution|ending)\s+([1-5])\b", re.IGNORECASE)  # "Option 2"
LOWER_OPTION = re.compile(r"\(([a-e])\)")  # "(c)": a lower-case letter only in parentheses ("a" is a word)


# A new prompt section the model hallucinated after its answer; LLM-Adapters' evaluation cuts there too
# (it splits the decoded text on "### Response:").
SECTION = re.compile(r"#{3}\s*(?:Instruction|Input|Response)\s*:", re.IGNORECASE)


def own_answer(response: str) -> str:
    """The response up to any prompt section it goes on to invent."""
    return SECTION.split(response, maxsplit=1)[0]


def _stated(response: str, rule: str) -> str | None:
    """The text after the first explicit "the answer is" / "Answer:", or None (or under LLM-Adapters' rule)."""
    if rule == "llm-adapters":
        return None
    found = EXPLICIT.search(response)
    return response[found.end() :] if found else None


def _normalise_numbers(text: str) -> str:
    text = text.replace("\u2212", "-")  # the Unicode minus sign
    return MIXED_NUMBER.sub(lambda m: str(int(m[1]) + int(m[2]) / int(m[3])) if int(m[3]) else m[0], text)


def _numbers(text: str, rule: str) -> list[float]:
    if rule == "explicit":
        text = _normalise_numbers(text)
    found = (m.group(0) for m in NUMBER.finditer(text) if re.search(r"\d", m.group(0)))
    return [v for v in map(parse_number, found) if v is not None]


def extract_number(response: str, rule: str = "explicit") -> float | None:
    """The first number after the first explicit "the answer is", else the last number in the response."""
    stated = _stated(response, rule)
    if stated is not None and (first := _numbers(stated, rule)[:1]):
        return first[0]
    found = _numbers(response, rule)
    return found[-1] if found else None


def answer_words(record: dict[str, Any]) -> list[str]:
    found = FORMAT_LINE.findall(str(record.get("instruction", "")))
    if found:
        return [w.strip().lower() for w in found[-1].split("/") if w.strip()]
    return []


def extract_label(response: str, record: dict[str, Any], rule: str = "explicit") -> str | None:
    """The first of the record's answer words (or any known label word) after an explicit "the answer is",
    else in the whole response; "Option 2" counts as option2."""
    words = answer_words(record)
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE) if words else LABEL_WORDS
    if rule == "explicit":
        response = SPACED_LABEL.sub(r"\1\2", response)
    for text in (_stated(response, rule), response):
        match = pattern.search(text) if text is not None else None
        if match:
            return match.group(1).lower()
    return None


def _letters(text: str, rule: str) -> list[str]:
    if rule == "explicit":
        text = LOWER_OPTION.sub(lambda m: f"({m[1].upper()})", text)
    return [a or b for a, b in OPTION_LETTER.findall(text)]


def extract_choice(response: str, rule: str = "explicit") -> str | None:
    """The first option letter after the first explicit "the answer is" ('(B)', 'B', '(b)'), else the last one."""
    stated = _stated(response, rule)
    if stated is not None:
        head = stated.lstrip(" (")[:1]
        if head.upper() in "ABCDE" and head and not stated.lstrip(" (")[1:2].isalpha():
            return head.upper()  # "the answer is c" / "(c)": the stated letter, whatever its case
        if first := _letters(stated, rule)[:1]:
            return first[0]
    letters = _letters(response, rule)
    return letters[-1] if letters else None


@cache
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge_scores(refs: list[str], response: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 of `response`, each the best over the references (`score_multi`)."""
    scores = _rouge().score_multi(refs, response)
    return {k: v.fmeasure for k, v in scores.items()}


def score_response(record: dict[str, Any], response: str, kind: str | None = None, rule: str = "explicit") -> float:
    """Score one response: 1.0/0.0 for label, number and choice; ROUGE-L F1 for summaries
    (the best over the record's references when it has several).

    rule "explicit" (default) takes a stated "the answer is X" / "Answer: X" first; "llm-adapters"
    is LLM-Adapters' own rule (first label word, last number, last option letter)."""
    kind = kind or infer_kind(record)
    if kind not in KINDS:
        raise ValueError(f"kind: unknown {kind!r}; accepted: {', '.join(KINDS)}")
    if rule not in RULES:
        raise ValueError(f"rule: unknown {rule!r}; accepted: {', '.join(RULES)}")
    response = own_answer(response)
    if kind == "rouge":
        return rouge_scores(references(record), response)["rougeL"]
    gold = _gold(record)
    if kind == "number":
        want, got = parse_number(gold), extract_number(response, rule)
        if want is None:
            raise ValueError(f"gold answer {gold!r} is not a number")
        return float(got is not None and abs(got - want) <= max(1e-3, 1e-6 * abs(want)))
    if kind == "choice":
        return float(extract_choice(response, rule) == gold.upper())
    return float(extract_label(response, record, rule) == gold.lower())
