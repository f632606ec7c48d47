"""`zflora bench-engines`: one model, every engine, one table.

Each engine is measured by its own benchmark, in a process of its own (so its peak memory is its own),
once per batch size:
    eager        `zflora bench` (Hugging Face transformers)
    compile      `zflora bench --compile` (`zflora.compile`, inductor)
    onnxruntime  `zflora bench --engine onnxruntime` (CPU execution provider; fp32 and block-wise int8)
    vllm         `zflora serve-bench` in an environment with vLLM (`make vllm-setup`), batch sizes in one run
Ratios to base come from within one run, so they compare methods measured side by side.

Per row: time to first token at each prompt length, decode milliseconds per step at `decode_context`
tokens of context, decode tokens/s (batch / step time), the weights the method's model holds, and the
weight bandwidth a decode step achieves (those bytes / step time, as gpt-fast reports it: a lower bound
on the bytes the step reads, since the KV cache and activations come on top). vLLM has no merged or MHA
rows (`serve-bench` runs base, vLLM's LoRA and the zFLoRA plugin); its decode is measured after a
128-token prompt, and at batch > 1 it reports wall time per output token of a batch of requests
(prefill included), which is a throughput figure, not a step time.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..hardware import describe_machine
from .config import EnginesConfig
from .report import bar_chart, md_table, target, targets_table, write_outputs

VLLM_BATCH_TOKENS = 32  # new tokens per request in vLLM's batch runs


def vllm_python(cfg: EnginesConfig) -> str | None:
    """The Python that runs vLLM: `cfg.vllm_python`, this one if it has vLLM, or .venv-vllm's."""
    from ..serve import vllm_available

    if cfg.vllm_python is not None:
        return str(cfg.vllm_python)
    if vllm_available():
        return sys.executable
    local = Path(".venv-vllm/bin/python")
    return str(local) if local.is_file() else None


def plan(cfg: EnginesConfig) -> tuple[list[tuple[str, int | None]], dict[str, str]]:
    """The runs (engine, batch; vLLM's batch None: all batch sizes in one run) and the engines skipped, why."""
    engines, skipped = list(cfg.engines or ()), {}
    if not engines:
        engines = ["eager", "compile", "onnxruntime", "vllm"]
        if vllm_python(cfg) is None:
            engines.remove("vllm")
            skipped["vllm"] = "vLLM not installed here and no .venv-vllm (make vllm-setup, or --vllm-python)"
    elif "vllm" in engines and vllm_python(cfg) is None:
        raise ValueError("engines: vllm asked for, but vLLM is not installed here and there is no .venv-vllm/bin/"
                         "python (make vllm-setup, or --vllm-python PATH)")  # fmt: skip
    runs = [(e, b) for e in engines if e != "vllm" for b in cfg.batches] + [("vllm", None)] * ("vllm" in engines)
    return runs, skipped


def command(cfg: EnginesConfig, engine: str, batch: int | None, out: Path) -> list[str]:
    """The command line of one run, writing its JSON to `out`."""
    shape = ["--model", str(cfg.model)] if cfg.model is not None else ["--preset", cfg.preset]
    if cfg.layers is not None:
        shape += ["--layers", str(cfg.layers)]
    common = [*shape, "--rank", str(cfg.rank), "--seed", str(cfg.seed), "--repeats", str(cfg.repeats),
              "--warmup", str(cfg.warmup), "--dtype", cfg.dtype, "--prompt-lens", ",".join(map(str, cfg.prompt_lens)),
              "--no-progress", "--json", str(out)]  # fmt: skip
    if cfg.alpha is not None:
        common += ["--alpha", str(cfg.alpha)]
    if engine == "vllm":
        return [vllm_python(cfg) or "", "-m", "zflora.cli", "serve-bench", *common, "--batch-sizes",
                ",".join(map(str, cfg.batches)), "--batch-tokens", str(VLLM_BATCH_TOKENS)]  # fmt: skip
    bench = [sys.executable, "-m", "zflora.cli", "bench", *common, "--batch", str(batch), "--decode-context",
             str(cfg.decode_context), "--decode-steps", str(cfg.decode_steps),
             "--methods", ",".join(cfg.methods)]  # fmt: skip
    if cfg.threads is not None:
        bench += ["--threads", str(cfg.threads)]
    if engine == "compile":
        bench.append("--compile")
    if engine == "onnxruntime":
        bench += ["--engine", "onnxruntime", "--precisions", ",".join(cfg.precisions)]
    return bench


