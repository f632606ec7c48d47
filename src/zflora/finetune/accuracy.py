"""`zflora accuracy`: the paper's accuracy study, in miniature, on a real pretrained LLM.

Protocol (after Gowda et al. and LLM-Adapters): one adapter per category, trained on
that category's training data and tested on its test sets, every method on the same
test records with the same prompts, batched greedy decoding:

    commonsense  train: boolq + ARC-Challenge + ARC-Easy + openbookqa (mixed)
                 test:  boolq, piqa, social_i_qa, ARC-Challenge, ARC-Easy, openbookqa, winogrande
    math         train: math_train_3k            test: gsm8k, SVAMP, AddSub, MultiArith, SingleEq
    summary      train: dialogsum.dev            test: dialogsum.test (3 references per dialogue)

Methods: base (no training), lora and zflora at rank r (several seeds), lora-mha,
zflora-mha, and zflora at the rank that matches LoRA's trainable parameters (fft
optional). Each method's learning rate comes from a short sweep scored by the loss on
a validation split carved from the training data (never a test set). Every run has
its own directory and is skipped once its result is written, so an interrupted study
resumes where it stopped.
"""

from __future__ import annotations

import functools
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..files import write_json, write_text
from ..models import load_local_model, load_tokenizer, require_local
from ..transform import fuse, is_zflora
from .config import ADAPTER_METHODS, CATEGORIES, AccuracyConfig
from .data import Example, load_examples, tokenize
from .evaluate import evaluate_tasks, score_responses_file, task_name
from .scoring import answer_words, infer_kind

# --------------------------------------------------------------------------- data


def train_split(cfg: AccuracyConfig, category: str) -> tuple[list[Example], list[Example]]:
    """The category's training records, shuffled with a fixed seed: 90% to train, 10% for validation."""
    records = [ex for f in CATEGORIES[category][0] for ex in load_examples(cfg.data / f)]
    random.Random(f"train:{category}").shuffle(records)
    records = records[: cfg.n_train]
    cut = max(1, len(records) // 10)
    return records[cut:], records[:cut]


@functools.lru_cache(maxsize=32)
def _shuffled(path: Path) -> tuple[Example, ...]:
    examples = load_examples(path)
    random.Random(f"test:{path.parent.name}/{path.name}").shuffle(examples)
    return tuple(examples)


def test_sets(cfg: AccuracyConfig, category: str) -> dict[str, list[Example]]:
    """The same test records for every method: a fixed-seed sample of each test file (all when fewer)."""
    n = dict(zip(CATEGORIES, cfg.n_test, strict=True))[category]
    return {task_name(cfg.data / f): list(_shuffled(cfg.data / f)[:n]) for f in CATEGORIES[category][1]}


def chance(examples: list[Example]) -> float | None:
    """Expected accuracy (%) of a uniform guess among each record's answer words; None for open answers."""
    if infer_kind(examples[0].record) != "label":
        return None
    return 100 * statistics.fmean(1 / max(1, len(answer_words(ex.record))) for ex in examples)


# --------------------------------------------------------------------------- runs


def validation_loss(model: torch.nn.Module, tokenizer: Any, examples: list[Example], max_length: int) -> float:
    """Mean token loss on held-out training records (the sweep's score)."""
    from transformers import DataCollatorForSeq2Seq

    tokenizer.padding_side = "right"
    features = tokenize(examples, tokenizer, max_length).features
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    losses, weights = [], []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(features), 16):
            batch = collate(features[i : i + 16])
            losses.append(model(**batch).loss.item())
            weights.append(int((batch["labels"] != -100).sum()))
    return sum(loss * w for loss, w in zip(losses, weights, strict=True)) / sum(weights)


