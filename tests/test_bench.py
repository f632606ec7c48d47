"""`zflora bench` on a tiny preset: it runs and reports everything, and its decode steps really decode
from the KV cache. No timing assertions."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from zflora.bench.config import E2E_METHODS, HEADLINE_METHODS, BenchConfig
from zflora.cli import main

TINY = ["--preset", "tiny", "--rank", "8", "--prompt-lens", "8,16", "--decode-context", "16", "--decode-steps", "2",
        "--repeats", "2", "--no-progress"]  # fmt: skip


def test_bench_full_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["bench", *TINY, "--full", "--proj-tokens", "1,4", "--proj-ranks", "4,8", "--proj-repeats", "1",
          "--json", str(out), "--chart", str(tmp_path / "bench.png")])  # fmt: skip
    result = json.loads(out.read_text())
    rows = result["end_to_end"]
    assert {r["method"] for r in rows} == set(E2E_METHODS)
    assert {(r["phase"], r["tokens"]) for r in rows} == {("prefill", 8), ("prefill", 16), ("decode", 16)}
    for r in rows:
        assert math.isfinite(r["ratio_to_base"]) and r["ratio_to_base"] > 0
        assert r["median_ms"] > 0 and len(r["samples_ms"]) == r["n"] >= 5  # --full: at least 5 repetitions
        base = next(b for b in rows if (b["method"], b["phase"], b["tokens"]) == ("base", r["phase"], r["tokens"]))
        assert r["ratio_to_base"] == pytest.approx(r["median_ms"] / base["median_ms"])
    variants = {(r["variant"], r["rank"]) for r in result["projection"]}
    assert variants == {("base", None)} | {(v, r) for v in ("lora", "naive-fused", "zflora") for r in (4, 8)}
    assert {r["method"] for r in result["switch"]} == {"zflora", "lora-merged", "lora"}
    env = result["environment"]
    assert env["torch"] and env["transformers"] and env["peft"] and env["threads"] >= 1
    assert "cpu_capability" in env and isinstance(env["native_bf16"], bool)
    assert result["settings"]["layers"] == 2 and result["settings"]["rank"] == 8
    assert result["settings"]["dtype"] == ("bf16" if env["native_bf16"] else "fp32")  # "auto" resolved
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "| zflora |" in capsys.readouterr().out


def test_bench_default_is_the_headline(tmp_path):
    main(["bench", *TINY, "--dtype", "fp32", "--json", str(tmp_path / "b.json")])
    result = json.loads((tmp_path / "b.json").read_text())
    assert [r["method"] for r in result["end_to_end"] if r["phase"] == "decode"] == list(HEADLINE_METHODS)
    assert result["projection"] == [] and result["settings"]["dtype"] == "fp32"


def test_decode_steps_read_the_filled_context(monkeypatch):
    """Every timed decode step runs with the decode context in the cache (a wrong keyword would be
    swallowed by the model's **kwargs and decode would run with an empty cache)."""
    import torch

    from zflora.bench import hf

    seen: list[int] = []
    forward = hf.Runner.forward

    def spy(self, ids: torch.Tensor, cache) -> None:
        before = cache.get_seq_length()
        forward(self, ids, cache)
        if ids.shape[1] == 1:  # a decode step: the cache held the context and grew by one token
            seen.append(before)
            assert cache.get_seq_length() == before + 1

    monkeypatch.setattr(hf.Runner, "forward", spy)
    cfg = BenchConfig(preset="tiny", rank=8, prompt_lens=(8,), decode_context=12, decode_steps=3, repeats=2,
                      warmup=0, methods=("base", "zflora"), dtype="fp32", progress=False)  # fmt: skip
    hf.run(cfg)
    assert len(seen) == 2 * 2 * 3  # methods x repeats x steps
    assert set(seen) == {12, 13, 14}  # rewound to the context at the start of every round


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 0}, "rank: must be a positive integer"),
        ({"dtype": "int8"}, "dtype: unknown 'int8'"),
        ({"methods": ("lora",)}, "methods: must include 'base'"),
        ({"preset": "gpt-5"}, "preset: unknown 'gpt-5'"),
        ({"prompt_lens": (128, -1)}, "prompt_lens: must be a positive integer"),
        ({"alpha": 0}, "alpha: must be a positive finite number"),
        ({"alpha": float("inf")}, "alpha: must be a positive finite number"),
    ],
)
def test_bench_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BenchConfig(**kwargs)


