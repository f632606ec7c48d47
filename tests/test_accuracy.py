"""`zflora accuracy` end to end on stories260K with the real task files, in a quick configuration: the
report's shape, chance per task, the learning-rate sweep, and a rerun that trains nothing again."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED

from zflora.finetune import accuracy
from zflora.finetune.config import AccuracyConfig


def test_quick_study_reports_and_resumes(stories_path, tmp_path, monkeypatch):
    data = SHARED / "data"
    if not (data / "commonsense").is_dir():
        pytest.skip(f"real data not available at {data}")
    cfg = AccuracyConfig(model=stories_path, data=data, output=tmp_path / "acc", categories=("commonsense",),
                         methods=("base", "lora", "zflora", "zflora-matched"), seeds=1, steps=2, sweep_steps=1,
                         lrs=(1e-3, 3e-3), n_train=40, n_test=(2, 2, 2), eval_batch_size=8,
                         progress=False)  # fmt: skip
    out = accuracy.run(cfg)
    saved = json.loads((tmp_path / "acc" / "accuracy.json").read_text())
    assert saved["model"] == str(stories_path) and (tmp_path / "acc" / "accuracy.png").is_file()
    runs = {(r["method"], r["seed"]): r for r in saved["runs"]}
    assert set(runs) == {("base", 0), ("lora", 0), ("zflora", 0), ("zflora-matched", 0)}
    tasks = {"boolq", "piqa", "social_i_qa", "ARC-Challenge", "ARC-Easy", "openbookqa", "winogrande"}
    for r in saved["runs"]:
        assert set(r["scores"]) == tasks and set(r["category_avg"]) == {"commonsense"}
    assert runs["base", 0]["trainable_params"] == 0 and runs["lora", 0]["trainable_params"] > 0
    assert runs["zflora-matched", 0]["rank"] > runs["zflora", 0]["rank"] == 16
    assert saved["chance"]["boolq"] == 50.0 and saved["chance"]["ARC-Easy"] == pytest.approx(25.0, abs=1)
    assert set(saved["sweeps"]) == {"lora", "zflora", "zflora-matched"}
    assert all(set(s["val_loss"]) == {"0.001", "0.003"} for s in saved["sweeps"].values())
    assert "| chance |" in (tmp_path / "acc" / "accuracy.md").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(accuracy, "train_run", no_training)
    assert accuracy.run(cfg)["runs"] == out["runs"]
