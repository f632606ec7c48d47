"""Task data: loaders for the paper's formats, the prompt template, tokenisation with label masking.

Formats (one record each; `.json` is a list, `.jsonl` one object per line):
    LLM-Adapters   {"instruction", "input", "output", "answer"}    commonsense / math suites
    DialogSum      {"dialogue", "summary", ...}                    summary-dialogue (train/dev)
                   {"dialogue", "summary1", "summary2", ...}       its test set: several references
    generic        {"prompt", "response"}                          anything else

Prompt template: the Alpaca one that LLM-Adapters trains and evaluates with
(`PROMPT_WITH_INPUT` when a record has an input, else `PROMPT_NO_INPUT`). The
model learns the response only: prompt tokens get label -100.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .scoring import is_summary_record, summary_references

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
SUMMARY_INSTRUCTION = "Summarize the following dialogue."


class DataError(ValueError):
    """A data file or record that cannot be used; the message names the file and record."""


@dataclass
class Example:
    prompt: str  # the full prompt, template applied
    target: str  # what the model should generate (trained on; empty for score-only records)
    record: dict[str, Any]  # the original record, for scoring


def format_prompt(instruction: str, input: str = "") -> str:
    if input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def _text(record: dict[str, Any], key: str, where: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def to_example(record: Any, where: str) -> Example:
    """One record in any supported format -> Example; `where` names it in errors ("file: record 3")."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if is_summary_record(record):
        dialogue = _text(record, "dialogue", where)
        refs = summary_references(record)
        if not refs:
            raise DataError(f"{where}: no gold summary (a non-empty 'summary', or 'summary1', 'summary2', ...)")
        # The first reference is the training target; scoring uses all of them.
        return Example(format_prompt(SUMMARY_INSTRUCTION, dialogue), refs[0], record)
    if "instruction" in record:
        instruction = _text(record, "instruction", where)
        output = _text(record, "output", where, required=False)
        answer = _text(record, "answer", where, required=False)
        if not instruction.strip():
            raise DataError(f"{where}: field 'instruction' is empty")
        if not output.strip() and not answer.strip():
            raise DataError(f"{where}: neither 'output' nor 'answer' holds a response")
        # MAWPS-style records carry a number with an empty output: the number is the target.
        target = output.strip() if output.strip() else answer.strip()
        return Example(format_prompt(instruction, _text(record, "input", where, required=False)), target, record)
    if "prompt" in record:
        prompt = _text(record, "prompt", where)
        if not prompt.strip():
            raise DataError(f"{where}: field 'prompt' is empty")
        return Example(prompt, _text(record, "response", where, required=False), record)
    raise DataError(
        f"{where}: unknown record format (keys {sorted(record)[:6]}); expected instruction/output/answer "
        "(LLM-Adapters), dialogue/summary (DialogSum) or prompt/response"
    )


def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a `.json` list or a `.jsonl` file (either suffix in any case); none is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line}: not UTF-8 text (byte {e.object[e.start]:#x} at offset {e.start})"
        ) from None
    records = _parse_jsonl(path, text) if path.suffix.lower() == ".jsonl" else _parse_json(path, text)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _parse_jsonl(path: Path, text: str) -> list[Any]:
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise DataError(f"{path}: line {n}: JSON nested too deeply") from None
    return records


def _parse_json(path: Path, text: str) -> list[Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def load_examples(path: str | os.PathLike, limit: int | None = None) -> list[Example]:
    records = load_records(path)
    if limit is not None:
        records = records[:limit]
    return [to_example(r, f"{path}: record {i}") for i, r in enumerate(records)]


@dataclass
class Tokenized:
    features: list[dict[str, list[int]]]
    truncated: int  # records cut to max_length (their target was shortened)
    dropped: int  # records whose prompt alone filled max_length: nothing left to learn


def tokenize(examples: list[Example], tokenizer: Any, max_length: int) -> Tokenized:
    """input_ids = BOS prompt target EOS; labels = -100 over the prompt. Truncated on the right."""
    features, truncated, dropped = [], 0, 0
    for ex in examples:
        prompt = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]
        target = tokenizer(ex.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids, labels = prompt + target, [-100] * len(prompt) + target
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
            if all(label == -100 for label in labels):
                dropped += 1
                continue
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return Tokenized(features, truncated, dropped)
