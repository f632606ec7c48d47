"""prepare_model for every method: what trains, how much, and that it learns."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import zflora
from zflora.methods import zflora_parameter_formula


def _lora_count(cfg, r: int, projections: list[str]) -> int:
    d, inter, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, inter), "up": (d, inter)}
    shapes["down"] = (inter, d)
    return cfg.num_hidden_layers * sum(r * (shapes[p][0] + shapes[p][1]) for p in projections)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"targets": "all"},
        {"targets": "mha"},
        {"targets": ["q", "v_proj", "down"]},
        {"targets": "all", "lm_head": True},
        {"targets": "mha", "expand_input": False},
    ],
)
def test_trainable_count_equals_spec_formula(kwargs):
    model = tiny_model(tie=True)
    config = zflora.ZFLoRAConfig(r=8, alpha=16, **kwargs)
    zflora.apply_zflora(model, config)
    n = zflora.count_trainable_parameters(model)
    assert n == zflora_parameter_formula(model.config, config)
    assert n == sum(p.numel() for p in zflora.adapter_parameters(model).values())


def test_method_counts():
    counts = {m: zflora.count_trainable_parameters(zflora.prepare_model(tiny_model(), m, r=4)) for m in zflora.METHODS}
    cfg = tiny_model().config
    assert counts["base"] == 0
    assert counts["fft"] == sum(p.numel() for p in tiny_model().parameters())
    assert counts["lora"] == _lora_count(cfg, 4, ["q", "k", "v", "o", "gate", "up", "down"])
    assert counts["lora-mha"] == _lora_count(cfg, 4, ["q", "k", "v", "o"])
    for m in ("zflora", "zflora-mha"):
        zf = zflora.ZFLoRAConfig(r=4, alpha=32, targets="mha" if m.endswith("mha") else "all")
        assert counts[m] == zflora_parameter_formula(cfg, zf)
    assert counts["zflora"] < counts["lora"] and counts["zflora-mha"] < counts["lora-mha"]


def test_unknown_method():
    with pytest.raises(ValueError, match="method: unknown 'dora'"):
        zflora.prepare_model(tiny_model(), "dora")


@pytest.mark.parametrize("method", ["zflora", "zflora-mha", "lora"])
def test_only_adapter_learns_and_loss_falls(method):
    model = tiny_model()
    base = [(p, p.detach().clone()) for p in model.parameters()]  # the same objects stay in the model
    model = zflora.prepare_model(model, method, r=8, alpha=16)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=3e-2)
    batch = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(8):
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, n
            assert p.requires_grad == ("zflora_" in n or "lora_" in n), n
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(torch.equal(p, copy) for p, copy in base)  # the base is untouched


def test_gradient_checkpointing_trains_adapter():
    model = tiny_model()
    zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=4, alpha=8))
    model.gradient_checkpointing_enable()
    model.train()
    batch = torch.randint(0, 97, (2, 8))
    model(input_ids=batch, labels=batch).loss.backward()
    assert all(p.grad is not None for p in zflora.adapter_parameters(model).values())
