"""Real model shapes, copied from the public config.json files (no weights; nothing is downloaded)."""

from __future__ import annotations

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
        hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=8, vocab_size=512, tie_word_embeddings=True,
    ),
}  # fmt: skip
