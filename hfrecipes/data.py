"""Datasets for every stage: bundled tiny data, local files, Hub ids; column checks; knowledge-cutoff dates.

Everything here runs before a model is loaded, so a dataset without the columns a stage needs fails in seconds
with the missing column, the columns found and the recipe key that fixes it (`dataset_columns`).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trl

from hfrecipes.errors import UsageError

TINY_PREFIX = "tiny:"
TINY_DATASETS = ("corpus", "sft", "preference", "unpaired", "prompts", "facts")
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
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
    dataset_max_date: str | None = field(
        default=None,
        metadata={
            "help": "Drop training and test rows dated after this day (YYYY-MM-DD; by dataset_date_column) before "
            "training, so the data stops there. Read by the pretrain stage; the record counts what was dropped."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training examples (quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Evaluate on only the first N held-out examples (a stage's own held-out evaluation)."},
    )
    dataset_test_split: str | None = field(
        default="test",
        metadata={
            "help": "Split held out for evaluation; null or an empty string for none. A single data file has "
            "no test split."
        },
    )
    tiny_seed: int = field(default=0, metadata={"help": "Seed of the embedded tiny data (`tiny:` datasets)."})

    # Cost and card (defaults: the device table in hfrecipes/costs.py)
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
        for key in ("knowledge_cutoff", "dataset_max_date"):
            value = getattr(self, key)
            if value is None:
                continue
            try:
                dt.date.fromisoformat(str(value))
            except ValueError:
                raise ValueError(f"{key} must be a date YYYY-MM-DD, got {value!r}") from None
            setattr(self, key, str(value))
        if self.cost_device is not None:
            from hfrecipes.costs import DEVICES, device_key

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
    splits_of = {"corpus": ("train", "test"), "facts": ("test",)}.get(name, ("train", "validation", "test"))
    if split not in splits_of:
        raise UsageError(f"dataset split '{split}' of 'tiny:{name}' does not exist; use one of {list(splits_of)}.")
    if name == "facts":  # the knowledge probe of the corpus' dated world: evaluation only
        return corpus.fact_rows(seed)
    if name == "corpus":
        docs = corpus.documents(seed=seed)
        n_test = len(docs) // 50
        return docs[n_test:] if split == "train" else docs[:n_test]
    splits = task.split_pairs(seed)
    pairs = {"train": splits["sft"], "validation": splits["validation"], "test": splits["heldout"]}[split]
    if name == "sft":  # only the training demonstrations carry the annotators' flaw; held-out replies are right
        return task.sft_rows(pairs, annotated=split == "train")
    if name == "preference":
        return task.preference_rows(pairs, seed)
    if name == "unpaired":
        return task.unpaired_rows(pairs, seed)
    return task.prompt_rows(splits["rl"] if split == "train" else pairs)


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
            files = sorted(
                f
                for f in path.rglob("*")
                if f.suffix in FILE_BUILDERS
                and f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(path).parts)
            )
            check_data_files(files)
            ds = _load(lambda: datasets.load_dataset(str(path), args.dataset_config, split=split), name, files)
        else:
            builder = FILE_BUILDERS.get(path.suffix)
            if builder is None:
                raise UsageError(
                    f"dataset_name '{name}': files ending in '{path.suffix}' are not read; use one of "
                    f"{', '.join(FILE_BUILDERS)}."
                )
            if split != args.dataset_train_split:
                return None  # a single file is the training split only
            check_data_files([path])
            ds = _load(lambda: datasets.load_dataset(builder, data_files=str(path), split="train"), name, [path])
    elif _looks_like_path(name):
        raise UsageError(f"dataset_name '{name}' does not exist. Check the path, or name a Hub dataset id.")
    else:
        ds = _load(lambda: datasets.load_dataset(name, args.dataset_config, split=split), name)
    if ds is None:
        return None
    if args.dataset_columns:
        ds = _apply_mapping(ds, args.dataset_columns, name)
    return ds


def _load(fn, name, files: list[Path] | None = None):
    from datasets.exceptions import DatasetGenerationError

    try:
        return fn()
    except DatasetGenerationError as e:  # a local file datasets could not parse: find the line ourselves
        for path in files or []:
            problem = locate_problem(path)
            if problem:
                raise UsageError(f"{path}: {problem}") from None
        cause = e.__cause__ or e
        raise UsageError(
            f"dataset_name '{name}' could not be read ({type(cause).__name__}: {' '.join(str(cause).split())}). "
            "Every row needs the same columns, each holding values of one type."
        ) from None
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


def check_data_files(files: list[Path]) -> None:
    """Local data files datasets would fail on, or read wrongly, found before it scans them: text that is not UTF-8
    (Arrow's JSON reader takes such bytes into a string column, which fails only when a row is read), decoded in
    C a block at a time; and Parquet files whose footer (schema and row groups, the file's last bytes) does not
    read, which are damaged or cut short."""
    import codecs

    for path in files:
        if path.suffix not in (".json", ".jsonl", ".csv", ".txt"):
            continue
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            with path.open("rb") as f:
                while block := f.read(1 << 20):
                    decoder.decode(block)
                decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UsageError(f"{path}: {_text_problem(path) or 'not UTF-8 text. Save the file as UTF-8.'}") from None
        if path.suffix in (".json", ".jsonl") and _json_tail_cut(path):
            raise UsageError(f"{path}: {_json_problem(path) or 'it ends partway through a row: it looks cut short.'}")
    parquet = [f for f in files if f.suffix == ".parquet"]
    if not parquet:
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in parquet:
        try:
            pq.read_metadata(path)
        except (pa.ArrowException, OSError) as e:
            raise UsageError(
                f"{path}: not a readable Parquet file ({' '.join(str(e).split())}); it is damaged or cut short. "
                "Write it again, or use another copy."
            ) from None


def _json_tail_cut(path: Path) -> bool:
    """Whether a JSON or JSON-lines file ends partway through a value: its last character that is not white space
    is not the `}` or `]` that closes a row or a document. Reads the file's last bytes only."""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 4096))
        tail = f.read().rstrip()
    return bool(tail) and tail[-1:] not in (b"}", b"]")


def locate_problem(path: Path) -> str | None:
    """Where a local text data file stops parsing, as "line N: what is wrong", or None if it parses. Read line by
    line, so it runs only once datasets has failed (or a cell came out empty) and the user needs the line."""
    if path.suffix in (".json", ".jsonl"):
        return _json_problem(path)
    if path.suffix == ".csv":
        return _csv_problem(path)
    if path.suffix == ".txt":
        return _text_problem(path)
    return None


def _cut_short(path: Path, line: int, last: int) -> str:
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 1))
        ends_in_newline = f.read() in (b"", b"\n")
    if line == last and not ends_in_newline:
        return " The file ends partway through this line: it looks cut short; write it again or drop the line."
    return " Fix or remove that line."


