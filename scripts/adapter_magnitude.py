"""How much a trained adapter changes each projection's output, per layer: zFLoRA against LoRA.

For every adapted input of a projection it measures, over the target tokens of a category's held-out
records (teacher-forced), the ratio ||adapter's part of the output|| / ||base output||:

    LoRA     q k v o gate up down:  ||s B A x|| / ||W x||
    zFLoRA   q k v gate up:         ||s B n_z|| / ||W n_h||   (o and down write z, never h)

and, for zFLoRA, the z stream beside the hidden state at each layer's input norm: rms(z) / rms(h),
which is what every B reads after the norm divides both by rms(h).

.venv/bin/python scripts/adapter_magnitude.py --category math RUN_DIR [RUN_DIR ...]

RUN_DIR: an adapter directory (zFLoRA or PEFT), e.g. a study run's last checkpoint
(~/.cache/zflora/accuracy/accuracy-smollm2-135m/zflora-r16-s0/math/checkpoint-100). "init:zflora" or
"init:lora" measures a freshly initialised adapter whose B is drawn like A (its untrained scale).
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections import defaultdict
from pathlib import Path

import torch
from transformers import DataCollatorForSeq2Seq

from zflora.adapter_io import attach_adapter
from zflora.finetune.accuracy import train_split
from zflora.finetune.config import AccuracyConfig
from zflora.finetune.data import tokenize
from zflora.hardware import describe_machine, environment
from zflora.methods import prepare_model
from zflora.models import load_local_model, load_tokenizer
from zflora.modules import ZFLoRALinear, ZFLoRARMSNorm, linear


def layer_of(name: str) -> int:
    return int(name.split("layers.")[1].split(".")[0])


class Recorder:
    """Sums of squared norms over target tokens, per (projection, layer)."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask  # (B, T) target positions
        self.num: dict[tuple[str, int], float] = defaultdict(float)
        self.den: dict[tuple[str, int], float] = defaultdict(float)

    def add(self, key: tuple[str, int], delta: torch.Tensor, base: torch.Tensor) -> None:
        m = self.mask[..., None].to(delta.dtype)
        self.num[key] += float(((delta * m) ** 2).sum())
        self.den[key] += float(((base * m) ** 2).sum())

    def ratios(self) -> dict[tuple[str, int], float]:
        return {k: (self.num[k] / self.den[k]) ** 0.5 for k in self.num if self.den[k] > 0}


def zflora_projection(rec: Recorder, key: tuple[str, int], m: ZFLoRALinear, args: tuple, out: torch.Tensor) -> None:
    base = linear(args[0].narrow(-1, 0, m.in_features), m.weight, m.bias)  # W n_h
    rec.add(key, out - base, base)


def stream(rec: Recorder, key: tuple[str, int], m: ZFLoRARMSNorm, args: tuple) -> None:
    x = args[0]
    rec.add(key, x[..., m.d :], x[..., : m.d] * (m.r / m.d) ** 0.5)  # an RMS ratio, not a norm ratio


def lora_projection(rec: Recorder, key: tuple[str, int], m: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
    base = m.base_layer(args[0])  # W x
    rec.add(key, out - base, base)


def attach_hooks(model: torch.nn.Module, rec: Recorder) -> list:
    """Forward hooks on every adapted projection (and zFLoRA's input norms) of a zFLoRA or PEFT model."""
    from peft.tuners.lora import Linear as LoraLinear

    handles = []
    for name, mod in model.named_modules():
        key = (name.rsplit(".", 1)[-1].removesuffix("_proj"), layer_of(name) if "layers." in name else -1)
        if isinstance(mod, ZFLoRALinear) and mod.kind == "in" and mod.zflora_B is not None:
            handles.append(mod.register_forward_hook(functools.partial(zflora_projection, rec, key)))
        elif isinstance(mod, ZFLoRARMSNorm) and key[0] == "input_layernorm":
            handles.append(mod.register_forward_pre_hook(functools.partial(stream, rec, ("z/h", key[1]))))
        elif isinstance(mod, LoraLinear):
            handles.append(mod.register_forward_hook(functools.partial(lora_projection, rec, key)))
    return handles


def measure(model_name: str, run: str, category: str, n: int) -> dict[tuple[str, int], float]:
    model, tokenizer = load_local_model(model_name), load_tokenizer(model_name)
    if run.startswith("init:"):
        model = prepare_model(model, run.removeprefix("init:"), r=16)
        torch.manual_seed(0)
        for pname, p in model.named_parameters():
            if p.requires_grad and ("zflora_B" in pname or "lora_B" in pname):  # B drawn like A, not zero
                torch.nn.init.kaiming_uniform_(p, a=5**0.5)
    else:
        model = attach_adapter(model, Path(run).expanduser())
    _, val = train_split(AccuracyConfig(model=Path(model_name)), category, tokenizer, 0)
    tokenizer.padding_side = "right"
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)(
        tokenize(val[:n], tokenizer, 768).features
    )
    rec = Recorder(batch["labels"] != -100)
    handles = attach_hooks(model, rec)
    with torch.no_grad():
        model.eval()(**batch)
    for h in handles:
        h.remove()
    return rec.ratios()


def label(run: str) -> str:
    """A study checkpoint by its run's name (zflora-r16-s0), anything else as given."""
    path = Path(run)
    return path.parent.parent.name if path.name.startswith("checkpoint-") else run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--category", default="math", choices=("commonsense", "math", "summary"))
    ap.add_argument("--records", type=int, default=16, help="held-out records to run (teacher-forced)")
    args = ap.parse_args()
    machine = describe_machine(environment(torch.device("cpu"), "fp32"))
    print(f"{machine}; {args.category}, {args.records} held-out records, target tokens only\n")
    for run in args.runs:
        ratios = measure(args.model, run, args.category, args.records)
        layers = 1 + max(layer for _, layer in ratios)
        thirds = [range(i, min(i + -(-layers // 3), layers)) for i in range(0, layers, -(-layers // 3))]
        print("| run | projection | " + " | ".join(f"layers {t[0]}-{t[-1]}" for t in thirds) + " | all layers |")
        print("|---|---|" + "---|" * (len(thirds) + 1))
        for proj in dict.fromkeys(p for p, _ in ratios):
            cells = [
                statistics.mean(ratios[proj, i] for i in t if (proj, i) in ratios) for t in (*thirds, range(layers))
            ]
            print(f"| {label(run)} | {proj} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
        print()


if __name__ == "__main__":
    main()
