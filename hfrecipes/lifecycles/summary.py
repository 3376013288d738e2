"""The lifecycle summary: one row per stage read from its record (`Record.parse`), the lifecycle's held-out accuracy
beside the stage's own held-out evaluation (`metrics.heldout`), the control, export and inference; written as
`summary.json` (everything), `summary.md` (`cards/summary.md`, numbers summed and formatted by the report layer as the
card's are, so a number reads the same in the summary and in the stage's card) and `summary.png`
(`report.plots.summary_chart`: held-out accuracy by stage, the SFT ceiling drawn, the seed spread where there are
several seeds).

Above the table, one line per claim the recipe declares in its `claims:` list says whether this run's numbers
support it (`lifecycles/claims.py` checks them: for the tiny lifecycle, SFT reproduces its demonstrations' flaw, RL
passes the SFT ceiling, more SFT for the same FLOPs does not, DPO costs less than reward model + PPO, ...).

    hfrecipes lifecycle        # writes runs/tiny/summary.md
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hfrecipes import record as records
from hfrecipes.lifecycles import claims
from hfrecipes.record import Record
from hfrecipes.report import planned as plans
from hfrecipes.report.card import cards_root
from hfrecipes.report.format import FORMATS
from hfrecipes.report.lineage import totals
from hfrecipes.report.plots import summary_chart

TEMPLATE = "summary"
SUMMED = ("steps", "wall_seconds", "tokens", "flops", "dollars")  # the lineage's keys the summary table shows


def _gold(r: Record) -> dict[str, Any] | None:
    """The stage's gold check (`hfrecipes.gold`) without its history: best, hacking, why it stopped, what it kept;
    the first and last checks' proxy and gold beside them."""
    gold = r.metrics.gold
    if gold is None:
        return None
    history = gold.history
    keep = ("metric", "best", "hacking", "stopped", "kept_step", "every")
    return {
        **{k: getattr(gold, k) for k in keep},
        "checks": len(history),
        "first": history[0] if history else None,
        "last": history[-1] if history else None,
    }


def _probe(r: Record) -> dict[str, Any] | None:
    """The knowledge-cutoff probe the stage recorded beside its cutoff (`hfrecipes.probe`), if any."""
    found = (r.data.knowledge_cutoff or {}).get("knowledge_probe")
    return found if isinstance(found, dict) else None


def _benchmarks(r: Record) -> dict[str, Any] | None:
    """The stage's lm-eval scores (`hfrecipes eval`), one a task asked for (a group, not its parts), with the share
    of its items that overlap the lineage's training data."""
    ev = r.evaluations
    if ev is None:
        return None
    sets = (ev.contamination or {}).get("sets") or {}
    return {
        name: {"metric": e["metric"], "value": e["value"], "overlap": (sets.get(name) or {}).get("share")}
        for name, e in ev.tasks.items()
        if not e.get("group")
    } or None


def row(stage_id: str, stage: str, rec: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, Any]:
    """A stage's numbers as its record holds them, with the lifecycle's held-out accuracy of its folder."""
    r = Record.parse(rec, f"{stage_id}/{records.RECORD}")
    heldout = r.metrics.heldout
    return {
        "id": stage_id,
        "stage": stage,
        "run_id": r.run_id,
        "steps": r.metrics.steps,
        "wall_seconds": r.compute.wall_seconds,
        "tokens": r.data.tokens_seen,
        "flops": r.compute.flops_6nd,
        "dollars": r.compute.dollars,
        "heldout_accuracy": evaluation.get("accuracy"),
        "by_group": {k: v.get("accuracy") for k, v in (evaluation.get("by_group") or {}).items()} or None,
        "heldout": heldout.to_dict() if heldout is not None else None,
        "gold": _gold(r),
        "probe": _probe(r),
        "benchmarks": _benchmarks(r),
        "planned": plans.compare(r),
    }


