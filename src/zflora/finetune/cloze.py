"""Commonsense records as cloze problems: the question alone as the prompt, each option's text as a continuation.

Small models cannot map an answer to its label ("answer2", "solution1"), so small-model
evaluations (lm-evaluation-harness, lighteval, OLMES) score each option's *text* by its
likelihood after the question instead. The LLM-Adapters records list the options inside
the instruction; this module parses them back out, one rule for every task:

    Please choose the correct answer to the question: Q\\n\\nAnswer1: a Answer2: b ...\\n\\nAnswer format: ...
    Please choose the correct solution to the question: Q\\n\\nSolution1: a\\n\\nSolution2: b\\n\\nAnswer format: ...
    Please choose the correct answer to fill in the blank ...: S _ S\\n\\nOption1: a Option2: b Answer format: ...
    Please answer the following question with true or false, question: Q\\n\\nAnswer format: true/false

and writes them in lm-evaluation-harness's form:

    most tasks   context "Question: Q\\nAnswer:", continuations " a", " b", ...
    boolq        context "Question: Q?\\nAnswer:", continuations " yes", " no" (no passage: the records carry none)
    winogrande   partial scoring: contexts "S-before-blank a", "S-before-blank b"; the one continuation
                 " S-after-blank", scored under each context
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .data import DataError, Example

HEADER = re.compile(r"^\s*Please (?:answer|choose)\b.*?\b(?:question|sentence)\s*:\s*", re.IGNORECASE | re.DOTALL)
MARKER = re.compile(r"\b(?:Answer|Solution|Option|Ending)(\d)\s*:\s*", re.IGNORECASE)
FORMAT = re.compile(r"\s*Answer format\s*:\s*([A-Za-z0-9_/ ]+?)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Cloze:
    """One multiple-choice record: option i is `continuations[i]` after `contexts[i]`."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]  # the option texts, for lm-evaluation-harness's per-character normalisation
    gold: int

    def example(self, record: dict[str, Any]) -> Example:
        """The gold option as a training example: prompt = its context, target = its continuation."""
        return Example(self.contexts[self.gold], self.continuations[self.gold], record)


def parse(record: dict[str, Any], where: str = "record") -> tuple[str, list[str], int]:
    """(question, option texts, gold index) of an LLM-Adapters commonsense record; a clear error otherwise."""
    instruction, answer = str(record.get("instruction", "")), str(record.get("answer", "")).strip().lower()
    found = FORMAT.search(instruction)
    if not found:
        raise DataError(f"{where}: no 'Answer format: ...' line to take the options from")
    words = [w.strip().lower() for w in found[1].split("/") if w.strip()]
    body = HEADER.sub("", instruction[: found.start()], count=1)
    if words == ["true", "false"]:
        question, options = body.strip(), ["true", "false"]
    else:
        parts = MARKER.split(body)  # [question, "1", text1, "2", text2, ...]
        question, numbers, options = parts[0].strip(), parts[1::2], [p.strip() for p in parts[2::2]]
        if numbers != [str(i) for i in range(1, len(numbers) + 1)] or len(options) != len(words):
            raise DataError(f"{where}: options numbered {numbers} do not match the answer format {found[1]!r}")
    if not question or not all(options):
        raise DataError(f"{where}: an empty question or option")
    if answer not in words:
        raise DataError(f"{where}: gold answer {answer!r} is not one of the answer format's {words}")
    return question, options, words.index(answer)


def to_cloze(record: dict[str, Any], where: str = "record") -> Cloze:
    """The record in lm-evaluation-harness's cloze form (see the module docstring)."""
    question, options, gold = parse(record, where)
    if options == ["true", "false"]:  # boolq: yes/no after the question
        context = f"Question: {question.rstrip('?')}?\nAnswer:"
        return Cloze((context, context), (" yes", " no"), ("yes", "no"), gold)
    if question.count("_") == 1 and len(options) == 2 and "fill in the blank" in str(record.get("instruction")):
        before, after = question.split("_")  # winogrande: the option completes the context
        rest = " " + after.strip()
        return Cloze(tuple(before + o for o in options), (rest, rest), tuple(options), gold)
    context = f"Question: {question}\nAnswer:"
    return Cloze((context,) * len(options), tuple(" " + o for o in options), tuple(options), gold)


def examples(records: list[dict[str, Any]], where: str) -> list[Example]:
    """Training examples in cloze form (question -> the gold option's text)."""
    return [to_cloze(r, f"{where}: record {i}").example(r) for i, r in enumerate(records)]
