"""A shortened lifecycle end to end: every stage, control, export, inference and summary; a second invocation skips
everything; a deleted record reruns that stage and those after it only; --force reruns a stage and its downstream.
The recipe is checked in full before anything runs, and the summary reads the records as the card does."""

from __future__ import annotations

import copy
import importlib
import json
import shutil
import types

import pytest
import yaml
from conftest import markdown_table

import hfrecipes
from hfrecipes import cli, record
from hfrecipes.errors import UsageError
from hfrecipes.lifecycles import claims as claimed
from hfrecipes.lifecycles import summary as summaries
from hfrecipes.lifecycles.runner import _clear
from hfrecipes.lifecycles.spec import load
from hfrecipes.report import card, lineage
from hfrecipes.report import format as report_format

GOLD = {"gold_samples": 8, "gold_every": 1}
PPO_FAST = {"max_steps": 2, "per_device_train_batch_size": 4, "num_mini_batches": 2, "heldout_max_prompts": 8}
FAST = {
    "*": {"logging_steps": 1, "save_strategy": "no"},
    "pretrain": {"max_steps": 12, "dataset_test_split": ""},
    "sft": {"max_steps": 8, **GOLD, "gold_every": 4},
    "reward": {"max_steps": 4},
    "dpo": {"max_steps": 3},
    "grpo": {"max_steps": 2, "eval_samples": 8, "per_device_train_batch_size": 16, "num_generations": 4, **GOLD},
    "ppo": {**PPO_FAST, **GOLD},
    "ppo_rm": {**PPO_FAST, **GOLD},
    "sft_more": {"gold_samples": 8},
}
STAGE_IDS = ("pretrain", "sft", "reward", "ppo", "ppo_rm", "dpo", "grpo")


@pytest.fixture(scope="module")
def spec():
    """The tiny lifecycle with held-out evaluation and inference on 8 problems, as a mapping."""
    from hfrecipes.recipe import load_yaml, resolve_recipe

    spec = load_yaml(resolve_recipe("tiny/lifecycle"))
    spec["evaluation"]["samples"] = 8
    spec["evaluation"].update(tasks=["tiny_facts"], task_limit=4, task_engine="transformers")
    spec["inference"]["samples"] = 8
    return spec


@pytest.fixture(scope="module")
def recipe(spec, tmp_path_factory):
    path = tmp_path_factory.mktemp("life") / "lifecycle.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def first(recipe, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    return run_dir, hfrecipes.lifecycle(recipe, run_dir=run_dir, overrides=FAST)


def _ids(summary):
    return {r["id"]: r["run_id"] for r in summary["stages"] + [summary["control"]]}


def _table(md: str) -> dict[str, list[str]]:
    """The summary's stage table (its first), cells by row label."""
    return {cells[0]: cells[1:] for cells in markdown_table(md, "| stage | steps |")}


