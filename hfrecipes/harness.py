"""Evaluation with lm-evaluation-harness (`lm_eval`): a model folder scored on benchmark tasks, each task's score
checked for contamination against the lineage's training data, the results written into the folder's record.

    hfrecipes eval runs/tiny/sft --tasks tiny_addition,tiny_addition_choice,tiny_facts
    hfrecipes.evaluate("runs/tiny/sft", tasks=["tiny_addition"], limit=50)

The bundled tasks (`eval_tasks/`, lm-eval task YAML over JSON-lines files shipped beside them) run offline; any task
lm-eval finds works too (its own, when the Hub is reachable for its data, or `--include-path` to the user's YAML).
The engine is lm-eval's vLLM backend where vLLM is installed, else its transformers backend (`engine`).

Per task the record keeps what a reader needs to weigh the number: metric, value, stderr, examples, shots, engine,
seconds, tokens processed, inference FLOPs (2·N per token: an estimate that ignores attention and lm-eval's
caching of shared contexts) and dollars (the wall time at the device's price), and the contamination check: the share
of items whose 13-grams (or whole text, when shorter) occur in a lineage stage's training data, and the score on the
clean items beside the full one. An item's text is its prompt (or the task's decontamination query).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hfrecipes.errors import UsageError

TASKS_DIR = Path(__file__).resolve().parent / "eval_tasks"
BUNDLED = ("tiny_addition", "tiny_addition_choice", "tiny_facts")
ENGINES = ("auto", "transformers", "vllm")
DATA_FILES = {"tiny_addition": "tiny_addition.jsonl", "tiny_addition_choice": "tiny_addition_choice.jsonl",
              "tiny_facts": "tiny_facts.jsonl"}  # fmt: skip

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- bundled task data


def bundled_rows(seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """The rows the bundled tasks' files hold, made from the embedded tiny task and corpus (seed 0 ships): the
    held-out addition problems (never trained on by any tiny stage), the same problems as four-way choices between
    whole replies (the SFT demonstrations' form), and the corpus' dated facts."""
    from hfrecipes.tiny import corpus, task

    heldout = task.split_pairs(seed)["heldout"]
    addition = [
        {"question": task.question(a, b), "answer": str(a + b), "a": a, "b": b, "kind": task.kind(a, b)}
        for a, b in heldout
    ]
    rng = random.Random(f"tiny-choice-{seed}")
    choice = []
    for a, b in heldout:
        right = a + b
        options = [right, task.dropped_carry(a, b) if task.carries(a, b) else right + 10]
        while len(options) < 4:
            wrong = task.wrong_sum(a, b, rng)
            if wrong not in options:
                options.append(wrong)
        rng.shuffle(options)
        choice.append(
            {"question": task.question(a, b), "a": a, "b": b, "kind": task.kind(a, b),
             "choices": [task.answer(a, b, o) for o in options], "label": options.index(right)}
        )  # fmt: skip
    return {"tiny_addition": addition, "tiny_addition_choice": choice, "tiny_facts": corpus.fact_rows(seed)}


def write_bundled(folder: Path = TASKS_DIR) -> None:
    """Write the bundled tasks' JSON-lines files (`python -m hfrecipes.harness`)."""
    for name, rows in bundled_rows().items():
        (folder / DATA_FILES[name]).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# --------------------------------------------------------------------------------------------- tasks and engine


def task_manager(include_path: str | Path | None = None):
    """lm-eval's task index with the bundled tasks (and the user's folder of task YAML) added."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UsageError(
            "hfrecipes eval needs lm-evaluation-harness: pip install 'hfrecipes[eval]' (scripts/setup.sh installs it)."
        ) from None
    if include_path is not None and not Path(include_path).expanduser().is_dir():
        raise UsageError(f"--include_path '{include_path}' is not a folder; give the folder of your task YAML files.")

    paths = [str(TASKS_DIR)] + ([str(include_path)] if include_path else [])
    return TaskManager(include_path=paths, verbosity="ERROR")


def check_tasks(tasks: list[str], manager) -> None:
    """Every task name is one lm-eval knows, before any model loads."""
    if not tasks:
        raise UsageError(f"--tasks is empty; name at least one task, e.g. {','.join(BUNDLED)}.")
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UsageError(
            f"--tasks: {', '.join(unknown)} not found among lm-eval's tasks; the bundled ones are "
            f"{', '.join(BUNDLED)}, and --include_path adds a folder of your own task YAML."
        )


def resolve_engine(engine: str, folder: Path) -> str:
    """`auto` is vLLM where it is installed and the folder holds full weights (vLLM serves no unmerged adapter),
    else transformers."""
    from hfrecipes import modeling, vllm_support

    if engine not in ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}.")
    if engine == "auto":
        return "vllm" if vllm_support.vllm_available() and not modeling.is_adapter(folder) else "transformers"
    if engine == "vllm" and not vllm_support.vllm_available():
        raise UsageError(
            "--engine vllm: vLLM is not installed; install it (bash scripts/setup.sh) or use --engine transformers."
        )
    if engine == "vllm" and modeling.is_adapter(folder):
        raise UsageError(
            f"--engine vllm: '{folder}' holds a LoRA adapter, which vLLM does not load unmerged; "
            f"`hfrecipes export {folder}` merges it, or use --engine transformers."
        )
    return engine


def _language_model(folder: Path, engine: str, batch_size: int, max_length: int | None):
    """lm-eval's model object for `folder`: the transformers backend on the model with any adapter merged, or the
    vLLM backend on the folder."""
    if engine == "vllm":
        from hfrecipes import vllm_support

        vllm_support.cpu_vllm_defaults()
        VLLM = vllm_support.lm_eval_vllm()  # noqa: N806 (a class)

        # The dtype the folder was saved in, as vllm_support.vllm_engine serves it ("auto" casts float32 down).
        config = json.loads((folder / "config.json").read_text())
        dtype = config.get("dtype") or config.get("torch_dtype") or "auto"
        return VLLM(pretrained=str(folder), dtype=dtype, batch_size="auto", seed=0, enforce_eager=True,
                    trust_remote_code=False, max_length=max_length)  # fmt: skip
    from lm_eval.models.huggingface import HFLM

    from hfrecipes import modeling

    model, tok = modeling.load_merged(folder)
    model.to(modeling.inference_device())
    return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=max_length)


@contextlib.contextmanager
def _no_environment_report():
    """lm-eval ends every `simple_evaluate` by collecting the environment (torch's `collect_env`, seconds of
    subprocesses) and the working folder's git hash (printing git's error outside a repository); the record keeps
    the library versions already, so both are skipped while hfrecipes runs it."""
    from lm_eval import evaluator

    saved = evaluator.add_env_info, evaluator.get_git_commit_hash
    evaluator.add_env_info, evaluator.get_git_commit_hash = (lambda results: None), (lambda: None)
    try:
        yield
    finally:
        evaluator.add_env_info, evaluator.get_git_commit_hash = saved


# --------------------------------------------------------------------------------------------- reading results


def _primary(config: dict[str, Any], task_results: dict[str, Any]) -> tuple[str, str]:
    """The task's headline metric key in lm-eval's results ("metric,filter") and its metric name: the first metric
    of the task's list under its first filter; without a list (a group), the first metric reported."""
    metrics = [m["metric"] for m in config.get("metric_list") or []]
    keys = [k for k in task_results if "," in k and not k.split(",")[0].endswith("_stderr")]
    for metric in metrics:
        for key in keys:
            if key.split(",")[0] == metric:
                return key, metric
    if not keys:
        raise RuntimeError(f"lm-eval reported no metric: {sorted(task_results)}")
    return keys[0], keys[0].split(",")[0]