def run_one(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run `cmd` (output to `log`): its exit code, seconds and peak resident memory (the process's own)."""
    started = time.perf_counter()
    with open(log, "w") as f:
        process = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    return {"command": shlex.join(cmd), "returncode": os.waitstatus_to_exitcode(status),
            "seconds": time.perf_counter() - started, "peak_rss_mb": usage.ru_maxrss / 1024}  # fmt: skip


def engine_rows(engine: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """One engine run's JSON as rows in the shared schema plus "engine", "dtype" and "weights_mb"."""
    dtype = result["settings"]["dtype"]
    if engine == "vllm":
        names = {"ttft": "prefill", "decode": "decode", "batch": "decode"}
        return [r | {"engine": "vllm", "dtype": dtype, "phase": names[r["phase"]], "weights_mb": None,
                     "note": "wall per output token, prefill included" if r["phase"] == "batch" else ""}
                for r in result["rows"] if not (r["phase"] == "batch" and r["batch"] == 1)]  # fmt: skip
    if engine == "onnxruntime":
        return [r | {"engine": f"onnxruntime {r['precision']}", "dtype": r["precision"],
                     "weights_mb": result["model_mb"][f"{r['precision']}/{r['method']}"]}
                for r in result["end_to_end"]]  # fmt: skip
    return [r | {"engine": engine, "dtype": dtype, "weights_mb": result["memory"][r["method"]]["weights_mb"]}
            for r in result["end_to_end"]]  # fmt: skip


def run(cfg: EnginesConfig) -> dict[str, Any]:
    runs, skipped = plan(cfg)
    result: dict[str, Any] = {"settings": asdict(cfg) | {"methods": list(cfg.methods)}, "skipped": skipped,
                              "runs": [], "rows": [], "environment": None}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="zflora-bench-engines-") as tmp:
        for engine, batch in tqdm(runs, desc="bench-engines", unit="run", disable=not cfg.progress):
            name = engine if batch is None else f"{engine}-b{batch}"
            out, log = Path(tmp) / f"{name}.json", Path(tmp) / f"{name}.log"
            done = run_one(command(cfg, engine, batch, out), log) | {"engine": engine, "batch": batch}
            if done["returncode"] != 0 or not out.is_file():
                done["error"] = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
                result["runs"].append(done)
                continue
            one = json.loads(out.read_text())
            result["runs"].append(done | {"dtype": one["settings"]["dtype"], "environment": one["environment"]})
            result["rows"] += engine_rows(engine, one)
            result["environment"] = result["environment"] or one["environment"]
            if one["settings"].get("hidden_size"):
                result["hidden_size"] = one["settings"]["hidden_size"]
    for r in result["rows"]:
        if r["phase"] == "decode":
            r["tokens_per_s"] = 1e3 * r["batch"] / r["median_ms"] if not r.get("note") else 1e3 / r["median_ms"]
            if r["weights_mb"] is not None and not r.get("note"):
                r["weights_gb_s"] = r["weights_mb"] * 2**20 / (r["median_ms"] / 1e3) / 1e9
    result["targets"] = check_targets(result["rows"], cfg.rank, result.get("hidden_size"))
    return result


def check_targets(rows: list[dict[str, Any]], rank: int, d: int | None) -> list[dict[str, Any]]:
    """zFLoRA within 1 + r/d + 0.01 of base in every engine, phase and batch; LoRA's ratio beside it."""
    if d is None:
        return []
    lora = {_key(r): r["ratio_to_base"] for r in rows if r["method"] == "lora"}
    out = []
    for r in (r for r in rows if r["method"] == "zflora"):
        note = {"note": f"lora {lora[_key(r)]:.3f}"} if _key(r) in lora else {}
        name = f"zflora {r['engine']} {_phase(r)} batch {r['batch']} / base (1 + r/d + 0.01)"
        out.append(target(name, r["ratio_to_base"], 1 + rank / d + 0.01, **note))
    return out


def _key(r: dict[str, Any]) -> tuple:
    return r["engine"], r["phase"], r["tokens"], r["batch"]


def _phase(r: dict[str, Any]) -> str:
    return f"TTFT {r['tokens']}" if r["phase"] == "prefill" else "decode"


# --------------------------------------------------------------------------- reports


def markdown(result: dict[str, Any]) -> str:
    st, rows = result["settings"], result["rows"]
    name = Path(st["model"]).name if st["model"] else st["preset"]
    env = result["environment"]
    lines = [f"# zflora bench-engines: {name}, r = {st['rank']}", ""]
    if env is not None:
        lines += [f"{describe_machine(env)} (each engine's dtype in its rows); median of {st['repeats']} repetitions "
                  f"after {st['warmup']} warm-up; ratios (x base) within one run of one engine; decode at "
                  f"{st['decode_context']} tokens of context (vLLM: after a 128-token prompt).", ""]  # fmt: skip
    lens = list(st["prompt_lens"])
    head = ["engine", "dtype", "batch", "method", *(f"TTFT {n} ms (x base)" for n in lens), "decode ms/step (x base)",
            "decode tokens/s", "weights MB", "weights GB/s"]  # fmt: skip
    by = {(r["engine"], r["batch"], r["method"], r["phase"], r["tokens"]): r for r in rows}
    groups = list(dict.fromkeys((r["engine"], r["batch"], r["method"]) for r in rows))
    body = []
    for e, b, m in groups:
        cells = [_cell(by.get((e, b, m, "prefill", n))) for n in lens]
        dec = next((r for r in rows if (r["engine"], r["batch"], r["method"], r["phase"]) == (e, b, m, "decode")), None)
        first = dec or next(r for r in rows if (r["engine"], r["batch"], r["method"]) == (e, b, m))
        weights = first.get("weights_mb")
        body.append([e, first["dtype"], b, m, *cells, _cell(dec) + (" *" if dec and dec.get("note") else ""),
                     f"{dec['tokens_per_s']:.1f}" if dec else "-", f"{weights:.0f}" if weights else "-",
                     f"{dec['weights_gb_s']:.1f}" if dec and "weights_gb_s" in dec else "-"])  # fmt: skip
    lines += md_table(head, body)
    if any(r.get("note") for r in rows):
        lines += ["", "\\* vLLM at batch > 1: wall milliseconds per output token of a batch of requests (a 128-"
                  f"token prompt and {VLLM_BATCH_TOKENS} new tokens each, prefill included); tokens/s is its "
                  "inverse."]  # fmt: skip
    runs = [[r["engine"], r["batch"] or ",".join(map(str, st["batches"])), r.get("dtype", "-"),
             f"{r['peak_rss_mb']:.0f}", f"{r['seconds']:.0f}", "failed" if "error" in r else "ok"]
            for r in result["runs"]]  # fmt: skip
    lines += ["", "Each run is one process: its peak resident memory holds every method's model at once (and for "
              "vLLM the API process, whose engine core is another process).", "",
              *md_table(["engine", "batch", "dtype", "peak RSS MB", "seconds", "status"], runs)]  # fmt: skip
    for r in result["runs"]:
        if "error" in r:
            lines += ["", f"{r['engine']} batch {r['batch']} failed: `{r['command']}`", "", "```", r["error"], "```"]
    lines += ["", *(f"Skipped {e}: {why}." for e, why in result["skipped"].items())] if result["skipped"] else []
    return "\n".join(lines + targets_table(result["targets"])) + "\n"


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    return f"{r['median_ms']:.1f}" + ("" if r["method"] == "base" else f" ({r['ratio_to_base']:.3f})")


def chart(result: dict[str, Any], path: Path) -> None:
    from ..charts import figure, save_figure

    engines = list(dict.fromkeys(r["engine"] for r in result["rows"]))
    if not engines:
        return
    fig, axes = figure(len(engines), 5.5 * len(engines))
    for ax, e in zip(axes, engines, strict=True):
        bar_chart(ax, [r for r in result["rows"] if r["engine"] == e],
                  lambda r: f"{_phase(r)}\nbatch {r['batch']}")  # fmt: skip
        ax.set_title(f"{e} ({next(r['dtype'] for r in result['rows'] if r['engine'] == e)})", fontsize=9)
    if result["environment"] is not None:
        fig.suptitle(describe_machine(result["environment"]), fontsize=8)
    save_figure(fig, path)


def main(cfg: EnginesConfig) -> None:
    result = run(cfg)
    print(write_outputs(result, cfg, markdown, chart))
    if failed := [f"{r['engine']} batch {r['batch']}" for r in result["runs"] if "error" in r]:
        raise SystemExit(f"bench-engines: {', '.join(failed)} failed (the report says why)")
