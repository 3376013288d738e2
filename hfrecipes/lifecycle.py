"""The lifecycle in one command: stages in order, each from its parent's folder, skipping what is complete,
resuming what was cut off; then export of the best aligned model, batched inference on held-out prompts, an honest
control, and a summary table (`summary.md`, `summary.json`, `summary.png`) in the run folder.

    hfrecipes lifecycle                       # recipes/tiny/lifecycle.yaml -> runs/tiny/
    hfrecipes lifecycle tiny/lifecycle --force grpo --set grpo.max_steps=100
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfrecipes import record as records
from hfrecipes.errors import UsageError

logger = logging.getLogger("hfrecipes.lifecycle")

TOP_KEYS = ("name", "run_dir", "stages", "evaluation", "export", "inference", "control")
STAGE_KEYS = ("id", "stage", "recipe", "parent", "overrides")
EVAL_KEYS = (
    "dataset_name",
    "dataset_config",
    "split",
    "prompt_column",
    "answer_column",
    "metric",
    "max_new_tokens",
    "samples",
)
EXPORT_KEYS = ("candidates", "dtype")
INFERENCE_KEYS = ("max_new_tokens", "samples", "engine")  # prompts: the evaluation split
CONTROL_KEYS = ("id", "stage", "recipe", "parent", "match_wall_time_of", "overrides")
SCORED_STAGES = ("pretrain", "sft", "dpo", "grpo", "ppo")  # causal LMs: held-out task accuracy applies


@dataclass
class StageSpec:
    id: str
    stage: str
    recipe: str
    parent: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def refs(self) -> set[str]:
        """Stage ids this one reads: its parent and any `{id}` placeholder in its overrides."""
        found = {self.parent} if self.parent else set()
        for v in self.overrides.values():
            if isinstance(v, str) and v.startswith("{") and v.endswith("}"):
                found.add(v[1:-1])
        return found


@dataclass
class Lifecycle:
    name: str
    run_dir: Path
    stages: list[StageSpec]
    evaluation: dict[str, Any]
    export: dict[str, Any] | None
    inference: dict[str, Any] | None
    control: dict[str, Any] | None
    source: str


def _check_keys(d: dict, allowed: tuple[str, ...], where: str) -> None:
    for k in d:
        if k not in allowed:
            close = difflib.get_close_matches(k, allowed, n=1)
            raise UsageError(f"{where}: unknown key '{k}'." + (f" Did you mean '{close[0]}'?" if close else ""))


def load(
    recipe: str | Path = "tiny/lifecycle",
    run_dir: str | Path | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Lifecycle:
    """Parse and check a lifecycle recipe, every stage's recipe with its overrides included, before anything runs.

    `overrides` maps a stage id (or `*` for every stage) to recipe keys, applied after the lifecycle's own.
    """
    from hfrecipes.api import parse_stage_args
    from hfrecipes.recipe import load_yaml, resolve_recipe
    from hfrecipes.stages import STAGES

    path = resolve_recipe(recipe)
    src = str(path)
    raw = load_yaml(path)
    _check_keys(raw, TOP_KEYS, src)
    if not raw.get("stages"):
        raise UsageError(f"{src}: 'stages' is empty; list the stages to run.")
    name = str(raw.get("name") or path.stem)
    stages: list[StageSpec] = []
    for i, s in enumerate(raw["stages"]):
        where = f"{src}: stages[{i}]"
        if not isinstance(s, dict):
            raise UsageError(f"{where}: a stage is a mapping with id, stage, recipe, parent, overrides.")
        _check_keys(s, STAGE_KEYS, where)
        spec = StageSpec(
            id=str(s.get("id") or s.get("stage")),
            stage=str(s.get("stage")),
            recipe=str(s.get("recipe")),
            parent=s.get("parent"),
            overrides=dict(s.get("overrides") or {}),
        )
        if spec.stage not in STAGES:
            raise UsageError(f"{where}: stage '{spec.stage}' is unknown; the stages are {', '.join(STAGES)}.")
        known = {x.id for x in stages}
        if spec.id in known:
            raise UsageError(f"{where}: id '{spec.id}' is used twice.")
        missing = spec.refs() - known
        if missing:
            raise UsageError(f"{where}: '{spec.id}' refers to {sorted(missing)}, which no earlier stage defines.")
        stages.append(spec)
    extra = dict(overrides or {})
    control_id = (raw.get("control") or {}).get("id")
    unknown = set(extra) - {s.id for s in stages} - {"*", control_id}
    if unknown:
        raise UsageError(f"overrides name stage(s) {sorted(unknown)} that '{src}' does not have.")
    for spec in stages:
        spec.overrides = {**spec.overrides, **extra.get("*", {}), **extra.get(spec.id, {})}
    evaluation = dict(raw.get("evaluation") or {})
    _check_keys(evaluation, EVAL_KEYS, f"{src}: evaluation")
    for key, allowed in (("export", EXPORT_KEYS), ("inference", INFERENCE_KEYS), ("control", CONTROL_KEYS)):
        if raw.get(key) is not None:
            _check_keys(raw[key], allowed, f"{src}: {key}")
    life = Lifecycle(
        name=name,
        run_dir=Path(run_dir or raw.get("run_dir") or f"runs/{name}"),
        stages=stages,
        evaluation=evaluation,
        export=raw.get("export"),
        inference=raw.get("inference"),
        control=raw.get("control"),
        source=src,
    )
    ids = {s.id for s in stages}
    if life.export:
        bad = [c for c in life.export.get("candidates", []) if c not in ids]
        if bad:
            raise UsageError(f"{src}: export candidates {bad} are not stage ids ({', '.join(ids)}).")
    if life.control:
        c = life.control
        if c.get("parent") not in ids or c.get("match_wall_time_of") not in ids:
            raise UsageError(f"{src}: control needs parent and match_wall_time_of among the stage ids.")
    for spec in stages:  # every stage recipe parses strictly with its final overrides, before anything runs
        parse_stage_args(spec.stage, spec.recipe, **stage_kwargs(life, spec))
    return life


def stage_kwargs(life: Lifecycle, spec: StageSpec) -> dict[str, Any]:
    """The stage's recipe overrides with folders filled in: output_dir, model_name_or_path, `{id}` placeholders."""
    kw = {}
    for k, v in spec.overrides.items():
        if isinstance(v, str) and v.startswith("{") and v.endswith("}"):
            v = str(life.run_dir / v[1:-1])
        kw[k] = v
    kw["output_dir"] = str(life.run_dir / spec.id)
    if spec.parent:
        kw["model_name_or_path"] = str(life.run_dir / spec.parent)
    return kw