def build(
    life,
    rows: list[dict[str, Any]],
    control: dict[str, Any] | None,
    exported: dict[str, Any] | None,
    inference: dict[str, Any] | None,
    ran: list[str],
    wall_seconds: float,
    start: dict[str, Any] | None = None,
    distillation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary as JSON: the stages' rows, the control's row, export, inference and the stages' total (None
    where no stage recorded a number, and `missing`: the stages a total leaves out, by the card's one rule)."""
    total, missing = totals(rows, SUMMED, name="id")
    summary = {
        "name": life.name,
        "recipe": life.source,
        "run_dir": str(life.root),
        "metric": life.evaluation.metric if life.evaluation.dataset_name else None,
        "group_column": life.evaluation.group_column,
        "start": start,
        "stages": rows,
        "control": control,
        "export": exported,
        "inference": inference,
        "distillation": distillation,
        "ran_this_time": ran,
        "wall_seconds_this_time": round(wall_seconds, 1),
        "total": total,
        "missing": missing,
        "planned_total": plans.total([r.get("planned") for r in rows]),
        "claims_spec": [claims.as_dict(c) for c in life.claims] or None,
    }
    summary["claims"] = claims.evaluate(life.claims, summary)
    return summary


# ------------------------------------------------------------------------------------------------------- seeds


def _spread(values: list[float | None]) -> dict[str, Any]:
    got = [v for v in values if v is not None]
    if not got:
        return {"mean": None, "min": None, "max": None, "values": values}
    return {"mean": sum(got) / len(got), "min": min(got), "max": max(got), "values": values}


def with_seeds(first: dict[str, Any], runs: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """The first seed's summary plus `seeds`: every stage's held-out accuracy (and by kind) as mean and min-max over
    the seeds, and each claim's verdict on every seed."""
    ids = [r["id"] for r in first["stages"]] + ([first["control"]["id"]] if first["control"] else [])

    def rows_of(summary):
        out = {r["id"]: r for r in summary["stages"]}
        if summary["control"]:
            out[summary["control"]["id"]] = summary["control"]
        return out

    by_seed = [rows_of(s) for s in runs]
    stages = {}
    for i in ids:
        got = [rows.get(i) for rows in by_seed]
        groups = sorted({g for r in got if r and r.get("by_group") for g in r["by_group"]})
        stages[i] = {
            **_spread([r["heldout_accuracy"] if r else None for r in got]),
            "by_group": {g: _spread([(r.get("by_group") or {}).get(g) if r else None for r in got]) for g in groups},
            "steps": _spread([r["steps"] if r else None for r in got]),
        }
    verdicts: dict[str, list[bool | None]] = {}
    for s in runs:
        for c in s.get("claims") or []:
            verdicts.setdefault(c["key"], []).append(c["supported"])
    return {
        **first,
        "seeds": {
            "seeds": seeds,
            "run_dirs": [s["run_dir"] for s in runs],
            "stages": stages,
            "claims": {k: {"supported": sum(v is True for v in vs), "of": len(vs)} for k, vs in verdicts.items()},
        },
    }


def _compare(control: dict[str, Any], matched: dict[str, Any]) -> str | None:
    """Which of the control and the stage it matched reached the higher held-out accuracy."""
    a, b = control["heldout_accuracy"], matched["heldout_accuracy"]
    if a is None or b is None:
        return None
    return "control" if a > b else "matched" if b > a else "tie"


def render(summary: dict[str, Any]) -> str:
    """summary.md from `cards/summary.md`, rendered by Jinja as the card is."""
    import jinja2

    stages = {r["id"]: r for r in summary["stages"]}
    control = summary["control"]
    template = jinja2.Template((cards_root() / f"{TEMPLATE}.md").read_text(encoding="utf-8"))
    text = template.render(
        **summary,
        rows=summary["stages"] + ([control] if control else []),
        matched=stages[control["matches"]] if control else None,
        parent=stages[control["parent"]] if control else None,
        better=_compare(control, stages[control["matches"]]) if control else None,
        groups=sorted({g for r in summary["stages"] for g in (r.get("by_group") or {})}),
        tasks=list(dict.fromkeys(t for r in summary["stages"] for t in (r.get("benchmarks") or {}))),
        **FORMATS,
        **plans.FORMATS,
    )
    return text if text.endswith("\n") else text + "\n"


def write(run_dir: Path, summary: dict[str, Any]) -> None:
    """summary.json (everything), summary.md (the table a person reads), summary.png (accuracy by stage)."""
    records.atomic_write_text(run_dir / "summary.md", render(summary))
    records.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    chart = summary_chart(summary)
    if chart is not None:
        records.atomic_write_bytes(run_dir / "summary.png", chart)
    else:  # no stage has a held-out accuracy this time: a chart left from an earlier run would show stale numbers
        (run_dir / "summary.png").unlink(missing_ok=True)
