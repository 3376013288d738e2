"""Log messages from the libraries hfrecipes calls that every command would print and no user can act on, dropped at
the logger that emits them (exactly those messages; everything else those loggers say still shows). Installed when
the package is imported, before any of these libraries is.

    hfrecipes check tiny/sft    # prints its verdict, not bitsandbytes' kernel notice
"""

from __future__ import annotations

import logging
import re

# (emitting logger, a regular expression the start of the message matches)
DROPPED = (
    # bitsandbytes imports with peft (and so with transformers' Trainer) on every command. On a CPU with AVX-512 BF16
    # it tries to fetch a faster 4-bit kernel from the Hub through the optional `kernels` package and says so when it
    # cannot; its own CPU kernel runs instead, and hfrecipes downloads no code at run time.
    ("bitsandbytes.backends.cpu.ops", re.escape("Failed to load CPU gemm_4bit_forward from kernels-community")),
    # `hfrecipes eval` hands lm-eval a model it loaded itself (adapters merged, on the inference device) on purpose,
    # and the bundled tasks read their shipped files through `custom_dataset`, which takes no extra keywords.
    ("lm_eval.models.huggingface", re.escape("`pretrained` model kwarg is not of type `str`")),
    ("lm_eval.models.huggingface", re.escape("Passed an already-initialized model through `pretrained`")),
    ("lm_eval.api.task", r"[\w.-]+: Custom kwargs can be passed to `--metadata`"),
)


class _Drop(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return re.match(self.prefix, str(record.msg)) is None


def install() -> None:
    """Add the filters to their loggers (once: importing the package again adds none)."""
    for name, prefix in DROPPED:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_Drop(prefix))
