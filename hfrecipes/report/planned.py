"""Planned against actual: what a stage's plan said before it ran (the record's `plan` block, `hfrecipes.planning`)
beside what its record measured, and their ratio, actual / planned. The card and the lifecycle summary read these.

    hfrecipes lifecycle tiny/lifecycle --plan    # the plan alone
    hfrecipes lifecycle tiny/lifecycle           # plan, run, then summary.md's "Planned and actual"
"""

from __future__ import annotations

from hfrecipes.record import Record
from hfrecipes.report import format as fmt

# (key, label, the formatter) of each number compared; the plan and the record name them alike but for two
NUMBERS = (
    ("tokens", "tokens", fmt.si),
    ("flops", "FLOPs (6·N·D)", fmt.si),
    ("seconds", "wall time", fmt.duration),
    ("dollars", "dollars", fmt.money),
    ("energy_kwh", "energy (kWh)", fmt.num),
)


def _ratio(planned: float | None, actual: float | None) -> float | None:
    return actual / planned if planned and actual is not None and planned > 0 else None


def actual(r: Record) -> dict[str, float | None]:
    """The measured numbers a plan is compared with, by the plan's names."""
    c = r.compute
    return {
        "tokens": r.data.tokens_seen,
        "flops": c.flops_6nd,
        "seconds": c.wall_seconds,
        "dollars": c.dollars,
        "energy_kwh": c.energy_kwh,
    }


def compare(r: Record) -> dict[str, dict[str, float | None]] | None:
    """Each number's planned and actual value and their ratio; None for a record made without a plan."""
    if r.plan is None:
        return None
    measured = actual(r)
    return {
        key: {
            "planned": getattr(r.plan, key),
            "actual": measured[key],
            "ratio": _ratio(getattr(r.plan, key), measured[key]),
        }
        for key, _, _ in NUMBERS
    }


def total(comparisons: list[dict[str, dict[str, float | None]] | None]) -> dict[str, dict[str, float | None]] | None:
    """Planned and actual summed over the stages that have both for a number, and the ratio of the sums; None where
    no stage was planned."""
    planned = [c for c in comparisons if c]
    if not planned:
        return None
    out = {}
    for key, _, _ in NUMBERS:
        pairs = [(c[key]["planned"], c[key]["actual"]) for c in planned]
        both = [(p, a) for p, a in pairs if p is not None and a is not None]
        p_sum = sum(p for p, _ in both) if both else None
        a_sum = sum(a for _, a in both) if both else None
        out[key] = {"planned": p_sum, "actual": a_sum, "ratio": _ratio(p_sum, a_sum), "stages": len(both)}
    return out


def rows(comparison: dict[str, dict[str, float | None]] | None) -> list[dict[str, str]]:
    """The card's table: one formatted row per number (planned, actual, actual / planned)."""
    if not comparison:
        return []
    return [
        {
            "label": label,
            "planned": show(comparison[key]["planned"]),
            "actual": show(comparison[key]["actual"]),
            "ratio": fmt.ratio(comparison[key]["ratio"]),
        }
        for key, label, show in NUMBERS
    ]


def cell(entry: dict[str, float | None] | None, key: str) -> str:
    """One summary cell: 'planned -> actual (ratio)'."""
    if not entry:
        return "n/a"
    show = next(s for k, _, s in NUMBERS if k == key)
    return f"{show(entry['planned'])} -> {show(entry['actual'])} ({fmt.ratio(entry['ratio'])})"


FORMATS = {"planned_cell": cell}


# ------------------------------------------------------------------------------------------------------- --plan


def plan_text(stages: list[dict], total: dict | None = None, control: dict | None = None) -> str:
    """Plans as `--plan` prints them: the rate and utilisation they rest on, one row per stage (the control after the
    total it is not part of), and how each stage's tokens were estimated."""
    first = stages[0]
    lines = [
        "Plan: every number an estimate, made before anything trains (no weights loaded).",
        f"Time = FLOPs / ({fmt.si(first['matmul_flops_per_second'], 'FLOP/s')} measured here by {first['matmul']} x "
        f"{fmt.share(first['utilisation'])} utilisation, {first['utilisation_source']}; --plan-utilisation sets it).",
        "",
        "| stage | parameters | steps | tokens | FLOPs | time | dollars | energy (kWh) | CO2 (kg) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def row(name: str, p: dict) -> str:
        return (
            f"| {name} | {fmt.si(p['params']) if 'params' in p else ''} | {p.get('steps', '')} | "
            f"{fmt.si(p['tokens'])} | {fmt.si(p['flops'])} | {fmt.duration(p['seconds'])} | "
            f"{fmt.money(p['dollars'])} | {fmt.num(p['energy_kwh'], 3)} | {fmt.num(p['co2_kg'], 3)} |"
        )

    for p in stages:
        lines.append(row(p.get("id") or p["stage"], p))
    if total is not None and len(stages) > 1:
        lines.append(row("**total**", total))
    if control is not None:
        lines.append(row(f"{control['id']} (the control, not in the total)", control))
    lines += ["", "How each was estimated:"]
    for p in stages + ([control] if control else []):
        name = p.get("id") or p["stage"]
        teacher = f" + the teacher's {fmt.si(p['teacher_params'])}" if p.get("teacher_params") else ""
        lines += [
            f"- {name}: N {fmt.si(p['params'])}{teacher} from {p['params_source']}; D = {p['steps']} steps "
            f"({p['steps_source']}) x {p['examples_per_step']} examples x {fmt.num(p['tokens_per_example'], 4)} "
            f"tokens ({p['tokens_per_example_source']}); FLOPs {p['flops_formula']}; "
            f"{fmt.money(p['price_per_hour'])}/h ({p['cost_device'] or 'unknown device'})."
        ]
    return "\n".join(lines)