def test_bench_int4_quantizes_every_method_and_times_the_swap():
    from zflora.bench import hf
    from zflora.weight_only import available

    if not available():
        pytest.skip("this torch has no int4 CPU kernel")
    pytest.importorskip("onnxruntime")
    cfg = BenchConfig(preset="tiny", rank=8, prompt_lens=(8,), decode_context=8, decode_steps=1, repeats=1,
                      warmup=0, quantize="int4", dtype="bf16", progress=False)  # fmt: skip
    assert cfg.methods == ("base", "lora", "lora-merged", "zflora")
    result = hf.run(cfg)
    assert {r["method"] for r in result["end_to_end"]} == set(cfg.methods)
    assert {r["method"] for r in result["switch"]} == {"zflora"}  # a merged LoRA switches by quantizing again
    for m in cfg.methods:
        info = result["memory"][m]
        assert info["quantize_s"] > 0 and info["bytes"]["packed"] > 0
    assert result["memory"]["zflora"]["bytes"]["swap_writes"] > 0 == result["memory"]["base"]["bytes"]["swap_writes"]
    assert "int4 weight-only" in hf.markdown(result)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"quantize": "int4", "compile": True}, "quantize: the transformers engine's"),
        ({"quantize": "int4", "pad_to": 32}, "quantize: the transformers engine's"),
        ({"quantize": "int4", "methods": ("base", "lora-mha")}, "methods: --quantize int4 runs"),
    ],
)
def test_bench_int4_settings_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BenchConfig(**kwargs)


def test_bench_cli_reports_missing_model(tmp_path):
    with pytest.raises(SystemExit, match="not a local checkpoint directory"):
        main(["bench", "--model", str(tmp_path / "nope"), "--no-progress"])


def test_bench_one_model_at_a_time_when_memory_is_short(monkeypatch):
    """The path the 8B shape takes on a 24 GiB machine: build, measure, free each method in turn."""
    from zflora.bench import hf

    monkeypatch.setattr(hf, "available_bytes", lambda device: 1)
    cfg = BenchConfig(preset="tiny", rank=8, prompt_lens=(8,), decode_context=8, decode_steps=1, repeats=1,
                      warmup=0, methods=E2E_METHODS, dtype="fp32", progress=False)  # fmt: skip
    result = hf.run(cfg)
    assert result["settings"]["interleaved_methods"] is False
    assert {r["method"] for r in result["end_to_end"]} == set(E2E_METHODS)
    assert {r["method"] for r in result["switch"]} == {"zflora", "lora-merged", "lora"}
    assert "one at a time" in hf.markdown(result)


def test_mixed_bench_smoke(tmp_path, capsys):
    out = tmp_path / "mixed.json"
    main(["mixed-bench", "--preset", "tiny", "--layers", "2", "--adapters", "1,3", "--batch", "4", "--prompt-lens",
          "8", "--decode-context", "12", "--decode-steps", "2", "--repeats", "2", "--no-progress", "--json", str(out),
          "--chart", str(tmp_path / "mixed.png"), "--markdown", str(tmp_path / "mixed.md")])  # fmt: skip
    result = json.loads(out.read_text())
    rows = result["mixed"]
    assert {(r["method"], r["adapters"]) for r in rows} == {("base", 0)} | {
        (m, k) for m in ("zflora-stacked", "lora-mixed") for k in (1, 3)
    }
    for r in rows:
        assert r["batch"] == 4 and r["median_ms"] > 0 and r["n"] == len(r["samples_ms"]) >= 2
        assert math.isfinite(r["ratio_to_base"]) and r["ratio_to_base"] > 0
    assert [t["target"].split(" / ")[0] for t in result["targets"]] == ["zflora-stacked k=3 prefill 8",
                                                                        "zflora-stacked k=3 decode @12"]  # fmt: skip
    assert (tmp_path / "mixed.png").read_bytes()[:4] == b"\x89PNG"
    text = (tmp_path / "mixed.md").read_text()
    assert "| 3 |" in text and text in capsys.readouterr().out


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="inductor needs a C++ compiler")
@pytest.mark.slow
def test_bench_compiled_smoke(tmp_path):
    out = tmp_path / "compiled.json"
    main(["bench", "--preset", "tiny", "--rank", "8", "--prompt-lens", "8", "--decode-context", "12",
          "--decode-steps", "2", "--repeats", "1", "--warmup", "0", "--no-progress", "--compile",
          "--methods", "base,zflora", "--json", str(out)])  # fmt: skip
    result = json.loads(out.read_text())  # PEFT's compiled hot-swap is timed by the benchmark (slow to compile)
    assert {r["method"] for r in result["end_to_end"]} == set(result["compile"]) == {"base", "zflora"}
    assert all(c["graphs"] >= 1 and c["compile_s"] > 0 for c in result["compile"].values())
    swaps = {r["method"]: r for r in result["switch"]}
    assert set(swaps) == {"zflora"}
    assert swaps["zflora"]["recompiles"] == 0  # the fused hot-swap never recompiles, at another alpha too
    assert any(t["target"].startswith("zflora swaps under compile") and t["met"] for t in result["targets"])


def test_onnxruntime_refuses_a_dtype_it_would_ignore():
    with pytest.raises(ValueError, match="dtype: onnxruntime exports run in fp32"):
        BenchConfig(engine="onnxruntime", dtype="bf16")
    BenchConfig(engine="onnxruntime", dtype="fp32")


