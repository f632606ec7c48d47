"""How much a trained adapter changes each projection's output, per layer: zFLoRA against LoRA.

For every adapted input of a projection it measures, over the target tokens of a category's held-out
records (teacher-forced), the ratio ||adapter's part of the output|| / ||base output||:

    LoRA     q k v o gate up down:  ||s B A x|| / ||W x||
    zFLoRA   q k v gate up:         ||s B n_z|| / ||W n_h||   (o and down write z, never h)

and, for zFLoRA, the z stream beside the hidden state at each layer's input norm: rms(z) / rms(h),
which is what every B reads after the norm divides both by rms(h).

.venv/bin/python scripts/adapter_magnitude.py [--category math] [--gradients] [--drift] RUN_DIR [RUN_DIR ...]

--gradients adds the loss's gradient norm per adapter matrix (A_in, A, B) and layer: where the
training signal lands. --drift adds how far training moved each A matrix (and A_in) from its
initialisation, ||A - A_0|| / ||A_0||, for a study run's checkpoint: A_0 is drawn again from the
run's seed exactly as training drew it (seed set, then the method applied to the base).

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

from zflora.adapter_io import attach_adapter
from zflora.config import DEFAULT_RANK
from zflora.finetune.accuracy import heldout_batches, train_split
from zflora.finetune.config import AccuracyConfig
from zflora.hardware import describe_machine, environment
from zflora.methods import prepare_model
from zflora.models import load_local_model, load_tokenizer
from zflora.modules import ADAPTER_PREFIX, ZFLoRALinear, ZFLoRARMSNorm, linear


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


def load(model_name: str, run: str) -> torch.nn.Module:
    model = load_local_model(model_name)
    if not run.startswith("init:"):
        return attach_adapter(model, Path(run).expanduser())
    model = prepare_model(model, run.removeprefix("init:"), r=DEFAULT_RANK)
    torch.manual_seed(0)
    for pname, p in model.named_parameters():
        if p.requires_grad and ("zflora_B" in pname or "lora_B" in pname):  # B drawn like A, not zero
            torch.nn.init.kaiming_uniform_(p, a=5**0.5)
    return model


def heldout_batch(model_name: str, category: str, n: int) -> dict[str, torch.Tensor]:
    """The first `n` of the study's held-out records of `category`, as one batch."""
    cfg, tokenizer = AccuracyConfig(model=Path(model_name)), load_tokenizer(model_name)
    _, val = train_split(cfg, category, tokenizer, 0)
    return heldout_batches(tokenizer, val[:n], cfg.max_length, size=n)[0]


def measure(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[tuple[str, int], float]:
    rec = Recorder(batch["labels"] != -100)
    handles = attach_hooks(model, rec)
    with torch.no_grad():
        model.eval()(**batch)
    for h in handles:
        h.remove()
    return rec.ratios()


def gradient_norms(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[tuple[str, int], float]:
    """The loss's gradient norm per (adapter matrix kind, layer); the input expansion A_in is layer -1."""
    for name, p in model.named_parameters():
        p.requires_grad_(ADAPTER_PREFIX in name or "lora_" in name)
    model.train()(**batch).loss.backward()
    squares: dict[tuple[str, int], float] = defaultdict(float)
    for name, p in model.named_parameters():
        if p.grad is not None:
            kind = "A_in" if "A_in" in name else "A" if "_A" in name else "B"
            squares[kind, layer_of(name) if "layers." in name else -1] += float(p.grad.pow(2).sum())
    return {k: v**0.5 for k, v in squares.items()}


def drift(model: torch.nn.Module, model_name: str, run: str) -> dict[tuple[str, int], float]:
    """||A - A_0|| / ||A_0|| per (A kind, layer) of a study run's checkpoint; A_in is layer -1."""
    name = Path(run).parent.parent.name  # zflora-r16-s0
    method, rank, seed = name.rsplit("-", 2)
    method = "zflora" if method == "zflora-matched" else method
    base = load_local_model(model_name)
    torch.manual_seed(int(seed.removeprefix("s")))  # then the method: as train_model draws the initialisation
    init = dict(prepare_model(base, method, r=int(rank.removeprefix("r"))).named_parameters())
    moved: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for pname, p in model.named_parameters():
        if "_A" in pname and (ADAPTER_PREFIX in pname or "lora_" in pname):
            a0 = init[pname]
            key = ("A_in" if "A_in" in pname else "A", layer_of(pname) if "layers." in pname else -1)
            moved[key][0] += float((p.detach() - a0.detach()).pow(2).sum())
            moved[key][1] += float(a0.detach().pow(2).sum())
    return {k: (d / n) ** 0.5 for k, (d, n) in moved.items()}


def table(run: str, values: dict[tuple[str, int], float], layers: int, statistic=statistics.mean) -> None:
    """One row per key kind: the statistic over each third of the layers and over all of them."""
    size = -(-layers // 3)
    thirds = [range(i, min(i + size, layers)) for i in range(0, layers, size)]
    print("| run | | " + " | ".join(f"layers {t[0]}-{t[-1]}" for t in thirds) + " | all layers |")
    print("|---|---|" + "---|" * (len(thirds) + 1))
    for kind in dict.fromkeys(k for k, _ in values):
        if (kind, -1) in values:  # not in a layer
            print(f"| {label(run)} | {kind} | " + " | ".join("" for _ in thirds) + f" | {values[kind, -1]:.4f} |")
            continue
        cells = [statistic([values[kind, i] for i in t if (kind, i) in values]) for t in (*thirds, range(layers))]
        print(f"| {label(run)} | {kind} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
    print()


def norm(values: list[float]) -> float:
    return sum(v * v for v in values) ** 0.5


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
    ap.add_argument("--gradients", action="store_true", help="also the loss's gradient norm per matrix and layer")
    ap.add_argument("--drift", action="store_true", help="also ||A - A_0|| / ||A_0|| of a study run's A matrices")
    args = ap.parse_args()
    machine = describe_machine(environment(torch.device("cpu"), "fp32"))
    print(f"{machine}; {args.category}, {args.records} held-out records, target tokens only\n")
    batch = heldout_batch(args.model, args.category, args.records)
    for run in args.runs:
        model = load(args.model, run)
        layers = model.config.num_hidden_layers
        print("Adapter part / base output (mean over layers); z/h: rms(z) / rms(h) at each input norm\n")
        table(run, measure(model, batch), layers)
        if args.gradients:
            print("Gradient norm of the loss (over the layers: the norm of their norms)\n")
            table(run, gradient_norms(model, batch), layers, statistic=norm)
        if args.drift:
            print("How far each A moved from its initialisation: ||A - A_0|| / ||A_0|| (mean over layers)\n")
            table(run, drift(model, args.model, run), layers)


if __name__ == "__main__":
    main()
