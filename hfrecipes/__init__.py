"""hfrecipes: the whole life of a language model on Transformers and TRL, with what it knows and what it cost.

import hfrecipes
out = hfrecipes.pretrain("tiny/pretrain", max_steps=50)
print(out.output_dir, out.record["compute"]["flops_6nd"])
"""

from hfrecipes.api import (
    StageResult,
    convert,
    cost,
    dpo,
    export,
    generate,
    grpo,
    lifecycle,
    parse_stage_args,
    ppo,
    pretrain,
    push,
    read_record,
    recipes,
    reward,
    run_stage,
    serve,
    sft,
)
from hfrecipes.errors import UsageError

__version__ = "0.1.0"
__all__ = [
    "StageResult",
    "UsageError",
    "convert",
    "cost",
    "dpo",
    "export",
    "generate",
    "grpo",
    "lifecycle",
    "parse_stage_args",
    "ppo",
    "pretrain",
    "push",
    "read_record",
    "recipes",
    "reward",
    "run_stage",
    "serve",
    "sft",
    "__version__",
]