def _clear(folder: Path, run_dir: Path) -> None:
    """Remove a stage folder of this run (never anything outside the run folder)."""
    folder, run_dir = folder.resolve(), run_dir.resolve()
    if run_dir not in folder.parents:
        raise UsageError(f"refusing to delete '{folder}': it is outside the run folder '{run_dir}'.")
    shutil.rmtree(folder)


def _eval_rows(ev: dict[str, Any]):
    from hfrecipes.data import ScriptArguments, load_split

    args = ScriptArguments(
        dataset_name=ev["dataset_name"], dataset_config=ev.get("dataset_config"), dataset_test_split=None
    )
    return load_split(args, ev.get("split", "test"))


def _evaluate(life: Lifecycle, folder: Path) -> dict[str, Any]:
    """Held-out task accuracy of a stage folder (adapters merged in memory), through `evaluate`."""
    from hfrecipes.evaluation import heldout_accuracy
    from hfrecipes.exporting import load_merged

    ev = life.evaluation
    if not ev.get("dataset_name"):
        return {}
    rows = _eval_rows(ev)
    if ev.get("samples"):
        rows = rows.select(range(min(ev["samples"], len(rows))))
    model, tok = load_merged(folder)
    tok.padding_side = "left"
    result = heldout_accuracy(
        model,
        tok,
        rows[ev.get("prompt_column", "prompt")],
        rows[ev.get("answer_column", "answer")],
        ev.get("metric", "answer_accuracy"),
        ev.get("max_new_tokens", 32),
    )
    return {k: result[k] for k in ("accuracy", "correct", "total", "metric")}


