"""The `zflora` command. Each subcommand is a short function over library calls."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DEFAULT_MODEL = Path("../shared/models/stories260K")


def demo(model_path: Path, rank: int) -> None:
    """Apply zFLoRA to a real model and measure the method's properties on it."""
    import zflora
    from zflora.config import alpha_for
    from zflora.models import load_local_model, load_tokenizer, meta_model, preset_config
    from zflora.transform import count_operators

    print("Trainable parameters at the LLaMA-3.2-1B shape, r = 64 (all seven / attention projections):")
    for method in ("lora", "lora-mha", "zflora", "zflora-mha"):
        model = zflora.prepare_model(meta_model(preset_config("llama-3.2-1b")), method, r=64, alpha=128)
        print(f"  {method:<11} {zflora.count_trainable_parameters(model):>12,}")

    tok = load_tokenizer(model_path)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    model = load_local_model(model_path)
    with torch.no_grad():
        base_logits = model(ids).logits
    base_story = model.generate(ids, max_new_tokens=40, do_sample=False)
    base_ops = count_operators(model, ids)
    zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=rank, alpha=alpha_for(rank)))
    print(f"\n{model_path}: zFLoRA r={rank}, {zflora.count_trainable_parameters(model):,} trainable parameters")
    with torch.no_grad():
        exact = torch.equal(model(ids).logits, base_logits)
    print(f"  exact at initialisation (B = 0, fp32 logits bit-identical): {exact}")
    story = model.generate(ids, max_new_tokens=40, do_sample=False)
    zflora.fuse(model)
    fused_story = model.generate(ids, max_new_tokens=40, do_sample=False)
    extra = count_operators(model, ids) - base_ops
    print(
        f"  greedy story equals the base model's: unfused {torch.equal(story, base_story)}, "
        f"fused {torch.equal(fused_story, base_story)}"
    )
    print(f"  {tok.decode(fused_story[0], skip_special_tokens=True)!r}")
    print(f"  fused forward vs base, extra compute operators per forward: {dict(extra)} "
          f"(the input expansion z0 = A_in h0; none per layer)")  # fmt: skip

    print("  fused vs unfused with a random non-zero adapter, max |logit diff| / max |logit|:")
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        model = load_local_model(model_path, dtype)
        zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=rank, alpha=alpha_for(rank)))
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in zflora.adapter_parameters(model).values():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            unfused = model(ids).logits.float()
            fused = zflora.fuse(model)(ids).logits.float()
        print(f"    {name}: {((fused - unfused).abs().max() / unfused.abs().max()).item():.2e}")


def bench(args: argparse.Namespace) -> None:
    """The latency study; prints a Markdown table, writes JSON and a PNG chart when asked."""
    from zflora.bench import BenchConfig, run, write_outputs

    cfg = BenchConfig(
        preset=args.preset, model=args.model, layers=args.layers, rank=args.rank, dtype=args.dtype,
        batch=args.batch, prompt_lens=tuple(args.prompt_lens), decode_context=args.decode_context,
        decode_steps=args.decode_steps, repeats=args.repeats, warmup=args.warmup, methods=tuple(args.methods),
        proj_tokens=tuple(args.proj_tokens), proj_ranks=tuple(args.proj_ranks), proj_repeats=args.proj_repeats,
        skip_projection=args.skip_projection, device=args.device, threads=args.threads, json_path=args.json,
        chart_path=args.chart, markdown_path=args.markdown, progress=not args.no_progress,
    )  # fmt: skip
    print(write_outputs(run(cfg), cfg))


def train(args: argparse.Namespace) -> None:
    """Fine-tune with one method; writes the adapter (or model) to OUTPUT/final and OUTPUT/train_log.json."""
    from zflora import train as training

    cfg = training.TrainConfig(
        model=args.model, data=args.data, output=args.output, method=args.method, rank=args.rank, alpha=args.alpha,
        lr=args.lr, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, max_length=args.max_length, dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing, save_steps=args.save_steps, seed=args.seed,
        limit=args.limit, resume=args.resume, progress=not args.no_progress,
    )  # fmt: skip
    log = training.run(cfg)
    data = log["data"]
    print(f"trained {cfg.method} for {log['steps']} steps on {data['trained']} records "
          f"({data['truncated']} truncated to {cfg.max_length} tokens, {data['dropped']} dropped); "
          f"{log['trainable_parameters']:,} trainable parameters; "
          f"{1e3 * training.step_time_summary(log['step_time_s']):.1f} ms/step; final loss "
          f"{log['loss'][-1]['loss'] if log['loss'] else float('nan'):.4f}\nwrote {log['output']}")  # fmt: skip


