"""`zflora train`: one training loop for every method, on Hugging Face `Trainer`.

`Trainer` brings what users expect: `accelerate launch` / `torchrun` spread it over
GPUs and nodes unchanged, bf16, gradient checkpointing, a progress bar, periodic
checkpoints with optimizer and RNG state, and an exact resume. On top of it:
zFLoRA checkpoints hold the adapter only (not the frozen base); a checkpoint counts
only once it is complete (a marker written last), so an interrupted save is never
resumed from; and a JSON log records the loss curve, time per step and the config.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import safe_globals

from ..adapter_io import CONFIG_NAME, adapter_kind, load_adapter, read_adapter, save_adapter
from ..files import write_json, write_text
from ..hardware import environment
from ..methods import count_trainable_parameters, prepare_model
from ..models import load_local_model, load_tokenizer, torch_dtype
from ..quantization import Quantization, simulate
from ..transform import adapter_parameters, is_zflora
from .config import TrainConfig
from .data import Example, load_examples, tokenize

COMPLETE = "zflora-checkpoint-complete"


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self.times.append(time.perf_counter() - self._start)


def loraplus_optimizer(
    model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], kwargs: dict[str, Any], ratio: float, decay: float
) -> torch.optim.Optimizer:
    """LoRA+ (Hayou et al., 2024): the `B` matrices learn at `ratio` times the learning rate in `kwargs`, the `A`
    matrices at it. LoRA: PEFT's `create_loraplus_optimizer`. zFLoRA: the same split, with `A_in` among the `A`s:
    they write the `z` stream that every later layer's `B`s read."""
    kwargs = dict(kwargs)
    lr = kwargs.pop("lr")
    if not is_zflora(model):
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(
            model, optimizer_cls, lr=lr, loraplus_lr_ratio=ratio, loraplus_weight_decay=decay, **kwargs
        )
    groups: dict[str, list[nn.Parameter]] = {"A": [], "B": []}
    for name, p in adapter_parameters(model).items():
        if p.requires_grad:
            groups["B" if name.rsplit(".", 1)[-1] == "zflora_B" else "A"].append(p)
    return optimizer_cls(
        [{"params": groups["A"], "lr": lr, "weight_decay": decay},
         {"params": groups["B"], "lr": lr * ratio, "weight_decay": decay}],
        lr=lr, **kwargs,
    )  # fmt: skip


