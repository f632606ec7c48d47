"""What every engine's benchmark shares: building each method's model, running prefill and decode with a
KV cache, one measured round, and the label of a phase. Engines import this, never each other."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..adapter_io import set_adapter
from ..methods import prepare_model, random_adapter, randomize_lora
from ..models import cache_kwarg, load_local_model, preset_config, random_model
from ..transform import fuse
from .config import BenchConfig
from .harness import Timer
from .report import Key


def base_model(cfg: BenchConfig, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """The model a benchmark measures: the preset's shape with random weights, or the checkpoint `cfg.model`,
    cut to `cfg.layers` layers when asked."""
    if cfg.model is None:
        return random_model(preset_config(cfg.preset, cfg.layers), dtype, device, cfg.seed)
    model = load_local_model(cfg.model, dtype).to(device)
    if cfg.layers is not None:
        del model.model.layers[cfg.layers :]
        model.config.num_hidden_layers = len(model.model.layers)
    return model


def build_method(base: nn.Module, method: str, cfg: BenchConfig, keep_base: bool) -> nn.Module:
    """Derive `method`'s model from `base`: PEFT LoRA (random non-zero B), merged, or fused zFLoRA.

    With `keep_base` the base stays intact: unmerged LoRA shares its weights (PEFT leaves
    them unchanged), the others get their own copy. Without it, `base` itself is changed.
    """
    if method == "base":
        return inference_state(base)
    model = base
    if keep_base:
        shared = method in ("lora", "lora-mha")
        memo = {id(t): t for t in [*base.parameters(), *base.buffers()]} if shared else {}
        model = copy.deepcopy(base, memo)
    if method.startswith("lora"):
        model = prepare_model(model, "lora-mha" if method == "lora-mha" else "lora", r=cfg.rank, alpha=cfg.alpha)
        randomize_lora(model, cfg.seed + 1)
        if method == "lora-merged":
            model.merge_adapter()
    else:
        prepare_model(model, method, r=cfg.rank, alpha=cfg.alpha)
        set_adapter(model, random_adapter(model, cfg.seed + 1))
        fuse(model, pad_to=cfg.pad_to)
    return inference_state(model)


def inference_state(model: nn.Module) -> nn.Module:
    """Every method measured alike: eval mode, parameters as `from_pretrained` leaves them.

    Under `torch.no_grad` the requires_grad flag changes no arithmetic, but PyTorch's
    matmul uses it to pick a path: a *frozen* LM head fed HF's last-position slice
    (`logits_to_keep=1`) makes it copy the whole head weight (about 3 s of a 1B prefill
    on a CPU). PEFT freezes the base, so leaving flags as each method sets them would
    charge LoRA for that artifact. zFLoRA's own modules avoid it either way.
    """
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()


class Runner:
    """Prefill and decode of one model, with its own KV cache at the decode context."""

    def __init__(self, model: nn.Module, cfg: BenchConfig, device: torch.device) -> None:
        self.model, self.cfg = model, cfg
        self.cache_kwarg = cache_kwarg(model)
        self.extra: dict[str, Any] = {}  # more forward keywords (PEFT's adapter_names)
        g = torch.Generator().manual_seed(cfg.seed)
        longest = max(*cfg.prompt_lens, cfg.decode_context)
        self.ids = torch.randint(3, model.config.vocab_size, (cfg.batch, longest), generator=g).to(device)
        self.cache = self.new_cache()

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, cache: Any) -> None:
        self.model(input_ids=ids, **{self.cache_kwarg: cache}, use_cache=True, logits_to_keep=1, **self.extra)

    def prefill(self, length: int) -> None:
        self.forward(self.ids[:, :length], self.new_cache())

    def fill_context(self) -> None:
        self.cache = self.new_cache()
        self.forward(self.ids[:, : self.cfg.decode_context], self.cache)

    def decode_step(self) -> None:
        self.forward(self.ids[:, :1], self.cache)

    def rewind(self) -> None:
        extra = self.cache.get_seq_length() - self.cfg.decode_context
        if extra > 0:
            self.cache.crop(-extra)  # drop the tokens the last decode steps appended


def empty_samples(cfg: BenchConfig) -> dict[Key, list[float]]:
    keys = [("prefill", n, cfg.batch) for n in cfg.prompt_lens] + [("decode", cfg.decode_context, cfg.batch)]
    return {k: [] for k in keys}


def measure_round(runner: Any, timer: Timer, cfg: BenchConfig, out: dict[Key, list[float]]) -> None:
    """One repetition of one method: each prompt length once, then `decode_steps` decode steps. `runner` is a
    `Runner` or any engine's runner with `prefill(n)`, `rewind()` and `decode_step()`."""
    for n in cfg.prompt_lens:
        out["prefill", n, cfg.batch].append(timer(lambda n=n: runner.prefill(n)))
    runner.rewind()
    for _ in range(cfg.decode_steps):
        out["decode", cfg.decode_context, cfg.batch].append(timer(runner.decode_step))


def phase_label(r: dict) -> str:
    return f"prefill {r['tokens']}" if r["phase"] == "prefill" else f"decode @{r['tokens']}"