def evaluate(args: argparse.Namespace) -> None:
    """Generate and score (or score saved responses); prints a per-task table."""
    from zflora import evaluate as ev

    if args.responses is None and not args.data:
        raise ValueError("data: give one or more --data files (or --responses FILE)")
    results = ev.run(
        args.model, args.data or [], adapter=args.adapter, responses=args.responses, output=args.output,
        limit=args.limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
    )  # fmt: skip
    print(ev.table(results))


def study(args: argparse.Namespace) -> None:
    """The miniature accuracy study on stories260K."""
    from zflora import study as st

    cfg = st.StudyConfig(
        model=args.model, rank=args.rank, seeds=args.seeds, steps=args.steps, output=args.output,
        progress=not args.no_progress,
    )  # fmt: skip
    print(st.markdown(st.run(cfg)))


def serve(args: argparse.Namespace) -> None:
    """Start vLLM's OpenAI-compatible server on the base checkpoint with the zFLoRA adapter fused in."""
    from zflora.serve import serve as run_server

    sys.exit(run_server(str(args.model), None if args.adapter is None else str(args.adapter), args.vllm_args,
                        dry_run=args.dry_run))  # fmt: skip


def serve_bench(args: argparse.Namespace) -> None:
    """Serving latency in vLLM: base vs vLLM LoRA vs the zFLoRA plugin."""
    from zflora.vllm_bench import ServeBenchConfig, run, write_outputs

    cfg = ServeBenchConfig(
        preset=args.preset, model=args.model, layers=args.layers, rank=args.rank, targets=args.targets,
        dtype=args.dtype, prompt_lens=tuple(args.prompt_lens), decode_tokens=args.decode_tokens,
        batch_sizes=tuple(args.batch_sizes), batch_tokens=args.batch_tokens, repeats=args.repeats,
        warmup=args.warmup, methods=tuple(args.methods), enforce_eager=args.enforce_eager, workdir=args.workdir,
        json_path=args.json, chart_path=args.chart, markdown_path=args.markdown, progress=not args.no_progress,
    )  # fmt: skip
    print(write_outputs(run(cfg), cfg))


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _strs(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="zflora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="apply zFLoRA to a real local model and show its invariants")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="local Hugging Face checkpoint directory")
    p.add_argument("--rank", type=int, default=16)

    from zflora.bench import DTYPES, BenchConfig
    from zflora.models import PRESETS

    d = BenchConfig()  # one source of defaults
    join = ",".join
    p = sub.add_parser("bench", help="latency: base vs LoRA vs zFLoRA, one projection and end to end")
    p.add_argument("--preset", default=d.preset, choices=list(PRESETS), help="real model shape, random weights")
    p.add_argument("--model", type=Path, default=None, help="a local checkpoint instead of a preset")
    p.add_argument("--layers", type=int, default=None, help="cut the depth to N layers (recorded in the output)")
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--dtype", default=d.dtype, choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument(
        "--prompt-lens",
        type=_ints,
        default=d.prompt_lens,
        help=f"prefill lengths (default {join(map(str, d.prompt_lens))})",
    )
    p.add_argument("--decode-context", type=int, default=d.decode_context)
    p.add_argument("--decode-steps", type=int, default=d.decode_steps, help="timed decode steps per repetition")
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed repetitions first")
    p.add_argument("--methods", type=_strs, default=d.methods, help=join(d.methods))
    p.add_argument("--proj-tokens", type=_ints, default=d.proj_tokens)
    p.add_argument("--proj-ranks", type=_ints, default=d.proj_ranks)
    p.add_argument("--proj-repeats", type=int, default=d.proj_repeats)
    p.add_argument("--skip-projection", action="store_true", help="end to end only")
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--json", type=Path, default=None, help="write every raw sample and the environment here")
    p.add_argument("--chart", type=Path, default=None, help="write a PNG chart here")
    p.add_argument("--markdown", type=Path, default=None, help="write the tables here too")
    p.add_argument("--no-progress", action="store_true")

    from zflora.methods import METHODS

    p = sub.add_parser("train", help="fine-tune with zflora, zflora-mha, lora, lora-mha or fft (HF Trainer)")
    p.add_argument("--model", type=Path, required=True, help="local Hugging Face checkpoint directory")
    p.add_argument("--data", type=Path, nargs="+", required=True, help="LLM-Adapters .json / DialogSum .jsonl files")
    p.add_argument("--output", type=Path, required=True, help="run directory (checkpoints, final/, train_log.json)")
    p.add_argument("--method", default="zflora", choices=[m for m in METHODS if m != "base"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None, help="default 2 * rank")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when > 0")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=512, help="tokens; longer records are truncated (and counted)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: each epoch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use the first N records of each file")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --output")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("eval", help="generate and score on task files, or score saved responses")
    p.add_argument("--model", type=Path, default=None, help="local checkpoint directory (base, or fft output)")
    p.add_argument("--adapter", type=Path, default=None, help="a zFLoRA or PEFT LoRA adapter directory")
    p.add_argument("--data", type=Path, nargs="*", default=[], help="task files; the task is named after each")
    p.add_argument("--responses", type=Path, default=None, help="score this responses JSONL; no model needed")
    p.add_argument("--output", type=Path, default=None, help="results JSON (+ .md table, + .responses.jsonl)")
    p.add_argument("--limit", type=int, default=None, help="first N records of each task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default by kind: 32 label, 96 number, 64 summary")

    from zflora.study import StudyConfig

    sd = StudyConfig()
    p = sub.add_parser("study", help="the miniature accuracy study on stories260K (all methods, several seeds)")
    p.add_argument("--model", type=Path, default=sd.model)
    p.add_argument("--rank", type=int, default=sd.rank)
    p.add_argument("--seeds", type=int, default=sd.seeds)
    p.add_argument("--steps", type=int, default=sd.steps)
    p.add_argument("--output", type=Path, default=None, help="write study.json and study.md here")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser(
        "serve",
        help="vLLM OpenAI-compatible server for a base checkpoint + zFLoRA adapter (needs vLLM)",
        description="Arguments after the options (or after --) are passed to vLLM's api_server, e.g. --port 8000.",
    )
    p.add_argument("--model", type=Path, required=True, help="the base model's local checkpoint directory")
    p.add_argument("--adapter", type=Path, default=None, help="zFLoRA adapter directory (none: serve the base)")
    p.add_argument("--dry-run", action="store_true", help="check the adapter and print the vLLM command only")

    from zflora.vllm_bench import ServeBenchConfig

    vd = ServeBenchConfig()
    p = sub.add_parser("serve-bench", help="serving latency in vLLM: base vs vLLM LoRA vs zFLoRA (needs vLLM)")
    p.add_argument("--preset", default=vd.preset, choices=list(PRESETS), help="real model shape, random weights")
    p.add_argument("--model", type=Path, default=None, help="a local checkpoint instead of a preset")
    p.add_argument("--layers", type=int, default=None, help="cut the depth to N layers (recorded in the output)")
    p.add_argument("--rank", type=int, default=vd.rank)
    p.add_argument("--targets", default=vd.targets, choices=["all", "mha"], help="projections, same for both")
    p.add_argument("--dtype", default=vd.dtype, choices=list(DTYPES))
    p.add_argument("--prompt-lens", type=_ints, default=vd.prompt_lens, help="time-to-first-token prompt lengths")
    p.add_argument("--decode-tokens", type=int, default=vd.decode_tokens, help="timed decode tokens per request")
    p.add_argument("--batch-sizes", type=_ints, default=vd.batch_sizes, help="throughput batch sizes")
    p.add_argument("--batch-tokens", type=int, default=vd.batch_tokens, help="new tokens per request in batches")
    p.add_argument("--repeats", type=int, default=vd.repeats)
    p.add_argument("--warmup", type=int, default=vd.warmup, help="untimed rounds first")
    p.add_argument("--methods", type=_strs, default=vd.methods, help=join(vd.methods))
    p.add_argument("--enforce-eager", action="store_true", help="no torch.compile / CUDA graphs (all methods)")
    p.add_argument("--workdir", type=Path, default=None, help="where to write the checkpoint and adapters")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--chart", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--no-progress", action="store_true")

    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.vllm_args = [a for a in extra if a != "--"]
    commands = {"demo": lambda: demo(args.model, args.rank), "bench": lambda: bench(args), "train": lambda: train(args),
                "eval": lambda: evaluate(args), "study": lambda: study(args), "serve": lambda: serve(args),
                "serve-bench": lambda: serve_bench(args)}  # fmt: skip
    try:
        commands[args.command]()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"zflora {args.command}: {e}")


if __name__ == "__main__":
    main()