def test_first_run_makes_every_artifact(first):
    run_dir, summary = first
    assert set(summary["ran_this_time"]) == {*STAGE_IDS, "sft_more"}
    for stage in (*STAGE_IDS, "sft_more"):
        assert json.loads((run_dir / stage / "record.json").read_text())["status"] == "complete"
    assert summary["export"]["from"] in ("ppo", "dpo", "grpo")
    # the held-out accuracy by kind of problem, and the claims the recipe names, each with its verdict
    rows = {r["id"]: r for r in summary["stages"]}
    assert set(rows["sft"]["by_group"]) == {"carry", "no_carry"}
    keys = [c["key"] for c in summary["claims"]]
    assert {"imitation", "plateau", "past_ceiling", "control", "dpo", "hacking"} <= set(keys), keys
    # each verdict follows from the rows' numbers and the recipe's margins, whichever way this short run came out
    declared, by_key = {c["key"]: c for c in summary["claims_spec"]}, {c["key"]: c for c in summary["claims"]}
    past, beats_control = declared["past_ceiling"], declared["control"]
    best_rl = max((rows[i] for i in past["best_of"] if rows.get(i)), key=lambda r: r["heldout_accuracy"])
    ceiling, control = rows[past["over"]]["heldout_accuracy"], summary["control"]["heldout_accuracy"]
    gain = best_rl["heldout_accuracy"] - ceiling
    assert by_key["past_ceiling"]["supported"] is (gain >= past["margin"] - 1e-9), by_key["past_ceiling"]
    lead = best_rl["heldout_accuracy"] - control
    assert by_key["control"]["supported"] is (lead >= beats_control["margin"] - 1e-9), by_key["control"]
    assert best_rl["id"] in by_key["past_ceiling"]["text"] and all(c["text"] for c in summary["claims"])
    assert rows["ppo_rm"]["gold"]["checks"] >= 2 and rows["sft"]["gold"]["checks"] >= 2
    ppo = json.loads((run_dir / "ppo" / "record.json").read_text())
    assert ppo["recipe"]["values"]["reward_model_path"] == str(run_dir / "reward")
    assert (run_dir / "export" / "model.safetensors").is_file()
    assert len((run_dir / "generations.jsonl").read_text().splitlines()) == 8
    md = (run_dir / "summary.md").read_text()
    assert "| sft |" in md and "Honest control" in md and "held-out accuracy" in md
    # lm-eval after every scored stage: the facts dated before the pretraining cutoff are in the corpus, so all
    # four of the first (the oldest) overlap, whichever stage is scored
    scored = [r for r in summary["stages"] if r["benchmarks"]]
    assert {r["id"] for r in scored} == {r["id"] for r in summary["stages"] if r["heldout_accuracy"] is not None}
    for r in scored:
        assert r["benchmarks"]["tiny_facts"]["metric"] == "acc" and r["benchmarks"]["tiny_facts"]["overlap"] == 1.0
    assert "## Benchmarks across the lineage" in md
    assert any(line.startswith("| sft | acc ") for line in md.splitlines())
    assert "### Benchmarks" in (run_dir / "sft" / "README.md").read_text()
    assert (run_dir / "summary.png").stat().st_size > 1000
    rows = {r["id"]: r for r in summary["stages"]}
    assert rows["pretrain"]["heldout_accuracy"] is not None and rows["reward"]["heldout_accuracy"] is None
    # each stage's own held-out evaluation, from its record's metrics.heldout
    assert rows["reward"]["heldout"]["metric"] == "pair_accuracy" and rows["reward"]["heldout"]["after"] is not None
    assert rows["sft"]["heldout"]["metric"] == "eval_loss" and rows["sft"]["heldout"]["higher_is_better"] is False
    assert rows["dpo"]["heldout"]["metric"] == "rewards/accuracies"
    # the parents chain through the run folder
    sft = json.loads((run_dir / "sft" / "record.json").read_text())
    assert sft["parent"]["run_id"] == rows["pretrain"]["run_id"]
    # the control ran for the number of SFT steps that spends GRPO's training FLOPs at SFT's FLOPs per step
    control = summary["control"]
    assert control["matches"] == "grpo" and control["parent"] == "sft" and control["steps"] >= 1
    assert control["budget"] == "flops" and control["steps"] == control["planned_steps"]
    assert control["parent_per_step"] == pytest.approx(rows["sft"]["flops"] / rows["sft"]["steps"])
    assert control["planned_steps"] == max(1, round(rows["grpo"]["flops"] / control["parent_per_step"]))


def test_summary_formats_numbers_as_the_card(first):
    run_dir, summary = first
    table = _table((run_dir / "summary.md").read_text())
    fmt = report_format.FORMATS
    for stage in STAGE_IDS:
        rec = json.loads((run_dir / stage / "record.json").read_text())
        card_row = card.lineage_rows(lineage.lineage_numbers(record.Record.parse(rec)))[0][-1]  # the card's row
        label = stage if stage == rec["stage"] else f"{stage} ({rec['stage']})"
        steps, wall, tokens, flops, dollars, accuracy, own, kinds = table[label]
        assert (steps, wall, tokens, flops, dollars) == (
            card_row["steps"],
            card_row["wall"],
            card_row["tokens"],
            card_row["flops"],
            card_row["dollars"],
        ), stage
        heldout = rec["metrics"].get("heldout")  # absent where a stage records none
        if heldout is not None:
            assert own.startswith(heldout["metric"]) and fmt["num"](heldout["after"]) in own, (stage, own)
            if heldout["before"] is not None:
                assert f"{fmt['num'](heldout['before'])} -> {fmt['num'](heldout['after'])}" in own
    rows = {r["id"]: r for r in summary["stages"]}
    assert table["sft"][5] == report_format.pct(rows["sft"]["heldout_accuracy"])
    total = table["total (the stages, without the control)"]  # bold in the table; the reader strips the marks
    assert total[1] == fmt["duration"](sum(r["wall_seconds"] for r in rows.values()))


def test_second_invocation_skips_everything(first, recipe):
    run_dir, summary = first
    again = hfrecipes.lifecycle(recipe, run_dir=run_dir, overrides=FAST)
    assert again["ran_this_time"] == []
    assert _ids(again) == _ids(summary)


