"""The embedded default: a dated corpus, one verifiable task, a local tokenizer and a small Llama config.

Nothing here downloads anything; everything is deterministic from a seed.
"""

from __future__ import annotations

# Llama, ~2.0M parameters; head_dim 32 because vLLM's CPU backend supports only 32, 64, 80, 96, 112, 128, ...
TINY_LLAMA = dict(
    model_type="llama",
    vocab_size=2048,
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)


def tiny_config(**overrides):
    """The tiny Llama config (a `transformers.LlamaConfig`), with `overrides` applied."""
    from transformers import AutoConfig

    values = {**TINY_LLAMA, **overrides}
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)
