"""The lifecycle's claims: what a run's numbers should show, declared in the lifecycle recipe's `claims:` list and
checked on the summary by a few kinds of comparison. A claim names its `kind`, its `key` in `summary.json` (and in
the count over seeds), the stage ids it reads, its bar, and its `text`: the line `summary.md` prints, whose `{name}`
placeholders the kind fills with this run's numbers (`WORDS` lists them per kind; a literal brace is doubled).

A claim's verdict is True, False or None (this run did not measure what it needs). A claim whose stage recorded
nothing to judge (no held-out accuracy, no gold check, no knowledge probe, no serving prices) is left out, as the
stage's card leaves out a block it has no numbers for.

    hfrecipes check tiny/lifecycle     # parses every claim and its placeholders
    hfrecipes lifecycle                # the first lines of runs/tiny/summary.md
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hfrecipes.report.format import FORMATS, pct

Row = dict[str, Any]
MARGIN = {"range": (-1, 1), "help": "in accuracy, as a fraction: 0.15 is 15 points"}


def _acc(row: Row | None) -> float | None:
    return None if row is None else row["heldout_accuracy"]


def _points(x: float) -> str:
    return f"{100 * x:+.1f} points"


def _best(rows: dict[str, Row], ids: list[str]) -> Row | None:
    """The row with the highest held-out accuracy among `ids` (the first listed on a tie), None if none has one."""
    scored = [rows[i] for i in ids if i in rows and _acc(rows[i]) is not None]
    return max(scored, key=_acc) if scored else None


def _leads(best: Row, other: Row, margin: float) -> tuple[bool, dict[str, str]]:
    """Whether `best` leads `other` in held-out accuracy by `margin` (to rounding), and the words that say so."""
    lead = _acc(best) - _acc(other)
    words = {"best": best["id"], "best_accuracy": pct(_acc(best)), "lead": _points(lead), "margin": _points(margin)}
    return lead >= margin - 1e-9, words


@dataclass
class Claim:
    """What every claim declares. `WORDS` maps each of its text fields to the placeholders the kind fills there;
    `NEEDS` names what the lifecycle must have besides the stages the claim names (checked by `spec.load`)."""

    key: str = field(metadata={"help": "its name in summary.json and in the count over seeds"})
    text: str = field(metadata={"help": "the line summary.md prints, with {placeholders} for this run's numbers"})

    WORDS: ClassVar[dict[str, tuple[str, ...]]] = {}
    NEEDS: ClassVar[tuple[str, ...]] = ()

    def check(self, rows: dict[str, Row], summary: dict[str, Any]) -> dict[str, Any] | None:
        """{key, text, supported} for this run, or None where the stage recorded nothing this claim reads."""
        raise NotImplementedError

    def _verdict(self, supported: bool | None, template: str | None = None, **words: Any) -> dict[str, Any]:
        return {"key": self.key, "text": (template or self.text).format(**words), "supported": supported}


@dataclass
class GroupGap(Claim):
    """A stage scores at least `margin` higher on one kind of problem (`high_group`) than on another (`low_group`):
    e.g. SFT reproduces its demonstrations' flaw on the kind they got wrong."""

    stage: str = field(metadata={"refs": "any", "help": "the stage whose accuracy by kind is read"})
    low_group: str = field(metadata={"help": "the kind of problem expected to score lower"})
    high_group: str = field(metadata={"help": "the kind expected to score higher"})
    margin: float = field(default=0.2, metadata=MARGIN)

    WORDS = {"text": ("stage", "low_group", "high_group", "low", "high", "margin")}
    NEEDS = ("heldout", "group_column")

    def check(self, rows, summary):
        row = rows.get(self.stage)
        if row is None:
            return None
        groups = row.get("by_group") or {}
        low, high = groups.get(self.low_group), groups.get(self.high_group)
        return self._verdict(
            None if low is None or high is None else high - low >= self.margin,
            stage=self.stage,
            low_group=self.low_group,
            high_group=self.high_group,
            low=pct(low),
            high=pct(high),
            margin=f"{100 * self.margin:.1f} points",
        )