def _number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if value == value else None  # lm-eval reports "N/A" or NaN where it has no stderr


def _tokens(samples: list[dict[str, Any]], tok) -> int:
    """Tokens the model processed for these samples: each log-likelihood request's context and continuation, each
    generation's prompt and reply."""
    total = 0
    for s in samples:
        args = s.get("arguments") or []
        resps = s.get("resps") or []
        for i, arg in enumerate(args):
            arg = list(arg.values()) if isinstance(arg, dict) else list(arg)
            if len(arg) >= 2 and isinstance(arg[1], str):  # (context, continuation)
                total += len(tok(arg[0] + arg[1], add_special_tokens=False)["input_ids"])
            elif arg and isinstance(arg[0], str):  # (context, generation kwargs)
                reply = resps[i][0] if i < len(resps) and resps[i] else ""
                total += len(tok(arg[0] + str(reply), add_special_tokens=False)["input_ids"])
    return total


def _doc_texts(task) -> list[str]:
    """Each evaluation document as the text a leak into training data would carry: the task's own decontamination
    query where it declares one (`doc_to_decontamination_query`), else its prompt, as lm-eval's decontamination reads
    a document. The prompt, not the prompt and answer: a training set states the answer in its own words ("40 plus 72
    is 112." where the task's target is "112"), and a leaked question is a leak whatever follows it."""
    texts = []
    for doc in task.eval_docs:
        if getattr(task.config, "should_decontaminate", False):
            text = task.doc_to_decontamination_query(doc)
        else:
            text = task.doc_to_text(doc)
        texts.append(text if isinstance(text, str) else str(text))
    return texts