def _text_problem(path: Path) -> str | None:
    with path.open("rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"line {i} is not UTF-8 text (byte {e.start} of the line). Save the file as UTF-8."
    return None


def _json_problem(path: Path) -> str | None:
    text_problem = _text_problem(path)
    if text_problem:
        return text_problem
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    if path.suffix == ".json" and not _parses(first):  # one JSON document over several lines, not JSON lines
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            return f"line {e.lineno}: not valid JSON ({_json_msg(e)}).{_cut_short(path, e.lineno, len(lines))}"
        if not isinstance(doc, (list, dict)):
            return f"holds a JSON {type(doc).__name__}; a dataset is a list of rows or JSON lines, one row each."
        return None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {i}: not valid JSON ({_json_msg(e)}).{_cut_short(path, i, len(lines))}"
        if not isinstance(row, dict):
            return (
                f"line {i} is a JSON {type(row).__name__}, not an object; each line of a JSON-lines file is one row, "
                '{"column": value, ...}.'
            )
    return None


def _json_msg(e: json.JSONDecodeError) -> str:
    return f"{e.msg.removesuffix(' at')} at column {e.colno}"


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def _csv_problem(path: Path) -> str | None:
    import csv

    text_problem = _text_problem(path)
    if text_problem:
        return text_problem
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f, strict=True)
        with path.open("rb") as lines:
            last = sum(1 for _ in lines)
        try:
            header = next(reader, None)
            for row in reader:
                if row and header is not None and len(row) != len(header):
                    return (
                        f"line {reader.line_num} has {len(row)} fields, the header {len(header)} "
                        f"({', '.join(header)}).{_cut_short(path, reader.line_num, last)}"
                    )
        except csv.Error as e:
            detail = "a quoted field never closes" if "end of data" in str(e) else str(e)
            return f"line {reader.line_num}: not valid CSV ({detail}).{_cut_short(path, reader.line_num, last)}"
    return None


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