def test_deleted_record_reruns_that_stage_and_downstream_only(first, recipe):
    run_dir, summary = first
    before = _ids(hfrecipes.lifecycle(recipe, run_dir=run_dir, overrides=FAST))
    (run_dir / "dpo" / "record.json").unlink()
    after = hfrecipes.lifecycle(recipe, run_dir=run_dir, overrides=FAST)
    assert after["ran_this_time"] == ["dpo"]
    changed = {k for k in before if before[k] != _ids(after)[k]}
    assert changed == {"dpo"}


def test_force_reruns_stage_and_downstream(first, recipe):
    run_dir, _ = first
    out = hfrecipes.lifecycle(recipe, run_dir=run_dir, overrides=FAST, force=["grpo"])
    assert out["ran_this_time"] == ["grpo", "sft_more"]  # the control matches grpo's time


def test_control_of_another_stage_runs_and_is_summarised_with_it(first, spec, tmp_path):
    """A GRPO control (more GRPO from the GRPO stage, matching DPO's wall time), in a copy of the finished run:
    only the control trains, and the summary speaks of GRPO and of its parent's accuracy."""
    run_dir, _ = first
    copied = tmp_path / "tiny"
    shutil.copytree(run_dir, copied)
    spec = copy.deepcopy(spec)
    spec["control"] = {
        "id": "grpo_more",
        "stage": "grpo",
        "recipe": "tiny/grpo",
        "parent": "grpo",
        "match_wall_time_of": "dpo",
    }
    path = tmp_path / "lifecycle.yaml"
    path.write_text(yaml.safe_dump(spec))
    fast = {**FAST, "grpo_more": {k: v for k, v in FAST["grpo"].items() if k != "max_steps"}}
    fast.pop("sft_more")
    out = hfrecipes.lifecycle(path, run_dir=copied, overrides=fast)
    assert out["ran_this_time"] == ["grpo_more"]
    rec = json.loads((copied / "grpo_more" / "record.json").read_text())
    assert (
        rec["stage"] == "grpo"
        and rec["parent"]["run_id"] == json.loads((copied / "grpo" / "record.json").read_text())["run_id"]
    )
    rows = {r["id"]: r for r in out["stages"]}
    control = out["control"]
    assert control["stage"] == "grpo" and control["parent"] == "grpo" and control["matches"] == "dpo"
    md = (copied / "summary.md").read_text()
    paragraph = " ".join(md[md.index("## Honest control") :].split("\n\n")[1].split())
    assert "the grpo recipe `tiny/grpo`" in paragraph and "SFT" not in paragraph and "sft" not in paragraph
    assert f"`grpo`, where the control started, had {report_format.pct(rows['grpo']['heldout_accuracy'])}" in paragraph
    assert f"against {report_format.pct(rows['dpo']['heldout_accuracy'])} for `dpo`" in paragraph


def _synthetic_summary(stage: str, matched: str, accuracies: dict[str, float]) -> dict:
    """A summary with the control on `stage` (from the stage of that name), as `summaries.build` returns it."""
    rows = [
        {"id": s, "stage": s, "run_id": s, "steps": 10, "wall_seconds": 60.0, "tokens": 1e5, "flops": 1e12,
         "dollars": 0.002, "heldout_accuracy": accuracies[s], "heldout": None}
        for s in ("sft", "dpo", "grpo")
    ]  # fmt: skip
    control = {
        **rows[0],
        "id": f"{stage}_more",
        "stage": stage,
        "run_id": "c",
        "heldout_accuracy": accuracies["control"],
        "parent": stage,
        "recipe": f"tiny/{stage}",
        "matches": matched,
        "budget": "wall_time",
        "planned_steps": 10,
        "parent_per_step": 6.0,
    }
    return {
        "name": "t",
        "recipe": "t.yaml",
        "run_dir": "runs/t",
        "metric": "answer_accuracy",
        "stages": rows,
        "control": control,
        "export": None,
        "inference": None,
        "ran_this_time": [],
        "wall_seconds_this_time": 1.0,
        "total": {"steps": 30, "wall_seconds": 180.0, "tokens": 3e5, "flops": 3e12, "dollars": 0.006},
    }


