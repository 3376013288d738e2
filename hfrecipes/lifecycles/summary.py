"""The lifecycle summary: one row per stage read from its record (`Record.parse`), the lifecycle's held-out accuracy
beside the stage's own held-out evaluation (`metrics.heldout`), the control, export and inference; written as
`summary.json` (everything), `summary.md` (`cards/summary.md`, numbers summed and formatted by the report layer as the
card's are, so a number reads the same in the summary and in the stage's card) and `summary.png`
(`report.plots.summary_chart`: held-out accuracy by stage, the SFT ceiling drawn, the seed spread where there are
several seeds).

Above the table, one line per claim of the recipe's `claims` block says whether this run's numbers support it: SFT
reproduces its demonstrations' flaw; RL passes the SFT ceiling; more SFT for the same FLOPs does not; DPO costs less
than reward model + PPO; the gold check catches a policy gaming its reward model; the model knows the facts before
its knowledge cutoff and not those after; output tokens cost more than input tokens.

    hfrecipes lifecycle        # writes runs/tiny/summary.md
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from hfrecipes import record as records
from hfrecipes.record import Record
from hfrecipes.report.card import cards_root
from hfrecipes.report.format import FORMATS, pct
from hfrecipes.report.lineage import totals
from hfrecipes.report.plots import summary_chart

TEMPLATE = "summary"
SUMMED = ("steps", "wall_seconds", "tokens", "flops", "dollars")  # the lineage's keys the summary table shows


def _gold(r: Record) -> dict[str, Any] | None:
    """The stage's gold check (`hfrecipes.gold`) without its history: best, hacking, why it stopped, what it kept;
    the first and last checks' proxy and gold beside them."""
    gold = r.metrics.extra.get("gold")
    if not isinstance(gold, dict):
        return None
    history = gold.get("history") or []
    keep = ("metric", "best", "hacking", "stopped", "kept_step", "every")
    return {
        **{k: gold.get(k) for k in keep},
        "checks": len(history),
        "first": history[0] if history else None,
        "last": history[-1] if history else None,
    }


def _favourite(probe: dict[str, Any]) -> str:
    """A sentence when one answer tops nearly every fact (nine in ten): the model ranks by how common each answer
    is, not by which fact it is asked."""
    top = probe.get("top_choice") or {}
    if not top.get("total") or top["rows"] < 0.9 * top["total"]:
        return ""
    return (
        f" The model's top choice is '{top['choice']}' for {top['rows']} of the {top['total']} facts: it learnt how "
        "common each answer is, not which fact has which."
    )


def _probe(r: Record) -> dict[str, Any] | None:
    """The knowledge-cutoff probe the stage recorded beside its cutoff (`hfrecipes.probe`), if any."""
    found = (r.data.knowledge_cutoff or {}).get("knowledge_probe")
    return found if isinstance(found, dict) else None


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
        "ran_this_time": ran,
        "wall_seconds_this_time": round(wall_seconds, 1),
        "total": total,
        "missing": missing,
        "claims_spec": dataclasses.asdict(life.claims) if life.claims else None,
    }
    summary["claims"] = claims(summary)
    return summary


# ------------------------------------------------------------------------------------------------------ claims


def _acc(r: dict[str, Any] | None) -> float | None:
    return None if r is None else r["heldout_accuracy"]


def _points(x: float) -> str:
    return f"{100 * x:+.1f} points"


