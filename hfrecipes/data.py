"""Datasets for every stage: bundled tiny data, local files, Hub ids; column checks; knowledge-cutoff dates.

Everything here runs before a model is loaded, so a dataset without the columns a stage needs fails in seconds
with the missing column, the columns found and the recipe key that fixes it (`dataset_columns`).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trl

from hfrecipes.errors import UsageError

TINY_PREFIX = "tiny:"
TINY_DATASETS = ("corpus", "sft", "preference", "prompts")
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
# The columns each stage reads: any one of the sets. Checked on the raw data, before any model is loaded.
STAGE_COLUMNS: dict[str, list[list[str]]] = {
    "pretrain": [["text"]],
    "sft": [["messages"], ["prompt", "completion"]],
    "reward": [["prompt", "chosen", "rejected"], ["chosen", "rejected"]],
    "dpo": [["prompt", "chosen", "rejected"], ["chosen", "rejected"]],
    "ppo": [["prompt"]],
}
# What a value in each well-known column must be, checked on the first rows before any model loads.
COLUMN_TYPES: dict[str, tuple[type, ...]] = {
    "text": (str,),
    "messages": (list,),
    "prompt": (str, list),
    "completion": (str, list),
    "chosen": (str, list),
    "rejected": (str, list),
    "answer": (str, int, float),
}


@dataclass
class ScriptArguments(trl.ScriptArguments):
    """TRL's script arguments plus hfrecipes' data options, shared by every stage."""

    dataset_columns: dict | str | None = field(
        default=None,
        metadata={
            "help": "Column mapping for datasets whose columns have other names: {stage column: dataset column}, "
            'e.g. {"text": "content"}. A JSON string on the command line.'
        },
    )
    dataset_date_column: str | None = field(
        default="date",
        metadata={
            "help": "Column(s) holding each document's date, comma-separated (e.g. 'date,published'); the "
            "newest date in them is the knowledge cutoff."
        },
    )
    knowledge_cutoff: str | None = field(
        default=None,
        metadata={"help": "Declared knowledge cutoff (YYYY-MM-DD), used when the data carries no dates."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training examples (quick runs)."}
    )
    dataset_test_split: str | None = field(
        default="test",
        metadata={
            "help": "Split held out for evaluation; null or an empty string for none. A single data file has "
            "no test split."
        },
    )
    tiny_seed: int = field(default=0, metadata={"help": "Seed of the embedded tiny data (`tiny:` datasets)."})

    # Cost and card (defaults: the device table in hfrecipes/cost.py)
    cost_device: str | None = field(
        default=None,
        metadata={"help": "Device row of the cost table (h100, a100, l4, cpu, ...); default: the device detected."},
    )
    device_price_per_hour: float | None = field(
        default=None, metadata={"help": "Price of one device-hour in USD; default: the cost table's."}
    )
    device_power_watts: float | None = field(
        default=None, metadata={"help": "Power draw of one device in watts; default: the cost table's."}
    )
    pue: float | None = field(default=None, metadata={"help": "Data-centre power usage effectiveness; default 1.2."})
    grid_gco2_per_kwh: float | None = field(
        default=None, metadata={"help": "Grid carbon intensity in gCO2/kWh; default 475 (world average)."}
    )
    license: str | None = field(
        default=None, metadata={"help": "License in the model card (a Hub license id); default: the parent's."}
    )

    def __post_init__(self):
        if self.dataset_test_split == "":
            self.dataset_test_split = None
        if isinstance(self.dataset_columns, str):
            try:
                self.dataset_columns = json.loads(self.dataset_columns)
            except json.JSONDecodeError:
                raise ValueError(
                    'dataset_columns must be a mapping such as \'{"text": "content"}\', '
                    f"got {self.dataset_columns!r}"
                ) from None
        if self.knowledge_cutoff is not None:
            try:
                dt.date.fromisoformat(str(self.knowledge_cutoff))
            except ValueError:
                raise ValueError(
                    f"knowledge_cutoff must be a date YYYY-MM-DD, got {self.knowledge_cutoff!r}"
                ) from None
            self.knowledge_cutoff = str(self.knowledge_cutoff)
        if self.cost_device is not None:
            from hfrecipes.cost import DEVICES, device_key

            if device_key(self.cost_device) is None:
                raise ValueError(f"cost_device must be one of {', '.join(DEVICES)}, got {self.cost_device!r}")
        if self.dataset_name is None:
            raise ValueError(
                "dataset_name is required: a bundled `tiny:` dataset, a local file or folder, or a Hub id"
            )


# ------------------------------------------------------------------------------------------------ loading


def tiny_rows(name: str, split: str, seed: int = 0) -> list[dict[str, Any]]:
    """Rows of a bundled tiny dataset; `split` is `train` or `test` (test = the held-out problems)."""
    from hfrecipes.tiny import corpus, task

    if name not in TINY_DATASETS:
        raise UsageError(
            f"dataset_name 'tiny:{name}' is not bundled; the tiny datasets are: "
            + ", ".join(TINY_PREFIX + n for n in TINY_DATASETS)
            + "."
        )
    if split not in ("train", "test"):
        raise UsageError(f"dataset split '{split}' of 'tiny:{name}' does not exist; use 'train' or 'test'.")
    if name == "corpus":
        docs = corpus.documents(seed=seed)
        n_test = len(docs) // 50
        return docs[n_test:] if split == "train" else docs[:n_test]
    splits = task.split_pairs(seed)
    if name == "sft":
        return task.sft_rows(splits["sft"] if split == "train" else splits["heldout"])
    if name == "preference":
        return task.preference_rows(splits["sft"] if split == "train" else splits["heldout"], seed)
    return task.prompt_rows(splits["rl"] if split == "train" else splits["heldout"])


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).suffix in FILE_BUILDERS or "\\" in name


def load_split(args: ScriptArguments, split: str):
    """One split of the dataset named by `args.dataset_name`, with the recipe's column mapping applied."""
    import datasets

    name = args.dataset_name
    if name.startswith(TINY_PREFIX):
        ds = datasets.Dataset.from_list(tiny_rows(name[len(TINY_PREFIX) :], split, args.tiny_seed))
    elif Path(name).expanduser().exists():
        path = Path(name).expanduser()
        if path.is_dir():
            ds = _load(lambda: datasets.load_dataset(str(path), args.dataset_config, split=split), name)
        else:
            builder = FILE_BUILDERS.get(path.suffix)
            if builder is None:
                raise UsageError(
                    f"dataset_name '{name}': files ending in '{path.suffix}' are not read; use one of "
                    f"{', '.join(FILE_BUILDERS)}."
                )
            if split != args.dataset_train_split:
                return None  # a single file is the training split only
            ds = _load(lambda: datasets.load_dataset(builder, data_files=str(path), split="train"), name)
    elif _looks_like_path(name):
        raise UsageError(f"dataset_name '{name}' does not exist. Check the path, or name a Hub dataset id.")
    else:
        ds = _load(lambda: datasets.load_dataset(name, args.dataset_config, split=split), name)
    if ds is None:
        return None
    if args.dataset_columns:
        ds = _apply_mapping(ds, args.dataset_columns, name)
    return ds