# --------------------------------------------------------------------------------------------- lineage training data


def training_sources(rec: dict[str, Any] | None) -> tuple[list[tuple[str, Iterator[str]]], list[dict[str, str]]]:
    """The training data of every stage in the lineage of `rec`, as (label, documents) streams for
    `contamination.check`, read again from each stage's resolved recipe; and the stages whose data could not be
    read (a base model's corpus, a dataset no longer there), each with why."""
    from hfrecipes.record import Record

    if rec is None:
        return [], [{"stage": "?", "why": "the folder holds no record, so its lineage is not known"}]
    sources, unread = [], []
    for r in Record.parse(rec).lineage():
        values = (r.recipe or {}).get("values") or {}
        name = values.get("dataset_name")
        label = f"{r.stage}: {name}" if name else r.stage
        if r.stage == "base":
            unread.append({"stage": r.stage, "why": "its training corpus is not published with the model"})
            continue
        if not name:  # a step that trains on nothing (an export)
            continue
        try:
            sources.append((label, _stage_documents(values)))
        except (UsageError, OSError, ValueError) as e:
            unread.append({"stage": r.stage, "why": str(e)})
    return sources, unread


def _stage_documents(values: dict[str, Any]) -> Iterator[str]:
    """A stage's training split, one document a row, as the stage read it: its dataset settings, `max_train_samples`
    and the date filter (`dataset_max_date`) applied."""
    from hfrecipes import contamination, data

    args = _script_args(values)
    ds = data.load_split(args, args.dataset_train_split)
    if ds is None:
        raise UsageError(f"dataset '{args.dataset_name}' has no split '{args.dataset_train_split}'")
    if args.max_train_samples is not None:
        ds = ds.select(range(min(args.max_train_samples, len(ds))))
    ds, _, _ = data.apply_max_date(args, ds, None)
    return (contamination.row_text(row) for row in ds)


def _script_args(values: dict[str, Any]):
    from hfrecipes import data

    keys = set(data.ScriptArguments.__dataclass_fields__)
    return data.ScriptArguments(**{k: v for k, v in values.items() if k in keys})


# --------------------------------------------------------------------------------------------- the run