@pytest.mark.parametrize(
    "stage, matched, control_acc, verdict",
    [
        ("dpo", "grpo", 0.9, "More dpo from `dpo` did better than `grpo`"),
        ("dpo", "grpo", 0.6, "`grpo` did better than more dpo from `dpo`"),
        ("grpo", "dpo", 0.9, "More grpo from `grpo` did better than `dpo`"),
        ("grpo", "dpo", 0.3, "`dpo` did better than more grpo from `grpo`"),
    ],
)
def test_control_paragraph_names_its_own_stage_and_parent(stage, matched, control_acc, verdict):
    accuracies = {"sft": 0.25, "dpo": 0.5, "grpo": 0.75, "control": control_acc}
    md = summaries.render(_synthetic_summary(stage, matched, accuracies))
    paragraph = " ".join(md[md.index("## Honest control") :].split("\n\n")[1].split())
    assert "SFT" not in paragraph and "`sft`" not in paragraph and "25.0%" not in paragraph, paragraph
    assert f"the {stage} recipe `tiny/{stage}`" in paragraph
    assert f"`{stage}`, where the control started, had {report_format.pct(accuracies[stage])}" in paragraph
    assert f"against {report_format.pct(accuracies[matched])} for `{matched}`" in paragraph
    assert verdict in paragraph
    assert f"| {stage}_more ({stage}) | 10 | 60.0 s |" in md


def test_lifecycle_package_is_a_module_and_the_api_a_function():
    import hfrecipes.lifecycles.runner as m

    assert isinstance(m, types.ModuleType) and m.__name__ == "hfrecipes.lifecycles.runner"
    importlib.import_module("hfrecipes.lifecycles.spec")
    importlib.import_module("hfrecipes.lifecycles.summary")
    assert isinstance(hfrecipes.lifecycle, types.FunctionType) and hfrecipes.lifecycle is hfrecipes.api.lifecycle
    assert isinstance(hfrecipes.lifecycles, types.ModuleType)
    with pytest.raises(ModuleNotFoundError):  # no module shadows the API function any more
        importlib.import_module("hfrecipes.lifecycle")


class _Delete:
    def __repr__(self) -> str:  # a stable test id on every xdist worker (an object()'s id holds its address)
        return "DELETE"


DELETE = _Delete()
BAD_LIFECYCLES = [
    # (block, key, value, words the message must contain)
    ("export", "candidates", DELETE, ["export", "'candidates' is missing"]),
    ("export", "candidates", [], ["export", "'candidates' is empty"]),
    ("export", "candidates", ["grpo", "nope"], ["export", "['nope']"]),
    ("export", "candidates", ["reward"], ["export", "['reward']", "causal-LM"]),
    ("export", "candidate", ["grpo"], ["export", "'candidate'", "Did you mean 'candidates'"]),
    ("export", "dtype", "fp8", ["export", "dtype", "'fp8'"]),
    ("control", "parent", "sfx", ["control", "parent 'sfx'"]),
    ("control", "match_flops_of", "grpx", ["control", "match_flops_of 'grpx'"]),
    ("control", "match_wall_time_of", "grpo", ["control", "exactly one of match_flops_of", "match_wall_time_of"]),
    (("claims", 2), "best_of", ["grpo", "nope"], ["claims[2] (beats)", "best_of ['nope']", "sft_more"]),
    (("claims", 2), "margn", 0.2, ["claims[2] (beats)", "'margn'", "Did you mean 'margin'"]),
    (("claims", 2), "margin", 15, ["claims[2] (beats)", "margin", "15", "from -1 to 1"]),
    (("claims", 2), "kind", "beat", ["claims[2]", "'beat'", "not a claim kind", "Did you mean 'beats'"]),
    (("claims", 2), "kind", DELETE, ["claims[2]", "'kind' is missing", "group_gap"]),
    (("claims", 2), "text", "RL wins by {gain}.", ["claims[2] (beats)", "text has {gain}", "{lead}"]),
    (("claims", 2), "text", "RL wins by {lead:.1f}.", ["claims[2] (beats)", "text does not format"]),
    (("claims", 5), "text_unflagged", DELETE, ["claims[5] (catches_hacking)", "'text_unflagged' is missing"]),
    (("claims", 6), "min_before", 2, ["claims[6] (cutoff)", "min_before", "from 0 to 1"]),
    (("claims", 1), "key", "imitation", ["claims[1] (plateau)", "'imitation' is used twice"]),
    ((), "claims", {"ceiling": "sft"}, ["claims", "expected a list of claims"]),
    ((), "control", DELETE, ["claims[3] (beats_control)", "no 'control' block"]),
    ("evaluation", "group_column", None, ["claims[0] (group_gap)", "group_column"]),
    ("control", "stage", "sfft", ["control", "'stage'", "'sfft'"]),
    ("control", "overrides", {"learning_rat": 1.0}, ["control", "learning_rat", "learning_rate"]),
    ("evaluation", "max_new_tokens", "ten", ["evaluation", "max_new_tokens", "int"]),
    ("inference", "engine", "tgi", ["inference", "engine", "'tgi'"]),
    ("stages", 1, {"stage": "sft", "parent": "pretrain"}, ["stages[1]", "'recipe' is missing"]),
]