def load_stage_data(args: ScriptArguments, stage: str, needs: Sequence[Sequence[str]]):
    """Training and (if present) test split, checked for the columns a stage needs: any one of `needs` (the stage's
    `FACTS.columns`)."""
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
        if args.max_eval_samples is not None:
            test = test.select(range(min(args.max_eval_samples, len(test))))
    else:
        test = None
    return train, test


def check_columns(ds, needs: Sequence[Sequence[str]], stage: str, name: str) -> None:
    """`ds` has one of the column sets in `needs`; else one error naming what is missing and what was found."""
    if len(ds) == 0:
        raise UsageError(f"dataset '{name}' is empty; the {stage} stage needs at least one example.")
    found = list(ds.column_names)
    for columns in needs:
        if all(c in found for c in columns):
            _check_types(ds, columns, name)
            if all(c in columns for c in UNPAIRED):
                _check_labels(ds, name, stage)
            return
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
            if value is None:
                path = Path(name).expanduser()
                problem = locate_problem(path) if path.is_file() else None  # a CSV line cut short reads as empty
                if problem:
                    raise UsageError(f"{path}: {problem}")
                raise UsageError(
                    f"dataset '{name}': column '{col}' row {i} is empty (a missing key, or an empty cell); every "
                    f"row needs a value in '{col}'."
                )
            if not isinstance(value, expected):
                names = " or ".join(t.__name__ for t in expected)
                raise UsageError(
                    f"dataset '{name}': column '{col}' row {i} holds a {type(value).__name__} ({value!r:.60}), "
                    f"expected {names}."
                )
    for col in columns:
        if col in CHAT_COLUMNS:
            conversation_roles(ds, col, name)


# TRL's unpaired preference format (KTO): each row's completion judged alone, `label` true where it is desirable.
UNPAIRED = ("completion", "label")
LABEL_MEANING = "true where the completion is desirable (a thumbs up), false where it is not"


