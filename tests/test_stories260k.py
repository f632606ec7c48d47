"""The real pretrained stories260K (llama2.c, converted to transformers): skipped when absent."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import zflora

ORACLE = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball."
)


@pytest.mark.parametrize("method", ["zflora", "zflora-mha"])
def test_greedy_story_matches_llama2c_oracle_in_both_forms(stories_path, method):
    tok = AutoTokenizer.from_pretrained(stories_path)
    model = AutoModelForCausalLM.from_pretrained(stories_path).eval()
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    base = model.generate(ids, max_new_tokens=40, do_sample=False)
    assert tok.decode(base[0], skip_special_tokens=True) == ORACLE
    zflora.prepare_model(model, method, r=16, alpha=32)
    assert torch.equal(model.generate(ids, max_new_tokens=40, do_sample=False), base)
    zflora.fuse(model)
    assert torch.equal(model.generate(ids, max_new_tokens=40, do_sample=False), base)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_fused_follows_unfused_step_by_step(stories_path, seed):
    """In bf16 the two forms round differently, so greedy sequences can part after 5-40 tokens where two
    tokens are within rounding of each other (fp32 is exact). On one shared sequence, every position's
    logits agree within bf16's tolerance and the chosen token agrees almost everywhere."""
    from zflora.models import load_local_model, load_tokenizer

    ids = load_tokenizer(stories_path)("Once upon a time", return_tensors="pt").input_ids
    model = load_local_model(stories_path, torch.bfloat16)
    zflora.apply_zflora(model, zflora.ZFLoRAConfig(r=8))
    zflora.set_adapter(model, zflora.random_adapter(model, seed=seed, std=0.05))
    seq = model.generate(ids, max_new_tokens=48, do_sample=False)
    with torch.no_grad():
        unfused = model(seq).logits.float()
        fused = zflora.fuse(model)(seq).logits.float()
    rel = (fused - unfused).abs().amax(-1) / unfused.abs().amax(-1)
    assert rel.max() < 8e-2  # per position, as FUSED_TOL[bf16] in test_transform.py (6e-2) plus margin
    assert (fused.argmax(-1) == unfused.argmax(-1)).float().mean() >= 0.9
