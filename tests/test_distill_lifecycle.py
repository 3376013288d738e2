"""Distil to serve cheaper: the payback of a distilled student by hand, the `pays_off` claim's verdicts, the
`distillation` block's checks in a lifecycle recipe, and the student's card saying what it saves."""

from __future__ import annotations

import copy

import pytest
import yaml

from hfrecipes import costs
from hfrecipes.errors import UsageError
from hfrecipes.lifecycles import claims as claimed
from hfrecipes.lifecycles.spec import load

TEACHER = {"prompts": 100, "input_tokens": 2000, "generated_tokens": 1000,
           "dollars_per_million_input_tokens": 0.10, "dollars_per_million_output_tokens": 2.00}  # fmt: skip
STUDENT = {**TEACHER, "generated_tokens": 1200,
           "dollars_per_million_input_tokens": 0.04, "dollars_per_million_output_tokens": 0.80}  # fmt: skip


def test_payback_by_hand():
    """A request at the measured traffic: the teacher's 20 prompt and 10 reply tokens cost 20*0.1e-6 + 10*2e-6
    = 22e-6 dollars; the student's 20 and 12 cost 20*0.04e-6 + 12*0.8e-6 = 10.4e-6 (its own, longer replies
    counted). The saving, 11.6e-6 a request, pays $0.0116 back after 1000 requests = 32,000 of its tokens."""
    got = costs.distillation_payback(0.0116, TEACHER, STUDENT)
    assert got["teacher_dollars_per_request"] == pytest.approx(22e-6)
    assert got["student_dollars_per_request"] == pytest.approx(10.4e-6)
    assert got["saving_share"] == pytest.approx(11.6 / 22)
    assert got["requests"] == pytest.approx(1000) and got["tokens"] == pytest.approx(32_000)


@pytest.mark.parametrize(
    "student, cost",
    [({**TEACHER}, 0.01), ({**STUDENT, "dollars_per_million_output_tokens": 3.0}, 0.01), (STUDENT, None)],
    ids=["same-price", "dearer", "cost-unknown"],
)
def test_a_student_that_saves_nothing_never_pays_back(student, cost):
    got = costs.distillation_payback(cost, TEACHER, student)
    assert got["requests"] is None and got["tokens"] is None


def test_payback_with_an_unknown_price_is_unknown():
    got = costs.distillation_payback(0.01, TEACHER, {**STUDENT, "dollars_per_million_output_tokens": None})
    assert got["saving_per_request"] is None and got["requests"] is None


def _summary(teacher_acc: float | None = 0.70, student_acc: float | None = 0.64, student=STUDENT) -> dict:
    return {
        "stages": [],
        "control": None,
        "distillation": {
            "teacher": "grpo",
            "student": "distill",
            "engine": "transformers",
            "teacher_accuracy": teacher_acc,
            "student_accuracy": student_acc,
            "teacher_params": 2.0e6,
            "student_params": 1.0e6,
            "payback": costs.distillation_payback(0.0116, TEACHER, student),
        },
    }


CLAIM = claimed.PaysOff(
    key="distilled",
    text="`{student}` ({student_params}) keeps {student_accuracy} of `{teacher}`'s {teacher_accuracy} and pays "
    "back {cost} after {requests} requests.",
    max_accuracy_drop=0.10,
)


@pytest.mark.parametrize(
    "summary, verdict",
    [
        (_summary(), True),
        (_summary(student_acc=0.50), False),  # cheaper, but 20 points worse than its teacher
        (_summary(student={**STUDENT, "dollars_per_million_output_tokens": 3.0}), False),  # dearer: never pays back
        (_summary(student_acc=None), None),  # the student was not scored: nothing to judge
    ],
    ids=["pays-off", "too-weak", "dearer", "unscored"],
)
def test_pays_off_claim_follows_the_numbers(summary, verdict):
    got = claimed.evaluate([CLAIM], summary)
    if verdict is None:
        assert got == []
        return
    assert got[0]["supported"] is verdict
    assert "{" not in got[0]["text"] and "None" not in got[0]["text"], got[0]["text"]
    if verdict:
        assert got[0]["text"] == (
            "`distill` (1 M) keeps 64.0% of `grpo`'s 70.0% and pays back $0.0116 after 1 k requests."
        )


# ------------------------------------------------------------------------------------------------ the recipe


@pytest.fixture(scope="module")
def spec():
    from hfrecipes.recipe import load_yaml, resolve_recipe

    return load_yaml(resolve_recipe("tiny/lifecycle_distill"))


def test_the_distillation_lifecycle_parses_and_counts_the_students_making(spec):
    life = load("tiny/lifecycle_distill")
    d = life.distillation
    assert d.student in d.cost_of and d.teacher not in d.cost_of
    ids = [s.id for s in life.stages]
    assert ids.index(d.teacher) < ids.index(d.student)
    assert any(kind == "pays_off" for kind in (claimed.kind_of(c) for c in life.claims))


BAD = [
    ("teacher", "nope", ["distillation", "teacher 'nope'"]),
    ("cost_of", [], ["distillation", "'cost_of' is empty"]),
    ("cost_of", ["student_pretrain"], ["distillation", "cost_of must include the student's own stage"]),
    ("students", "distill", ["distillation", "'students'", "Did you mean 'student'"]),
]