def claims(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per claim the recipe names: `key`, `text` (the numbers, in words) and `supported` (True, False,
    or None where this run did not measure what the claim needs)."""
    spec = summary.get("claims_spec")
    if not spec:
        return []
    rows = {r["id"]: r for r in summary["stages"]}
    control = summary["control"]
    if control:
        rows[control["id"]] = control
    out: list[dict[str, Any]] = []

    def claim(key: str, text: str, supported: bool | None) -> None:
        out.append({"key": key, "text": text, "supported": supported})

    ceiling = rows.get(spec["ceiling"]) if spec["ceiling"] else None
    if ceiling and spec["flaw_group"] and spec["clean_group"]:
        groups = ceiling.get("by_group") or {}
        flaw, clean = groups.get(spec["flaw_group"]), groups.get(spec["clean_group"])
        ok = None if flaw is None or clean is None else clean - flaw >= spec["flaw_margin"]
        claim(
            "imitation",
            f"SFT imitates its demonstrations, flaw included: `{ceiling['id']}` scores {pct(flaw)} on "
            f"{spec['flaw_group']} problems, where its demonstrations are flawed, and {pct(clean)} on "
            f"{spec['clean_group']} problems (a gap of at least {_points(spec['flaw_margin'])[1:]} expected).",
            ok,
        )
    if ceiling and ceiling.get("gold"):
        gold = ceiling["gold"]
        best = gold.get("best") or {}
        ok = gold.get("stopped") == "plateau"
        how = f"stopped at step {ceiling['steps']}" if ok else f"ran all {ceiling['steps']} steps without stopping"
        claim(
            "plateau",
            f"SFT trained to its plateau: validation {gold.get('metric') or 'accuracy'} stopped improving "
            f"(best {pct(best.get('gold'))} at step {best.get('step')}); it {how}.",
            ok,
        )
    rl = [rows[i] for i in spec["rl"] if i in rows and _acc(rows[i]) is not None]
    best_rl = max(rl, key=_acc) if rl else None
    if ceiling and best_rl and _acc(ceiling) is not None:
        gain = _acc(best_rl) - _acc(ceiling)
        claim(
            "past_ceiling",
            f"RL passes the SFT ceiling: `{best_rl['id']}` reaches {pct(_acc(best_rl))} against `{ceiling['id']}`'s "
            f"{pct(_acc(ceiling))}, {_points(gain)} (target {_points(spec['rl_margin'])}).",
            gain >= spec["rl_margin"] - 1e-9,
        )
    if control and best_rl and _acc(control) is not None:
        lead = _acc(best_rl) - _acc(control)
        budget = "training FLOPs" if control.get("budget") == "flops" else "wall time"
        claim(
            "control",
            f"More SFT does not get there: the control `{control['id']}` spent `{control['matches']}`'s {budget} "
            f"({FORMATS['si'](control['flops'])} FLOPs, {FORMATS['duration'](control['wall_seconds'])}) on more "
            f"imitation and reached {pct(_acc(control))}; `{best_rl['id']}` leads it by {_points(lead)} "
            f"(target {_points(spec['control_margin'])}).",
            lead >= spec["control_margin"] - 1e-9,
        )
    dpo, rlhf = rows.get(spec["dpo"]) if spec["dpo"] else None, [rows[i] for i in spec["rlhf"] if i in rows]
    if dpo and rlhf:
        flops = [r["flops"] for r in rlhf]
        walls = [r["wall_seconds"] for r in rlhf]
        rlhf_flops = sum(flops) if None not in flops else None
        rlhf_wall = sum(walls) if None not in walls else None
        names = " + ".join(f"`{r['id']}`" for r in rlhf)
        last = rlhf[-1]
        ok = None if dpo["flops"] is None or rlhf_flops is None else dpo["flops"] < rlhf_flops
        claim(
            "dpo",
            f"DPO aligns for less: `{dpo['id']}` took {FORMATS['si'](dpo['flops'])} FLOPs and "
            f"{FORMATS['duration'](dpo['wall_seconds'])} to reach {pct(_acc(dpo))}; {names} took "
            f"{FORMATS['si'](rlhf_flops)} FLOPs and {FORMATS['duration'](rlhf_wall)} to reach {pct(_acc(last))}.",
            ok,
        )
    hacked = rows.get(spec["hacking"]) if spec["hacking"] else None
    if hacked:
        gold = hacked.get("gold") or {}
        flag = gold.get("hacking")
        if flag:
            kept = gold.get("kept_step")
            text = (
                f"A reward model can be gamed, and the gold check catches it: `{hacked['id']}` (PPO against the "
                f"reward model alone) raised its proxy reward to {FORMATS['num'](flag.get('proxy'))} (from "
                f"{FORMATS['num'](flag.get('proxy_at_best'))} at its best gold check) while gold accuracy fell from "
                f"{pct(flag.get('best_gold'))} to {pct(flag.get('gold'))}; flagged at step {flag.get('step')}"
                + (", training stopped" if gold.get("stopped") == "reward_hacking" else "")
                + (f", the weights of step {kept} kept" if kept is not None else "")
                + f"; held-out {pct(_acc(hacked))}."
            )
        else:
            text = (
                f"A reward model can be gamed: `{hacked['id']}`'s gold check flagged no hacking in "
                f"{gold.get('checks', 0)} checks (held-out {pct(_acc(hacked))})."
            )
        claim("hacking", text, bool(flag) if gold else None)
    cut = rows.get(spec["cutoff"]) if spec["cutoff"] else None
    probe = (cut or {}).get("probe")
    if probe:
        before, after, chance = probe.get("before") or {}, probe.get("after") or {}, probe.get("chance")
        ok = None
        if before.get("accuracy") is not None and after.get("accuracy") is not None and chance is not None:
            ok = before["accuracy"] >= 0.5 and after["accuracy"] <= 2 * chance
        claim(
            "cutoff",
            f"Nothing after the cutoff is known: `{cut['id']}` (cutoff {probe.get('cutoff')}) knows "
            f"{before.get('known')}/{before.get('total')} facts dated before it and {after.get('known')}/"
            f"{after.get('total')} dated after (chance {pct(chance)}; supported when at least half before and at "
            f"most twice chance after).{_favourite(probe)}",
            ok,
        )
    inf = summary.get("inference") or {}
    ratio = inf.get("output_input_price_ratio")
    if ratio is not None:
        claim(
            "output_tokens",
            f"Output tokens cost more than input tokens: serving the export ({inf.get('engine')}), a generated token "
            f"costs {FORMATS['money'](inf.get('dollars_per_million_output_tokens'))} per million, a prompt token "
            f"{FORMATS['money'](inf.get('dollars_per_million_input_tokens'))}: {ratio:.1f}x (decode runs a step "
            "per token; prefill reads a whole prompt in one).",
            ratio > 1,
        )
    return out


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
        **FORMATS,
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