@dataclass
class Plateau(Claim):
    """A stage's gold check stopped it at its validation plateau, before its planned steps ran out."""

    stage: str = field(metadata={"refs": "any", "help": "the stage trained with a gold check"})

    WORDS = {"text": ("stage", "metric", "best", "best_step", "steps", "outcome")}

    def check(self, rows, summary):
        row = rows.get(self.stage)
        if row is None or not row.get("gold"):
            return None
        gold = row["gold"]
        best = gold.get("best") or {}
        stopped = gold.get("stopped") == "plateau"
        return self._verdict(
            stopped,
            stage=self.stage,
            metric=gold.get("metric") or "accuracy",
            best=pct(best.get("gold")),
            best_step=best.get("step"),
            steps=row["steps"],
            outcome=f"stopped at step {row['steps']}" if stopped else f"ran all {row['steps']} steps without stopping",
        )


@dataclass
class Beats(Claim):
    """The best of some stages passes another stage's held-out accuracy by at least `margin`: e.g. RL passes the
    SFT ceiling. The chart in summary.png draws `over` as the bar and colours `best_of`."""

    best_of: list[str] = field(metadata={"refs": "any", "min_items": 1, "help": "the ids of the stages compared"})
    over: str = field(metadata={"refs": "any", "help": "the stage they should pass"})
    margin: float = field(default=0.15, metadata=MARGIN)

    WORDS = {"text": ("best", "best_accuracy", "over", "over_accuracy", "lead", "margin")}
    NEEDS = ("heldout",)

    def check(self, rows, summary):
        over, best = rows.get(self.over), _best(rows, self.best_of)
        if best is None or _acc(over) is None:
            return None
        supported, words = _leads(best, over, self.margin)
        return self._verdict(supported, over=over["id"], over_accuracy=pct(_acc(over)), **words)


@dataclass
class BeatsControl(Claim):
    """The best of some stages passes the lifecycle's control (the same FLOPs or wall time spent on more of the
    control's stage) by at least `margin`."""

    best_of: list[str] = field(metadata={"refs": "any", "min_items": 1, "help": "the ids of the stages compared"})
    margin: float = field(default=0.10, metadata=MARGIN)

    WORDS = {
        "text": (
            "best", "best_accuracy", "control", "control_accuracy", "matches", "budget", "control_flops",
            "control_wall", "lead", "margin",
        )
    }  # fmt: skip
    NEEDS = ("heldout", "control")

    def check(self, rows, summary):
        control, best = summary["control"], _best(rows, self.best_of)
        if best is None or _acc(control) is None:
            return None
        supported, words = _leads(best, control, self.margin)
        return self._verdict(
            supported,
            control=control["id"],
            control_accuracy=pct(_acc(control)),
            matches=control["matches"],
            budget="training FLOPs" if control.get("budget") == "flops" else "wall time",
            control_flops=FORMATS["si"](control["flops"]),
            control_wall=FORMATS["duration"](control["wall_seconds"]),
            **words,
        )


@dataclass
class Cheaper(Claim):
    """A stage spends fewer training FLOPs than some others together: e.g. DPO against reward model + PPO."""

    stage: str = field(metadata={"refs": "any", "help": "the stage expected to cost less"})
    than: list[str] = field(metadata={"refs": "any", "min_items": 1, "help": "the ids of the stages it undercuts"})

    WORDS = {"text": ("stage", "flops", "wall", "accuracy", "than", "than_flops", "than_wall", "than_accuracy")}

    def check(self, rows, summary):
        row, others = rows.get(self.stage), [rows[i] for i in self.than if i in rows]
        if row is None or not others:
            return None
        flops, walls = [r["flops"] for r in others], [r["wall_seconds"] for r in others]
        than_flops = sum(flops) if None not in flops else None
        than_wall = sum(walls) if None not in walls else None
        return self._verdict(
            None if row["flops"] is None or than_flops is None else row["flops"] < than_flops,
            stage=self.stage,
            flops=FORMATS["si"](row["flops"]),
            wall=FORMATS["duration"](row["wall_seconds"]),
            accuracy=pct(_acc(row)),
            than=" + ".join(f"`{r['id']}`" for r in others),
            than_flops=FORMATS["si"](than_flops),
            than_wall=FORMATS["duration"](than_wall),
            than_accuracy=pct(_acc(others[-1])),
        )


