"""Smoke test of `zflora bench` on a tiny preset: it runs and reports everything. No timing assertions."""

from __future__ import annotations

import json
import math

import pytest

from zflora.bench import E2E_METHODS, BenchConfig
from zflora.cli import main


def test_bench_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(
        ["bench", "--preset", "tiny", "--rank", "8", "--prompt-lens", "8,16", "--decode-context", "16",
         "--decode-steps", "2", "--repeats", "2", "--proj-tokens", "1,4", "--proj-ranks", "4,8",
         "--proj-repeats", "1", "--json", str(out), "--chart", str(tmp_path / "bench.png"), "--no-progress"]
    )  # fmt: skip
    result = json.loads(out.read_text())
    rows = result["end_to_end"]
    assert {r["method"] for r in rows} == set(E2E_METHODS)
    assert {(r["phase"], r["tokens"]) for r in rows} == {("prefill", 8), ("prefill", 16), ("decode", 16)}
    for r in rows:
        assert math.isfinite(r["ratio_to_base"]) and r["ratio_to_base"] > 0
        assert r["median_ms"] > 0 and len(r["samples_ms"]) >= 2
    assert all(r["ratio_to_base"] == 1.0 for r in rows if r["method"] == "base")
    variants = {(r["variant"], r["rank"]) for r in result["projection"]}
    assert variants == {("base", None)} | {(v, r) for v in ("lora", "naive-fused", "zflora") for r in (4, 8)}
    assert {r["method"] for r in result["switch"]} == {"zflora", "lora-merged", "lora"}
    env = result["environment"]
    assert env["torch"] and env["transformers"] and env["peft"] and env["threads"] >= 1
    assert result["settings"]["layers"] == 2 and result["settings"]["rank"] == 8
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "| zflora |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 0}, "rank: must be a positive integer"),
        ({"dtype": "int8"}, "dtype: unknown 'int8'"),
        ({"methods": ("lora",)}, "methods: must include 'base'"),
        ({"preset": "gpt-5"}, "preset: unknown 'gpt-5'"),
        ({"prompt_lens": (128, -1)}, "prompt_lens: must be a positive integer"),
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
    from zflora import bench

    monkeypatch.setattr(bench, "available_bytes", lambda device: 1)
    cfg = BenchConfig(preset="tiny", rank=8, prompt_lens=(8,), decode_context=8, decode_steps=1, repeats=1,
                      warmup=0, skip_projection=True, progress=False)  # fmt: skip
    result = bench.run(cfg)
    assert result["settings"]["interleaved_methods"] is False
    assert {r["method"] for r in result["end_to_end"]} == set(E2E_METHODS)
    assert {r["method"] for r in result["switch"]} == {"zflora", "lora-merged", "lora"}
    assert "one at a time" in bench.markdown(result)