def _check_labels(ds, name: str, stage: str) -> None:
    """The `label` column of unpaired preference data, over the whole column in Arrow: booleans in every row, and
    both kinds present (a stage that learns from the contrast has nothing to contrast with one kind)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = ds.with_format("arrow")["label"]
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    where = f"dataset '{name}': column 'label'"
    if not pa.types.is_boolean(arr.type) and not pa.types.is_null(arr.type):
        first = next((v for v in arr.to_pylist() if v is not None), None)
        raise UsageError(
            f"{where} holds {type(first).__name__} values (such as {first!r:.40}), expected booleans: "
            f"{LABEL_MEANING}. Write the column as true/false."
        )
    if arr.null_count:
        row = pc.index(arr.is_null(), True).as_py()
        raise UsageError(f"{where} row {row} is empty; every row needs a label: {LABEL_MEANING}.")
    desirable = pc.sum(pc.cast(arr, pa.int64())).as_py() or 0
    if desirable in (0, len(arr)):
        kind = "true (desirable)" if desirable else "false (undesirable)"
        rows = "its one row" if len(arr) == 1 else f"all {len(arr)} rows"
        raise UsageError(
            f"{where} is {kind} in {rows}; the {stage} stage needs both desirable (label true) and "
            "undesirable (label false) examples to learn from. Add rows of the other kind."
        )


# ------------------------------------------------------------------------------------------------ conversations

# Columns that hold conversations (lists of messages) in TRL's conversational formats.
CHAT_COLUMNS = ("messages", "prompt", "completion", "chosen", "rejected")
# Roles every chat template takes, by name or through a generic turn; any other must be named in the template.
GENERIC_ROLES = ("system", "user", "assistant")
MESSAGE_FORM = 'Each message is {"role": "user" | "assistant" | "system", "content": "text"}.'


def message_problem(message: Any) -> str | None:
    """What is wrong with one message of a conversation ("has no 'content'", ...), or None."""
    if not isinstance(message, dict):
        return f"is {_a(type(message).__name__)} ({message!r:.40}), not a message"
    sharegpt = " (ShareGPT's from/value: rename them role/content, with human -> user, gpt -> assistant)"
    role, content = message.get("role"), message.get("content")
    if role is None:
        return "has no 'role'" + (sharegpt if "from" in message else "")
    if not isinstance(role, str):
        return f"has role {role!r}, expected text"
    if content is None:
        if message.get("tool_calls"):  # an assistant turn that only calls tools has no text
            return None
        return "has no 'content'" + (sharegpt if "value" in message else "")
    if isinstance(content, list):
        return (
            "has a list as 'content' (content parts, as vision models take); the chat template of a text model "
            "takes a string: join the text parts"
        )
    if not isinstance(content, str):
        return f"has {_a(type(content).__name__)} as 'content' ({content!r:.40}), expected a string"
    return None


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def conversation_roles(ds, col: str, name: str) -> dict[str, int]:
    """Check every conversation in column `col` (rows that are text are skipped): each a non-empty list of messages,
    each message a role and a text content. Returns each role found and the first row that uses it.

    A column whose rows all share one message shape is checked in Arrow over the whole column (no Python object per
    row); one with irregular rows, which is where the broken ones are, row by row in Python."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = ds.with_format("arrow")[col]
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    kind = arr.type
    where = f"dataset '{name}': column '{col}'"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return {}
    item = kind.value_type if pa.types.is_list(kind) or pa.types.is_large_list(kind) else None
    regular = (
        item is not None
        and pa.types.is_struct(item)
        and all(item.get_field_index(k) >= 0 and pa.types.is_string(item.field(k).type) for k in ("role", "content"))
    )
    if not regular:
        return _conversation_roles_rows(ds, col, where)
    first_null = pc.index(arr.is_null(), True).as_py()
    if first_null >= 0:
        raise UsageError(f"{where} row {first_null} is empty (a missing key); every row needs a conversation.")
    first_empty = pc.index(pc.list_value_length(arr), pa.scalar(0, pa.int32())).as_py()
    if first_empty >= 0:
        raise UsageError(f"{where} row {first_empty} is an empty conversation (no messages). {MESSAGE_FORM}")
    flat, parents = pc.list_flatten(arr), pc.list_parent_indices(arr)
    roles, content = pc.struct_field(flat, "role"), pc.struct_field(flat, "content")
    bad = pc.or_(flat.is_null(), roles.is_null())
    no_text = content.is_null()
    if item.get_field_index("tool_calls") >= 0:
        no_text = pc.and_(no_text, pc.struct_field(flat, "tool_calls").is_null())
    bad = pc.or_(bad, no_text)
    first_bad = pc.index(bad, True).as_py()
    if first_bad >= 0:
        row = parents[first_bad].as_py()
        j = first_bad - pc.index(parents, parents[first_bad]).as_py()
        problem = message_problem(flat[first_bad].as_py()) or "is not a message"
        raise UsageError(f"{where} row {row} message {j} {problem}. {MESSAGE_FORM}")
    return {r: parents[pc.index(roles, r).as_py()].as_py() for r in pc.unique(roles).to_pylist()}


def _conversation_roles_rows(ds, col: str, where: str) -> dict[str, int]:
    found: dict[str, int] = {}
    for start in range(0, len(ds), 1000):
        for i, value in enumerate(ds[start : start + 1000][col], start):
            if isinstance(value, str):
                continue
            if value is None:
                raise UsageError(f"{where} row {i} is empty (a missing key); every row needs a conversation.")
            if not isinstance(value, list):
                raise UsageError(f"{where} row {i} holds a {type(value).__name__}, expected a list of messages.")
            if not value:
                raise UsageError(f"{where} row {i} is an empty conversation (no messages). {MESSAGE_FORM}")
            for j, message in enumerate(value):
                problem = message_problem(message)
                if problem:
                    raise UsageError(f"{where} row {i} message {j} {problem}. {MESSAGE_FORM}")
                found.setdefault(message["role"], i)
    return found