class AdapterTrainer(Trainer):
    """`Trainer` whose zFLoRA checkpoints hold the adapter only, that marks complete checkpoints, and that trains
    with LoRA+ learning rates when given `loraplus_lr_ratio`."""

    def __init__(self, *args: Any, loraplus_lr_ratio: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loraplus_lr_ratio = loraplus_lr_ratio

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None and self.loraplus_lr_ratio is not None:
            target = self.model if model is None else model
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, target)
            self.optimizer = loraplus_optimizer(target, cls, kwargs, self.loraplus_lr_ratio, self.args.weight_decay)
        return super().create_optimizer(model)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if is_zflora(model):
            if self.args.should_save:
                save_adapter(model, output_dir or self.args.output_dir)
            return
        super()._save(output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = self.accelerator.unwrap_model(model or self.model)
        if is_zflora(target):
            load_adapter(target, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
            write_text(folder / COMPLETE, "complete\n")


def complete_checkpoints(output: Path) -> list[Path]:
    """The checkpoint-N under `output` that were written to the end, newest first."""
    done = [p for p in output.glob("checkpoint-*") if (p / COMPLETE).is_file() and p.name.split("-")[-1].isdigit()]
    return sorted(done, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def last_complete_checkpoint(output: Path) -> Path | None:
    return next(iter(complete_checkpoints(output)), None)


def checkpoint_problem(path: Path) -> str | None:
    """Why a complete checkpoint cannot be resumed from (a damaged file), or None if it can."""
    try:
        json.loads((path / "trainer_state.json").read_text())
        with safe_globals():  # the numpy types Trainer's RNG state holds, as Trainer loads it
            for state in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
                if (path / state).exists():
                    torch.load(path / state, map_location="cpu", weights_only=True)
        for weights in path.glob("*.safetensors"):
            with safe_open(weights, framework="pt") as f:
                names = f.keys()
                for name in names:
                    f.get_tensor(name)
        if (path / CONFIG_NAME).is_file() and adapter_kind(path) == "zflora":
            read_adapter(path)
    except Exception as e:  # any damage: unreadable JSON, a truncated pickle or tensor file, a bad adapter
        return f"{type(e).__name__}: {str(e)[:160]}"
    return None


def resume_point(output: Path) -> Path:
    """The newest complete checkpoint that is undamaged; a damaged newer one is named and skipped."""
    for path in complete_checkpoints(output):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        print(f"zflora train: {path.name} is damaged ({problem}); trying the previous checkpoint", file=sys.stderr)
    raise FileNotFoundError(f"{output}: no complete, undamaged checkpoint to resume from")


def check_extra(extra: dict[str, Any], ours: dict[str, Any]) -> None:
    """`--extra` may add TrainingArguments, not restate one of zflora's own flags or name an unknown one."""
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    if unknown := sorted(set(extra) - known):
        raise ValueError(
            f"extra: {', '.join(unknown)} {'is not a' if len(unknown) == 1 else 'are not'} TrainingArguments field(s)"
        )
    if clash := sorted(set(extra) & set(ours)):
        raise ValueError(
            f"extra: {', '.join(clash)} set by zflora train's own flags (or fixed by it); use the flag instead"
        )


def build_trainer(
    cfg: TrainConfig, model: nn.Module, tokenizer: Any, features: list[dict], callbacks: list[TrainerCallback]
) -> AdapterTrainer:
    save: dict[str, Any] = {"save_strategy": "epoch"}
    if cfg.save_steps:
        save = (
            {"save_strategy": "steps", "save_steps": cfg.save_steps} if cfg.save_steps > 0 else {"save_strategy": "no"}
        )
    ours = dict(
        output_dir=str(cfg.output),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type="linear",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_total_limit=cfg.save_total_limit,
        bf16=cfg.dtype == "bf16",  # weights and adapters in bf16, matmuls under bf16 autocast
        use_cpu=not torch.cuda.is_available(),  # Trainer's bf16 refuses a CPU unless told
        gradient_checkpointing=cfg.gradient_checkpointing,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        include_num_input_tokens_seen=True,  # tokens per second in the log
        disable_tqdm=not cfg.progress,
        remove_unused_columns=False,
        **save,
    )
    check_extra(cfg.extra, ours)
    args = TrainingArguments(**ours, **cfg.extra)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, pad_to_multiple_of=8)
    return AdapterTrainer(
        model=model, args=args, train_dataset=features, data_collator=collator, callbacks=callbacks,
        loraplus_lr_ratio=cfg.loraplus_lr_ratio,
    )  # fmt: skip


def load_base(cfg: TrainConfig) -> nn.Module:
    """The base to train on: the checkpoint in `cfg.dtype`, or with `quantized_base` the weights an int8 / int4
    deployment computes with (quantized from fp32, `zflora.quantization.simulate`), then cast to `cfg.dtype`."""
    if cfg.quantized_base is None:
        return load_local_model(cfg.model, torch_dtype(cfg.dtype))
    fp32 = load_local_model(cfg.model, torch.float32)
    return simulate(fp32, Quantization.named(cfg.quantized_base)).to(torch_dtype(cfg.dtype))


def train_model(
    cfg: TrainConfig,
    examples: list[Example] | None = None,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    callbacks: list[TrainerCallback] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train `cfg.method`; return the trained model and the run's log. Library entry point of `zflora train`."""
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    tokenizer.padding_side = "right"  # LLaMA takes positions from the order, not the mask, when training
    if examples is None:
        examples = [ex for path in cfg.data for ex in load_examples(path, cfg.limit)]
    tok = tokenize(examples, tokenizer, cfg.max_length)
    if not tok.features:
        raise ValueError(f"no trainable record left after truncation to max_length={cfg.max_length}")
    torch.manual_seed(cfg.seed)  # adapter initialisation (A matrices) depends on it
    model = model if model is not None else load_base(cfg)
    model = prepare_model(model, cfg.method, r=cfg.rank, alpha=cfg.alpha, targets=cfg.targets)
    if cfg.gradient_checkpointing and cfg.method != "fft":
        model.enable_input_require_grads()  # frozen embeddings: let checkpointed blocks see a grad path
    timer = StepTimer()
    trainer = build_trainer(cfg, model, tokenizer, tok.features, [timer, *(callbacks or [])])
    resume = resume_point(cfg.output) if cfg.resume else None
    resumed = json.loads((resume / "trainer_state.json").read_text()) if resume else {}
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    tokens_seen = int(trainer.state.num_input_tokens_seen or 0)
    log = {
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
        "environment": environment(next(model.parameters()).device, cfg.dtype),
        "data": {"records": len(examples), "trained": len(tok.features), "truncated": tok.truncated,
                 "dropped": tok.dropped},
        "trainable_parameters": count_trainable_parameters(model),
        "steps": trainer.state.global_step,
        "tokens_seen": tokens_seen,
        "resumed_from": str(resume) if resume else None,
        "resumed_step": resumed.get("global_step", 0),
        "tokens_trained": tokens_seen - int(resumed.get("num_input_tokens_seen") or 0),  # by this process, in wall_s
        "wall_s": time.perf_counter() - started,
        "step_time_s": timer.times,
        "loss": [  # grad_norm before clipping (max_grad_norm 1.0): how hard each logged step pulled
            {"step": h["step"], "loss": h["loss"]} | ({"grad_norm": h["grad_norm"]} if "grad_norm" in h else {})
            for h in trainer.state.log_history
            if "loss" in h
        ],
        "final_train_loss": next((h["train_loss"] for h in trainer.state.log_history if "train_loss" in h), None),
    }  # fmt: skip
    return model, log


def save_model(model: nn.Module, tokenizer: Any, path: Path) -> Path:
    """Into directory `path`: the adapter of a zflora or lora model, or a full model and its tokenizer (fft)."""
    if is_zflora(model):
        save_adapter(model, path)
    else:  # PEFT saves the adapter only; a full fine-tune saves the model and its tokenizer
        model.save_pretrained(path)
        if not hasattr(model, "peft_config"):
            tokenizer.save_pretrained(path)
    return path


def save_trained(model: nn.Module, tokenizer: Any, output: Path, log: dict[str, Any]) -> Path:
    """The run's result in `output/final` (`save_model`), plus `train_log.json`."""
    final = save_model(model, tokenizer, output / "final")
    write_json(output / "train_log.json", log)
    return final


def is_main_process() -> bool:
    """False on every process but the first of a distributed run (torchrun, accelerate launch)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def previous_run(output: Path) -> list[Path]:
    """What another run left in `output`: its result, log and checkpoints."""
    return sorted(p for p in [output / "final", output / "train_log.json", *output.glob("checkpoint-*")] if p.exists())


def claim_output(cfg: TrainConfig) -> None:
    """Refuse an output directory that holds another run, unless resuming it or told to overwrite it (then
    its result and checkpoints go first, so the new run neither resumes from nor rotates the old ones)."""
    found = previous_run(cfg.output)
    if cfg.resume and (cfg.output / "final").exists() and (cfg.output / "train_log.json").is_file():
        raise FileExistsError(f"{cfg.output}: the run there finished (final/ and train_log.json); nothing to resume. "
                              "Pass --overwrite to train it again, or another --output")  # fmt: skip
    if not found or cfg.resume:
        return
    if not cfg.overwrite:
        raise FileExistsError(
            f"{cfg.output}: holds another run ({', '.join(p.name for p in found[:3])}); "
            "pass --resume to continue it, --overwrite to replace it, or another --output"
        )
    for p in found:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train and save. In a distributed run every process trains; only the main one writes the result."""
    if is_main_process():
        claim_output(cfg)
    tokenizer = load_tokenizer(cfg.model)
    model, log = train_model(cfg, tokenizer=tokenizer)
    if is_main_process():
        log["output"] = str(save_trained(model, tokenizer, cfg.output, log))
    return log


def step_time_summary(times: list[float]) -> float:
    """Median seconds per step, skipping the first (warm-up) step when there are more."""
    body = times[1:] if len(times) > 1 else times
    return statistics.median_high(body) if body else float("nan")


def main(cfg: TrainConfig) -> None:
    log = run(cfg)
    if "output" not in log:  # not the main process of a distributed run
        return
    data, losses = log["data"], log["loss"]
    step_ms, loss = 1e3 * step_time_summary(log["step_time_s"]), losses[-1]["loss"] if losses else float("nan")
    print(f"trained {cfg.method} for {log['steps']} steps on {data['trained']} records "
          f"({data['truncated']} truncated to {cfg.max_length} tokens, {data['dropped']} dropped); "
          f"{log['trainable_parameters']:,} trainable parameters; {step_ms:.1f} ms/step; final loss {loss:.4f}\n"
          f"wrote {log['output']}")  # fmt: skip
