"""Models and tokenizers: from a config (random weights), from a checkpoint, and the embedded tiny tokenizer.

Safe by default: `trust_remote_code` only when the recipe sets it, and weights from safetensors only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trl

from hfrecipes.errors import UsageError


@dataclass
class ModelConfig(trl.ModelConfig):
    """TRL's model options (LoRA, QLoRA, dtype, attention) plus hfrecipes' safety switches."""

    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code from the checkpoint's repository. Off unless you trust it."}
    )
    allow_pickle_weights: bool = field(
        default=False,
        metadata={"help": "Allow pickled `.bin` weights (can run arbitrary code). Off: safetensors only."},
    )


def has_accelerator() -> bool:
    import torch

    return (
        torch.cuda.is_available()
        or (hasattr(torch, "xpu") and torch.xpu.is_available())
        or (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available())
    )


def apply_device_defaults(args) -> None:
    """On a machine without an accelerator, train on the CPU: `use_cpu=True` (so `accelerate launch --multi_gpu`
    gives gloo DDP instead of one process per rank training alone), and no bf16/fp16 (TRL configs default bf16 on,
    which a CPU-only machine refuses). Call at the top of a config's `__post_init__`."""
    if has_accelerator():
        return
    args.use_cpu = True
    args.bf16 = False
    args.fp16 = False


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as e:
        raise UsageError(f"tokenizer '{name_or_path}' could not be loaded: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def train_tiny_tokenizer(texts, vocab_size: int, model_max_length: int):
    from hfrecipes.tiny.tokenizer import train_tokenizer

    return train_tokenizer(texts, vocab_size=vocab_size, model_max_length=model_max_length)


def config_from(source: str, overrides: dict[str, Any] | None, tokenizer, trust_remote_code: bool = False):
    """A model config to initialise randomly: `tiny` (embedded) or a config folder/Hub id, with overrides.

    The vocabulary and special-token ids follow the tokenizer, so a freshly trained tokenizer always fits.
    """
    from transformers import AutoConfig

    overrides = dict(overrides or {})
    if source == "tiny":
        from hfrecipes.tiny import tiny_config

        config = tiny_config(**overrides)
    else:
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **overrides)
        except (OSError, ValueError) as e:
            raise UsageError(f"model_init_config '{source}' could not be loaded: {e}") from None
    config.vocab_size = len(tokenizer)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


def init_model(config, seed: int):
    """Random weights from `config`, deterministic for `seed`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def check_model_path(name_or_path: str, field: str = "model_name_or_path") -> None:
    """A local path that is not there fails here, before anything loads (Hub ids pass through)."""
    p = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or p.suffix in (".gguf", ".safetensors")
    if looks_local and not p.exists():
        raise UsageError(f"{field} '{name_or_path}' does not exist. Check the path.")


def load_causal_lm(model_args, torch_dtype: str | None = None):
    """A pretrained causal LM from `trl.ModelConfig`: safetensors only, remote code only when asked."""
    from transformers import AutoModelForCausalLM

    check_model_path(model_args.model_name_or_path)
    try:
        return AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path,
            revision=model_args.model_revision,
            trust_remote_code=model_args.trust_remote_code,
            attn_implementation=model_args.attn_implementation,
            dtype=torch_dtype or model_args.dtype or "auto",
            use_safetensors=not model_args.allow_pickle_weights,
        )
    except (OSError, ValueError) as e:
        raise UsageError(f"model_name_or_path '{model_args.model_name_or_path}' could not be loaded: {e}") from None