@dataclass
class Comparable(Claim):
    """A stage reaches within `margin` of another's held-out accuracy (or passes it), with the training FLOPs and
    wall time of each beside: e.g. KTO from unpaired judgments against DPO from the same judgments in pairs."""

    stage: str = field(metadata={"refs": "any", "help": "the stage compared"})
    to: str = field(metadata={"refs": "any", "help": "the stage it should come close to"})
    margin: float = field(default=0.10, metadata=MARGIN)

    WORDS = {
        "text": (
            "stage", "accuracy", "flops", "wall", "to", "to_accuracy", "to_flops", "to_wall", "gap", "margin",
        )
    }  # fmt: skip
    NEEDS = ("heldout",)

    def check(self, rows, summary):
        row, to = rows.get(self.stage), rows.get(self.to)
        if _acc(row) is None or _acc(to) is None:
            return None
        gap = _acc(row) - _acc(to)
        return self._verdict(
            gap >= -self.margin - 1e-9,
            stage=self.stage,
            accuracy=pct(_acc(row)),
            flops=FORMATS["si"](row["flops"]),
            wall=FORMATS["duration"](row["wall_seconds"]),
            to=self.to,
            to_accuracy=pct(_acc(to)),
            to_flops=FORMATS["si"](to["flops"]),
            to_wall=FORMATS["duration"](to["wall_seconds"]),
            gap=_points(gap),
            margin=_points(self.margin),
        )


@dataclass
class CatchesHacking(Claim):
    """A stage's gold check flags its policy gaming the reward model (the proxy reward rising while gold accuracy
    falls). `text` is printed when it flagged, `text_unflagged` when it did not."""

    stage: str = field(metadata={"refs": "any", "help": "the stage trained with a gold check"})
    text_unflagged: str = field(metadata={"help": "the line printed when the check flagged nothing"})

    WORDS = {
        "text": ("stage", "proxy", "proxy_at_best", "best_gold", "gold", "step", "stopped", "kept", "accuracy"),
        "text_unflagged": ("stage", "checks", "accuracy"),
    }

    def check(self, rows, summary):
        row = rows.get(self.stage)
        if row is None:
            return None
        gold = row.get("gold") or {}
        flag = gold.get("hacking")
        supported = bool(flag) if gold else None
        accuracy = pct(_acc(row))
        if not flag:
            return self._verdict(
                supported, self.text_unflagged, stage=self.stage, checks=gold.get("checks", 0), accuracy=accuracy
            )
        kept = gold.get("kept_step")
        return self._verdict(
            supported,
            stage=self.stage,
            proxy=FORMATS["num"](flag.get("proxy")),
            proxy_at_best=FORMATS["num"](flag.get("proxy_at_best")),
            best_gold=pct(flag.get("best_gold")),
            gold=pct(flag.get("gold")),
            step=flag.get("step"),
            stopped=", training stopped" if gold.get("stopped") == "reward_hacking" else "",
            kept=f", the weights of step {kept} kept" if kept is not None else "",
            accuracy=accuracy,
        )


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


@dataclass
class Cutoff(Claim):
    """A stage's knowledge probe knows the facts dated before its cutoff (at least `min_before` of them) and not
    those after (at most `max_after_chance` times chance)."""

    stage: str = field(metadata={"refs": "any", "help": "the stage that recorded a knowledge probe"})
    min_before: float = field(default=0.5, metadata={"range": (0, 1), "help": "share of facts before it known"})
    max_after_chance: float = field(default=2.0, metadata={"range": (0, None), "help": "times chance, after it"})

    WORDS = {
        "text": (
            "stage", "cutoff", "before_known", "before_total", "after_known", "after_total", "chance", "favourite",
        )
    }  # fmt: skip

    def check(self, rows, summary):
        probe = (rows.get(self.stage) or {}).get("probe")
        if not probe:
            return None
        before, after, chance = probe.get("before") or {}, probe.get("after") or {}, probe.get("chance")
        supported = None
        if before.get("accuracy") is not None and after.get("accuracy") is not None and chance is not None:
            supported = before["accuracy"] >= self.min_before and after["accuracy"] <= self.max_after_chance * chance
        return self._verdict(
            supported,
            stage=self.stage,
            cutoff=probe.get("cutoff"),
            before_known=before.get("known"),
            before_total=before.get("total"),
            after_known=after.get("known"),
            after_total=after.get("total"),
            chance=pct(chance),
            favourite=_favourite(probe),
        )


