"""The `zflora` command. Each subcommand is a short function over library calls."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DEFAULT_MODEL = Path("../shared/models/stories260K")


def demo(model_path: Path, rank: int) -> None:
    """Apply zFLoRA to a real model and show the method's properties on it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import zflora
    from zflora.shapes import meta_model, preset_config

    print("Trainable parameters at the LLaMA-3.2-1B shape, r = 64 (all seven / attention projections):")
    for method in ("lora", "lora-mha", "zflora", "zflora-mha"):
        model = zflora.prepare_model(meta_model(preset_config("llama-3.2-1b")), method, r=64, alpha=128)
        print(f"  {method:<11} {zflora.count_trainable_parameters(model):>12,}")

    if not (model_path / "config.json").is_file():
        sys.exit(f"zflora demo: no checkpoint at {model_path} (pass --model PATH to a local Hugging Face model)")
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits = model(ids).logits
    base_story = model.generate(ids, max_new_tokens=40, do_sample=False)
    zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=rank, alpha=2 * rank))
    print(f"\n{model_path}: zFLoRA r={rank}, {zflora.count_trainable_parameters(model):,} trainable parameters")
    with torch.no_grad():
        exact = torch.equal(model(ids).logits, base_logits)
    print(f"  exact at initialisation (B = 0, fp32 logits bit-identical): {exact}")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in zflora.adapter_parameters(model).values():
            p.normal_(std=0.05)
        unfused = model(ids).logits
        zflora.fuse(model)
        err = (model(ids).logits - unfused).abs().max().item()
    print(f"  fused = unfused with a random non-zero adapter: max |logit difference| = {err:.2e}")
    zflora.unfuse(model)
    with torch.no_grad():
        for name, p in zflora.adapter_parameters(model).items():
            if name.endswith("zflora_B"):
                p.zero_()
    zflora.fuse(model)
    story = model.generate(ids, max_new_tokens=40, do_sample=False)
    print(f"  fused model, B = 0, greedy story equals the base model's: {torch.equal(story, base_story)}")
    print(f"  {tok.decode(story[0], skip_special_tokens=True)!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="zflora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="apply zFLoRA to a real local model and show its invariants")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="local Hugging Face checkpoint directory")
    p.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.model, args.rank)


if __name__ == "__main__":
    main()