def check_chat_data(ds, tokenizer, name: str, chat_template_path: str | None = None) -> None:
    """Conversations the chat template cannot take, found once the tokenizer is loaded and before the model: a role
    outside system/user/assistant that the template never names (it would render as a turn of a kind the model
    never saw, or not at all), and rows the template raises on (its own `raise_exception`, a syntax error, a key it
    reads). The template is the tokenizer's, or the one chat_template_path names (checked here too); it renders the
    first rows and the first row of each role, which is cheap."""
    template = chat_template_file(chat_template_path) if chat_template_path else tokenizer.chat_template
    if ds is None or not template:
        return
    source = f"chat_template_path '{chat_template_path}'" if chat_template_path else f"'{tokenizer.name_or_path}'"
    rows = set(range(min(len(ds), 8)))
    for col in [c for c in CHAT_COLUMNS if c in ds.column_names]:
        for role, row in conversation_roles(ds, col, name).items():
            named = isinstance(template, str) and (f"'{role}'" in template or f'"{role}"' in template)
            if role not in GENERIC_ROLES and not named:
                raise UsageError(
                    f"dataset '{name}': column '{col}' row {row} has role '{role}', which the chat template of "
                    f"{source} never names (besides {', '.join(GENERIC_ROLES)}, a role must be). Rename the role, "
                    f"or set chat_template_path to a template that handles '{role}'."
                )
            rows.add(row)
    for i in sorted(rows):
        example = ds[i]
        prompt = example.get("prompt") if isinstance(example.get("prompt"), list) else []
        if isinstance(example.get("messages"), list):
            conversations = [("messages", example["messages"])]
        else:
            replies = [c for c in ("completion", "chosen", "rejected") if isinstance(example.get(c), list)]
            conversations = [(c, prompt + example[c]) for c in replies] or ([("prompt", prompt)] if prompt else [])
        for col, conversation in conversations:
            try:
                tokenizer.apply_chat_template(
                    conversation, chat_template=template, tokenize=False, add_generation_prompt=col == "prompt"
                )
            except Exception as e:  # jinja2's TemplateError from the template's own checks, or a key it reads
                from jinja2 import TemplateSyntaxError

                if isinstance(e, TemplateSyntaxError):
                    raise UsageError(
                        f"the chat template of {source} is not valid Jinja (line {e.lineno}: {e.message}). Fix the "
                        "template, or set chat_template_path to another."
                    ) from None
                raise UsageError(
                    f"dataset '{name}': the chat template of {source} cannot render column '{col}' row {i} "
                    f"({type(e).__name__}: {' '.join(str(e).split())}). Fix the row, or set chat_template_path to "
                    "a template that takes it."
                ) from None


def chat_template_file(chat_template_path: str) -> str | dict | None:
    """The template chat_template_path names, read as TRL reads it: a `.jinja`/`.j2` file, or a tokenizer folder
    (its `chat_template.jinja` or tokenizer_config.json's `chat_template`); None for a Hub id."""
    path = Path(chat_template_path).expanduser()
    if path.is_file():
        if path.suffix not in (".jinja", ".j2"):
            raise UsageError(
                f"chat_template_path '{chat_template_path}' is a file but not a .jinja or .j2 template; name a "
                "template file, or a tokenizer folder or Hub id whose template to use."
            )
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"chat_template_path '{chat_template_path}' is not UTF-8 text.") from None
    if path.is_dir():
        if (path / "chat_template.jinja").is_file():
            return chat_template_file(str(path / "chat_template.jinja"))
        config = path / "tokenizer_config.json"
        try:
            return json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise UsageError(f"chat_template_path: {config} is not a JSON object; the tokenizer is damaged.") from None
    if chat_template_path.startswith((".", "/", "~")) or path.suffix in (".jinja", ".j2"):
        raise UsageError(f"chat_template_path '{chat_template_path}' does not exist. Check the path.")
    return None


def fingerprint(ds) -> str | None:
    return getattr(ds, "_fingerprint", None)


# --------------------------------------------------------------------------------------------- knowledge cutoff


def as_date(value) -> dt.date | None:
    """A date from an ISO string (a time and zone allowed), a date or datetime, or a Unix timestamp; else None."""
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


