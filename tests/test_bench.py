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
