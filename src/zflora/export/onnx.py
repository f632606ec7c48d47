"""ONNX export of a fused zFLoRA model (or the base, or an unmerged PEFT LoRA), for ONNX Runtime.

The graph follows the decoder conventions of ONNX Runtime tooling (optimum,
onnxruntime-genai): inputs `input_ids`, `attention_mask`, `position_ids`,
`past_key_values.N.key` / `.value`; outputs `logits`, `present.N.key` / `.value`;
dynamic batch, sequence and past axes (a past of length 0 is the prefill).

    OUT/model.onnx           the graph (torch.onnx, dynamo exporter)
    OUT/model.onnx.data      the base weights (external data)
    OUT/adapter.onnx.data    zFLoRA only: the adapter blocks (quantized: their packed weights and scales)
    OUT/zflora_onnx.json     what the graph is: names, shapes, the adapter's config, base identity,
                             each adapter initializer's source tensor, and the adapter file's sha256

Each fused projection is exported as its base weight and its adapter block, two
initializers joined by a Concat node; ONNX Runtime folds that into one constant
weight when the session is created, so the session runs one matmul per
projection, exactly as the fused model does. The adapter's bytes stay in their
own file: `swap` rewrites that file only (atomically), or `session(..., adapter=DIR)`
supplies another adapter's blocks at session creation without touching a file.
With a quantization (`quantize.py`), each projection is one `MatMulNBits` instead, its base and adapter
blocks quantized apart and joined the same way, so the same swap rewrites quantized adapter bytes only.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..adapter_io import AdapterError, base_identity, check_fits, check_same_base, read_adapter
from ..files import apply_umask, atomic_write, read_json_object, remove_stale, write_json
from ..fusion import Kind, adapter_block, adapter_tensor, base_block, block_of
from ..models import cache_kwarg, head_dim, meta_model
from ..modules import FusedLinear, ZFLoRALinear
from ..quantization import Quantization, adapter_parts
from ..transform import apply_zflora, fuse, fused_padding, is_zflora
from .quantize import quantize_graph

MANIFEST = "zflora_onnx.json"
GRAPH, WEIGHTS, ADAPTER = "model.onnx", "model.onnx.data", "adapter.onnx.data"
OPSET = 18


class SplitLinear(nn.Module):
    """Export form of a fused projection: weight W and block `zflora_block` (s B or A) joined in the graph."""

    def __init__(self, weight: torch.Tensor, block: torch.Tensor, kind: Kind, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.zflora_block = nn.Parameter(block.detach().clone(), requires_grad=False)
        self.bias = bias
        self.dim = 1 if kind == "in" else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, torch.cat([self.weight, self.zflora_block], self.dim), self.bias)


def split_adapter_blocks(model: nn.Module) -> dict[str, str]:
    """Replace every fused projection (and an adapted LM head) by a SplitLinear, in place. Returns, for each
    block's parameter name, the adapter tensor it is made from."""
    sources: dict[str, str] = {}
    for name, m in list(model.named_modules()):
        if not isinstance(m, FusedLinear | ZFLoRALinear) or m.adapter_matrix is None:
            continue
        kind, r = m.kind, m.r
        if isinstance(m, FusedLinear):
            w = m.weight.detach()
            base, block = base_block(kind, w, r), block_of(kind, w, r)
        else:  # the LM head with lm_head=True: unfused in the model, [W | s B] in the graph
            base, block = m.weight, adapter_block(kind, m.weight, m.adapter_matrix, m.scaling, r)
        parent, _, attr = name.rpartition(".")  # the bias stays as fused: [b ; 0] for an output projection
        setattr(model.get_submodule(parent), attr, SplitLinear(base, block, kind, m.bias))
        sources[f"{name}.zflora_block"] = f"{name}.{adapter_tensor(kind)}"
    if is_zflora(model) and model.zflora_config.expand_input:
        sources["model.embed_tokens.zflora_A_in"] = "model.embed_tokens.zflora_A_in"
    return sources


class Decoder(nn.Module):
    """A causal LM behind the ONNX decoder signature: flat past tensors in, logits and flat presents out."""

    def __init__(self, model: nn.Module, logits_to_keep: int = 0) -> None:
        super().__init__()
        self.model, self.logits_to_keep = model, logits_to_keep  # 0: every position; 1: the last one
        self.layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):  # noqa: ANN001, ANN201 - traced
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=self.logits_to_keep,
                         **{cache_kwarg(self.model): cache})  # fmt: skip
        return (out.logits, *(t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)))


