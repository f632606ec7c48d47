"""One projection, as the paper's single-layer study: base linear; LoRA's four operations (A x, B(.),
scale, add); naive fused LoRA ([W; A] x, split, B(.), scale, add); zFLoRA (one matmul with r more
columns or rows). Runs with `zflora bench --full`."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from ..config import check_alpha
from ..models import head_dim
from .config import BenchConfig
from .harness import Timer, interleaved, summarize
from .report import md_table, target


def projection_shapes(config: Any) -> list[tuple[str, str, int, int]]:
    """(name, kind, in, out) of the model's distinct projections; kind as in zFLoRA."""
    d, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * head_dim(config), config.num_key_value_heads * head_dim(config)
    return [("q", "in", d, q), ("k/v", "in", d, kv), ("o", "out", q, d), ("gate/up", "in", d, inter),
            ("down", "out", inter, d)]  # fmt: skip


def _lora(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    return F.linear(x, w) + F.linear(F.linear(x, a), b) * s  # PEFT's order: A x, B (.), scale, add


def _naive_fused(x: torch.Tensor, wa: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    y, t = F.linear(x, wa).split([b.shape[0], wa.shape[0] - b.shape[0]], dim=-1)  # [W x ; A x], split
    return y + F.linear(t, b) * s


def _variants(
    kind: str, x: torch.Tensor, w: torch.Tensor, ranks: tuple[int, ...], alpha: float | None, rand: Callable
) -> dict:
    fns: dict[str, Callable[[], Any]] = {"base": partial(F.linear, x, w)}
    fin, fout = w.shape[1], w.shape[0]
    for r in ranks:
        a, b, scale = rand(r, fin), rand(fout, r), check_alpha(alpha, r) / r  # s = alpha / r, as --alpha gives it
        wa = torch.cat([w, a])  # naive fusion of the down-projection: (out + r, in)
        fns[f"lora r={r}"] = partial(_lora, x, w, a, b, scale)
        fns[f"naive-fused r={r}"] = partial(_naive_fused, x, wa, b, scale)
        if kind == "in":  # [W | s B] on the d + r stream
            wz, xz = torch.cat([w, scale * b], dim=1), torch.cat([x, rand(x.shape[0], r)], dim=1)
            fns[f"zflora r={r}"] = partial(F.linear, xz, wz)
        else:  # [W ; A]
            fns[f"zflora r={r}"] = partial(F.linear, x, wa)
    return fns


@torch.no_grad()
def projection_study(
    cfg: BenchConfig, config: Any, dtype: torch.dtype, device: torch.device, timer: Timer, tick: Callable
) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) / math.sqrt(shape[-1])).to(dtype=dtype, device=device)

    rows = []
    for name, kind, fin, fout in projection_shapes(config):
        w = rand(fout, fin)
        for tokens in cfg.proj_tokens:
            fns = _variants(kind, rand(cfg.batch * tokens, fin), w, cfg.proj_ranks, cfg.alpha, rand)
            samples = interleaved(timer, fns, cfg.proj_repeats, cfg.warmup, tick)
            base_ms = statistics.median(samples["base"])
            for key, ss in samples.items():
                variant, _, rank = key.partition(" r=")
                rows.append({"projection": name, "kind": kind, "in": fin, "out": fout, "tokens": tokens,
                             "rank": int(rank) if rank else None, "variant": variant, **summarize(ss),
                             "ratio_to_base": statistics.median(ss) / base_ms, "samples_ms": ss})  # fmt: skip
    return rows


def shown_rank(proj: list[dict]) -> int:
    ranks = sorted({r["rank"] for r in proj if r["rank"]})
    return 64 if 64 in ranks else ranks[-1]


def check_target(proj: list[dict]) -> list[dict[str, Any]]:
    """zFLoRA's one matmul within 5% of base where base takes >= 0.5 ms, r <= 64."""
    base_ms = {(r["projection"], r["tokens"]): r["median_ms"] for r in proj if r["variant"] == "base"}
    zf = [r for r in proj if r["variant"] == "zflora" and r["rank"] <= 64]
    big = [r for r in zf if base_ms[r["projection"], r["tokens"]] >= 0.5]
    if not big:
        return []
    worst = max(big, key=lambda r: r["ratio_to_base"])
    share = sum(r["ratio_to_base"] <= 1.05 for r in big) / len(big)
    note = f"worst: {worst['projection']} tokens={worst['tokens']} r={worst['rank']}; met in {share:.0%} of cases"
    return [target("one projection: zflora / base where base >= 0.5 ms, r <= 64", worst["ratio_to_base"], 1.05,
                   note=note)]  # fmt: skip


def markdown(proj: list[dict]) -> list[str]:
    show = shown_rank(proj)
    body = []
    for name, tokens in dict.fromkeys((r["projection"], r["tokens"]) for r in proj):
        cell = {r["variant"]: r for r in proj if (r["projection"], r["tokens"]) == (name, tokens)
                and r["rank"] in (None, show)}  # fmt: skip
        body.append([name, tokens, f"{cell['base']['median_ms']:.3f}",
                     *(f"{cell[v]['ratio_to_base']:.3f}" for v in ("lora", "naive-fused", "zflora"))])  # fmt: skip
    head = ["projection", "tokens", "base ms", "lora (4 ops)", "naive fused", "zflora"]
    return ["", f"One projection, r = {show}: median ms of base, then x base for each variant", "",
            *md_table(head, body)]  # fmt: skip


def plot(ax: Any, proj: list[dict]) -> None:
    import matplotlib.pyplot as plt

    show = shown_rank(proj)
    names = list(dict.fromkeys(r["projection"] for r in proj))
    colors = dict(zip(names, plt.get_cmap("tab10").colors, strict=False))  # colour: projection
    for variant, style in (("lora", "-"), ("naive-fused", ":"), ("zflora", "--")):  # style: variant
        for name in names:
            rows = [r for r in proj if (r["variant"], r["rank"], r["projection"]) == (variant, show, name)]
            ax.plot([r["tokens"] for r in rows], [r["ratio_to_base"] for r in rows], style, color=colors[name],
                    marker="o", markersize=3, label=f"{variant} {name}")  # fmt: skip
    ax.set_xscale("log")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("tokens")
    ax.set_ylabel("time / base linear")
    ax.set_title(f"One projection, r={show}")
    ax.legend(fontsize=6, ncol=3)
