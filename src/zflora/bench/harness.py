"""Timing after gpt-fast: warm up and discard, interleave what is compared, medians and quartiles,
CUDA events on a GPU and `perf_counter` on a CPU, and the machine recorded beside every figure."""

from __future__ import annotations

import math
import os
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn


class Timer:
    """Milliseconds of `inner` calls of `fn`, per call: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any], inner: int = 1) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / inner
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t) * 1e3 / inner


def summarize(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else [samples[0]] * 3
    return {"median_ms": statistics.median(samples), "p25_ms": q[0], "p75_ms": q[2], "n": len(samples)}


def rotated(items: list[str], rep: int) -> list[str]:
    """The order for repetition `rep`: rotated, so no item always follows the same one."""
    k = rep % len(items)
    return items[k:] + items[:k]


def interleaved(
    timer: Timer, fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, tick: Callable[[], Any],
    min_ms: float = 10.0,
) -> dict[str, list[float]]:  # fmt: skip
    """Time every fn once per repetition, in rotating order; calls shorter than `min_ms` are looped."""
    inner = {}
    for name, fn in fns.items():  # warm-up, discarded; also sizes the inner loop
        t = min(timer(fn) for _ in range(max(warmup, 1)))
        inner[name] = max(1, math.ceil(min_ms / max(t, 1e-3)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(repeats):
        for name in rotated(list(fns), rep):
            samples[name].append(timer(fns[name], inner[name]))
        tick()
    return samples


def pick_device(name: str, threads: int | None) -> torch.device:
    """The device for "auto" / "cpu" / "cuda"; on a CPU, `threads` threads (default: every core)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if threads or device.type == "cpu":
        torch.set_num_threads(threads or os.cpu_count() or 1)
    return device


def model_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on (for a server this run starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
