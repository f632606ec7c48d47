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