@pytest.mark.parametrize("block, key, value, words", BAD_LIFECYCLES, ids=lambda x: str(x)[:30])
def test_check_refuses_a_bad_lifecycle_before_anything_runs(spec, tmp_path, capsys, block, key, value, words):
    spec = copy.deepcopy(spec)
    target = spec
    for part in block if isinstance(block, tuple) else (block,):
        target = target[part]
    if value is DELETE:
        del target[key]
    else:
        target[key] = value
    path = tmp_path / "lifecycle.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert cli.main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("hfrecipes: error:") == 1 and "Traceback" not in err, err
    for word in [str(path), *words]:
        assert word in err, f"{word!r} not in: {err}"
    with pytest.raises(UsageError):
        hfrecipes.lifecycle(path, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists(), "a refused lifecycle wrote its run folder"


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--force", "nope"], ["--force", "nope"]),
        (["--set", "nope.max_steps=1"], ["nope", "--set"]),
        (["--set", "sft.learning_rat=1"], ["stages[1]", "learning_rat", "learning_rate"]),
        (["--set", "sft.reward_model_path={grpo}"], ["stages[1]", "'grpo'", "no earlier stage"]),
    ],
)
def test_lifecycle_flags_are_checked_before_anything_runs(recipe, tmp_path, capsys, flags, words):
    assert cli.main(["lifecycle", str(recipe), "--run_dir", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, f"{word!r} not in: {err}"
    assert not (tmp_path / "run").exists()


def test_bad_lifecycle_input(tmp_path, recipe):
    spec = yaml.safe_load(recipe.read_text())
    spec["stages"][1]["parnet"] = "pretrain"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec))
    with pytest.raises(UsageError, match="'parnet'. Did you mean 'parent'"):
        load(bad)
    spec = yaml.safe_load(recipe.read_text())
    spec["stages"][2]["parent"] = "grpo"  # refers to a later stage
    bad.write_text(yaml.safe_dump(spec))
    with pytest.raises(UsageError, match="no earlier stage"):
        load(bad)
    with pytest.raises(UsageError, match="learning_rat"):
        load(recipe, overrides={"sft": {"learning_rat": 1.0}})
    with pytest.raises(UsageError, match="--force"):
        hfrecipes.lifecycle(recipe, run_dir=tmp_path / "r", force=["nope"])


