"""The machine: what it runs natively (and so which dtype to pick), and its description for every figure."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from .config import check_dtype

# CPU features that decide which dtype runs fast (bf16 is emulated, ~60x slower than fp32, without them).
CAPABILITY_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether `device` runs bf16 matmuls natively: a CUDA GPU that supports bf16, or a CPU with
    AVX-512 BF16 or AMX. Elsewhere (AVX2 only) PyTorch emulates bf16, about 60x slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def auto_dtype(name: str, device: torch.device | str = "cpu") -> str:
    """`name`, or for "auto" the fastest exact-enough dtype the hardware runs natively: bf16 or fp32."""
    if name != "auto":
        check_dtype("dtype", name)
        return name
    return "bf16" if native_bf16(device) else "fp32"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def environment(device: torch.device, dtype: str) -> dict[str, Any]:
    """The machine and library versions, recorded beside every figure; the CPU's dtype capability too."""
    import peft
    import transformers

    flags = cpu_flags()
    return {
        "device": device.type,
        "hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu_capability": [f for f in CAPABILITY_FLAGS if f in flags],
        "native_bf16": native_bf16(device),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "dtype": dtype,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def describe_machine(env: dict[str, Any]) -> str:
    """One line naming the hardware, its dtype capability, threads and versions, for every report."""
    caps = ", ".join(env.get("cpu_capability") or []) or "no AVX2"
    native = "native bf16" if env.get("native_bf16") else "no native bf16"
    where = env["hardware"] if env["device"] == "cuda" else f"{env['hardware']} ({caps}; {native})"
    versions = f"torch {env['torch']}, transformers {env['transformers']}"
    threads = f"{env['threads']} thread{'' if env['threads'] == 1 else 's'}"
    return f"{where}, {threads}, {env['dtype']}; {versions}"
