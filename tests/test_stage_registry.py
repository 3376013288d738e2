"""The stage registry: a stage's facts are declared once in its module and read everywhere else.

Adding a stage touches its module, one registry line, its recipes, tests and docs: the CLI command, the Python API
function, the lifecycle's scoring and the data check all come from there. These tests hold that promise with a toy
stage registered for the test alone.
"""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest

import hfrecipes
from hfrecipes import data, modeling
from hfrecipes.errors import UsageError
from hfrecipes.recipe import resolve_recipe
from hfrecipes.stages import STAGES, StageFacts, describe, facts, get_stage, scored_stages


@pytest.mark.parametrize("stage_id", list(STAGES))
def test_every_stage_declares_its_facts(stage_id):
    module = get_stage(stage_id)
    declared = module.FACTS
    assert isinstance(declared, StageFacts)
    assert declared.head in modeling.HEADS, f"{stage_id}: head '{declared.head}' is not a key of modeling.HEADS"
    assert declared.columns and all(cols and all(isinstance(c, str) for c in cols) for cols in declared.columns)
    assert module.STAGE == stage_id and callable(module.run) and module.DATACLASSES
    # the Python API and the CLI read the registry: a function and a command for every stage, described alike
    function = getattr(hfrecipes, stage_id)
    assert function.__name__ == stage_id and function.__doc__.startswith(describe(stage_id))
    assert stage_id in hfrecipes.__all__
    assert resolve_recipe(f"tiny/{stage_id}").is_file(), "the API's default recipe is the stage's tiny one"


def test_scored_stages_are_the_causal_lms():
    scored = scored_stages()
    assert "reward" not in scored and {"pretrain", "sft", "dpo", "grpo", "ppo"} <= set(scored)
    assert all(facts(s).head == "causal_lm" for s in scored)


def test_data_check_reads_the_stage_columns():
    """A dataset without any of the stage's declared column sets is refused, naming every accepted set."""
    from datasets import Dataset

    ds = Dataset.from_list([{"question": "hi"}])
    with pytest.raises(UsageError) as err:
        data.check_columns(ds, facts("sft").columns, "sft", "mine")
    assert "messages or prompt+completion" in str(err.value) and "dataset_columns" in str(err.value)


@pytest.fixture
def toy_stage(tmp_path, monkeypatch):
    """A stage registered by one line, its module outside the package, as a third party's would be."""
    (tmp_path / "toy_stage.py").write_text(
        textwrap.dedent(
            """
            from hfrecipes.stages import StageFacts

            STAGE = "toy"
            FACTS = StageFacts(columns=(("prompt", "label"),), scored=False)
            DATACLASSES = ()

            def run(script_args, training_args, model_args, recipe):
                raise NotImplementedError
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(STAGES, "toy", ("toy_stage", "A toy stage."))
    api = importlib.reload(sys.modules["hfrecipes.api"])
    yield api
    monkeypatch.undo()
    importlib.reload(sys.modules["hfrecipes.api"])
    sys.modules.pop("toy_stage", None)


def test_one_registry_line_adds_api_cli_and_lifecycle_facts(toy_stage):
    from hfrecipes import cli

    assert toy_stage.toy.__doc__.startswith("A toy stage.") and "toy" in toy_stage.__all__
    commands = next(a for a in cli._parser()._actions if a.dest == "command").choices
    assert "toy" in commands
    assert facts("toy").columns == (("prompt", "label"),) and "toy" not in scored_stages()