@dataclass
class OutputCostlier(Claim):
    """Serving the export, a generated token costs more than a prompt token (the inference block's prices)."""

    WORDS = {"text": ("engine", "output_price", "input_price", "ratio")}
    NEEDS = ("inference",)

    def check(self, rows, summary):
        inference = summary.get("inference") or {}
        ratio = inference.get("output_input_price_ratio")
        if ratio is None:
            return None
        return self._verdict(
            ratio > 1,
            engine=inference.get("engine"),
            output_price=FORMATS["money"](inference.get("dollars_per_million_output_tokens")),
            input_price=FORMATS["money"](inference.get("dollars_per_million_input_tokens")),
            ratio=f"{ratio:.1f}",
        )


@dataclass
class PaysOff(Claim):
    """The student distilled from the teacher is cheaper to serve, within `max_accuracy_drop` of the teacher's
    held-out accuracy, and so pays for its making after some traffic (the `distillation` block's payback)."""

    max_accuracy_drop: float = field(default=0.10, metadata=MARGIN)

    WORDS = {
        "text": (
            "teacher",
            "student",
            "teacher_accuracy",
            "student_accuracy",
            "teacher_params",
            "student_params",
            "teacher_request",
            "student_request",
            "saving",
            "cost",
            "requests",
            "tokens",
            "engine",
            "max_accuracy_drop",
        )
    }
    NEEDS = ("distillation",)

    def check(self, rows, summary):
        d = summary.get("distillation") or {}
        pay = d.get("payback") or {}
        t_acc, s_acc = d.get("teacher_accuracy"), d.get("student_accuracy")
        if pay.get("saving_per_request") is None or t_acc is None or s_acc is None:
            return None
        money = FORMATS["money"]
        return self._verdict(
            pay["requests"] is not None and t_acc - s_acc <= self.max_accuracy_drop + 1e-9,
            teacher=d["teacher"],
            student=d["student"],
            teacher_accuracy=pct(t_acc),
            student_accuracy=pct(s_acc),
            teacher_params=FORMATS["si"](d.get("teacher_params")),
            student_params=FORMATS["si"](d.get("student_params")),
            teacher_request=money(pay["teacher_dollars_per_request"] * 1e6),
            student_request=money(pay["student_dollars_per_request"] * 1e6),
            saving=FORMATS["share"](pay.get("saving_share")),
            cost=money(pay.get("cost_dollars")),
            requests=FORMATS["si"](pay.get("requests")) if pay.get("requests") is not None else "never",
            tokens=FORMATS["si"](pay.get("tokens")) if pay.get("tokens") is not None else "never",
            engine=d.get("engine"),
            max_accuracy_drop=_points(self.max_accuracy_drop),
        )


# The claim kinds a lifecycle recipe may name, kind -> its dataclass.
KINDS: dict[str, type[Claim]] = {
    "group_gap": GroupGap,
    "plateau": Plateau,
    "beats": Beats,
    "beats_control": BeatsControl,
    "cheaper": Cheaper,
    "comparable": Comparable,
    "catches_hacking": CatchesHacking,
    "cutoff": Cutoff,
    "output_costlier": OutputCostlier,
    "pays_off": PaysOff,
}


def kind_of(claim: Claim) -> str:
    return next(kind for kind, cls in KINDS.items() if type(claim) is cls)


def as_dict(claim: Claim) -> dict[str, Any]:
    """The claim as the recipe declares it, its kind first (summary.json's `claims_spec`)."""
    return {"kind": kind_of(claim), **dataclasses.asdict(claim)}


def evaluate(claims: list[Claim], summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per claim this run measured, in the recipe's order: `key`, `text` (the numbers, in words) and
    `supported` (True, False, or None where this run did not measure what the claim needs)."""
    rows = {r["id"]: r for r in summary["stages"]}
    if summary["control"]:
        rows[summary["control"]["id"]] = summary["control"]
    return [verdict for claim in claims if (verdict := claim.check(rows, summary)) is not None]
