"""`zflora demo`: zFLoRA applied to a real local model, with the method's properties measured on it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import ADAPTER_METHODS, DEFAULT_RANK, STORIES260K, positive_int


@dataclass
class DemoConfig:
    """`zflora demo`: apply zFLoRA to a real local model and show its invariants."""

    model: Path = field(default=STORIES260K, metadata={"help": "local Hugging Face checkpoint directory"})
    rank: int = DEFAULT_RANK

    def __post_init__(self) -> None:
        positive_int("rank", self.rank)


def parameter_counts() -> None:
    import zflora
    from zflora.models import meta_model, preset_config

    print("Trainable parameters at the LLaMA-3.2-1B shape, r = 64 (all seven / attention projections):")
    for method in ADAPTER_METHODS:
        model = zflora.prepare_model(meta_model(preset_config("llama-3.2-1b")), method, r=64)
        print(f"  {method:<11} {zflora.count_trainable_parameters(model):>12,}")


def invariants(cfg: DemoConfig) -> None:
    """Exact at initialisation, and no extra operator per layer once fused."""
    import torch

    import zflora
    from zflora.models import load_local_model, load_tokenizer
    from zflora.transform import count_operators

    tok = load_tokenizer(cfg.model)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    model = load_local_model(cfg.model)
    with torch.no_grad():
        base_logits = model(ids).logits
    base_story = model.generate(ids, max_new_tokens=40, do_sample=False)
    base_ops = count_operators(model, ids)
    zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=cfg.rank))
    print(f"\n{cfg.model}: zFLoRA r={cfg.rank}, {zflora.count_trainable_parameters(model):,} trainable parameters")
    with torch.no_grad():
        exact = torch.equal(model(ids).logits, base_logits)
    print(f"  exact at initialisation (B = 0, fp32 logits bit-identical): {exact}")
    story = model.generate(ids, max_new_tokens=40, do_sample=False)
    zflora.fuse(model)
    fused_story = model.generate(ids, max_new_tokens=40, do_sample=False)
    extra = count_operators(model, ids) - base_ops
    print(f"  greedy story equals the base model's: unfused {torch.equal(story, base_story)}, "
          f"fused {torch.equal(fused_story, base_story)}")  # fmt: skip
    print(f"  {tok.decode(fused_story[0], skip_special_tokens=True)!r}")
    print(f"  fused forward vs base, extra compute operators per forward: {dict(extra)} "
          f"(the input expansion z0 = A_in h0; none per layer)")  # fmt: skip


def fused_error(cfg: DemoConfig) -> None:
    """Fused vs unfused with a random non-zero adapter, per dtype."""
    import torch

    import zflora
    from zflora.models import load_local_model, load_tokenizer, torch_dtype

    ids = load_tokenizer(cfg.model)("Once upon a time", return_tensors="pt").input_ids
    print("  fused vs unfused with a random non-zero adapter, max |logit diff| / max |logit|:")
    for name in ("fp32", "bf16", "fp16"):
        model = load_local_model(cfg.model, torch_dtype(name))
        zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=cfg.rank))
        zflora.set_adapter(model, zflora.random_adapter(model, seed=0, std=0.05))
        with torch.no_grad():
            unfused = model(ids).logits.float()
            fused = zflora.fuse(model)(ids).logits.float()
        print(f"    {name}: {((fused - unfused).abs().max() / unfused.abs().max()).item():.2e}")


def run(cfg: DemoConfig) -> None:
    parameter_counts()
    invariants(cfg)
    fused_error(cfg)