def evaluate(
    model: str | Path,
    tasks: list[str] | str,
    limit: int | None = None,
    num_fewshot: int | None = None,
    engine: str = "auto",
    batch_size: int = 32,
    chat_template: bool | None = None,
    include_path: str | Path | None = None,
    ngram: int = 13,
    contamination_check: bool = True,
    write: bool = True,
    price_per_hour: float | None = None,
    probe: str | None = None,
    cutoff: str | None = None,
) -> dict[str, Any]:
    """Score the model folder `model` on lm-eval `tasks` and return the `evaluations` block; with `write` (and a
    record in the folder) the block joins the record (earlier results of other tasks kept); the card is the report
    layer's to draw again (`hfrecipes.evaluate` does). `chat_template` None applies the tokenizer's chat template
    where it has one. `probe` (dated facts: a `tiny:` name or a file) adds the knowledge probe, month by month, split
    at `cutoff` (default: the record's model cutoff). Bad input (a missing folder, an unknown task or engine, facts
    without their columns) stops before any model loads."""
    from hfrecipes import costs, modeling
    from hfrecipes import record as records

    folder = Path(model).expanduser()
    modeling.check_stage_dir(folder)
    tasks = [t.strip() for t in tasks.split(",") if t.strip()] if isinstance(tasks, str) else list(tasks)
    if not tasks and not probe:
        raise UsageError(f"nothing to evaluate: name --tasks (bundled: {','.join(BUNDLED)}) or --probe dated facts.")
    if probe:
        from hfrecipes import probe as probing

        probing.load_facts(probe)  # its columns and dates checked before any model loads
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}.")
    if ngram < 1:
        raise UsageError(f"--ngram must be at least 1, got {ngram}.")
    manager = task_manager(include_path)
    if tasks:
        check_tasks(tasks, manager)
    engine = resolve_engine(engine, folder)
    rec = records.read_record(folder)
    if probe and cutoff is None:  # the probe splits at a date: known before the tasks run, not after
        cutoff = (((rec or {}).get("data") or {}).get("model_cutoff") or {}).get("date")
        if cutoff is None:
            raise UsageError(
                f"--probe needs a cutoff to split the facts at: '{folder}' records none; give --cutoff YYYY-MM-DD."
            )
    tok = modeling.load_tokenizer(str(folder))
    if chat_template is None:
        chat_template = bool(getattr(tok, "chat_template", None))
    params = _params(folder, rec)
    device = records.device_info(1)
    price = price_per_hour if price_per_hour is not None else costs.prices(device)["price_per_hour"]

    import lm_eval

    lm = _language_model(folder, engine, batch_size, None) if tasks else None
    block: dict[str, Any] = {"engine": engine, "model": str(folder), "device": device, "price_per_hour": price,
                             "chat_template": chat_template, "tasks": {}}  # fmt: skip
    for name in tasks:
        start = time.perf_counter()
        with _no_environment_report():
            out = lm_eval.simple_evaluate(
                model=lm, tasks=[name], task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                log_samples=True, apply_chat_template=chat_template, bootstrap_iters=1000, random_seed=0,
                numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
            )  # fmt: skip
        seconds = time.perf_counter() - start
        leaves = dict(out.get("samples") or {})
        tokens = sum(_tokens(s, tok) for s in leaves.values())
        flops = costs.inference_flops_per_token(params) * tokens if params else None
        dollars = seconds / 3600 * price if price is not None else None
        for task_name, result in out["results"].items():
            config = out["configs"].get(task_name) or {}
            samples = leaves.get(task_name)
            if samples is None and task_name != name:
                continue
            key, metric = _primary(config, result)  # a group has no config: its first reported metric
            n = (out.get("n-samples") or {}).get(task_name) or {}
            entry = {
                "metric": metric,
                "filter": key.split(",", 1)[1],
                "value": _number(result.get(key)),
                "stderr": _number(result.get(f"{metric}_stderr,{key.split(',', 1)[1]}")),
                "examples": n.get("effective") or (len(samples) if samples else None),
                "examples_total": n.get("original"),
                "shots": (out.get("n-shot") or {}).get(task_name),
                "engine": engine,
                "group": name if task_name != name else None,
            }
            if task_name == name:  # the task asked for carries the run's time and cost (a group: all its parts)
                entry.update(seconds=round(seconds, 3), tokens=tokens, inference_flops=flops, dollars=dollars)
            if samples is not None:
                entry["scores"] = {int(s["doc_id"]): _number(s.get(metric)) for s in samples}
            block["tasks"][task_name] = entry
    _group_examples(block["tasks"])
    if contamination_check:
        sets = {**_contamination_sets(block["tasks"], manager), **heldout_sets(rec)}
        block["contamination"] = check_sets(sets, rec, ngram)
        _group_sets(block["tasks"], block["contamination"]["sets"])
    for entry in block["tasks"].values():
        entry.pop("scores", None)
    del lm  # the probe loads the model again on its own
    if probe:
        from hfrecipes import probe as probing

        block["probe"] = probing.evaluate(folder, probe, cutoff)
    if write and rec is not None:
        earlier = rec.get("evaluations") or {}
        merged_tasks = {**(earlier.get("tasks") or {}), **block["tasks"]}
        merged_sets = {**((earlier.get("contamination") or {}).get("sets") or {}),
                       **((block.get("contamination") or {}).get("sets") or {})}  # fmt: skip
        rec["evaluations"] = {**earlier, **block, "tasks": merged_tasks}
        if not probe and earlier.get("probe"):
            rec["evaluations"]["probe"] = earlier["probe"]
        if block.get("contamination"):
            rec["evaluations"]["contamination"] = {**block["contamination"], "sets": merged_sets}
        records.write_record(folder, rec)
    return block


def _contamination_sets(entries: dict[str, Any], manager) -> dict[str, dict[str, Any]]:
    """Each scored task's documents as texts, with its per-document scores."""
    from lm_eval.tasks import get_task_dict

    sets = {}
    for name, entry in entries.items():
        if "scores" not in entry:
            continue
        task = get_task_dict([name], manager)[name]
        texts = _doc_texts(task)
        ids = sorted(entry["scores"])
        sets[name] = {"texts": [texts[i] for i in ids], "scores": [entry["scores"][i] for i in ids],
                      "metric": entry["metric"], "value": entry["value"]}  # fmt: skip
    return sets


