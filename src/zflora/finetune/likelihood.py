"""Multiple-choice scoring by likelihood, as lm-evaluation-harness computes it.

For each option i of a record, the log-likelihood of its continuation after its context:

    ll_i = sum_t log p(cont_t | context, cont_<t)
    acc      = [argmax_i ll_i == gold]
    acc_norm = [argmax_i ll_i / len(choice_i in characters) == gold]

Tokenised as the harness does (`_encode_pair`): trailing spaces of the context move to the
continuation, the pair is encoded whole, and the continuation's tokens are what follows the
context's own encoding. All options of a record run in one batch (records of similar length
share it), and only the logits of continuation positions are computed (`logits_to_keep`), so a
49K vocabulary does not cost a full logit tensor per token.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .cloze import Cloze


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens), split as lm-evaluation-harness splits them."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    return ctx, whole[len(ctx) :]


def _batches(lengths: list[int], sizes: list[int], max_rows: int) -> list[list[int]]:
    """Records (by index) grouped so one batch holds at most `max_rows` rows, longest records first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = [[]]
    for i in order:
        if batches[-1] and sum(sizes[j] for j in batches[-1]) + sizes[i] > max_rows:
            batches.append([])
        batches[-1].append(i)
    return [b for b in batches if b]


@torch.no_grad()
def loglikelihoods(
    model: nn.Module, tokenizer: Any, records: list[list[tuple[str, str]]], max_rows: int = 32
) -> list[list[tuple[float, bool]]]:
    """For each record (a list of (context, continuation) pairs), each pair's (log-likelihood, is_greedy):
    is_greedy says whether greedy decoding would have produced the continuation."""
    encoded = [[encode_pair(tokenizer, c, x) for c, x in pairs] for pairs in records]
    if any(not cont for pairs in encoded for _, cont in pairs):
        raise ValueError("a continuation encodes to no tokens")
    lengths = [max(len(c) + len(x) for c, x in pairs) for pairs in encoded]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[list[tuple[float, bool]]] = [[] for _ in records]
    model.eval()
    for batch in _batches(lengths, [len(p) for p in encoded], max_rows):
        rows = [(i, ctx, cont) for i in batch for ctx, cont in encoded[i]]
        seqs = [(ctx + cont)[:-1] for _, ctx, cont in rows]  # the last token is only predicted
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, s in enumerate(seqs):  # right padding: positions count from 0 in every row
            ids[j, : len(s)], mask[j, : len(s)] = torch.tensor(s), 1
        first = min(len(ctx) for _, ctx, _ in rows) - 1  # the first position that predicts a continuation token
        keep = torch.arange(first, width, device=device)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep).logits
        for j, (i, ctx, cont) in enumerate(rows):
            at = torch.arange(len(ctx) - 1 - first, len(ctx) - 1 - first + len(cont), device=device)
            logprobs = torch.log_softmax(logits[j, at].float(), dim=-1)  # (len(cont), vocab)
            target = torch.tensor(cont, device=device)
            ll = logprobs.gather(1, target[:, None]).sum().item()
            results[i].append((ll, bool((logprobs.argmax(-1) == target).all())))
    return results


def score_clozes(model: nn.Module, tokenizer: Any, clozes: list[Cloze], max_rows: int = 32) -> list[dict[str, Any]]:
    """Each record's `acc` and `acc_norm` (0 or 1) and its options' log-likelihoods."""
    pairs = [list(zip(c.contexts, c.continuations, strict=True)) for c in clozes]
    scored = loglikelihoods(model, tokenizer, pairs, max_rows)
    out = []
    for cloze, lls in zip(clozes, scored, strict=True):
        ll = [v for v, _ in lls]
        norm = [v / max(1, len(choice)) for v, choice in zip(ll, cloze.choices, strict=True)]
        out.append(
            {
                "acc": float(ll.index(max(ll)) == cloze.gold),
                "acc_norm": float(norm.index(max(norm)) == cloze.gold),
                "ll": [round(v, 4) for v in ll],
            }
        )
    return out
