"""`zflora eval`: batched greedy generation on task files, scored per task, averaged.

The model generates with the KV cache (zFLoRA in its fused form), left-padded
batches. Responses are saved as JSONL (`{"task", "record", "response"}`), which
`zflora eval --responses FILE` scores again without a model.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..adapter_io import attach_adapter
from ..files import write_json, write_text
from ..methods import prepare_for_eval
from ..models import load_local_model, load_tokenizer
from .config import EvalConfig
from .data import DataError, Example, load_examples
from .scoring import infer_kind, references, rouge_scores, score_response

# Tokens to generate per kind (generation stops at EOS): small vocabularies need more per word.
MAX_NEW_TOKENS = {"label": 32, "choice": 32, "number": 96, "rouge": 64}  # stop early at EOS


def load_for_eval(model_path: Path, adapter: Path | None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Base model plus an optional adapter directory, as served: zFLoRA fused, PEFT LoRA merged."""
    model = load_local_model(model_path, dtype)
    return prepare_for_eval(model if adapter is None else attach_adapter(model, adapter))


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 16,
    progress: bool = False,
) -> list[str]:
    """Greedy continuations of `prompts` (the prompt itself not included)."""
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    out: list[str] = []
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, disable=not progress, desc="generate", leave=False):
        enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True).to(device)
        ids = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        out.extend(zip(batch, texts, strict=True))
    return [text.strip() for _, text in sorted(out)]


def score_task(records: list[dict], responses: list[str], kind: str | None = None) -> dict[str, Any]:
    """Mean score of one task; for summaries ROUGE-1/2/L too, and how many references each record had
    (several: each ROUGE type is the best match over them, `rouge_score`'s `score_multi`)."""
    kind = kind or infer_kind(records[0])
    scores = [score_response(r, resp, kind) for r, resp in zip(records, responses, strict=True)]
    result: dict[str, Any] = {"kind": kind, "n": len(scores), "score": 100 * statistics.fmean(scores)}
    if kind == "rouge":
        refs = [references(r) for r in records]
        all_r = [rouge_scores(g, resp) for g, resp in zip(refs, responses, strict=True)]
        result |= {k: 100 * statistics.fmean(s[k] for s in all_r) for k in ("rouge1", "rouge2", "rougeL")}
        result["references"] = statistics.fmean(len(g) for g in refs)
    return result


def task_kind(name: str, examples: list[Example] | list[dict[str, Any]]) -> str:
    """The one scoring kind of a task's records (or examples); a record without a gold answer or of another
    kind is an error naming it (found before generating, not after; and before scoring saved responses)."""
    if not examples:
        raise DataError(f"{name}: no records")
    kinds = []
    for i, ex in enumerate(examples):
        try:
            kinds.append(infer_kind(ex.record if isinstance(ex, Example) else ex))
        except ValueError as e:
            raise DataError(f"{name}: record {i}: {e}") from None
        if kinds[i] != kinds[0]:
            raise DataError(f"{name}: record {i} is scored as {kinds[i]!r} but record 0 as {kinds[0]!r}; "
                            "one kind per task file")  # fmt: skip
    return kinds[0]


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: dict[str, list[Example]],
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    kinds: dict[str, str] | None = None,
    progress: bool = False,
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Generate and score every task; returns per-task results and the responses (for saving)."""
    results, saved = {}, []
    task_kinds = {name: (kinds or {}).get(name) or task_kind(name, examples) for name, examples in tasks.items()}
    for name, examples in tasks.items():  # every task validated above, before any generation
        records, kind = [ex.record for ex in examples], task_kinds[name]
        n_new = max_new_tokens or MAX_NEW_TOKENS[kind]
        responses = generate(model, tokenizer, [ex.prompt for ex in examples], n_new, batch_size, progress)
        results[name] = score_task(records, responses, kind)
        saved += [{"task": name, "record": r, "response": resp} for r, resp in zip(records, responses, strict=True)]
    return results, saved


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| task | kind | n | score |", "|---|---|---|---|"]
    for name, r in results.items():
        extra = f" (R1 {r['rouge1']:.1f}, R2 {r['rouge2']:.1f})" if r["kind"] == "rouge" else ""
        if r.get("references", 1) > 1:
            extra += f", best of {r['references']:g} references"
        lines.append(f"| {name} | {r['kind']} | {r['n']} | {r['score']:.2f}{extra} |")
    lines.append(f"| **average** | | | {statistics.fmean(r['score'] for r in results.values()):.2f} |")
    return "\n".join(lines) + "\n"


def task_name(path: Path) -> str:
    """`.../commonsense/boolq/test.json` -> `boolq`; `dialogsum.dev.jsonl` -> `dialogsum.dev`."""
    return path.parent.name if path.stem in ("test", "train", "dev") else path.stem


def score_responses_file(path: Path) -> dict[str, dict[str, Any]]:
    """Score a saved responses JSONL (one `{"task", "record", "response"}` per line) without a model."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: responses file not found")
    by_task: dict[str, tuple[list, list]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("record"), dict)
            or not isinstance(row.get("response"), str)
        ):
            raise ValueError(f"{path}: line {n}: expected {{'task', 'record': {{...}}, 'response': '...'}}")
        records, responses = by_task.setdefault(str(row.get("task", "responses")), ([], []))
        records.append(row["record"])
        responses.append(row["response"])
    if not by_task:
        raise ValueError(f"{path}: no responses")
    return {
        task: score_task(recs, resps, task_kind(f"{path}: task {task}", recs))
        for task, (recs, resps) in by_task.items()
    }


def run(cfg: EvalConfig, dtype: torch.dtype = torch.float32) -> dict[str, dict[str, Any]]:
    if cfg.output is not None and cfg.output.is_dir():  # found now, not after all the generation
        raise IsADirectoryError(f"{cfg.output}: is a directory; --output names the results JSON file")
    if cfg.responses is not None:
        results = score_responses_file(cfg.responses)
    else:
        names = [task_name(p) for p in cfg.data]
        if clash := sorted({n for n in names if names.count(n) > 1}):
            files = [str(p) for p, n in zip(cfg.data, names, strict=True) if n in clash]
            raise DataError(
                f"data: {', '.join(files)} all name the task {clash[0]!r} (a task is named after its "
                "file); evaluate them in separate runs"
            )
        tasks = {name: load_examples(p, cfg.limit) for name, p in zip(names, cfg.data, strict=True)}
        for name, examples in tasks.items():
            task_kind(name, examples)  # before the model is even loaded
        tokenizer = load_tokenizer(cfg.model)
        model = load_for_eval(cfg.model, cfg.adapter, dtype)
        if cfg.compile:
            from ..compiled import compile

            compile(model, dynamic=True)  # prompts and the cache change length: one dynamic graph, not one each
        results, saved = evaluate_tasks(model, tokenizer, tasks, cfg.batch_size, cfg.max_new_tokens, progress=True)
        if cfg.output is not None:
            write_text(cfg.output.with_suffix(".responses.jsonl"), "".join(json.dumps(s) + "\n" for s in saved))
    if cfg.output is not None:
        write_json(cfg.output, results)
        write_text(cfg.output.with_suffix(".md"), table(results))
    return results


def main(cfg: EvalConfig) -> None:
    print(table(run(cfg)))
