"""hfrecipes: the whole life of a language model on Transformers and TRL, with what it knows and what it cost.

import hfrecipes
out = hfrecipes.pretrain("tiny/pretrain", max_steps=50)
print(out.output_dir, out.record["compute"]["flops_6nd"])
"""

# `hfrecipes.cost` and `hfrecipes.lifecycle` are API functions. The modules of the same names are imported first, so
# that loading them later cannot replace the functions on the package; code reaches the modules with
# `from hfrecipes.cost import ...`.
from hfrecipes import cost as _cost_module  # noqa: F401
from hfrecipes import lifecycle as _lifecycle_module  # noqa: F401
from hfrecipes.api import (
    StageResult,
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
    sft,
)
from hfrecipes.errors import UsageError

__version__ = "0.1.0"
__all__ = [
    "StageResult",
    "UsageError",
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
    "sft",
    "__version__",
]
