"""The model card: `cards/<template>.md` (Jinja) + the stage record, rendered through huggingface_hub's ModelCard.

Every number in the card comes from `record.json` and its parents; nothing is typed in by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hfrecipes import record as records
from hfrecipes.recipe import _resource_dir


def cards_root() -> Path:
    return _resource_dir("cards")


def _si(x: float | None, unit: str = "") -> str:
    if x is None:
        return "n/a"
    for factor, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g} {prefix}{unit}".rstrip()
    return f"{x:.3g} {unit}".rstrip()


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def lineage_rows(rec: dict[str, Any]) -> tuple[list[dict[str, str]], dict[str, str]]:
    rows, tot = [], {"tokens": 0, "steps": 0, "wall": 0.0, "device_hours": 0.0, "flops": 0.0}
    for r in records.lineage(rec):
        d, c, m = r.get("data", {}), r.get("compute", {}), r.get("metrics", {})
        names = ", ".join(x["name"] for x in d.get("datasets", [])) or "n/a"
        rows.append(
            {
                "stage": r["stage"],
                "data": names,
                "tokens": _si(d.get("tokens_seen")),
                "steps": m.get("steps", "n/a"),
                "wall": _duration(c.get("wall_seconds")),
                "device_hours": f"{c.get('device_hours', 0):.4g}",
                "flops": _si(c.get("flops_6nd")),
            }
        )
        tot["tokens"] += d.get("tokens_seen") or 0
        tot["steps"] += m.get("steps") or 0
        tot["wall"] += c.get("wall_seconds") or 0
        tot["device_hours"] += c.get("device_hours") or 0
        tot["flops"] += c.get("flops_6nd") or 0
    total = {
        "tokens": _si(tot["tokens"]),
        "steps": tot["steps"],
        "wall": _duration(tot["wall"]),
        "device_hours": f"{tot['device_hours']:.4g}",
        "flops": _si(tot["flops"]),
    }
    return rows, total


def render(rec: dict[str, Any], repo_or_path: str = "path/to/this/folder", template: str = "default"):
    """The card as a `huggingface_hub.ModelCard`."""
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    parent = rec.get("parent") or {}
    datasets = [d["name"] for d in rec.get("data", {}).get("datasets", []) if not d["name"].startswith("tiny:")]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["hfrecipes", f"hfrecipes-{rec['stage']}"],
        datasets=datasets or None,
        base_model=(parent.get("recipe") or {}).get("hub_id") if parent else None,
    )
    rows, total = lineage_rows(rec)
    params = rec.get("model", {}).get("params_total")
    cutoff = rec.get("data", {}).get("model_cutoff") or {"date": None, "source": "unknown", "detail": "not recorded"}
    versions = ", ".join(f"{k} {v}" for k, v in rec.get("versions", {}).items())
    summary = (
        f"A {rec['model'].get('model_type', '')} model of {_si(params)} parameters after the **{rec['stage']}** "
        f"stage ({len(rows)} stage(s) in its lineage)."
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(cards_root() / f"{template}.md"),
        model_name=Path(repo_or_path).name,
        summary=summary,
        cutoff=cutoff,
        lineage=rows,
        total=total,
        params=_si(params),
        trainer_flops=_si(rec.get("compute", {}).get("flops_trainer")),
        inference_flops=_si(2 * params if params else None),
        metrics=rec.get("metrics", {}),
        repo_or_path=repo_or_path,
        recipe_yaml=yaml.safe_dump((rec.get("recipe") or {}).get("values", {}), sort_keys=False),
        versions=versions,
    )


def write_card(folder: str | Path, rec: dict[str, Any]) -> Path:
    path = Path(folder) / "README.md"
    records.atomic_write_text(path, str(render(rec, str(folder))))
    return path


class RecordCardMixin:
    """Trainer mixin: the card comes from the stage record, not from the trainer's own template on every save."""

    def create_model_card(self, *args, **kwargs):
        path = Path(self.args.output_dir)
        if (path / records.RECORD).is_file() and self.is_world_process_zero():
            write_card(path, records.read_record(path))
