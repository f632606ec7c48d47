"""Compiled inference: a compiled fused model equals the eager one, and swaps adapters (any alpha)
without recompiling. Inductor on the CPU needs a C++ compiler: skipped without one."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from conftest import assert_same_state, state, tiny_model

import zflora
from zflora.adapter_io import AdapterError
from zflora.compiled import compile_count

HAS_CXX = shutil.which("c++") or shutil.which("g++")
pytestmark = [pytest.mark.skipif(not HAS_CXX, reason="inductor needs a C++ compiler"), pytest.mark.slow]


def adapter(base: torch.nn.Module, alpha: float, seed: int, r: int = 4) -> zflora.Adapter:
    return zflora.random_adapter(zflora.apply_zflora(copy.deepcopy(base), zflora.ZFLoRAConfig(r=r, alpha=alpha)),
                                 seed, std=0.2)  # fmt: skip


def fused(base: torch.nn.Module, a: zflora.Adapter) -> torch.nn.Module:
    return zflora.fuse(zflora.set_adapter(zflora.apply_zflora(copy.deepcopy(base), a.config), a))


@pytest.fixture(scope="module")
def setup():
    torch._dynamo.reset()
    base = tiny_model()
    first, second = adapter(base, alpha=8.0, seed=1), adapter(base, alpha=3.0, seed=2)
    model = zflora.compile(fused(base, first))
    return base, first, second, model


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_compiled_equals_eager_and_swaps_without_recompiling(setup, ids, tmp_path) -> None:
    base, first, second, model = setup
    torch.testing.assert_close(logits(model, ids), logits(fused(base, first), ids), rtol=1e-5, atol=1e-5)
    compiled = compile_count()
    assert compiled >= 1  # it really ran compiled
    for a in (second, first, second):  # back and forth, alpha 3 <-> 8
        zflora.set_adapter(model, a)
        torch.testing.assert_close(logits(model, ids), logits(fused(base, a), ids), rtol=1e-5, atol=1e-5)
    eager = fused(base, second)
    path = zflora.save_adapter(eager, tmp_path / "second")
    zflora.set_adapter(model, first)
    zflora.load_adapter(model, path)  # from disk
    torch.testing.assert_close(logits(model, ids), logits(eager, ids), rtol=1e-5, atol=1e-5)
    assert compile_count() == compiled  # no swap recompiled


def test_compiled_generate_follows_the_swapped_adapter(setup, ids) -> None:
    base, first, second, model = setup
    zflora.set_adapter(model, second)
    kw = {"max_new_tokens": 6, "do_sample": False}
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kw), fused(base, second).generate(ids, **kw))


def test_what_cannot_be_swapped_is_refused(setup, ids) -> None:
    base, first, _, model = setup
    before, compiled = state(model), compile_count()
    with pytest.raises(AdapterError, match="r: adapter 8, model 4"):
        zflora.set_adapter(model, adapter(base, alpha=8.0, seed=3, r=8))
    assert_same_state(before, state(model))
    frozen = zflora.compile(fused(base, first), freeze=True)
    frozen_state = state(frozen)
    with pytest.raises(AdapterError, match="freeze=True"):
        zflora.set_adapter(frozen, adapter(base, alpha=2.0, seed=4))
    assert_same_state(frozen_state, state(frozen))
    with pytest.raises(ValueError, match="already compiled"):
        zflora.compile(model)
    assert compile_count() == compiled


def test_eval_compiled_gives_the_eager_responses(stories_path, tmp_path) -> None:
    import json

    from zflora.cli import main
    from zflora.finetune.tasks import make_task
    from zflora.models import load_local_model

    data = tmp_path / "math.json"
    data.write_text(json.dumps(make_task("story-math", 2, seed=0)))
    model = zflora.apply_zflora(load_local_model(stories_path), zflora.ZFLoRAConfig(r=4))
    adapter = zflora.save_adapter(zflora.set_adapter(model, zflora.random_adapter(model, 1, std=0.05)), tmp_path / "a")
    responses = {}
    for mode in ("eager", "compiled"):
        out = tmp_path / f"{mode}.json"
        main(["eval", "--model", str(stories_path), "--adapter", str(adapter), "--data", str(data), "--output",
              str(out), "--max-new-tokens", "4", *(["--compile"] if mode == "compiled" else [])])  # fmt: skip
        responses[mode] = [json.loads(line)["response"] for line in out.with_suffix(".responses.jsonl").open()]
    assert responses["compiled"] == responses["eager"] and len(responses["eager"]) == 2