def run(
    recipe: str | Path = "tiny/lifecycle",
    run_dir: str | Path | None = None,
    force: tuple[str, ...] = (),
    overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run (or resume) a lifecycle; returns the summary (also written as summary.json/.md/.png in the run folder)."""
    from hfrecipes.api import run_stage

    life = load(recipe, run_dir, overrides)
    ids = [s.id for s in life.stages] + ([life.control["id"]] if life.control else [])
    bad = [f for f in force if f not in ids + ["export"]]
    if bad:
        raise UsageError(f"--force names {bad}, not stages of this lifecycle ({', '.join(ids)}).")
    life.run_dir.mkdir(parents=True, exist_ok=True)
    state_path = life.run_dir / "lifecycle.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"evaluations": {}}
    rerun: set[str] = set()
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()

    def one(spec: StageSpec, also_after: set[str] = frozenset()) -> dict[str, Any]:
        folder = life.run_dir / spec.id
        upstream_changed = bool((spec.refs() | set(also_after)) & rerun)
        if spec.id in force or upstream_changed:
            if folder.exists():
                _clear(folder, life.run_dir)
        elif records.is_complete(folder):
            logger.info("[%s] %s: complete, skipped", life.name, spec.id)
            return records.read_record(folder)
        elif folder.exists() and not (folder / records.MARKER).is_file():
            _clear(folder, life.run_dir)  # a stage folder of this run without a record: its output is stale
        resumed = (folder / records.MARKER).is_file()
        logger.info(
            "[%s] %s: %s (%s from %s)",
            life.name,
            spec.id,
            "resuming" if resumed else "starting",
            spec.stage,
            spec.parent or "scratch",
        )
        t = time.perf_counter()
        result = run_stage(spec.stage, spec.recipe, **stage_kwargs(life, spec))
        rerun.add(spec.id)
        logger.info("[%s] %s: done in %.1f min", life.name, spec.id, (time.perf_counter() - t) / 60)
        return result.record

    def scored(spec_id: str, stage: str, rec: dict[str, Any]) -> dict[str, Any]:
        if stage not in SCORED_STAGES:
            return {}
        cached = state["evaluations"].get(spec_id)
        if cached and cached.get("run_id") == rec["run_id"]:
            return cached
        result = {**_evaluate(life, life.run_dir / spec_id), "run_id": rec["run_id"]}
        state["evaluations"][spec_id] = result
        records.atomic_write_text(state_path, json.dumps(state, indent=2) + "\n")
        if "accuracy" in result:
            logger.info("[%s] %s: held-out accuracy %.1f%%", life.name, spec_id, 100 * result["accuracy"])
        return result

    for spec in life.stages:
        rec = one(spec)
        rows.append(_row(spec.id, spec.stage, rec, scored(spec.id, spec.stage, rec)))

    control_row = None
    if life.control:
        c = life.control
        target = next(r for r in rows if r["id"] == c["match_wall_time_of"])
        parent = records.read_record(life.run_dir / c["parent"])
        per_step = parent["compute"]["wall_seconds"] / max(parent["metrics"]["steps"], 1)
        steps = max(1, round(target["wall_seconds"] / per_step))
        spec = StageSpec(
            id=c["id"],
            stage=c.get("stage", "sft"),
            recipe=c["recipe"],
            parent=c["parent"],
            overrides={
                **(c.get("overrides") or {}),
                **(overrides or {}).get("*", {}),
                **(overrides or {}).get(c["id"], {}),
                "max_steps": steps,
            },
        )
        rec = one(spec, also_after={c["match_wall_time_of"]})
        control_row = _row(spec.id, spec.stage, rec, scored(spec.id, spec.stage, rec))
        control_row["matches"] = c["match_wall_time_of"]

    export_row, inference_stats = None, None
    if life.export:
        candidates = [r for r in rows if r["id"] in life.export["candidates"]]
        best = max(candidates, key=lambda r: r.get("heldout_accuracy") or 0.0)
        export_dir = life.run_dir / "export"
        prev = records.read_record(export_dir) if export_dir.is_dir() else None
        stale = (
            "export" in force
            or prev is None
            or best["id"] in rerun
            or (prev.get("parent") or {}).get("run_id") != best["run_id"]
        )
        if stale:
            from hfrecipes.exporting import export

            logger.info(
                "[%s] export: %s (best held-out accuracy among %s)",
                life.name,
                best["id"],
                ", ".join(life.export["candidates"]),
            )
            export(life.run_dir / best["id"], export_dir, dtype=life.export.get("dtype", "auto"), force=True)
        else:
            logger.info("[%s] export: complete, skipped", life.name)
        export_row = {"id": "export", "from": best["id"]}
        if life.inference:
            inference_stats = _inference(life, export_dir, stale)

    summary = {
        "name": life.name,
        "recipe": life.source,
        "run_dir": str(life.run_dir),
        "stages": rows,
        "control": control_row,
        "export": export_row,
        "inference": inference_stats,
        "ran_this_time": sorted(rerun),
        "wall_seconds_this_time": round(time.perf_counter() - started, 1),
        "total": {k: sum((r.get(k) or 0) for r in rows) for k in ("wall_seconds", "tokens", "flops", "dollars")},
    }
    write_summary(life.run_dir, summary)
    logger.info("[%s] summary: %s", life.name, life.run_dir / "summary.md")
    return summary


def _inference(life: Lifecycle, export_dir: Path, stale: bool) -> dict[str, Any]:
    from hfrecipes.inference import generate
    from hfrecipes.rewards import answers_match

    out = life.run_dir / "generations.jsonl"
    cached = life.run_dir / "inference.json"
    if cached.is_file() and out.is_file() and not stale:
        return json.loads(cached.read_text())
    ev, inf = life.evaluation, life.inference
    rows = _eval_rows(ev)
    if inf.get("samples"):
        rows = rows.select(range(min(inf["samples"], len(rows))))
    prompts, answers = rows[ev.get("prompt_column", "prompt")], rows[ev.get("answer_column", "answer")]
    logger.info("[%s] inference: %d held-out prompts on %s", life.name, len(prompts), export_dir)
    gen_rows, stats = generate(
        export_dir, prompts, out, engine=inf.get("engine", "auto"), max_new_tokens=inf.get("max_new_tokens", 32)
    )
    hits = sum(answers_match(r["completions"][0], a) for r, a in zip(gen_rows, answers, strict=True))
    result = {
        **{
            k: stats[k]
            for k in (
                "engine",
                "prompts",
                "generated_tokens",
                "wall_seconds",
                "tokens_per_second",
                "flops_per_token",
                "dollars_per_million_tokens",
            )
        },
        "accuracy": hits / len(gen_rows),
    }
    records.atomic_write_text(cached, json.dumps(result, indent=2) + "\n")
    return result


def _row(id_: str, stage: str, rec: dict[str, Any], ev: dict[str, Any]) -> dict[str, Any]:
    m, c, d = rec.get("metrics") or {}, rec.get("compute") or {}, rec.get("data") or {}
    return {
        "id": id_,
        "stage": stage,
        "run_id": rec["run_id"],
        "steps": m.get("steps"),
        "wall_seconds": c.get("wall_seconds"),
        "tokens": d.get("tokens_seen"),
        "flops": c.get("flops_6nd"),
        "dollars": c.get("dollars"),
        "heldout_accuracy": ev.get("accuracy"),
        "pair_accuracy": m.get("heldout_pair_accuracy"),
        "mean_reward": m.get("heldout_reward", m.get("reward_last_logged")),
        "kl": m.get("kl", m.get("heldout_kl")),
    }


def _fmt(v, kind: str = "") -> str:
    if v is None:
        return "—"
    if kind == "pct":
        return f"{100 * v:.1f}%"
    if kind == "time":
        return f"{v / 60:.1f} min" if v >= 90 else f"{v:.0f} s"
    if kind == "si":
        for f, p in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(v) >= f:
                return f"{v / f:.3g}{p}"
        return f"{v:.3g}"
    if kind == "usd":
        return f"${v:.2g}"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """summary.json (everything), summary.md (the table a person reads), summary.png (accuracy by stage)."""
    head = (
        "| stage | steps | wall time | tokens | FLOPs | dollars | held-out accuracy | RM pair accuracy | "
        "mean reward | KL |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [
        f"# Lifecycle `{summary['name']}`",
        "",
        f"Recipe: `{summary['recipe']}`. Folder: `{summary['run_dir']}`.",
        "",
        head,
    ]
    for r in summary["stages"] + ([summary["control"]] if summary["control"] else []):
        label = r["id"] if r["id"] == r["stage"] else f"{r['id']} ({r['stage']})"
        lines.append(
            f"| {label} | {_fmt(r['steps'])} | {_fmt(r['wall_seconds'], 'time')} | {_fmt(r['tokens'], 'si')} | "
            f"{_fmt(r['flops'], 'si')} | {_fmt(r['dollars'], 'usd')} | {_fmt(r['heldout_accuracy'], 'pct')} | "
            f"{_fmt(r['pair_accuracy'], 'pct')} | {_fmt(r['mean_reward'])} | {_fmt(r['kl'])} |"
        )
    t = summary["total"]
    lines.append(
        f"| **total (lineage stages)** | | **{_fmt(t['wall_seconds'], 'time')}** | **{_fmt(t['tokens'], 'si')}** "
        f"| **{_fmt(t['flops'], 'si')}** | **{_fmt(t['dollars'], 'usd')}** | | | | |"
    )
    if summary["control"]:
        c = summary["control"]
        matched = next(r for r in summary["stages"] if r["id"] == c["matches"])
        parent_acc = next((r["heldout_accuracy"] for r in summary["stages"] if r["stage"] == "sft"), None)
        lines += [
            "",
            "## Honest control",
            "",
            f"`{c['id']}` continues SFT for the same wall time that `{matched['id']}` took "
            f"({_fmt(matched['wall_seconds'], 'time')}): {_fmt(c['heldout_accuracy'], 'pct')} held-out "
            f"accuracy, against {_fmt(matched['heldout_accuracy'], 'pct')} for `{matched['id']}` "
            f"(SFT started at {_fmt(parent_acc, 'pct')}). "
            + (
                "More SFT did better in the same time."
                if (c["heldout_accuracy"] or 0) > (matched["heldout_accuracy"] or 0)
                else f"`{matched['id']}` did better in the same time."
            ),
        ]
    if summary["export"]:
        lines += ["", f"Exported: `{summary['export']['from']}` (best held-out accuracy) -> `export/`."]
    if summary["inference"]:
        i = summary["inference"]
        lines += [
            f"Inference ({i['engine']}): {i['prompts']} held-out prompts, {i['generated_tokens']} tokens in "
            f"{i['wall_seconds']:.1f} s = {i['tokens_per_second']:.0f} tokens/s, accuracy "
            f"{_fmt(i['accuracy'], 'pct')}; {_fmt(i['flops_per_token'], 'si')} FLOPs per token."
        ]
    lines += [
        "",
        f"This invocation ran: {', '.join(summary['ran_this_time']) or 'nothing (all complete)'}; "
        f"{_fmt(summary['wall_seconds_this_time'], 'time')}.",
        "",
    ]
    records.atomic_write_text(run_dir / "summary.md", "\n".join(lines))
    records.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    _chart(run_dir / "summary.png", summary)


def _chart(path: Path, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        r
        for r in summary["stages"] + ([summary["control"]] if summary["control"] else [])
        if r["heldout_accuracy"] is not None
    ]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar([r["id"] for r in rows], [100 * r["heldout_accuracy"] for r in rows], color="#4C72B0")
    for i, r in enumerate(rows):
        ax.text(i, 100 * r["heldout_accuracy"] + 1, f"{100 * r['heldout_accuracy']:.0f}%", ha="center", fontsize=8)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"lifecycle {summary['name']}: held-out task accuracy by stage")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def parse_sets(sets: list[str]) -> dict[str, dict[str, Any]]:
    """`--set sft.max_steps=100 --set '*.logging_steps=5'` -> {"sft": {"max_steps": 100}, "*": {...}} (YAML values)."""
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in sets:
        key, eq, value = item.partition("=")
        stage, dot, name = key.partition(".")
        if not eq or not dot or not name:
            raise UsageError(f"--set '{item}': expected STAGE.KEY=VALUE (STAGE may be '*').")
        out.setdefault(stage, {})[name] = yaml.safe_load(value)
    return copy.deepcopy(out)