def io_names(layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def _export_graph(model: nn.Module, path: Path, last_logits: bool) -> None:
    from torch.export import Dim

    cfg = model.config
    layers, kv, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim(cfg)
    batch, seq, past_len, total = Dim("batch"), Dim("sequence"), Dim("past_sequence"), Dim("total_sequence")
    b, s, p = 2, 3, 4  # example sizes above 1, so that no axis is specialised
    ids = torch.zeros(b, s, dtype=torch.long)
    mask = torch.ones(b, p + s, dtype=torch.long)
    pos = torch.arange(p, p + s).expand(b, s)
    dtype = next(model.parameters()).dtype
    past = tuple(torch.zeros(b, kv, p, hd, dtype=dtype) for _ in range(2 * layers))
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
               "position_ids": {0: batch, 1: seq}, "past": tuple({0: batch, 2: past_len} for _ in past)}  # fmt: skip
    inputs, outputs = io_names(layers)
    with torch.no_grad():
        program = torch.onnx.export(Decoder(model, int(last_logits)).eval(), (ids, mask, pos, *past), dynamo=True,
                                    optimize=False, dynamic_shapes=dynamic, input_names=inputs,
                                    output_names=outputs, opset_version=OPSET, verbose=False)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=True)


def _relocate(proto: Any, out: Path, adapter_names: set[str], quantization: Quantization | None
              ) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Write graph `proto` (loaded with its data) to `out`, the adapter initializers in ADAPTER and the
    rest in WEIGHTS; with `quantization`, its projection weights quantized first (base and adapter apart).
    Returns the adapter initializers' layout: parameter, shape (and, quantized, part and kind)."""
    import onnx
    from onnx.external_data_helper import set_external_data, write_external_data_tensors

    quantized = quantize_graph(proto, adapter_names, quantization) if quantization else {}
    layout = {}
    for t in proto.graph.initializer:
        name = t.name.removeprefix("model.")  # the Decoder wrapper's attribute
        adapter = name in adapter_names or t.name in quantized
        set_external_data(t, location=ADAPTER if adapter else WEIGHTS)
        if adapter:
            layout[t.name] = quantized.get(t.name, {"parameter": name}) | {"shape": list(t.dims)}
    found = {v["parameter"] for v in layout.values()}
    if missing := sorted(adapter_names - found):
        raise RuntimeError(f"adapter tensors missing from the exported graph: {missing[:3]}")
    write_external_data_tensors(proto, str(out))  # appends each tensor to its file, records offset and length
    onnx.save_model(proto, str(out / GRAPH))
    return layout


def _check_output(output: str | os.PathLike) -> Path:
    out = Path(output)
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not a zflora ONNX export; choose an empty or new directory")
    return out


