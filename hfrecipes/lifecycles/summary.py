"""The lifecycle summary: one row per stage read from its record (`Record.parse`), the lifecycle's held-out accuracy
beside the stage's own held-out evaluation (`metrics.heldout`), the control, export and inference; written as
`summary.json` (everything), `summary.md` (`cards/summary.md`, numbers formatted by the card's own formatters, so a
number reads the same in the summary and in the stage's card) and `summary.png` (held-out accuracy by stage).

    hfrecipes lifecycle        # writes runs/tiny/summary.md
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from hfrecipes import record as records
from hfrecipes.card import FORMATS, cards_root
from hfrecipes.record import Record

TEMPLATE = "summary"
SUMMED = ("steps", "wall_seconds", "tokens", "flops", "dollars")


def pct(x: float | None) -> str:
    """A fraction as a percentage; 'n/a' for a number not measured, as the card's formatters write it."""
    return "n/a" if x is None else f"{100 * x:.1f}%"


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
        "heldout": heldout.to_dict() if heldout is not None else None,
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
) -> dict[str, Any]:
    """The summary as JSON: the stages' rows, the control's row, export, inference and the stages' total (None
    where no stage recorded a number, as the card sums its lineage)."""
    total = {}
    for key in SUMMED:
        values = [r[key] for r in rows if r[key] is not None]
        total[key] = sum(values) if values else None
    return {
        "name": life.name,
        "recipe": life.source,
        "run_dir": str(life.root),
        "metric": life.evaluation.metric if life.evaluation.dataset_name else None,
        "start": start,
        "stages": rows,
        "control": control,
        "export": exported,
        "inference": inference,
        "ran_this_time": ran,
        "wall_seconds_this_time": round(wall_seconds, 1),
        "total": total,
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
        pct=pct,
        **FORMATS,
    )
    return text if text.endswith("\n") else text + "\n"


def write(run_dir: Path, summary: dict[str, Any]) -> None:
    """summary.json (everything), summary.md (the table a person reads), summary.png (accuracy by stage)."""
    records.atomic_write_text(run_dir / "summary.md", render(summary))
    records.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    chart = _chart(summary)
    if chart is not None:
        records.atomic_write_bytes(run_dir / "summary.png", chart)
    else:  # no stage has a held-out accuracy this time: a chart left from an earlier run would show stale numbers
        (run_dir / "summary.png").unlink(missing_ok=True)


def _chart(summary: dict[str, Any]) -> bytes | None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [summary["start"]] if summary.get("start") else []
    rows += summary["stages"] + ([summary["control"]] if summary["control"] else [])
    rows = [r for r in rows if r["heldout_accuracy"] is not None]
    if not rows:
        return None
    fig = Figure(figsize=(7, 3.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    values = [100 * r["heldout_accuracy"] for r in rows]
    ax.bar([r["id"] for r in rows], values, color="#4C72B0")
    for i, (r, v) in enumerate(zip(rows, values, strict=True)):
        ax.text(i, v + 1, pct(r["heldout_accuracy"]), ha="center", fontsize=8)
    ax.set_ylabel(f"held-out {summary['metric'] or 'accuracy'} (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"lifecycle {summary['name']}: held-out task accuracy by stage")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