def train_run(
    cfg: AccuracyConfig, method: str, rank: int, lr: float, seed: int, train: list[Example], steps: int, out: Path
) -> tuple[torch.nn.Module, dict[str, Any]]:
    from .config import TrainConfig
    from .train import train_model

    tc = TrainConfig(model=cfg.model, data=[Path("<accuracy>")], output=out, method=method, rank=rank, lr=lr,
                     max_steps=steps, batch_size=cfg.batch_size, max_length=cfg.max_length, seed=seed,
                     save_steps=max(20, steps // 4), logging_steps=10, progress=False,
                     resume=any(out.glob("checkpoint-*")),
                     extra={"train_sampling_strategy": "group_by_length"})  # fmt: skip
    return train_model(tc, examples=train, tokenizer=load_tokenizer(cfg.model))


def sweep(cfg: AccuracyConfig, method: str, rank: int, bar: tqdm) -> dict[str, Any]:
    """Each learning rate for `sweep_steps` on commonsense data, scored by validation loss (cached on disk)."""
    done = cfg.output / "sweep" / f"{method}-r{rank}.json"
    if done.is_file():
        return json.loads(done.read_text())
    train, val = train_split(cfg, "commonsense")
    tokenizer, losses = load_tokenizer(cfg.model), {}
    for lr in cfg.lrs:
        model, _ = train_run(
            cfg, method, rank, lr, 0, train, cfg.sweep_steps, cfg.output / "sweep" / f"{method}-r{rank}-{lr}"
        )
        losses[str(lr)] = validation_loss(model, tokenizer, val[:200], cfg.max_length)
        bar.set_postfix_str(f"sweep {method} lr {lr}: val loss {losses[str(lr)]:.3f}")
    result = {"method": method, "rank": rank, "steps": cfg.sweep_steps, "val_loss": losses,
              "best_lr": float(min(losses, key=losses.get))}  # fmt: skip
    write_json(done, result)
    return result


def evaluate_run(cfg: AccuracyConfig, model: torch.nn.Module, category: str) -> dict[str, Any]:
    if is_zflora(model):
        fuse(model)  # evaluated as it would be served
    elif hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()  # PEFT LoRA merged, as `zflora eval` serves it
    tests = test_sets(cfg, category)
    started = time.perf_counter()
    scores, saved = evaluate_tasks(model.eval(), load_tokenizer(cfg.model), tests, cfg.eval_batch_size)
    return {"scores": {t: r["score"] for t, r in scores.items()}, "details": scores,
            "eval_s": time.perf_counter() - started, "responses": saved}  # fmt: skip


def one_run(cfg: AccuracyConfig, method: str, rank: int | None, seed: int, lr: float | None, category: str) -> dict:
    """Train (unless base) and evaluate one method on one category; cached in its own directory."""
    name = method if rank is None else f"{method}-r{rank}"
    out = cfg.output / "runs" / f"{name}-s{seed}" / category
    if (out / "result.json").is_file():  # finished: re-scored from its saved responses by today's scorers
        details = score_responses_file(out / "responses.jsonl")
        scores = {task: r["score"] for task, r in details.items()}
        return json.loads((out / "result.json").read_text()) | {"scores": scores, "details": details}
    result: dict[str, Any] = {"method": method, "rank": rank, "seed": seed, "lr": lr, "category": category}
    if method == "base":
        model = load_local_model(cfg.model)
    else:
        train, _ = train_split(cfg, category)
        base_method = "zflora" if method == "zflora-matched" else method
        model, log = train_run(cfg, base_method, rank or cfg.rank, lr, seed, train, cfg.steps, out)
        result |= {"trainable_params": log["trainable_parameters"], "train_wall_s": log["wall_s"],
                   "tokens_per_s": log["tokens_seen"] / log["wall_s"] if log["wall_s"] else None,
                   "final_loss": log["loss"][-1]["loss"] if log["loss"] else None}  # fmt: skip
    evaluated = evaluate_run(cfg, model, category)
    write_text(out / "responses.jsonl", "".join(json.dumps(r) + "\n" for r in evaluated.pop("responses")))
    result |= evaluated
    write_json(out / "result.json", result)
    return result


# --------------------------------------------------------------------------- the study


def matched_rank(cfg: AccuracyConfig) -> int:
    """The zFLoRA rank whose trainable parameters come closest to LoRA's at `rank`."""
    from .study import matched_rank as closest

    return closest(require_local(cfg.model), "zflora", "lora", cfg.rank)


def plan(cfg: AccuracyConfig, ranks: dict[str, int]) -> list[tuple[str, int | None, int]]:
    """(method, rank, seed) of every run, the central comparison first: base, then lora and zflora over
    every seed, then the attention-only variants, zFLoRA at LoRA's parameter count and fft."""
    runs: list[tuple[str, int | None, int]] = [("base", None, 0)] if "base" in cfg.methods else []
    runs += [(m, ranks[m], s) for s in range(cfg.seeds) for m in ("lora", "zflora") if m in cfg.methods]
    runs += [(m, ranks.get(m), 0) for m in ("lora-mha", "zflora-mha", "zflora-matched", "fft") if m in cfg.methods]
    return runs


def run(cfg: AccuracyConfig) -> dict[str, Any]:
    require_local(cfg.model)
    ranks = {m: cfg.rank for m in ADAPTER_METHODS} | {"zflora-matched": matched_rank(cfg)}
    runs, started = plan(cfg, ranks), time.perf_counter()
    swept = [m for m in dict.fromkeys(m for m, _, _ in runs) if m != "base"]
    total = len(runs) * len(cfg.categories) + len(swept)
    bar = tqdm(total=total, disable=not cfg.progress, desc="zflora accuracy", unit="run")
    sweeps: dict[str, dict[str, Any]] = {}
    results = []
    for method, rank, seed in runs:
        if method != "base" and method not in sweeps:  # swept just before its first run: results come in order
            sweeps[method] = sweep(cfg, "zflora" if method == "zflora-matched" else method, rank or cfg.rank, bar)
            bar.update(1)
        lr = sweeps[method]["best_lr"] if method in sweeps else None
        for category in cfg.categories:
            bar.set_postfix_str(f"{method} seed {seed} {category}")
            results.append(one_run(cfg, method, rank, seed, lr, category))
            bar.update(1)
            write_report(cfg, results, sweeps, time.perf_counter() - started)  # every finished run is reported
    bar.close()
    return write_report(cfg, results, sweeps, time.perf_counter() - started)


def write_report(cfg: AccuracyConfig, results: list[dict], sweeps: dict, wall_s: float) -> dict[str, Any]:
    from .accuracy_report import chart, markdown, summary

    out = summary(cfg, results, sweeps, wall_s)
    write_json(cfg.output / "accuracy.json", out)
    write_text(cfg.output / "accuracy.md", markdown(out))
    chart(out, cfg.output / "accuracy.png")
    return out


def main(cfg: AccuracyConfig) -> None:
    from .accuracy_report import markdown

    print(markdown(run(cfg)))