def drop_after(ds, date_column: str | None, max_date: str, name: str, declared: str | None = None):
    """`ds` without the rows dated after `max_date` in any of the date columns, and how many were dropped. Rows
    without a readable date are kept: nothing says they are newer. None passes through.

    A dataset with none of the date columns is refused (the filter would silently keep everything), unless the
    recipe declares a knowledge_cutoff on or before `max_date`: then the undated rows are within it by declaration.
    """
    if ds is None:
        return None, 0
    columns = [c.strip() for c in (date_column or "").split(",") if c.strip()]
    present = [c for c in columns if c in ds.column_names]
    if not present:
        if declared is not None and declared <= max_date:
            return ds, 0
        why = f"has no date column {', '.join(repr(c) for c in columns)}" if columns else "has no date column set"
        raise UsageError(
            f"dataset_max_date {max_date} needs dated rows, but dataset '{name}' {why} (dataset_date_column); its "
            f"columns are {ds.column_names}. Name its date column in dataset_date_column, or set dataset_max_date: "
            "null."
        )
    limit = dt.date.fromisoformat(max_date)

    def newer(values) -> bool:
        return any((d := as_date(v)) is not None and d > limit for v in values)

    keep = [i for i, values in enumerate(zip(*(ds[c] for c in present), strict=True)) if not newer(values)]
    if len(keep) == len(ds):
        return ds, 0
    return ds.select(keep), len(ds) - len(keep)


def apply_max_date(args: ScriptArguments, train, test):
    """The training and test splits without the rows dated after `args.dataset_max_date`, and how many training
    rows were dropped; a test split left empty becomes None. Unchanged when no dataset_max_date is set."""
    if args.dataset_max_date is None:
        return train, test, 0
    name = args.dataset_name
    train, dropped = drop_after(train, args.dataset_date_column, args.dataset_max_date, name, args.knowledge_cutoff)
    if len(train) == 0:
        raise UsageError(
            f"dataset '{name}': every one of its {dropped} training rows is dated after dataset_max_date "
            f"{args.dataset_max_date}; nothing is left to train on. Set a later dataset_max_date, or null."
        )
    test, _ = drop_after(test, args.dataset_date_column, args.dataset_max_date, name, args.knowledge_cutoff)
    return train, test if test is not None and len(test) > 0 else None, dropped


def knowledge_cutoff(
    datasets_: list, date_column: str | None, declared: str | None, max_date: str | None = None, dropped: int = 0
) -> dict[str, Any]:
    """The newest document date in the training data, or the recipe's declared date; and which of the two.
    `max_date` and `dropped` record a date filter (`drop_after`) applied to that data before training."""
    cutoff = _knowledge_cutoff(datasets_, date_column, declared)
    if max_date is None:
        return cutoff
    note = f"; {dropped} rows dated after {max_date} were dropped first (dataset_max_date)"
    return {**cutoff, "detail": cutoff["detail"] + note, "max_date": max_date, "dropped": dropped}


def _knowledge_cutoff(datasets_: list, date_column: str | None, declared: str | None) -> dict[str, Any]:
    newest, count, used = None, 0, []
    columns = [c.strip() for c in (date_column or "").split(",") if c.strip()]
    for ds in datasets_:
        for column in columns:
            if ds is None or column not in ds.column_names:
                continue
            used.append(column)
            for value in ds[column]:
                d = as_date(value)
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
    """A model knows what its parent knew plus this stage's data: the later of the two dates. `stage` names the stage
    whose data set that date; three ways to get it, told apart by two keys:

    - set first: the lineage knew no date before this stage (neither key);
    - moved: this stage's data is dated after the inherited cutoff; `moved_from` holds the inherited `date`, the
      `stage` that had set it and its `source`;
    - inherited: this stage's data is undated, older or no newer; the parent's cutoff stands, `moved_from` as it
      was, and `inherited_from` names the parent's stage.
    """
    inherited = ((parent or {}).get("data") or {}).get("model_cutoff") or {}
    date, before = stage_cutoff.get("date"), inherited.get("date")
    if date and not before:
        return {**stage_cutoff, "stage": stage}
    if date and date > before:
        moved_from = {"date": before, "stage": inherited.get("stage"), "source": inherited.get("source")}
        return {**stage_cutoff, "stage": stage, "moved_from": moved_from}
    if before:
        out = {k: v for k, v in inherited.items() if k != "inherited_from"}
        if stage_cutoff.get("knowledge_probe"):  # this stage probed the model it made: its own count, not the parent's
            out["knowledge_probe"] = stage_cutoff["knowledge_probe"]
        return {**out, "inherited_from": parent.get("stage")}
    return {**stage_cutoff, "stage": stage}
