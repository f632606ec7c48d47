"""Stacked adapters with per-row routing: each row is exactly its adapter's fused model."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    assert_same_state,
    saved_adapter,
    state,
    tiny_model,
)

import zflora
from zflora.adapter_io import AdapterError
from zflora.compiled import compile as zcompile
from zflora.transform import UnsupportedModelError

# Different ranks, targets, alphas, LM head and input expansion: all share one stream.
CONFIGS = [
    zflora.ZFLoRAConfig(r=4),
    zflora.ZFLoRAConfig(r=8, alpha=3.0, targets="mha"),
    zflora.ZFLoRAConfig(r=4, alpha=16.0, lm_head=True, expand_input=False),
]


def make_adapter(base: torch.nn.Module, config: zflora.ZFLoRAConfig, seed: int) -> zflora.Adapter:
    return zflora.random_adapter(zflora.apply_zflora(copy.deepcopy(base), config), seed, std=0.2)


def single(base: torch.nn.Module, adapter: zflora.Adapter) -> torch.nn.Module:
    """Today's single-adapter fused model with `adapter`."""
    model = zflora.apply_zflora(copy.deepcopy(base), adapter.config)
    return zflora.fuse(zflora.set_adapter(model, adapter))


@pytest.fixture
def base() -> torch.nn.Module:
    return tiny_model()


@pytest.fixture
def adapters(base: torch.nn.Module) -> list[zflora.Adapter]:
    return [make_adapter(base, c, seed=10 + i) for i, c in enumerate(CONFIGS)]


@pytest.fixture
def stacked(base: torch.nn.Module, adapters: list[zflora.Adapter]) -> torch.nn.Module:
    return zflora.stack_adapters(copy.deepcopy(base), adapters)


def logits(model: torch.nn.Module, ids: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kw).logits


