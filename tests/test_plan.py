"""Plan, then compare: `--plan` before anything trains, and the plan beside what the run measured.

pytest tests/test_plan.py -q
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

import hfrecipes
from hfrecipes import cli
from hfrecipes.lifecycles import summary as summaries
from hfrecipes.record import Record
from hfrecipes.report import planned
from hfrecipes.tiny import TINY_LLAMA

STAGES_OF_TINY = ("pretrain", "sft", "reward", "ppo", "ppo_rm", "dpo", "grpo")


@pytest.fixture
def no_training(monkeypatch):
    """Any weight load, random initialisation or training step fails the test."""
    import transformers

    from hfrecipes import modeling

    def refuse(*args, **kwargs):
        raise AssertionError("a plan loaded weights or trained")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(transformers.Trainer, "train", refuse)
    monkeypatch.setattr(modeling, "init_model", refuse)


def test_stage_plan_prints_tokens_flops_and_time_and_writes_nothing(tiny_pretrained, tmp_path, capsys, no_training):
    out = tmp_path / "sft"
    argv = ["sft", "--config", "tiny/sft", "--plan", "--model_name_or_path", str(tiny_pretrained.output_dir)]
    assert cli.main([*argv, "--output_dir", str(out), "--max_steps", "7"]) == 0
    text = capsys.readouterr().out
    assert "| sft |" in text and "estimate" in text
    for column in ("tokens", "FLOPs", "time", "dollars", "energy (kWh)"):
        assert column in text
    assert "D = 7 steps (max_steps)" in text and "mean of" in text  # how the tokens were estimated
    assert not out.exists()


def test_lifecycle_plan_prints_every_stage_chained_and_trains_nothing(
    tiny_pretrained, tmp_path, capsys, monkeypatch, no_training
):
    """Every stage printed, none trained, nothing written; each stage planned from its parent's planned model (the
    reward model is the SFT model under a one-output head), the control's steps spend grpo's planned FLOPs at sft's
    planned FLOPs per step, and pretraining's plan is what the tiny pretrained model recorded: its tokenizer trained
    as the run trains it, its blocks packed exactly."""
    from hfrecipes.lifecycles import plan as lifecycle_plan

    made, original = [], lifecycle_plan.plan

    def keep(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(lifecycle_plan, "plan", keep)
    run_dir = tmp_path / "life"
    argv = ["lifecycle", "tiny/lifecycle", "--plan", "--run_dir", str(run_dir), "--plan-utilisation", "0.5"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    rows = {line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")}
    assert set(STAGES_OF_TINY) <= rows and "**total**" in rows
    assert any(r.startswith("sft_more") for r in rows)
    assert "50% utilisation, given" in text and "estimate" in text
    assert not run_dir.exists()

    p = made[0]
    by_id = {s["id"]: s for s in p["stages"]}
    head = TINY_LLAMA["hidden_size"]  # the reward model's one output, where the LM head shared the embeddings
    assert by_id["sft"]["params"] == by_id["pretrain"]["params"] == by_id["reward"]["params"] - head
    per_step = by_id["sft"]["flops"] / by_id["sft"]["steps"]
    assert p["control"]["steps"] == round(by_id["grpo"]["flops"] / per_step)
    assert p["total"]["flops"] == pytest.approx(sum(s["flops"] for s in p["stages"]))
    assert all(s["estimate"] and s["seconds"] > 0 and s["dollars"] is not None for s in p["stages"])

    pre, recorded = by_id["pretrain"], Record.parse(tiny_pretrained.record)
    assert pre["params"] == recorded.model.params_total
    assert pre["tokens"] / pre["steps"] == recorded.data.tokens_seen / recorded.metrics.steps
    assert 6 * pre["params"] * recorded.data.tokens_seen == recorded.compute.flops_6nd


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--no_such_key", "1"], "no_such_key"),
        (["--dataset_name", "./no/such/data.jsonl"], "does not exist"),
        (["--plan-utilisation", "2"], "--plan-utilisation"),
    ],
    ids=["unknown key", "missing data", "utilisation above 1"],
)
def test_bad_input_with_plan_fails_as_a_run_does(flags, words, capsys, no_training):
    argv = ["pretrain", "--config", "tiny/pretrain", *flags]
    assert cli.main([*argv, "--plan"]) == 2
    planned_err = capsys.readouterr().err
    assert words in planned_err
    if "--plan-utilisation" not in flags:  # the same message as the run without --plan
        assert cli.main(argv) == 2
        assert capsys.readouterr().err == planned_err


def test_a_run_records_its_plan_and_the_plan_matches(tiny_pretrained, tmp_path):
    """Every run records its plan. Pretraining packs blocks, so its planned tokens are the record's exactly (its
    parameters, planned inside the run before its tokenizer exists, are an upper bound); SFT's rows are sampled, so
    its plan lands within a band of what it read. The card and the summary put plan and actual side by side."""
    pre = Record.parse(tiny_pretrained.record)
    assert pre.plan.tokens == pre.data.tokens_seen and pre.plan.params >= pre.model.params_total

    sft = hfrecipes.sft(
        "tiny/sft",
        model_name_or_path=str(tiny_pretrained.output_dir),
        output_dir=str(tmp_path / "sft"),
        max_steps=4,
        save_strategy="no",
        gold_dataset_name=None,
        gold_patience=None,
        gold_keep_best=False,
    )
    r = Record.parse(sft.record)
    compared = planned.compare(r)
    assert 0.9 < compared["tokens"]["ratio"] < 1.1 and 0.9 < compared["flops"]["ratio"] < 1.1
    assert r.plan.params == r.model.params_total and r.plan.steps == r.metrics.steps == 4
    assert compared["seconds"]["actual"] == r.compute.wall_seconds and compared["seconds"]["ratio"] > 0

    card = (sft.output_dir / "README.md").read_text()
    section = card[card.index("### Planned and actual") : card.index("## Serving cost")]
    assert f"| tokens | {planned.fmt.si(r.plan.tokens)} | {planned.fmt.si(r.data.tokens_seen)} |" in section
    assert "actual / planned" in section and "estimate" in section
    assert card.index("## Lineage and training cost") < card.index("### Planned and actual")

    life = SimpleNamespace(
        name="t",
        source="t.yaml",
        root=tmp_path,
        claims=[],
        evaluation=SimpleNamespace(metric=None, dataset_name=None, group_column=None),
    )
    rows = [summaries.row(i, i, rec, {}) for i, rec in (("pretrain", tiny_pretrained.record), ("sft", sft.record))]
    summary = summaries.build(life, rows, None, None, None, [], 1.0)
    total = summary["planned_total"]
    assert total["tokens"]["planned"] == pytest.approx(pre.plan.tokens + r.plan.tokens)
    assert total["tokens"]["actual"] == pre.data.tokens_seen + r.data.tokens_seen
    md = summaries.render(json.loads(json.dumps(summary)))
    table = md[md.index("## Planned and actual") :]
    assert "| `pretrain` | 1" in table and "(1.00x)" in table and "**planned and actual total" in table