@pytest.mark.parametrize("key, value, words", BAD, ids=lambda x: str(x)[:20])
def test_a_bad_distillation_block_is_refused_before_anything_runs(spec, tmp_path, key, value, words):
    spec = copy.deepcopy(spec)
    spec["distillation"][key] = value
    path = tmp_path / "lifecycle.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(UsageError) as e:
        load(path, run_dir=tmp_path / "run")
    for w in [str(path), *words]:
        assert w in str(e.value), str(e.value)
    assert not (tmp_path / "run").exists()


def test_distillation_needs_the_inference_block(spec, tmp_path):
    spec = copy.deepcopy(spec)
    spec.pop("inference")
    spec["claims"] = [c for c in spec.get("claims", []) if c["kind"] not in ("output_costlier",)]
    path = tmp_path / "lifecycle.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(UsageError, match="distillation serves the teacher and the student"):
        load(path)


# ------------------------------------------------------------------------------------------------ a short run

GOLD = {"gold_samples": 8, "gold_every": 4}
FAST = {
    "*": {"logging_steps": 1, "save_strategy": "no"},
    "pretrain": {"max_steps": 12, "dataset_test_split": ""},
    "sft": {"max_steps": 8, **GOLD},
    "grpo": {
        "max_steps": 2,
        "eval_samples": 8,
        "per_device_train_batch_size": 16,
        "num_generations": 4,
        "gold_samples": 8,
        "gold_every": 1,
    },
    "student_pretrain": {"max_steps": 12, "dataset_test_split": ""},
    "student_sft": {"max_steps": 8, **GOLD},
    "distill": {"max_steps": 3, "per_device_train_batch_size": 8, "max_eval_samples": 8, **GOLD},
}


@pytest.fixture(scope="module")
def distilled(spec, tmp_path_factory):
    import hfrecipes

    spec = copy.deepcopy(spec)
    spec["evaluation"]["samples"] = 8
    spec["inference"]["samples"] = 8
    spec["inference"]["engine"] = "transformers"  # one engine for both, and the same on every machine
    path = tmp_path_factory.mktemp("life") / "lifecycle.yaml"
    path.write_text(yaml.safe_dump(spec))
    run_dir = tmp_path_factory.mktemp("run") / "tiny_distill"
    return run_dir, hfrecipes.lifecycle(path, run_dir=run_dir, overrides=FAST)


def test_the_student_is_served_beside_its_teacher_and_says_what_it_saves(distilled):
    from hfrecipes import record

    run_dir, summary = distilled
    d = summary["distillation"]
    rows = {r["id"]: r for r in summary["stages"]}
    assert (d["teacher"], d["student"]) == ("grpo", "distill") and d["engine"] == "transformers"
    # about half the teacher's parameters, sharing its tokenizer
    assert 0.3 < d["student_params"] / d["teacher_params"] < 0.7
    for role in ("teacher", "student"):
        served = d[f"{role}_serving"]
        assert served["prompts"] == 8 and served["dollars_per_million_output_tokens"] > 0
        assert (run_dir / "served" / d[role] / "record.json").is_file()
    # what the student cost is the three stages that made it, the teacher's forward passes inside the last
    pay = d["payback"]
    made = ("student_pretrain", "student_sft", "distill")
    assert pay["cost_dollars"] == pytest.approx(sum(rows[i]["dollars"] for i in made))
    assert d["cost_flops"] == pytest.approx(sum(rows[i]["flops"] for i in made))
    expected = costs.distillation_payback(pay["cost_dollars"], d["teacher_serving"], d["student_serving"])
    assert pay == pytest.approx(expected)
    # the student's served export holds the block, and its card says it; the teacher's card does not
    student = record.load_record(run_dir / "served" / "distill")
    assert student.distillation is not None and student.distillation.teacher == "grpo"
    card = (run_dir / "served" / "distill" / "README.md").read_text()
    assert "### Distilled to serve cheaper" in card and "student_pretrain, student_sft, distill" in card
    assert "Distilled to serve cheaper" not in (run_dir / "served" / "grpo" / "README.md").read_text()
    md = (run_dir / "summary.md").read_text()
    assert "Distillation: `distill`" in md and "| teacher `grpo` |" in md
    assert {c["key"] for c in summary["claims"]} <= {"distilled", "pays_off"}


def test_a_second_invocation_serves_nothing_again(distilled, spec, tmp_path):
    import hfrecipes

    run_dir, summary = distilled
    cached = (run_dir / "served" / "distill" / "inference.json").stat().st_mtime_ns
    spec = copy.deepcopy(spec)
    spec["evaluation"]["samples"] = 8
    spec["inference"].update(samples=8, engine="transformers")
    path = tmp_path / "lifecycle.yaml"
    path.write_text(yaml.safe_dump(spec))
    again = hfrecipes.lifecycle(path, run_dir=run_dir, overrides=FAST)
    assert again["ran_this_time"] == [] and again["distillation"] == summary["distillation"]
    assert (run_dir / "served" / "distill" / "inference.json").stat().st_mtime_ns == cached
