"""hfrecipes: the whole life of a language model on Transformers and TRL, with what it knows and what it cost.

import hfrecipes
out = hfrecipes.pretrain("tiny/pretrain", max_steps=50)
print(out.output_dir, out.record["compute"]["flops_6nd"])
"""

from hfrecipes import api as _api
from hfrecipes import quiet as _quiet
from hfrecipes.api import (
    StageResult,
    convert,
    cost,
    evaluate,
    export,
    generate,
    lifecycle,
    parse_stage_args,
    plan,
    push,
    read_record,
    recipes,
    run_stage,
    serve,
)
from hfrecipes.errors import UsageError
from hfrecipes.stages import STAGES

_quiet.install()  # the imports above are light: no library whose message it drops has loaded yet

globals().update({stage_id: getattr(_api, stage_id) for stage_id in STAGES})  # hfrecipes.sft(...), one a stage

__version__ = "0.1.0"
__all__ = [
    "StageResult",
    "UsageError",
    "convert",
    "cost",
    "evaluate",
    "export",
    "generate",
    "lifecycle",
    "parse_stage_args",
    "plan",
    "push",
    "read_record",
    "recipes",
    "run_stage",
    "serve",
    *STAGES,
    "__version__",
]
