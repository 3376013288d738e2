"""KTO trains for real on the tiny task's unpaired judgments, against the SFT model as reference (LoRA KTO, against
the adapter-disabled policy, trains the real model in tests/test_real_rl.py).

Held-out numbers are measured on problems no stage trains on, before and after training: the margin of the
desirable replies' rewards over the undesirable ones' starts at zero and must rise.
"""

from __future__ import annotations

import json

import pytest
from conftest import default_lm_head, dpo_margins, lm_head_kind
from safetensors.torch import load_file

import hfrecipes
from hfrecipes import modeling, record
from hfrecipes.data import tiny_rows
from hfrecipes.errors import UsageError

ZERO = 1e-4  # a margin this small is rounding: the log-probabilities of identical models differ by less


def test_full_kto_raises_the_desirable_margin(tiny_sft, tmp_path, captured_trainers):
    from transformers import AutoModelForCausalLM

    result = hfrecipes.kto(
        "tiny/kto",
        model_name_or_path=str(tiny_sft.output_dir),
        output_dir=str(tmp_path / "kto"),
        max_steps=30,
        # The recipe's rate suits the lifecycle's SFT model, past the task's learning transition; from the fixture's
        # short SFT run, a few steps at that rate move both kinds of reply together more than they part them.
        learning_rate=1e-4,
        max_train_samples=960,
        max_eval_samples=128,  # the recorded margin's rows; the paired check below scores all 300 problems
        logging_steps=10,
        save_strategy="no",
    )
    rec = result.record
    h = rec["metrics"]["heldout"]
    assert h["metric"] == "rewards/margins" and h["examples"] == 128 and h["higher_is_better"]
    before, after = h["detail"]["before"], h["detail"]["after"]
    assert h["before"] == before["rewards/margins"] and h["after"] == after["rewards/margins"]
    assert abs(h["before"]) < ZERO, "before training the policy is the reference: every reward is zero"
    assert h["after"] > ZERO, (before, after)
    # The same judgments paired on the held-out problems: each one's reward margin of the right reply over the wrong
    # one (the saved policy against the parent), positive on average beyond rounding and by more than two standard
    # errors over the problems. How far a few steps move it depends on the trajectory (the device's float kernels),
    # so the bar is the problems' own spread, not a size read off one run.
    policy = AutoModelForCausalLM.from_pretrained(result.output_dir).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_sft.output_dir).eval()
    rows = tiny_rows("preference", "test")
    tokenizer = modeling.load_tokenizer(str(tiny_sft.output_dir))
    margins = dpo_margins(policy, tokenizer, rows, rec["recipe"]["values"]["beta"], reference)
    error = margins.std().item() / len(rows) ** 0.5
    print("kto held-out paired margins:", margins.mean().item(), "+-", error, after)
    assert margins.mean().item() > max(2 * error, ZERO), (margins.mean().item(), error)

    trainer = captured_trainers[0]
    assert trainer.ref_model is not None, "full KTO holds a frozen copy of the parent as reference"
    assert lm_head_kind(trainer.model) == lm_head_kind(trainer.ref_model) == default_lm_head()
    assert rec["model"]["reference"] == "separate copy of the parent"
    assert rec["metrics"]["loss_type"] == "kto" and rec["metrics"]["steps"] == 30
    assert [r["stage"] for r in record.lineage(rec)] == ["pretrain", "sft", "kto"]
    # every weight tensor saved, and training moved them
    trained = load_file(result.output_dir / "model.safetensors")
    parent = load_file(tiny_sft.output_dir / "model.safetensors")
    assert trained.keys() == parent.keys()
    assert max(float((trained[k] - parent[k]).abs().max()) for k in trained) > ZERO
    card = (result.output_dir / "README.md").read_text()
    assert "Held-out evaluation of the kto stage: rewards/margins:" in card
    assert not list(result.output_dir.glob("*.bin")) and (result.output_dir / "record.json").is_file()


def test_tiny_unpaired_rows_are_the_preference_judgments_one_a_prompt():
    for split in ("train", "validation", "test"):
        pairs, rows = tiny_rows("preference", split), tiny_rows("unpaired", split)
        assert len(rows) == len(pairs)
        for i, (pair, row) in enumerate(zip(pairs, rows, strict=True)):
            assert row["prompt"] == pair["prompt"] and row["label"] is (i % 2 == 0)
            assert row["completion"] == (pair["chosen"] if row["label"] else pair["rejected"])


def test_held_out_split_of_one_label_kind_is_refused_before_any_model(tmp_path, monkeypatch):
    """The held-out margin needs both kinds in the test split too; refused before any model or tokenizer loads."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the bad data was reported")

    monkeypatch.setattr(modeling, "load_pretrained", refuse)
    monkeypatch.setattr(modeling, "load_stage_tokenizer", refuse)
    data = tmp_path / "judged"
    data.mkdir()
    row = {"prompt": "What is 1 plus 2?", "completion": "1 plus 2 is 3."}
    rows = {"train": [{**row, "label": True}, {**row, "label": False}], "test": [{**row, "label": True}] * 3}
    for split, split_rows in rows.items():
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))
    (tmp_path / "model").mkdir()
    with pytest.raises(UsageError) as e:
        hfrecipes.kto(
            "tiny/kto",
            model_name_or_path=str(tmp_path / "model"),
            dataset_name=str(data),
            output_dir=str(tmp_path / "out"),
        )
    message = str(e.value)
    for words in (f"{data} (test)", "'label'", "true (desirable) in all 3 rows", "both desirable", "undesirable"):
        assert words in message, message
    assert not (tmp_path / "out").exists()


def test_kl_loss_refuses_what_its_pairing_cannot_take():
    """TRL's trainer refuses these once the model has loaded; the recipe is refused when parsed."""
    with pytest.raises(UsageError, match="train_sampling_strategy 'random'.*sequential"):
        hfrecipes.parse_stage_args("kto", "tiny/kto", train_sampling_strategy="random")
    with pytest.raises(UsageError, match="per_device_train_batch_size 1.*at least 2"):
        hfrecipes.parse_stage_args("kto", "tiny/kto", per_device_train_batch_size=1)
    (_, config, _), _ = hfrecipes.parse_stage_args(
        "kto", "tiny/kto", loss_type="apo_zero_unpaired", train_sampling_strategy="random"
    )
    assert config.loss_type == "apo_zero_unpaired"
    with pytest.raises(UsageError, match="loss_type"):
        hfrecipes.parse_stage_args("kto", "tiny/kto", loss_type="sigmoid")