def test_every_row_is_its_adapters_fused_model(base, adapters, stacked) -> None:
    ids = torch.randint(0, 97, (5, 11), generator=torch.Generator().manual_seed(3))
    route = torch.tensor([2, -1, 0, 1, 0])
    with zflora.route(stacked, route):
        got = logits(stacked, ids)
    for row, j in enumerate(route.tolist()):
        reference = base if j < 0 else single(base, adapters[j])
        want = logits(reference, ids[row : row + 1])[0]
        torch.testing.assert_close(got[row], want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    # The adapters really differ: a row served by the wrong slot would be caught.
    assert not torch.allclose(logits(single(base, adapters[0]), ids[:1]), logits(single(base, adapters[1]), ids[:1]))


def test_generate_with_cache_on_a_left_padded_batch(base, adapters, stacked) -> None:
    ids = torch.randint(3, 97, (4, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :4] = mask[3, :2] = 0  # left padding
    ids = ids.masked_fill(mask == 0, 0)
    route = torch.tensor([1, 0, -1, 2])
    kw = {"attention_mask": mask, "max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad(), zflora.route(stacked, route):
        got = stacked.generate(ids, **kw)
    for row, j in enumerate(route.tolist()):
        reference = base if j < 0 else single(base, adapters[j])
        with torch.no_grad():
            want = reference.generate(ids, **kw)[row]  # the whole batch: same padding, same positions
        assert torch.equal(got[row], want), row


def test_one_adapter_equals_todays_fused_model(base, adapters, ids) -> None:
    stacked = zflora.stack_adapters(copy.deepcopy(base), adapters[:1])
    with zflora.route(stacked, [0] * ids.shape[0]):
        got = logits(stacked, ids)
    assert torch.equal(got, logits(single(base, adapters[0]), ids))


def test_base_rows_equal_the_base_model(base, stacked, ids) -> None:
    with zflora.route(stacked, [-1] * ids.shape[0]):
        got = logits(stacked, ids)
    assert torch.equal(got, logits(base, ids))  # bit for bit in fp32, as zFLoRA at initialisation


def test_slot_swap_equals_a_fresh_stack(base, adapters, stacked, ids) -> None:
    new = make_adapter(base, zflora.ZFLoRAConfig(r=8, alpha=5.0), seed=99)  # rank of slot 1, other targets
    zflora.swap_slot(stacked, 1, new)
    fresh = zflora.stack_adapters(copy.deepcopy(base), [adapters[0], new, adapters[2]])
    assert_same_state(state(stacked), state(fresh))
    assert stacked.zflora_stack.slots[1].config.alpha == 5.0
    with zflora.route(stacked, [1, 0]):
        torch.testing.assert_close(logits(stacked, ids)[0], logits(single(base, new), ids[:1])[0])


def test_stacks_adapter_directories(base, tmp_path, ids) -> None:
    paths = []
    for i, c in enumerate(CONFIGS[:2]):
        model = zflora.apply_zflora(copy.deepcopy(base), c)
        zflora.set_adapter(model, zflora.random_adapter(model, i, std=0.2))
        paths.append(zflora.save_adapter(model, tmp_path / f"a{i}"))
    stacked = zflora.stack_adapters(copy.deepcopy(base), paths)
    assert [s.source for s in stacked.zflora_stack.slots] == [str(p) for p in paths]
    with zflora.route(stacked, [1, 1]):
        got = logits(stacked, ids)
    want = logits(zflora.fuse(zflora.load_adapter(copy.deepcopy(base), paths[1])), ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_rows_follow_their_adapters(base, adapters, ids) -> None:
    base16 = base.to(torch.bfloat16)
    stacked = zflora.stack_adapters(copy.deepcopy(base16), adapters)
    with zflora.route(stacked, [2, 1]):
        got = logits(stacked, ids).float()
    for row, j in enumerate([2, 1]):
        want = logits(single(base16, adapters[j]), ids[row : row + 1])[0].float()
        torch.testing.assert_close(got[row], want, rtol=0.05, atol=0.05 * want.abs().max().item())


def test_bad_adapters_leave_the_model_unchanged(base, adapters) -> None:
    other_base = make_adapter(tiny_model(seed=1), CONFIGS[0], seed=1)
    model = copy.deepcopy(base)
    before = state(model)
    with pytest.raises(AdapterError, match="different base model"):
        zflora.stack_adapters(model, [adapters[0], other_base])
    with pytest.raises(ValueError, match="non-empty list"):
        zflora.stack_adapters(model, [])
    assert_same_state(before, state(model))
    assert not hasattr(model, "zflora_stack")
    with pytest.raises(UnsupportedModelError, match="already carries"):
        zflora.stack_adapters(zflora.apply_zflora(copy.deepcopy(base), CONFIGS[0]), adapters)


def test_bad_swaps_and_routes_are_refused(base, adapters, stacked, ids) -> None:
    before = state(stacked)
    with pytest.raises(AdapterError, match="rank 4 does not fit slot 1"):
        zflora.swap_slot(stacked, 1, adapters[0])
    with pytest.raises(ValueError, match="slot: must be an integer in 0..2"):
        zflora.swap_slot(stacked, 3, adapters[0])
    head = make_adapter(base, zflora.ZFLoRAConfig(r=4, lm_head=True), seed=4)
    no_head = zflora.stack_adapters(copy.deepcopy(base), adapters[:2])
    with pytest.raises(AdapterError, match="LM head"):
        zflora.swap_slot(no_head, 0, head)
    assert_same_state(before, state(stacked))
    with pytest.raises(ValueError, match=r"\[3\] out of range"), zflora.route(stacked, [0, 3]):
        pass
    with pytest.raises(ValueError, match="integer tensor"), zflora.route(stacked, torch.tensor([0.0, 1.0])):
        pass
    with pytest.raises(RuntimeError, match="zflora.route"):
        logits(stacked, ids)
    with pytest.raises(ValueError, match="3 adapter ids"), zflora.route(stacked, [0, 1, 2]):
        logits(stacked, ids)
    with pytest.raises(UnsupportedModelError, match="stacked adapters"):
        zflora.apply_zflora(stacked, CONFIGS[0])


def test_no_extra_operator_per_layer(ids) -> None:
    from collections import Counter

    from zflora.transform import count_operators

    counts = {}
    for layers in (2, 4):
        base = tiny_model(layers=layers)
        counts["base", layers] = count_operators(base, ids)
        stacked = zflora.stack_adapters(base, [make_adapter(base, c, seed=i) for i, c in enumerate(CONFIGS)])
        with zflora.route(stacked, [0, 2]):
            counts["stacked", layers] = count_operators(stacked, ids)
    per_layer = {m: counts[m, 4] - counts[m, 2] for m in ("base", "stacked")}
    assert per_layer["stacked"] == per_layer["base"]  # routing adds nothing inside a layer
    assert counts["base", 2] - counts["stacked", 2] == Counter()


# --------------------------------------------------------------------------- refusals and faults


def test_stack_api_edges_are_explained(tmp_path):
    """route("0") / route(None) gave torch's messages, stack_adapters([None]) a TypeError, swap_slot(True) took
    slot 1, save_adapter on a stack said it had no adapter, and a frozen compiled stack accepted a swap."""
    path = saved_adapter(tmp_path)
    model = zflora.stack_adapters(tiny_model(tie=True), [path, path])
    for ids in ("0", None, 3):
        with pytest.raises(ValueError, match="adapter_ids"), zflora.route(model, ids):
            pass
    with pytest.raises(ValueError, match="slot: must be an integer"):
        zflora.swap_slot(model, True, path)
    with pytest.raises(AdapterError, match="holds stacked adapters"):
        zflora.save_adapter(model, tmp_path / "out")
    with pytest.raises(ValueError, match="each must be an adapter directory or an Adapter, got NoneType"):
        zflora.stack_adapters(tiny_model(tie=True), [None])
    zcompile(model, freeze=True)
    before = state(model)
    with pytest.raises(AdapterError, match="freeze=True"):
        zflora.swap_slot(model, 0, path)
    assert_same_state(before, state(model))