def test_never_deletes_outside_the_run_folder(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep.txt").write_text("x")
    with pytest.raises(UsageError, match="outside the run folder"):
        _clear(outside, tmp_path / "run")
    assert (outside / "keep.txt").is_file()


# ------------------------------------------------------------------------------------------ claims and seeds


def _declared(**changed: dict) -> list[claimed.Claim]:
    """The tiny lifecycle's claims as its recipe declares them, with fields changed by claim key."""
    from hfrecipes.recipe import load_yaml, resolve_recipe

    out = []
    for item in load_yaml(resolve_recipe("tiny/lifecycle"))["claims"]:
        fields = {k: v for k, v in item.items() if k != "kind"} | changed.get(item["key"], {})
        out.append(claimed.KINDS[item["kind"]](**fields))
    return out


# the tiny claims on the synthetic summary's three stages: RL is `grpo`, and `sft` stands for reward model + PPO
CLAIMS = _declared(past_ceiling={"best_of": ["grpo"]}, control={"best_of": ["grpo"]}, dpo={"than": ["sft"]})


def _claimed(accuracies: dict[str, float], by_group: dict[str, float]) -> dict[str, dict]:
    summary = _synthetic_summary("sft", "grpo", accuracies)
    summary["stages"][0]["by_group"] = by_group
    return {c["key"]: c for c in claimed.evaluate(CLAIMS, summary)}


@pytest.mark.parametrize(
    "grpo, control, past, beats_control",
    [(0.80, 0.60, True, True), (0.74, 0.60, False, True), (0.80, 0.71, True, False), (0.50, 0.70, False, False)],
)
def test_claims_follow_the_numbers_and_their_targets(grpo, control, past, beats_control):
    got = _claimed({"sft": 0.60, "dpo": 0.7, "grpo": grpo, "control": control}, {"carry": 0.3, "no_carry": 0.9})
    assert got["past_ceiling"]["supported"] is past and got["control"]["supported"] is beats_control
    assert f"{100 * grpo:.1f}%" in got["past_ceiling"]["text"] and "60.0%" in got["past_ceiling"]["text"]
    assert got["imitation"]["supported"] is True and "30.0%" in got["imitation"]["text"]
    # DPO's FLOPs (1e12) equal the named RLHF stages' here: not fewer, so not supported
    assert got["dpo"]["supported"] is False


def test_imitation_claim_fails_when_the_flaw_is_not_reproduced():
    got = _claimed({"sft": 0.6, "dpo": 0.7, "grpo": 0.9, "control": 0.6}, {"carry": 0.85, "no_carry": 0.9})
    assert got["imitation"]["supported"] is False


def _row(stage_id: str, stage: str, accuracy: float | None, **more) -> dict:
    return {"id": stage_id, "stage": stage, "run_id": stage_id, "steps": 100, "wall_seconds": 61.5, "tokens": 2.5e5,
            "flops": 3.1e12, "dollars": 0.004, "heldout_accuracy": accuracy, "by_group": None, "heldout": None,
            "gold": None, "probe": None, **more}  # fmt: skip


def _recorded() -> dict:
    """A summary of the tiny lifecycle as `summaries.build` writes it: every stage, the control and inference, the
    SFT stage stopped at its plateau, `ppo_rm` flagged and stopped by its gold check, the pretrain stage's probe."""
    probe = {"cutoff": "2024-06-30", "before": {"known": 14, "total": 24, "accuracy": 14 / 24},
             "after": {"known": 2, "total": 12, "accuracy": 2 / 12}, "chance": 1 / 6,
             "top_choice": {"choice": "Paris", "rows": 20, "total": 36}}  # fmt: skip
    plateau = {"metric": "accuracy", "best": {"step": 150, "gold": 0.41}, "hacking": None, "stopped": "plateau",
               "kept_step": 150, "every": 50, "checks": 5}  # fmt: skip
    flag = {"step": 40, "proxy": 2.31, "proxy_at_best": 0.52, "gold": 0.12, "best_gold": 0.45}
    hacked = {"metric": "accuracy", "best": {"step": 20, "gold": 0.45}, "hacking": flag, "stopped": "reward_hacking",
              "kept_step": 20, "every": 10, "checks": 4}  # fmt: skip
    stages = [
        _row("pretrain", "pretrain", 0.0, probe=probe),
        _row("sft", "sft", 0.43, by_group={"carry": 0.12, "no_carry": 0.71}, gold=plateau, steps=200),
        _row("reward", "reward", None, flops=1.2e12, wall_seconds=30.0),
        _row("ppo", "ppo", 0.52, flops=4.4e12),
        _row("ppo_rm", "ppo", 0.30, gold=hacked),
        _row("dpo", "dpo", 0.47, flops=2.0e12),
        _row("grpo", "grpo", 0.68, flops=8.8e12),
    ]
    control = {**_row("sft_more", "sft", 0.45), "parent": "sft", "recipe": "tiny/sft", "matches": "grpo",
               "budget": "flops", "planned_steps": 300, "parent_per_step": 1.5e10}  # fmt: skip
    inference = {"engine": "transformers", "dollars_per_million_output_tokens": 0.41,
                 "dollars_per_million_input_tokens": 0.02, "output_input_price_ratio": 20.5}  # fmt: skip
    return {"name": "tiny", "stages": stages, "control": control, "export": None, "inference": inference}


# The lines summary.md printed for `_recorded()` before the claims moved into the recipe, word for word.
TINY_LINES = [
    ("imitation", True, "SFT imitates its demonstrations, flaw included: `sft` scores 12.0% on carry problems, where "
     "its demonstrations are flawed, and 71.0% on no_carry problems (a gap of at least 20.0 points expected)."),
    ("plateau", True, "SFT trained to its plateau: validation accuracy stopped improving (best 41.0% at step 150); it "
     "stopped at step 200."),
    ("past_ceiling", True, "RL passes the SFT ceiling: `grpo` reaches 68.0% against `sft`'s 43.0%, +25.0 points "
     "(target +15.0 points)."),
    ("control", True, "More SFT does not get there: the control `sft_more` spent `grpo`'s training FLOPs (3.1 T "
     "FLOPs, 61.5 s) on more imitation and reached 45.0%; `grpo` leads it by +23.0 points (target +10.0 points)."),
    ("dpo", True, "DPO aligns for less: `dpo` took 2 T FLOPs and 61.5 s to reach 47.0%; `reward` + `ppo` took 5.6 T "
     "FLOPs and 91.5 s to reach 52.0%."),
    ("hacking", True, "A reward model can be gamed, and the gold check catches it: `ppo_rm` (PPO against the reward "
     "model alone) raised its proxy reward to 2.31 (from 0.52 at its best gold check) while gold accuracy fell from "
     "45.0% to 12.0%; flagged at step 40, training stopped, the weights of step 20 kept; held-out 30.0%."),
    ("cutoff", True, "Nothing after the cutoff is known: `pretrain` (cutoff 2024-06-30) knows 14/24 facts dated "
     "before it and 2/12 dated after (chance 16.7%; supported when at least half before and at most twice chance "
     "after)."),
    ("output_tokens", True, "Output tokens cost more than input tokens: serving the export (transformers), a "
     "generated token costs $0.41 per million, a prompt token $0.02: 20.5x (decode runs a step per token; prefill "
     "reads a whole prompt in one)."),
]  # fmt: skip


def test_tiny_recipe_claims_read_as_they_always_have():
    """The tiny lifecycle's recipe, parsed by `load` and checked by the generic kinds, says what summary.md said
    when the claims were code: the same keys in the same order, the same verdicts, the same words."""
    life = load("tiny/lifecycle")
    got = [(c["key"], c["supported"], c["text"]) for c in claimed.evaluate(life.claims, _recorded())]
    assert got == TINY_LINES
    assert [c["kind"] for c in (claimed.as_dict(c) for c in life.claims)][:3] == ["group_gap", "plateau", "beats"]


def _set(summary: dict, path: tuple, value) -> None:
    """Set a value in a summary by (stage or control id, or 'inference', then keys); one part replaces the block."""
    if path[0] == "inference" and len(path) == 1:
        summary["inference"] = value
        return
    rows = {r["id"]: r for r in summary["stages"] + [summary["control"]]}
    target = summary["inference"] if path[0] == "inference" else rows[path[0]]
    for part in path[1:-1]:
        target = target[part]
    target[path[-1]] = value


ABSENT = "left out"  # the claim's stage recorded nothing it reads
KIND_VERDICTS = [
    # (claim key, where in the summary, new value, verdict): each kind True on `_recorded()`, then False and None
    ("imitation", ("sft", "by_group", "carry"), 0.6, False),
    ("imitation", ("sft", "by_group", "carry"), None, None),
    ("plateau", ("sft", "gold", "stopped"), "max_steps", False),
    ("plateau", ("sft", "gold"), None, ABSENT),
    ("past_ceiling", ("grpo", "heldout_accuracy"), 0.5, False),
    ("past_ceiling", ("sft", "heldout_accuracy"), None, ABSENT),
    ("control", ("sft_more", "heldout_accuracy"), 0.6, False),
    ("control", ("sft_more", "heldout_accuracy"), None, ABSENT),
    ("dpo", ("dpo", "flops"), 9e12, False),
    ("dpo", ("reward", "flops"), None, None),
    ("hacking", ("ppo_rm", "gold", "hacking"), None, False),
    ("hacking", ("ppo_rm", "gold"), None, None),
    ("cutoff", ("pretrain", "probe", "after", "accuracy"), 0.5, False),
    ("cutoff", ("pretrain", "probe", "chance"), None, None),
    ("output_tokens", ("inference", "output_input_price_ratio"), 0.9, False),
    ("output_tokens", ("inference",), None, ABSENT),
]


@pytest.mark.parametrize("key, path, value, verdict", KIND_VERDICTS, ids=lambda x: str(x)[:24])
def test_each_claim_kind_is_true_false_or_not_measured(key, path, value, verdict):
    assert {c["key"]: c["supported"] for c in claimed.evaluate(_declared(), _recorded())}[key] is True
    summary = _recorded()
    _set(summary, path, value)
    got = {c["key"]: c for c in claimed.evaluate(_declared(), summary)}
    if verdict == ABSENT:
        assert key not in got, got.get(key)
    else:
        assert got[key]["supported"] is verdict, got[key]
        assert "{" not in got[key]["text"] and "None%" not in got[key]["text"], got[key]["text"]


def test_a_claims_text_takes_every_placeholder_its_kind_fills():
    """Each kind's WORDS are exactly the names it fills: a text naming all of them renders each one."""
    summary = _recorded()
    _set(summary, ("pretrain", "probe", "top_choice", "rows"), 34)  # one answer tops nearly every fact
    for claim in _declared():
        for name, words in claim.WORDS.items():
            setattr(claim, name, " ".join(f"<{{{w}}}>" for w in words))
        if isinstance(claim, claimed.CatchesHacking):  # its other text, when nothing was flagged
            unflagged = copy.deepcopy(summary)
            _set(unflagged, ("ppo_rm", "gold", "hacking"), None)
            assert "<4>" in claimed.evaluate([claim], unflagged)[0]["text"]
        text = claimed.evaluate([claim], summary)[0]["text"]
        assert "<>" not in text and text.count("<") == len(claim.WORDS["text"]), (claim.key, text)


def test_summary_over_seeds_gives_mean_and_min_max_and_each_claims_count(tmp_path):
    runs = []
    for grpo in (0.9, 0.8, 0.7):
        s = _synthetic_summary("sft", "grpo", {"sft": 0.6, "dpo": 0.7, "grpo": grpo, "control": 0.62})
        s["claims_spec"] = [claimed.as_dict(c) for c in CLAIMS]  # as summary.json holds them; the chart reads them
        s["claims"] = claimed.evaluate(CLAIMS, s)
        runs.append(s)
    out = summaries.with_seeds(runs[0], runs, [42, 43, 44])
    grpo = out["seeds"]["stages"]["grpo"]
    assert grpo["mean"] == pytest.approx(0.8) and (grpo["min"], grpo["max"]) == (0.7, 0.9)
    assert out["seeds"]["claims"]["past_ceiling"] == {"supported": 2, "of": 3}
    md = summaries.render(out)
    assert "## Over 3 seeds" in md and "| grpo | 80.0% (70.0%-90.0%) |" in md
    assert "(Supported on 2 of 3 seeds.)" in md
    summaries.write(tmp_path, out)
    assert (tmp_path / "summary.md").read_text() == md and (tmp_path / "summary.png").stat().st_size > 1000


def test_seeds_add_runs_beside_the_first(first, recipe, tmp_path):
    """`--seeds 2` on a finished run: the first seed is complete and skipped, the second trains in seeds/<seed+1>
    with every stage's seed raised by one, and the run folder's summary reports both."""
    run_dir, summary = first
    copied = tmp_path / "tiny"
    shutil.copytree(run_dir, copied)
    first_grpo = json.loads((copied / "grpo" / "record.json").read_text())["run_id"]  # earlier tests may --force it
    assert cli.main(["lifecycle", str(recipe), "--run_dir", str(copied), "--seeds", "2", *_sets(FAST)]) == 0
    second = copied / "seeds" / "43"
    rec = json.loads((second / "grpo" / "record.json").read_text())
    assert rec["recipe"]["values"]["seed"] == 43
    assert json.loads((copied / "grpo" / "record.json").read_text())["run_id"] == first_grpo
    out = json.loads((copied / "summary.json").read_text())
    assert out["seeds"]["seeds"] == [42, 43] and out["seeds"]["run_dirs"][1] == str(second)
    assert len(out["seeds"]["stages"]["sft"]["values"]) == 2
    assert "## Over 2 seeds" in (copied / "summary.md").read_text()
    assert cli.main(["lifecycle", str(recipe), "--run_dir", str(copied), "--seeds", "0"]) == 2


def _sets(overrides: dict) -> list[str]:
    out = []
    for stage, values in overrides.items():
        for key, value in values.items():
            out += ["--set", f"{stage}.{key}={json.dumps(value)}"]  # quoted: YAML would read `no` as false
    return out


@pytest.mark.parametrize("kto, verdict", [(0.45, True), (0.52, True), (0.30, False), (None, None)])
def test_comparable_claim_is_within_its_margin_or_not_measured(kto, verdict):
    """`comparable`: KTO from unpaired judgments within 10 points of DPO (0.47) from the same judgments paired."""
    claim = claimed.Comparable(
        key="kto", stage="kto", to="dpo", margin=0.10,
        text="`{stage}` {accuracy} ({flops} FLOPs, {wall}) against `{to}` {to_accuracy} ({to_flops} FLOPs, "
        "{to_wall}): {gap} (within {margin} expected).",
    )  # fmt: skip
    summary = _recorded()
    summary["stages"].append(_row("kto", "kto", kto, flops=1.9e12))
    got = claimed.evaluate([claim], summary)
    if verdict is None:
        assert got == []
        return
    assert got[0]["supported"] is verdict
    if kto == 0.45:
        assert got[0]["text"] == (
            "`kto` 45.0% (1.9 T FLOPs, 61.5 s) against `dpo` 47.0% (2 T FLOPs, 61.5 s): -2.0 points "
            "(within +10.0 points expected)."
        )
