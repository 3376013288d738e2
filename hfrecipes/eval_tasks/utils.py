"""Loading for the bundled lm-evaluation-harness tasks: each reads a JSON-lines file shipped beside it, so the tasks
run offline and from any working directory (`lm_eval --include_path <this folder> --tasks tiny_addition` works too).
"""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load(data_file: str, kind: str | None = None, **_) -> datasets.DatasetDict:
    """The `test` split of `data_file` (relative to this folder); `kind` keeps only the rows of that kind. lm-eval
    passes the task's metadata (its version) as keywords too, hence `**_`."""
    with open(HERE / data_file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if kind is not None:
        rows = [r for r in rows if r["kind"] == kind]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