@contextlib.contextmanager
def _building(output: str | os.PathLike) -> Iterator[Path]:
    """A directory built beside `output` and renamed into place at the end: a failed build leaves nothing."""
    out = _check_output(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(p for p in out.parent.glob(f".{out.name}.*") if p.is_dir())  # of exports that were killed
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield work
        apply_umask(work)  # mkdtemp's directory is private; an export is readable like any other files
        _replace_dir(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_quantizable(quantization: Quantization, dtype: str, hidden_size: int, adapted: bool) -> None:
    if dtype != "float32":
        raise ValueError(f"quantization needs an fp32 model to quantize from; this one is {dtype}")
    if adapted and hidden_size % quantization.block_size:
        raise ValueError(f"block_size: {quantization.block_size} does not divide the hidden size {hidden_size}, "
                         f"so s B's columns would share blocks with W's; choose one that does")  # fmt: skip


def _adapter_manifest(layout: dict[str, dict[str, Any]], sources: dict[str, str], config: dict[str, Any],
                      source: str, work: Path) -> dict[str, Any]:  # fmt: skip
    for entry in layout.values():
        entry["source"] = sources[entry["parameter"]]
    return {"config": config, "initializers": layout, "source": source, "sha256": _sha256(work / ADAPTER)}


def export(
    model: nn.Module,
    output: str | os.PathLike,
    method: str | None = None,
    source: str = "",
    last_logits: bool = False,
    quantization: Quantization | None = None,
) -> Path:
    """Export `model` (base, PEFT LoRA unmerged, or zFLoRA in either form) to directory `output`.

    `quantization`: every projection weight as an int8 or int4 `MatMulNBits` weight (`quantize.py`), a
    zFLoRA adapter's blocks quantized on their own and kept in ADAPTER (an fp32 model only).

    `logits` has every position, as optimum's decoders do; `last_logits` keeps the last only
    (what generation reads; the LM head then runs on one position, as `logits_to_keep=1`).
    The directory is built beside `output` and renamed into place: a failed export leaves nothing.
    A zFLoRA model is fused first (in place).
    """
    import onnx

    _check_output(output)
    zf, dtype = is_zflora(model), str(next(model.parameters()).dtype).removeprefix("torch.")
    if quantization is not None:
        _check_quantizable(quantization, dtype, model.config.hidden_size, zf)
    if zf and fused_padding(model):
        raise ValueError(
            "a padded fused model (fuse(model, pad_to=...)) cannot be exported: its adapter blocks "
            "carry zero padding; unfuse it first (the export fuses it unpadded)"
        )
    identity, export_model, adapter_info = base_identity(model), model, None
    if zf:
        fuse(model)
        export_model = copy.deepcopy(model)
        adapter_info = {"config": model.zflora_config.to_dict(), "sources": split_adapter_blocks(export_model)}
    method = method or ("zflora" if zf else "lora" if hasattr(model, "peft_config") else "base")
    with _building(output) as work:
        _export_graph(export_model, work / "raw" / GRAPH, last_logits)
        proto = onnx.load(str(work / "raw" / GRAPH), load_external_data=True)
        layout = _relocate(proto, work, set(adapter_info["sources"]) if adapter_info else set(), quantization)
        shutil.rmtree(work / "raw")
        cfg = model.config
        manifest = {"format": 1, "method": method, "opset": OPSET, "base_model": identity,
                    "num_layers": cfg.num_hidden_layers, "num_key_value_heads": cfg.num_key_value_heads,
                    "head_dim": head_dim(cfg), "vocab_size": cfg.vocab_size, "logits": "last" if last_logits else "all",
                    "dtype": dtype, "inputs": io_names(cfg.num_hidden_layers)[0],
                    "outputs": io_names(cfg.num_hidden_layers)[1], "config": cfg.to_dict()}  # fmt: skip
        if quantization:
            manifest["quantization"] = quantization.to_dict()
        if adapter_info:
            manifest["adapter"] = _adapter_manifest(layout, adapter_info["sources"], adapter_info["config"], source,
                                                    work)  # fmt: skip
        write_json(work / MANIFEST, manifest, indent=2)
    return Path(output)


def quantize_export(source: str | os.PathLike, output: str | os.PathLike, quantization: Quantization) -> Path:
    """An fp32 export at `source` quantized into a new export at `output` (`source` is left as it is): what
    `export(..., quantization=...)` gives, without exporting the model again."""
    import onnx

    _check_output(output)
    manifest = read_manifest(source)
    if "quantization" in manifest:
        raise ValueError(f"{source}: already quantized ({manifest['quantization']['name']}); quantize an fp32 export")
    info = manifest.get("adapter")
    _check_quantizable(quantization, manifest["dtype"], manifest["config"]["hidden_size"], info is not None)
    sources = {e["parameter"]: e["source"] for e in info["initializers"].values()} if info else {}
    with _building(output) as work:
        proto = onnx.load(str(Path(source) / GRAPH), load_external_data=True)
        layout = _relocate(proto, work, set(sources), quantization)
        manifest["quantization"] = quantization.to_dict()
        if info:
            manifest["adapter"] = _adapter_manifest(layout, sources, info["config"], info["source"], work)
        write_json(work / MANIFEST, manifest, indent=2)
    return Path(output)


def _replace_dir(new: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(output: str | os.PathLike) -> dict[str, Any]:
    path = Path(output) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{output}: no {MANIFEST}; not a zflora ONNX export")
    return read_json_object(path, AdapterError)


# --------------------------------------------------------------------------- adapter swap


def adapter_arrays(manifest: dict[str, Any], adapter_dir: str | os.PathLike, check_base: bool = True
                   ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:  # fmt: skip
    """Another adapter's blocks for an exported zFLoRA graph, by initializer name, and its config, checked
    first: the same base, rank, targets, LM head and input expansion (alpha may differ; the scale is folded in)."""
    from ..config import ZFLoRAConfig

    info = manifest.get("adapter")
    if not info:
        raise AdapterError(f"this export ({manifest.get('method')}) holds no zFLoRA adapter to swap")
    from transformers import AutoConfig

    config = AutoConfig.for_model(**{k: v for k, v in manifest["config"].items() if k != "model_type"},
                                  model_type=manifest["config"]["model_type"])  # fmt: skip
    probe = apply_zflora(meta_model(config), ZFLoRAConfig.from_dict(info["config"]))
    adapter = read_adapter(adapter_dir)
    check_fits(probe, adapter, check_base_weights=False)  # rank, targets, tensor names and shapes
    check_same_base(manifest["base_model"], adapter, check_base)
    cfg, dtype = adapter.config, getattr(torch, manifest["dtype"])
    quantization = Quantization.from_dict(manifest["quantization"]) if "quantization" in manifest else None
    arrays, parts = {}, {}  # parts: per adapter tensor, its block (or, quantized, packed weight and scales)
    for init, entry in info["initializers"].items():
        source, shape = entry["source"], tuple(entry["shape"])
        if source not in parts:  # a quantized export lists each tensor twice: its packed weight and scales
            kind: Kind = "in" if source.endswith(adapter_tensor("in")) else "out"  # s B; A and A_in as they are
            block = adapter_block(kind, torch.empty(0, dtype=dtype), adapter.tensors[source], cfg.scaling, cfg.r)
            if not torch.isfinite(block).all():
                raise AdapterError(f"{adapter_dir}: {source} does not give a finite block in {dtype}")
            parts[source] = adapter_parts(block.numpy(), quantization) if "part" in entry else {"block": block.numpy()}
        arrays[init] = np.ascontiguousarray(parts[source][entry.get("part", "block")])
        if arrays[init].shape != shape:
            raise AdapterError(f"{adapter_dir}: {source} gives a {arrays[init].shape} {init}, the export has {shape}")
    return arrays, cfg.to_dict()


def swap(output: str | os.PathLike, adapter_dir: str | os.PathLike, check_base: bool = True) -> dict[str, Any]:
    """Replace an exported model's adapter by the one in `adapter_dir`: only ADAPTER is rewritten
    (atomically, same layout), then the manifest. Returns the bytes written and the seconds taken."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    out, started = Path(output), time.perf_counter()
    manifest = read_manifest(out)
    arrays, config = adapter_arrays(manifest, adapter_dir, check_base)
    proto = onnx.load(str(out / GRAPH), load_external_data=False)
    slots = {t.name: ExternalDataInfo(t) for t in proto.graph.initializer if t.name in arrays}
    size = max(s.offset + s.length for s in slots.values())
    data = bytearray(size)
    for name, info in slots.items():
        raw = arrays[name].tobytes()
        if len(raw) != info.length:
            raise AdapterError(f"{adapter_dir}: {name} is {len(raw)} bytes, the graph expects {info.length}")
        data[info.offset : info.offset + info.length] = raw
    atomic_write(out / ADAPTER, lambda tmp: Path(tmp).write_bytes(bytes(data)))
    manifest["adapter"] |= {"source": str(adapter_dir), "sha256": hashlib.sha256(data).hexdigest(), "config": config}
    write_json(out / MANIFEST, manifest, indent=2)
    return {"bytes_written": len(data), "seconds": time.perf_counter() - started}


# --------------------------------------------------------------------------- ONNX Runtime


def session(output: str | os.PathLike, adapter: str | os.PathLike | None = None, options: Any = None,
            providers: list[str] | None = None) -> Any:  # fmt: skip
    """An ONNX Runtime session on an export; with `adapter`, that adapter's blocks are supplied at session
    creation (`add_external_initializers`), leaving every file as it is."""
    import onnxruntime as ort

    out = Path(output)
    manifest = read_manifest(out)
    info = manifest.get("adapter")
    if info and _sha256(out / ADAPTER) != info["sha256"]:
        raise AdapterError(f"{out / ADAPTER}: does not match {MANIFEST} (an interrupted swap?); swap again")
    options = options or ort.SessionOptions()
    values: list[Any] = []
    if adapter is not None:
        arrays, _ = adapter_arrays(manifest, adapter)
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()]  # views of the arrays, not copies
        options.add_external_initializers(list(arrays), values)
    sess = ort.InferenceSession(str(out / GRAPH), options, providers=providers or ["CPUExecutionProvider"])
    sess.zflora_initializers = values  # the session may read those buffers: they live as long as it does
    return sess


def feeds(manifest: dict[str, Any], ids: np.ndarray, past: list[np.ndarray] | None, past_len: int) -> dict:
    """Inputs for one step: `ids` (B, S) after `past_len` cached tokens (no padding)."""
    b, s = ids.shape
    dtype = np.dtype(manifest["dtype"])
    if past is None:
        shape = (b, manifest["num_key_value_heads"], 0, manifest["head_dim"])
        past = [np.zeros(shape, dtype) for _ in range(2 * manifest["num_layers"])]
    feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((b, past_len + s), np.int64),
            "position_ids": np.broadcast_to(np.arange(past_len, past_len + s), (b, s)).astype(np.int64)}  # fmt: skip
    return feed | dict(zip(manifest["inputs"][3:], past, strict=True))


def generate(sess: Any, manifest: dict[str, Any], ids: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """Greedy decoding through the KV cache: the prompt once, then one token per step."""
    out, past, past_len, step = ids, None, 0, ids
    for _ in range(max_new_tokens):
        logits, *past = sess.run(None, feeds(manifest, step, past, past_len))
        past_len += step.shape[1]
        step = logits[:, -1].argmax(-1)[:, None]
        out = np.concatenate([out, step], axis=1)
    return out