def _load(fn, name):
    try:
        return fn()
    except ValueError as e:  # datasets raises ValueError for an unknown split, and for a file with no rows
        if "corresponds to no data" in str(e):
            raise UsageError(f"dataset '{name}' is empty; a stage needs at least one example.") from None
        if "split" in str(e).lower():
            return None
        raise UsageError(f"dataset_name '{name}' could not be read: {e}") from None
    except StopIteration:  # datasets' JSON reader on a file without a single row
        raise UsageError(f"dataset '{name}' is empty; a stage needs at least one example.") from None
    except (FileNotFoundError, ConnectionError, OSError) as e:
        raise UsageError(
            f"dataset_name '{name}' could not be loaded ({type(e).__name__}: {e}). Use a local file or folder, "
            "or check the Hub id and your connection."
        ) from None


def _apply_mapping(ds, mapping: dict[str, str], name: str):
    missing = [src for src in mapping.values() if src not in ds.column_names]
    if missing:
        raise UsageError(
            f"dataset_columns maps to column(s) {missing} that '{name}' does not have; its columns are "
            f"{ds.column_names}."
        )
    renames = {src: dst for dst, src in mapping.items() if src != dst}
    clashes = [dst for dst in renames.values() if dst in ds.column_names]
    if clashes:
        ds = ds.remove_columns(clashes)
    return ds.rename_columns(renames)


