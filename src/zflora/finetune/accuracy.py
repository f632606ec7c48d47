"""`zflora accuracy`: does zFLoRA learn as well as LoRA on a real pretrained model?

Protocol, sized for a 135M model (SmolLM2-135M-Instruct) on a CPU:

    commonsense  train: boolq + ARC-Challenge + ARC-Easy + openbookqa, in cloze form (question -> option text)
                 test:  the seven LLM-Adapters tasks scored by likelihood (lm-evaluation-harness's acc and
                        acc_norm, `cloze.py`); the paper's generation score (label word in a generated answer)
                        and its rate of valid answers beside it
    math         train: math_train_3k rationales     test: gsm8k, SVAMP, AddSub, MultiArith, SingleEq (exact)
    summary      train: dialogsum.dev                 test: dialogsum.test, ROUGE best of 3 references and
                                                            against summary1 alone; lead-2 as a baseline

Math and summary prompts use the model's own chat template for every method (the base model answers
Alpaca prompts poorly), cloze prompts are plain text, as the harness writes them. Each run also records
the teacher-forced loss on held-out training records of its category. Every method's learning rate comes
from a sweep on that held-out loss, never from a test set.

A study lives in `output`: `study.json` (its settings and dtype, fixed at the start), `sweeps/`, and one
directory per finished run with small files (result, per-item scores and responses, training log), meant
to be committed, so that a rerun on any machine continues where the last one stopped; an adapter of at most
`KEEP_ADAPTER_BYTES` is kept there too (`adapter/`), so it can be evaluated again anywhere. Checkpoints of a
run in progress live under `work` on this machine: a rerun here resumes from them, elsewhere restarts it.
"""

from __future__ import annotations

import functools
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..files import write_json, write_text
from ..hardware import environment, native_bf16
from ..methods import matched_rank, prepare_for_eval
from ..models import load_local_model, load_tokenizer, require_local, torch_dtype
from ..registry import home
from .accuracy_report import chart, collect, markdown, recorded_settings, settings, sha256, verified
from .cloze import to_cloze
from .config import ADAPTER_METHODS, CATEGORIES, AccuracyConfig, TrainConfig
from .data import SUMMARY_INSTRUCTION, Example, format_prompt, load_records, to_example, tokenize
from .evaluate import generate, task_name
from .likelihood import score_clozes
from .scoring import extract_label, references, rouge_scores, score_response, summary_references
from .train import complete_checkpoints, save_model, train_model

MAX_NEW_TOKENS = {"commonsense": 16, "math": 128, "summary": 64}  # math: 90% of training rationales fit in 119
ADAPTER = "adapter"  # a run's trained adapter, in its study directory
KEEP_ADAPTER_BYTES = 4 * 2**20  # "a few MB": on SmolLM2 zFLoRA-MHA r = 16 (2.85 MiB in fp32) is kept, LoRA (18.6) not

# --------------------------------------------------------------------------- data


def chat_prompt(tokenizer: Any, text: str) -> str:
    """The model's own chat template around a user message (an Alpaca prompt where it has none)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return format_prompt(text)


def as_example(category: str, record: dict[str, Any], tokenizer: Any, where: str) -> Example:
    """A training record in the form its category is tested in."""
    if category == "commonsense":
        return to_cloze(record, where).example(record)
    ex = to_example(record, where)
    if category == "math":  # the rationale, without math_train_3k's "\nA: " lead
        target = ex.target.removeprefix("A:").strip()
        return Example(chat_prompt(tokenizer, record["instruction"]), target, record)
    return Example(chat_prompt(tokenizer, summary_instruction(record)), ex.target, record)


def summary_instruction(record: dict[str, Any]) -> str:
    return f"{SUMMARY_INSTRUCTION}\n\n{record['dialogue']}"


@functools.lru_cache(maxsize=4)
def _training_records(data: Path, category: str) -> tuple[tuple[str, int, dict], ...]:
    """The category's training records (file, index, record), shuffled with a fixed seed; read once."""
    records = [(f, i, r) for f in CATEGORIES[category][0] for i, r in enumerate(load_records(data / f))]
    random.Random(f"train:{category}").shuffle(records)
    return tuple(records)


