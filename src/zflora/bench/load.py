"""`zflora serve-load`: base vs vLLM LoRA vs the zFLoRA plugin behind vLLM's OpenAI server, under load.

One OpenAI-compatible server per method (`vllm.entrypoints.openai.api_server`, loopback only): base;
vLLM's LoRA (`--enable-lora`, a PEFT adapter with non-zero B served under its own model name); the
zFLoRA plugin (`zflora serve`'s command, the adapter fused at load). The load is vLLM's own client
(`vllm.benchmarks.serve`, what `vllm bench serve` runs): random prompts of `input_len` tokens drawn
with the model's tokenizer and the same seed for every method (so the same prompts), `output_len`
tokens each with EOS ignored, at most `concurrency` requests in flight and `requests_per_client`
requests per client. Each repetition visits the methods in rotating order and every concurrency
within each; prefix caching is off.

Measures, in the shared row schema (milliseconds, higher is slower, ratios to base):
    output    wall milliseconds per output token of the whole run (its inverse is the throughput)
    ttft      time to first token, p50 and p99 over the run's requests
    itl       inter-token latency, p50 and p99
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..charts import figure, save_figure
from ..config import check_alpha
from ..hardware import auto_dtype, describe_machine, environment
from ..models import torch_dtype
from ..serve import require_vllm, serve_command
from .config import ServeLoadConfig
from .harness import free_port, rotated
from .report import Key, bar_chart, md_table, rows, target, targets_table, write_outputs
from .vllm import fit_together, prepare_checkpoints

# vLLM's result field -> (phase, how a sample in ms is read from it)
MEASURES = {
    "output": ("output_throughput", lambda v: 1e3 / v),
    "ttft p50": ("median_ttft_ms", float),
    "ttft p99": ("p99_ttft_ms", float),
    "itl p50": ("median_itl_ms", float),
    "itl p99": ("p99_itl_ms", float),
}


def server_command(method: str, paths: dict[str, Path], cfg: ServeLoadConfig, dtype: str, port: int) -> list[str]:
    """The api_server command serving `method` as model name `method` on 127.0.0.1:`port`."""
    args = ["--host", "127.0.0.1", "--port", str(port), "--dtype", str(torch_dtype(dtype)).removeprefix("torch."),
            "--max-model-len", str(cfg.input_len + cfg.output_len + 64), "--max-num-seqs", str(max(cfg.concurrency)),
            "--no-enable-prefix-caching", "--seed", str(cfg.seed), "--served-model-name",
            "lora-base" if method == "lora" else method]  # fmt: skip
    if cfg.enforce_eager:
        args.append("--enforce-eager")
    if method == "lora":
        max_rank = max(8, 1 << (cfg.rank - 1).bit_length())  # vLLM takes 8, 16, 32, ...: the next one up
        args += ["--enable-lora", "--max-lora-rank", str(max_rank), "--max-loras", "1",
                 "--lora-modules", f"lora={paths['lora']}"]  # fmt: skip
    if method != "zflora":
        return serve_command(str(paths["base"]), None, args)
    return serve_command(str(paths["base"]), str(paths["zflora"]), args, cfg.pad_to)


class Server:
    """One api_server process, its log in a file; stopped (terminated, then killed) on `stop`."""

    def __init__(self, method: str, cmd: list[str], log: Path, kv_cache_gib: int) -> None:
        self.method, self.log, self.port = method, log, int(cmd[cmd.index("--port") + 1])
        env = dict(os.environ)
        if not torch.cuda.is_available():
            env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
        self.started = time.perf_counter()
        with open(log, "w") as f:
            self.process = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        self.startup_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float) -> None:
        """Until /health answers 200; a server that exits or outlasts `timeout` is an error with its log's tail."""
        while time.perf_counter() - self.started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"the {self.method} server exited ({self.process.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                    if r.status == 200:
                        self.startup_s = time.perf_counter() - self.started
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet
            time.sleep(2)
        raise RuntimeError(f"the {self.method} server did not answer within {timeout:.0f} s:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def client_args(server: Server, cfg: ServeLoadConfig, base: Path, clients: int, log_dir: Path) -> list[str]:
    """`vllm bench serve`'s arguments for one run of `clients` concurrent clients against `server`."""
    return ["--backend", "vllm", "--base-url", server.url, "--endpoint", "/v1/completions", "--model", str(base),
            "--served-model-name", server.method, "--tokenizer", str(base), "--dataset-name", "random",
            "--random-input-len", str(cfg.input_len), "--random-output-len", str(cfg.output_len),
            "--num-prompts", str(clients * cfg.requests_per_client), "--max-concurrency", str(clients),
            "--ignore-eos", "--temperature", "0", "--percentile-metrics", "ttft,tpot,itl",
            "--metric-percentiles", "50,99", "--seed", str(cfg.seed), "--disable-tqdm",
            "--result-dir", str(log_dir)]  # fmt: skip


def load_run(args: list[str], log: Path) -> dict[str, Any]:
    """One run of vLLM's benchmark client (its printout to `log`): its result dict."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    with open(log, "a") as f, contextlib.redirect_stdout(f):
        result = bench_main(parser.parse_args(args))
    expected = int(args[args.index("--num-prompts") + 1])
    if result.get("completed") != expected:
        raise RuntimeError(f"{result.get('completed')} of {expected} requests completed (see {log})")
    return result


def empty_samples(cfg: ServeLoadConfig) -> dict[Key, list[float]]:
    return {(phase, cfg.input_len, c): [] for c in cfg.concurrency for phase in MEASURES}


class Rounds:
    """Every measured run, warm-up rounds discarded; `raw` keeps vLLM's result fields of each run."""

    def __init__(self, cfg: ServeLoadConfig, paths: dict[str, Path], logs: Path, bar: tqdm) -> None:
        self.cfg, self.paths, self.logs, self.bar = cfg, paths, logs, bar
        self.samples = {m: empty_samples(cfg) for m in cfg.methods}
        self.raw: list[dict[str, Any]] = []
        self.startup: dict[str, float] = {}

    def __call__(self, server: Server, rep: int) -> None:
        keep = rep >= self.cfg.warmup
        for c in self.cfg.concurrency:
            args = client_args(server, self.cfg, self.paths["base"], c, self.logs)
            result = load_run(args, self.logs / f"client-{server.method}.log")
            if keep:
                for phase, (name, read) in MEASURES.items():
                    self.samples[server.method][phase, self.cfg.input_len, c].append(read(result[name]))
                fields = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                self.raw.append({"method": server.method, "concurrency": c, "repetition": rep - self.cfg.warmup}
                                | fields)  # fmt: skip
        self.bar.update(1)

    def start(self, methods: list[str], dtype: str) -> dict[str, Server]:
        servers = {}
        try:
            for m in methods:
                cmd = server_command(m, self.paths, self.cfg, dtype, free_port())
                servers[m] = Server(m, cmd, self.logs / f"server-{m}.log", self.cfg.kv_cache_gib)
            for m, s in servers.items():
                s.wait_ready(self.cfg.startup_timeout)
                self.startup[m] = s.startup_s or 0.0
        except BaseException:
            for s in servers.values():
                s.stop()
            raise
        return servers

    def interleaved(self, dtype: str) -> None:
        methods = list(self.cfg.methods)
        servers = self.start(methods, dtype)
        try:
            for rep in range(self.cfg.warmup + self.cfg.repeats):
                for m in rotated(methods, rep):
                    self(servers[m], rep)
        finally:
            for s in servers.values():
                s.stop()

    def one_at_a_time(self, dtype: str) -> None:
        for m in self.cfg.methods:
            server = self.start([m], dtype)[m]
            try:
                for rep in range(self.cfg.warmup + self.cfg.repeats):
                    self(server, rep)
            finally:
                server.stop()


def run(cfg: ServeLoadConfig) -> dict[str, Any]:
    require_vllm()
    import vllm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = auto_dtype(cfg.dtype, device)
    bar = tqdm(total=(cfg.warmup + cfg.repeats) * len(cfg.methods), desc="serve-load", disable=not cfg.progress)
    logs = Path(tempfile.mkdtemp(prefix="zflora-serve-load-logs-", dir=cfg.workdir))
    with tempfile.TemporaryDirectory(prefix="zflora-serve-load-", dir=cfg.workdir) as tmp:
        paths = prepare_checkpoints(cfg, torch_dtype(dtype), Path(tmp))
        rounds = Rounds(cfg, paths, logs, bar)
        together = fit_together(cfg, paths["base"], cfg.kv_cache_gib, process_gib=2.0)
        try:
            rounds.interleaved(dtype) if together else rounds.one_at_a_time(dtype)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n(the servers' and clients' logs are kept in {logs})") from None
    shutil.rmtree(logs)
    bar.close()
    result_rows = rows(rounds.samples)
    env = environment(device, dtype) | {"vllm": vllm.__version__, "engine": "vLLM OpenAI server"}
    settings = asdict(cfg) | {"dtype": dtype, "dtype_requested": cfg.dtype, "model": str(paths["base"]),
                              "alpha": check_alpha(cfg.alpha, cfg.rank)}  # fmt: skip
    return {"settings": settings, "environment": env, "interleaved": together, "startup_s": rounds.startup,
            "rows": result_rows, "runs": rounds.raw, "targets": check_targets(result_rows)}  # fmt: skip


def check_targets(result_rows: list[dict[str, Any]], limit: float = 1.03) -> list[dict[str, Any]]:
    """zFLoRA's output throughput within 3% of base's at every concurrency (time per output token <= 1.03x)."""
    return [target(f"zflora ms per output token / base, {r['batch']} clients", r["ratio_to_base"], limit,
                   note=f"throughput {1 / r['ratio_to_base']:.3f}x base")
            for r in result_rows if r["method"] == "zflora" and r["phase"] == "output"]  # fmt: skip


# --------------------------------------------------------------------------- reports


def _cell(r: dict[str, Any]) -> str:
    return f"{r['median_ms']:.1f}" + ("" if r["method"] == "base" else f" ({r['ratio_to_base']:.3f}x)")


def markdown(result: dict[str, Any]) -> str:
    st, env = result["settings"], result["environment"]
    by = {(r["method"], r["phase"], r["batch"]): r for r in result["rows"]}
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    body = []
    for c in st["concurrency"]:
        for m in methods:
            out = by[m, "output", c]
            tps = f"{1e3 / out['median_ms']:.1f}" + ("" if m == "base" else f" ({1 / out['ratio_to_base']:.3f}x)")
            body.append([c, m, tps, *(_cell(by[m, phase, c]) for phase in MEASURES if phase != "output")])
    order = "servers alive together, methods in rotating order" if result["interleaved"] else "one server at a time"
    head = ["clients", "method", "output tokens/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"]
    lines = [
        f"# zflora serve-load: {Path(st['model']).name}, r={st['rank']} ({st['targets']})"
        + (f", zFLoRA's stream padded to a multiple of {st['pad_to']}" if st.get("pad_to") else "")
        + f", vLLM {env['vllm']} OpenAI server",
        "",
        f"{describe_machine(env)}; {env['date']}. Prompts {st['input_len']} tokens, {st['output_len']} output "
        f"tokens each, {st['requests_per_client']} requests per client; {order}; median of {st['repeats']} runs "
        f"after {st['warmup']} warm-up. Throughput: higher is better (x base); latencies: higher is slower.",
        "",
        *md_table(head, body),
        "",
        "Server start-up (s): " + ", ".join(f"{m} {s:.1f}" for m, s in result["startup_s"].items()),
    ]  # fmt: skip
    return "\n".join(lines + targets_table(result["targets"])) + "\n"


def chart(result: dict[str, Any], path: Path) -> None:
    fig, (ax,) = figure(1, 9)
    shown = [r for r in result["rows"] if r["method"] != "base" and r["phase"] in ("output", "ttft p50", "itl p50")]
    log = max(r["ratio_to_base"] for r in shown) > 3
    label = {"output": "per output token"}
    bar_chart(ax, shown, lambda r: f"{label.get(r['phase'], r['phase'])}\n{r['batch']} clients", log=log)
    st, env = result["settings"], result["environment"]
    name = Path(st["model"]).name
    ax.set_title(f"vLLM {env['vllm']} OpenAI server under load: {name}, r={st['rank']}, {st['dtype']}")
    fig.suptitle(describe_machine(env), fontsize=8)
    save_figure(fig, path)


def main(cfg: ServeLoadConfig) -> None:
    print(write_outputs(run(cfg), cfg, markdown, chart))
