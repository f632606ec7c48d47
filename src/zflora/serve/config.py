"""`zflora serve`'s options (light: the command line builds its flags from this)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ServeConfig:
    """vLLM OpenAI-compatible server for a base checkpoint + zFLoRA adapter (needs vLLM). Arguments after
    `--` are passed to vLLM's api_server unchanged, e.g. `-- --port 8000`."""

    model: Path = field(metadata={"help": "the base model's local checkpoint directory"})
    adapter: Path | None = field(default=None, metadata={"help": "zFLoRA adapter directory (none: serve the base)"})
    pad_to: int | None = field(default=None, metadata={"help": "widen the fused stream with zero channels to a "
                                                               "multiple of N (a faster GEMM width)"})  # fmt: skip
    dry_run: bool = field(default=False, metadata={"help": "check the adapter and print the vLLM command only"})
    vllm_args: list[str] = field(default_factory=list, metadata={"cli": False})
