"""A shortened lifecycle end to end: every stage, control, export, inference and summary; a second invocation skips
everything; a deleted record reruns that stage and those after it only; --force reruns a stage and its downstream."""

from __future__ import annotations

import json

import pytest
import yaml

import hfrecipes
from hfrecipes.errors import UsageError
from hfrecipes.lifecycle import _clear, load

FAST = {
    "*": {"logging_steps": 1, "save_strategy": "no"},
    "pretrain": {"max_steps": 12, "dataset_test_split": ""},
    "sft": {"max_steps": 8},
    "reward": {"max_steps": 4},
    "dpo": {"max_steps": 3},
    "grpo": {"max_steps": 2, "eval_samples": 8, "per_device_train_batch_size": 16, "num_generations": 4},
    "ppo": {"max_steps": 2, "per_device_train_batch_size": 4, "num_mini_batches": 2, "heldout_max_prompts": 8},
    "sft_more": {},
}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """The tiny lifecycle with held-out evaluation and inference on 8 problems."""
    from hfrecipes.recipe import load_yaml, resolve_recipe

    spec = load_yaml(resolve_recipe("tiny/lifecycle"))
    spec["evaluation"]["samples"] = 8
    spec["inference"]["samples"] = 8
    path = tmp_path_factory.mktemp("life") / "lifecycle.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def first(recipe, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    return run_dir, hfrecipes.lifecycle(recipe, run_dir=run_dir, overrides=FAST)


def _ids(summary):
    return {r["id"]: r["run_id"] for r in summary["stages"] + [summary["control"]]}


def test_first_run_makes_every_artifact(first):
    run_dir, summary = first
    assert set(summary["ran_this_time"]) == {"pretrain", "sft", "reward", "ppo", "dpo", "grpo", "sft_more"}
    for stage in ("pretrain", "sft", "reward", "ppo", "dpo", "grpo", "sft_more"):
        assert json.loads((run_dir / stage / "record.json").read_text())["status"] == "complete"
    assert summary["export"]["from"] in ("ppo", "dpo", "grpo")
    ppo = json.loads((run_dir / "ppo" / "record.json").read_text())
    assert ppo["recipe"]["values"]["reward_model_path"] == str(run_dir / "reward")
    assert (run_dir / "export" / "model.safetensors").is_file()
    assert len((run_dir / "generations.jsonl").read_text().splitlines()) == 8
    md = (run_dir / "summary.md").read_text()
    assert "| sft |" in md and "Honest control" in md and "held-out accuracy" in md
    assert (run_dir / "summary.png").stat().st_size > 1000
    rows = {r["id"]: r for r in summary["stages"]}
    assert rows["pretrain"]["heldout_accuracy"] is not None and rows["reward"]["heldout_accuracy"] is None
    assert rows["reward"]["pair_accuracy"] is not None
    # the parents chain through the run folder
    sft = json.loads((run_dir / "sft" / "record.json").read_text())
    assert sft["parent"]["run_id"] == rows["pretrain"]["run_id"]
    # the control ran for the number of SFT steps that fits GRPO's wall time
    assert summary["control"]["matches"] == "grpo" and summary["control"]["steps"] >= 1


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