def load_stage_data(args: ScriptArguments, stage: str, needs: list[list[str]]):
    """Training and (if present) test split, checked for the columns a stage needs: any one of `needs`."""
    train = load_split(args, args.dataset_train_split)
    if train is None:
        raise UsageError(
            f"dataset_name '{args.dataset_name}' has no split '{args.dataset_train_split}' (dataset_train_split)."
        )
    check_columns(train, needs, stage, args.dataset_name)
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    test = load_split(args, args.dataset_test_split) if args.dataset_test_split else None
    if test is not None and len(test) > 0:
        check_columns(test, needs, stage, f"{args.dataset_name} ({args.dataset_test_split})")
    else:
        test = None
    return train, test


def check_columns(ds, needs: list[list[str]], stage: str, name: str) -> list[str]:
    """The first column set in `needs` that `ds` has; else one error naming what is missing and what was found."""
    if len(ds) == 0:
        raise UsageError(f"dataset '{name}' is empty; the {stage} stage needs at least one example.")
    found = list(ds.column_names)
    for columns in needs:
        if all(c in found for c in columns):
            _check_types(ds, columns, name)
            return columns
    wanted = " or ".join("+".join(cols) for cols in needs)
    best = min(needs, key=lambda cols: sum(c not in found for c in cols))
    missing = [c for c in best if c not in found]
    raise UsageError(
        f"dataset '{name}' lacks column(s) {missing} that the {stage} stage needs ({wanted}); it has {found}. "
        f'Rename them in the recipe with dataset_columns, e.g. {{"{missing[0]}": "<your column>"}}.'
    )


def _check_types(ds, columns: list[str], name: str) -> None:
    sample = ds.select(range(min(len(ds), 100)))
    for col in columns:
        expected = COLUMN_TYPES.get(col)
        if expected is None:
            continue
        for i, value in enumerate(sample[col]):
            if not isinstance(value, expected):
                names = " or ".join(t.__name__ for t in expected)
                raise UsageError(
                    f"dataset '{name}': column '{col}' row {i} holds a {type(value).__name__} ({value!r:.60}), "
                    f"expected {names}."
                )


def fingerprint(ds) -> str | None:
    return getattr(ds, "_fingerprint", None)


# --------------------------------------------------------------------------------------------- knowledge cutoff


def _as_date(value) -> dt.date | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, (int, float)):  # a Unix timestamp
        return dt.datetime.fromtimestamp(value, dt.timezone.utc).date()
    try:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).date()
    except ValueError:
        return None


def knowledge_cutoff(datasets_: list, date_column: str | None, declared: str | None) -> dict[str, Any]:
    """The newest document date in the training data, or the recipe's declared date; and which of the two."""
    newest, count, used = None, 0, []
    columns = [c.strip() for c in (date_column or "").split(",") if c.strip()]
    for ds in datasets_:
        for column in columns:
            if ds is None or column not in ds.column_names:
                continue
            used.append(column)
            for value in ds[column]:
                d = _as_date(value)
                if d is not None:
                    count += 1
                    newest = d if newest is None or d > newest else newest
    data_date = newest.isoformat() if newest else None
    names = ", ".join(f"'{c}'" for c in dict.fromkeys(used or columns))
    if declared:
        detail = "declared in the recipe (knowledge_cutoff)"
        if data_date:
            detail += f"; the newest dated document in the data is {data_date}"
        return {"date": declared, "source": "declared", "data_date": data_date, "detail": detail}
    if data_date:
        return {
            "date": data_date,
            "source": "data",
            "data_date": data_date,
            "detail": f"newest value of column {names} over {count} dated documents",
        }
    why = f"the data has no dated column {names}" if columns else "no date column is configured"
    return {
        "date": None,
        "source": "unknown",
        "data_date": None,
        "detail": f"{why} and the recipe declares no knowledge_cutoff",
    }


def model_cutoff(stage_cutoff: dict[str, Any], parent: dict[str, Any] | None, stage: str) -> dict[str, Any]:
    """A model knows what its parent knew plus this stage's data: the later of the two dates, and which stage."""
    inherited = ((parent or {}).get("data") or {}).get("model_cutoff")
    if stage_cutoff.get("date") and (
        not inherited or not inherited.get("date") or stage_cutoff["date"] >= inherited["date"]
    ):
        return {**stage_cutoff, "stage": stage}
    if inherited:
        return dict(inherited)
    return {**stage_cutoff, "stage": stage}