# --------------------------------------------------------------------------- bench-engines


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(engines=("eager", "tensorrt")), "engines: from eager"), (dict(batches=()), "batches: must not be empty"),
     (dict(dtype="bf16"), "dtype: ONNX Runtime runs fp32"), (dict(precisions=("int3",)), "precisions: from"),
     (dict(vllm_python="/no/such/python"), "vllm_python: /no/such/python is not a file")],
)  # fmt: skip
def test_bench_engines_config_validation(kwargs, match):
    from zflora.bench.config import EnginesConfig

    with pytest.raises(ValueError, match=match):
        EnginesConfig(**kwargs)
    EnginesConfig(engines=("eager", "compile"), dtype="bf16")  # without ONNX Runtime every engine honours bf16


def test_bench_engines_runs_each_engine_by_its_own_benchmark(monkeypatch):
    from zflora.bench import engines
    from zflora.bench.config import ONNX_METHODS, EnginesConfig

    monkeypatch.setattr(engines, "vllm_python", lambda cfg: None)
    runs, skipped = engines.plan(EnginesConfig(batches=(1, 8)))
    assert runs == [(e, b) for e in ("eager", "compile", "onnxruntime") for b in (1, 8)] and set(skipped) == {"vllm"}
    with pytest.raises(ValueError, match="engines: vllm asked for, but vLLM is not installed"):
        engines.plan(EnginesConfig(engines=("eager", "vllm")))
    cfg = EnginesConfig(model="m", batches=(1, 8))
    cmds = {e: engines.command(cfg, e, 8, engines.Path("o.json")) for e in ("eager", "compile", "onnxruntime")}
    for cmd in cmds.values():
        assert cmd[cmd.index("--methods") + 1] == ",".join(ONNX_METHODS) and cmd[cmd.index("--batch") + 1] == "8"
        assert cmd[cmd.index("--model") + 1] == "m" and cmd[cmd.index("--json") + 1] == "o.json"
    assert "--compile" in cmds["compile"] and "--compile" not in cmds["eager"]
    assert cmds["onnxruntime"][-4:] == ["--engine", "onnxruntime", "--precisions", "fp32,int8"]
    monkeypatch.setattr(engines, "vllm_python", lambda cfg: "/venv/bin/python")
    vllm = engines.command(cfg, "vllm", None, engines.Path("o.json"))
    assert vllm[:4] == ["/venv/bin/python", "-m", "zflora.cli", "serve-bench"]
    assert vllm[vllm.index("--batch-sizes") + 1] == "1,8"


def test_bench_engines_one_table(tmp_path, capsys):
    """Eager and ONNX Runtime (fp32, int8) at batch 1 and 2 on the tiny preset, each in its own process."""
    out = tmp_path / "e"
    main(["bench-engines", "--preset", "tiny", "--rank", "4", "--engines", "eager,onnxruntime", "--batches", "1,2",
          "--prompt-lens", "8,16", "--decode-context", "16", "--decode-steps", "2", "--repeats", "1", "--warmup", "0",
          "--dtype", "fp32", "--no-progress", "--json", str(out / "r.json"), "--markdown", str(out / "r.md"),
          "--chart", str(out / "r.png")])  # fmt: skip
    result = json.loads((out / "r.json").read_text())
    assert [(r["engine"], r["batch"], r["returncode"]) for r in result["runs"]] == [
        ("eager", 1, 0), ("eager", 2, 0), ("onnxruntime", 1, 0), ("onnxruntime", 2, 0)]  # fmt: skip
    assert all(r["peak_rss_mb"] > 50 and r["dtype"] == "fp32" for r in result["runs"])
    keys = {(r["engine"], r["batch"], r["method"], r["phase"], r["tokens"]) for r in result["rows"]}
    assert keys == {(e, b, m, p, n) for e in ("eager", "onnxruntime fp32", "onnxruntime int8") for b in (1, 2)
                    for m in E2E_METHODS if m != "lora-mha" for p, n in (("prefill", 8), ("prefill", 16),
                                                                          ("decode", 16))}  # fmt: skip
    for r in (r for r in result["rows"] if r["phase"] == "decode"):
        assert r["tokens_per_s"] == pytest.approx(1e3 * r["batch"] / r["median_ms"])
        assert r["weights_gb_s"] == pytest.approx(r["weights_mb"] * 2**20 / r["median_ms"] * 1e3 / 1e9)
    int8 = {r["method"]: r["weights_mb"] for r in result["rows"] if r["engine"] == "onnxruntime int8"}
    fp32 = {r["method"]: r["weights_mb"] for r in result["rows"] if r["engine"] == "onnxruntime fp32"}
    assert all(int8[m] < fp32[m] for m in fp32)
    assert len(result["targets"]) == 3 * 2 * 3  # zflora: every engine, batch and phase
    text = (out / "r.md").read_text()
    assert "| onnxruntime int8 | int8 | 2 | zflora |" in text and "| eager | fp32 | 1 | base |" in text
    assert (out / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_engines_reports_a_failed_engine(tmp_path):
    """An engine that fails is reported with its output and the command exits non-zero; the others still land."""
    out = tmp_path / "r.md"
    with pytest.raises(SystemExit, match="vllm batch None failed"):
        main(["bench-engines", "--preset", "tiny", "--engines", "vllm", "--vllm-python", shutil.which("false"),
              "--no-progress", "--markdown", str(out)])  # fmt: skip
    assert "vllm batch None failed: `" in out.read_text()