def heldout_sets(rec: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The held-out split of every stage in the lineage (read again from its resolved recipe), once per dataset, as
    texts; they have no per-item scores here, so only their overlap is reported."""
    from hfrecipes import contamination, data
    from hfrecipes.record import Record

    sets: dict[str, dict[str, Any]] = {}
    if rec is None:
        return sets
    for r in Record.parse(rec).lineage():
        values = (r.recipe or {}).get("values") or {}
        name, split = values.get("dataset_name"), values.get("dataset_test_split")
        label = f"held-out {name} ({split})"
        if not name or not split or label in sets or r.stage == "base":
            continue
        try:
            args = _script_args(values)
            ds = data.load_split(args, split)
        except (UsageError, OSError, ValueError) as e:
            logger.warning("contamination: the held-out split of the %s stage could not be read: %s", r.stage, e)
            continue
        if ds is not None and len(ds):
            sets[label] = {"texts": [contamination.row_text(row) for row in ds], "scores": None, "stage": r.stage}
    return sets


def check_sets(sets: dict[str, dict[str, Any]], rec: dict[str, Any] | None, ngram: int) -> dict[str, Any]:
    """One pass over the lineage's training data for every set at once: per set the share of items that overlap and,
    where the set has per-item scores, the score on its clean items beside the full one."""
    from hfrecipes import contamination

    sources, unread = training_sources(rec)
    items, spans = [], {}
    for name, s in sets.items():
        spans[name] = (len(items), len(items) + len(s["texts"]))
        items += s["texts"]
    report = contamination.check(items, sources, n=ngram)
    out_sets = {}
    for name, s in sets.items():
        lo, hi = spans[name]
        flags = report.flags[lo:hi]
        hits = sum(flags)
        entry = {"items": hi - lo, "contaminated": hits, "share": hits / (hi - lo) if hi > lo else None}
        if s.get("scores") is not None:
            scores = [x if x is not None else 0.0 for x in s["scores"]]
            entry.update(
                metric=s["metric"],
                score=sum(scores) / len(scores) if scores else None,
                clean_items=(hi - lo) - hits,
                clean_score=contamination.clean_score(scores, flags),
            )
        if s.get("stage"):
            entry["stage"] = s["stage"]
        out_sets[name] = entry
    return {
        "ngram": ngram,
        "sources": {
            label: {k: v for k, v in info.items() if k != "flagged"} for label, info in report.sources.items()
        },
        "not_checked": unread,
        "documents": report.documents,
        "seconds": round(report.seconds, 3),
        "sets": out_sets,
    }


def _group_examples(entries: dict[str, Any]) -> None:
    """A group's examples are its parts'."""
    for name, entry in entries.items():
        parts = [e for e in entries.values() if e.get("group") == name]
        if parts and entry.get("examples") is None:
            entry["examples"] = sum(e.get("examples") or 0 for e in parts)


def _group_sets(entries: dict[str, Any], sets: dict[str, Any]) -> None:
    """A group's contamination from its parts': their items and overlaps summed, the scores weighted by size."""
    for name in entries:
        parts = [sets[t] for t, e in entries.items() if e.get("group") == name and t in sets]
        if not parts:
            continue
        items = sum(p["items"] for p in parts)
        hits = sum(p["contaminated"] for p in parts)
        clean = [(p["clean_score"], p["clean_items"]) for p in parts if p.get("clean_score") is not None]
        clean_items = sum(n for _, n in clean)
        sets[name] = {
            "items": items,
            "contaminated": hits,
            "share": hits / items if items else None,
            "metric": parts[0].get("metric"),
            "score": sum((p.get("score") or 0.0) * p["items"] for p in parts) / items if items else None,
            "clean_items": items - hits,
            "clean_score": sum(v * n for v, n in clean) / clean_items if clean_items else None,
        }


def _params(folder: Path, rec: dict[str, Any] | None) -> int | None:
    total = ((rec or {}).get("model") or {}).get("params_total")
    if total:
        return int(total)
    from hfrecipes.inference import param_count

    try:
        return param_count(folder)
    except (OSError, ValueError):
        return None