def train_split(
    cfg: AccuracyConfig, category: str, tokenizer: Any, n_train: int
) -> tuple[list[Example], list[Example]]:
    """The first `n_train` training examples and the `n_val` held out, from the fixed shuffle of the
    category's training records (only those are built)."""
    records = _training_records(cfg.data, category)[: cfg.n_val + n_train]
    examples = [as_example(category, r, tokenizer, f"{f}: record {i}") for f, i, r in records]
    return examples[cfg.n_val :], examples[: cfg.n_val]


@functools.lru_cache(maxsize=32)
def _sample(path: Path, n: int) -> tuple[tuple[int, dict], ...]:
    records = list(enumerate(load_records(path)))
    random.Random(f"test:{path.parent.name}/{path.name}").shuffle(records)
    return tuple(records[:n])


def test_sets(cfg: AccuracyConfig, category: str) -> dict[str, list[tuple[int, dict]]]:
    """The same (index, record) test items for every method: a fixed-seed sample of each test file."""
    n = dict(zip(CATEGORIES, cfg.n_test, strict=True))[category]
    return {task_name(cfg.data / f): list(_sample(cfg.data / f, n)) for f in CATEGORIES[category][1]}


# --------------------------------------------------------------------------- evaluation


def heldout_batches(tokenizer: Any, examples: list[Example], max_length: int, size: int = 16) -> list[dict]:
    """Teacher-forced batches of `size` examples: right-padded, labels only on the target tokens."""
    from transformers import DataCollatorForSeq2Seq

    tokenizer.padding_side = "right"
    features = tokenize(examples, tokenizer, max_length).features
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    batches = [collate(features[i : i + size]) for i in range(0, len(features), size)]
    tokenizer.padding_side = "left"
    return batches


