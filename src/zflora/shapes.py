"""Real model shapes (from the public config.json files) for benchmarks and parameter counts.

Latency does not depend on weight values, so these are built with random weights.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

PRESETS: dict[str, dict] = {
    "llama-3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
    ),
    "llama-3.2-3b": dict(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
    ),
    # A few-second shape for smoke tests.
    "tiny": dict(
        hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=8, vocab_size=512, tie_word_embeddings=True,
    ),
}  # fmt: skip


def preset_config(name: str, layers: int | None = None) -> LlamaConfig:
    if name not in PRESETS:
        raise ValueError(f"preset: unknown {name!r}; accepted: {', '.join(PRESETS)}")
    fields = dict(PRESETS[name], rms_norm_eps=1e-5, max_position_embeddings=131072, rope_theta=500000.0)
    if layers is not None:
        if layers <= 0:
            raise ValueError(f"layers: must be positive, got {layers}")
        fields["num_hidden_layers"] = layers
    return LlamaConfig(**fields)


def meta_model(config: LlamaConfig) -> LlamaForCausalLM:
    """A model with no storage, for counting parameters of real shapes instantly."""
    with torch.device("meta"):
        return LlamaForCausalLM(config)