def heldout_loss(model: torch.nn.Module, tokenizer: Any, examples: list[Example], max_length: int) -> float:
    """Mean token loss on held-out training records (teacher-forced)."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in heldout_batches(tokenizer, examples, max_length):
            n = int((batch["labels"][:, 1:] != -100).sum())
            total, count = total + model(**batch).loss.item() * n, count + n
    if not count:
        raise ValueError(f"held-out loss: no target token left after truncation to max_length={max_length}")
    return total / count


def evaluate_category(cfg: AccuracyConfig, model: torch.nn.Module, tokenizer: Any, category: str) -> list[dict]:
    """Per-item scores of every test task of `category` (one row per item)."""
    rows: list[dict] = []
    for task, items in test_sets(cfg, category).items():
        records = [r for _, r in items]
        if category == "commonsense":
            prompts = [chat_prompt(tokenizer, r["instruction"]) for r in records]
            scored = score_clozes(model, tokenizer, [to_cloze(r, f"{task}: record {i}") for i, r in items])
        else:
            text = [r["instruction"] if category == "math" else summary_instruction(r) for r in records]
            prompts, scored = [chat_prompt(tokenizer, t) for t in text], [{} for _ in records]
        responses = generate(model, tokenizer, prompts, MAX_NEW_TOKENS[category], cfg.eval_batch_size)
        for (i, record), score, response in zip(items, scored, responses, strict=True):
            rows.append(
                {"task": task, "item": i, "response": response} | score | item_scores(category, record, response)
            )
    return rows


def item_scores(category: str, record: dict[str, Any], response: str) -> dict[str, Any]:
    if category == "commonsense":  # the paper's protocol: the first answer word of a generated answer
        label = extract_label(response, record)
        return {"gen_acc": float(label == str(record["answer"]).lower()), "gen_valid": float(label is not None)}
    if category == "math":
        return {"exact": score_response(record, response, "number")}
    best = rouge_scores(references(record), response)
    first = rouge_scores(summary_references(record)[:1], response)
    return {
        "rouge1": best["rouge1"],
        "rouge2": best["rouge2"],
        "rougeL": best["rougeL"],
        "rouge1_s1": first["rouge1"],
        "rouge2_s1": first["rouge2"],
        "rougeL_s1": first["rougeL"],
    }


def baselines(cfg: AccuracyConfig) -> dict[str, dict[str, Any]]:
    """What needs no model, per task: chance and the majority class for multiple choice; for summaries
    lead-2 (the dialogue's first two utterances, speaker tags removed) scored as the models are."""
    out: dict[str, dict[str, Any]] = {}
    for category in cfg.categories:
        for task, items in test_sets(cfg, category).items():
            if category == "commonsense":
                clozes = [to_cloze(r, f"{task}: record {i}") for i, r in items]
                golds = [c.gold for c in clozes]
                out[task] = {
                    "chance": 100 * sum(1 / len(c.choices) for c in clozes) / len(clozes),
                    "majority": 100 * max(map(golds.count, set(golds))) / len(golds),
                }
            elif category == "summary":
                lead = [lead2(r["dialogue"]) for _, r in items]
                rows = [item_scores(category, r, s) for (_, r), s in zip(items, lead, strict=True)]
                out[task] = {"lead2": {k: 100 * sum(x[k] for x in rows) / len(rows) for k in rows[0]}}
    return out


def lead2(dialogue: str) -> str:
    turns = [t.split(":", 1)[-1].strip() for t in dialogue.splitlines() if t.strip()]
    return " ".join(turns[:2])


# --------------------------------------------------------------------------- runs


def run_name(method: str, rank: int | None, seed: int) -> str:
    return f"{method}-s{seed}" if rank is None else f"{method}-r{rank}-s{seed}"


def load_model(cfg: AccuracyConfig) -> torch.nn.Module:
    return load_local_model(cfg.model, torch_dtype(cfg.dtype))


def train(
    cfg: AccuracyConfig,
    method: str,
    rank: int,
    lr: float,
    seed: int,
    examples: list[Example],
    steps: int,
    work: Path,
    base: torch.nn.Module | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """One training run; resumes from a complete checkpoint in `work`, else starts afresh there. `base`: the
    model to adapt instead of the study's (a quantized one, `zflora quantized-accuracy --train-on-quantized`)."""
    resume = bool(complete_checkpoints(work))
    if not resume and work.exists():
        shutil.rmtree(work)  # leftovers of a run killed before its first complete checkpoint
    tc = TrainConfig(
        model=cfg.model,
        data=[Path("<accuracy>")],
        output=work,
        method=method,
        rank=rank,
        lr=lr,
        max_steps=steps,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        seed=seed,
        dtype=cfg.dtype,
        warmup_ratio=cfg.warmup_ratio,
        loraplus_lr_ratio=None if method == "fft" else cfg.loraplus_lr_ratio,
        targets=None if method == "fft" else cfg.targets,
        save_steps=max(10, steps // 3),
        logging_steps=10,
        progress=False,
        resume=resume,
    )
    model = load_model(cfg) if base is None else base
    return train_model(tc, examples=examples, model=model, tokenizer=load_tokenizer(cfg.model))


def one_run(
    cfg: AccuracyConfig, method: str, rank: int | None, seed: int, lr: float | None, category: str, work: Path
) -> dict[str, Any]:
    """Train (unless base) and evaluate one method on one category; skipped once finished."""
    name = run_name(method, rank, seed)
    out = cfg.output / "runs" / name / category
    if (done := verified(out)) is not None:
        return done
    (out / "result.json").unlink(missing_ok=True)  # a run whose items do not match it is run again
    shutil.rmtree(out / ADAPTER, ignore_errors=True)  # and the adapter it kept, if any
    tokenizer = load_tokenizer(cfg.model)
    steps = dict(zip(CATEGORIES, cfg.steps, strict=True))[category]
    seen, val = train_split(cfg, category, tokenizer, 0 if method == "base" else steps * cfg.batch_size)
    result: dict[str, Any] = {"method": method, "rank": rank, "seed": seed, "lr": lr, "category": category}
    if method == "base":
        model = load_model(cfg)
    else:
        train_method = "zflora" if method == "zflora-matched" else method  # `seen`: each record once
        model, log = train(cfg, train_method, rank or cfg.rank, lr, seed, seen, steps, work / name / category)
        result |= {
            "trainable_params": log["trainable_parameters"],
            "train_wall_s": log["wall_s"],
            "tokens_seen": log["tokens_seen"],
            "tokens_per_s": log["tokens_trained"] / log["wall_s"],  # a resumed run: its last process's steps
        }
        if log["resumed_step"]:
            result["resumed_at_step"] = log["resumed_step"]
        write_json(out / "train_log.json", log)
        if method != "fft":  # a full fine-tune is a model, not an adapter
            keep_adapter(model, out / ADAPTER)
    model = prepare_for_eval(model)  # as it is served: zFLoRA fused, LoRA merged
    started = time.perf_counter()
    result["heldout_loss"] = heldout_loss(model, tokenizer, val, cfg.max_length)
    rows = evaluate_category(cfg, model, tokenizer, category)
    write_text(out / "items.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    result |= {
        "eval_wall_s": time.perf_counter() - started,
        "items": len(rows),
        "items_sha256": sha256(out / "items.jsonl"),
        "environment": environment(torch.device("cpu"), cfg.dtype),
    }
    write_json(out / "result.json", result)  # written last: the run counts as finished
    return result


def keep_adapter(model: torch.nn.Module, path: Path) -> Path | None:
    """A trained adapter small enough to commit, saved at `path` as it was trained (before fusing or merging)."""
    if sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) > KEEP_ADAPTER_BYTES:
        return None
    return save_model(model, None, path)


def sweep(cfg: AccuracyConfig, method: str, rank: int, work: Path) -> dict[str, Any]:
    """Each learning rate for `sweep_steps` on the three categories' training data mixed, scored by the
    mean held-out loss over the categories (cached in the study). Always all three, whatever `--categories`
    a sitting runs: the sweep fixes the study's learning rate, and `categories` does not define a study.
    Each finished rate is a small file of its own until the sweep is done, so a new machine goes on from it."""
    rates = cfg.output / "sweeps" / f"{method}-r{rank}"
    done = rates.with_name(f"{rates.name}.json")
    if done.is_file():
        return json.loads(done.read_text())
    tokenizer = load_tokenizer(cfg.model)
    splits = {c: train_split(cfg, c, tokenizer, cfg.sweep_steps * cfg.batch_size) for c in CATEGORIES}
    mixed = [ex for c in CATEGORIES for ex in splits[c][0]]
    random.Random("sweep").shuffle(mixed)
    losses = {}
    for lr in cfg.lrs:
        if (rate := rates / f"{lr}.json").is_file():
            losses[str(lr)] = json.loads(rate.read_text())["heldout_loss"]
            continue
        model, _ = train(cfg, method, rank, lr, 0, mixed, cfg.sweep_steps, work / "sweeps" / f"{method}-r{rank}-{lr}")
        losses[str(lr)] = sum(heldout_loss(model, tokenizer, v[:32], cfg.max_length) for _, v in splits.values())
        losses[str(lr)] /= len(splits)
        write_json(rate, {"lr": lr, "heldout_loss": losses[str(lr)]})
    result = {
        "method": method,
        "rank": rank,
        "steps": cfg.sweep_steps,
        "heldout_loss": losses,
        "best_lr": float(min(losses, key=losses.get)),
    }
    write_json(done, result)
    shutil.rmtree(rates)  # the sweep's file holds every rate now
    return result


# --------------------------------------------------------------------------- the study


def open_study(cfg: AccuracyConfig) -> None:
    """Create the study's record, or check that this machine and these settings may continue it."""
    record, want = cfg.output / "study.json", settings(cfg)
    if record.is_file():
        have = recorded_settings(cfg.output)
        if have != want:
            if not cfg.new:
                diff = ", ".join(f"{k} {have.get(k)!r} -> {want.get(k)!r}" for k in want if have.get(k) != want[k])
                raise ValueError(
                    f"{cfg.output}: a study with other settings is here ({diff}); rerun with its "
                    "settings, use another --output, or pass --new to discard it"
                )
            for sub in ("runs", "sweeps"):
                shutil.rmtree(cfg.output / sub, ignore_errors=True)
            record.unlink()
    if want["dtype"] == "bf16" and not native_bf16():
        raise ValueError(
            f"{cfg.output}: this study runs in bf16, which this CPU does not run natively (no "
            "AVX-512 BF16 or AMX: emulated, ~60x slower); continue it on such a CPU, or start another "
            "study in fp32"
        )
    if not record.is_file():
        write_json(cfg.output / "baselines.json", baselines(cfg))
        write_json(
            record,
            {
                "settings": want,
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "environment": environment(torch.device("cpu"), cfg.dtype),
            },
        )


def plan(cfg: AccuracyConfig, ranks: dict[str, int | None]) -> list[tuple[str, int | None, int]]:
    """(method, rank, seed) of every run, the central comparison first: base, then lora and zflora over
    every seed, then the attention-only variants, zFLoRA at LoRA's parameter count and fft (`other_seeds`)."""
    runs: list[tuple[str, int | None, int]] = [("base", None, 0)] if "base" in cfg.methods else []
    runs += [(m, ranks[m], s) for s in range(cfg.seeds) for m in ("lora", "zflora") if m in cfg.methods]
    others = ("lora-mha", "zflora-mha", "zflora-matched", "fft")
    runs += [(m, ranks[m], s) for s in range(cfg.other_seeds) for m in others if m in cfg.methods]
    return runs


def work_dir(cfg: AccuracyConfig) -> Path:
    return cfg.work or home() / "accuracy" / cfg.output.resolve().name


def run(cfg: AccuracyConfig) -> dict[str, Any]:
    require_local(cfg.model)  # a name stays a name in the study's record: it resolves on every machine
    open_study(cfg)
    ranks: dict[str, int | None] = {m: cfg.rank for m in ADAPTER_METHODS}
    ranks |= {"base": None, "fft": None}
    if "zflora-matched" in cfg.methods:
        ranks["zflora-matched"] = matched_rank(require_local(cfg.model), "zflora", "lora", cfg.rank)
    runs, work = plan(cfg, ranks), work_dir(cfg)
    bar = tqdm(total=len(runs) * len(cfg.categories), disable=not cfg.progress, desc="zflora accuracy", unit="run")
    sweeps: dict[str, dict[str, Any]] = {}
    for method, rank, seed in runs:
        if method == "base":
            lr = None
        elif len(cfg.lrs) == 1:
            lr = cfg.lrs[0]  # one rate, given: nothing to sweep
        else:
            key = "zflora" if method == "zflora-matched" else method  # the sweep at r: one per method
            if key not in sweeps:
                bar.set_postfix_str(f"sweep {key}")
                sweeps[key] = sweep(cfg, key, cfg.rank, work)
            lr = sweeps[key]["best_lr"]
        for category in cfg.categories:
            bar.set_postfix_str(f"{run_name(method, rank, seed)} {category}")
            one_run(cfg, method, rank, seed, lr, category, work)
            bar.update(1)
            write_report(cfg)  # every finished run is reported at once
    bar.close()
    return write_report(cfg)


def write_report(cfg: AccuracyConfig) -> dict[str, Any]:
    out = collect(cfg.output, cfg.data)
    if cfg.report is not None:
        write_json(cfg.report.with_suffix(".json"), out)
        write_text(cfg.report.with_suffix(".md"), markdown(out))
        chart(out, cfg.report.with_suffix(".png"))
    return out


def main(cfg: AccuracyConfig) -> None:
    print(markdown(run(cfg)))
