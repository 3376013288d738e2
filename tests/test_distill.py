"""Distillation: a half-size student (the tiny pretrained model's first two layers) learns the tiny SFT model's
next-token distributions on its own replies; the teacher's folder is only read, its identity and its forward passes
are in the record; a teacher of another vocabulary, or none, is refused before any model loads.

    pytest tests/test_distill.py
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from conftest import fewer_layers
from safetensors.torch import load_file

import hfrecipes
from hfrecipes import modeling
from hfrecipes.errors import UsageError

STEPS = 16


@pytest.fixture(scope="module")
def student(tiny_pretrained, tmp_path_factory):
    return fewer_layers(tiny_pretrained.output_dir, tmp_path_factory.mktemp("distill") / "student", keep=[0, 1])


def digest(folder) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_the_student_comes_closer_to_its_teacher(student, tiny_sft, tmp_path, captured_trainers):
    from transformers import AutoModelForCausalLM

    from hfrecipes.data import tiny_rows
    from hfrecipes.stages.distill import agreement, teacher_replies

    teacher_files = digest(tiny_sft.output_dir)
    out = hfrecipes.distill(
        "tiny/distill",
        model_name_or_path=str(student),
        teacher_model_name_or_path=str(tiny_sft.output_dir),
        output_dir=str(tmp_path / "distill"),
        max_steps=STEPS,
        max_eval_samples=32,
        logging_steps=4,
        save_strategy="no",
    )
    rec, h = out.record, out.record["metrics"]["heldout"]
    # the student ranks first more of the teacher's held-out reply tokens, and its distributions came closer
    assert h["metric"] == "teacher_agreement" and h["examples"] == 32, h
    assert h["after"] > h["before"] + 0.1 and h["detail"]["kl_after"] < h["detail"]["kl_before"], h
    # the recorded agreement is the saved student's, measured again from the two folders on the stage's device
    device = captured_trainers[0].args.device
    model = AutoModelForCausalLM.from_pretrained(out.output_dir).to(device)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_sft.output_dir).to(device)
    tokenizer = modeling.load_tokenizer(str(out.output_dir))
    prompts = [r["prompt"] for r in tiny_rows("prompts", "test")[:32]]
    again = agreement(model, teacher_replies(teacher, tokenizer, prompts, 16))
    assert again["agreement"] == pytest.approx(h["after"], abs=1e-9), (again, h)
    # the student's weights moved; the teacher's folder is as it was
    start, trained = load_file(student / "model.safetensors"), load_file(out.output_dir / "model.safetensors")
    assert trained.keys() == start.keys() and any((trained[k] - start[k]).abs().max() > 0 for k in start)
    assert digest(tiny_sft.output_dir) == teacher_files
    # the record names the teacher, and its forward passes, 2 x its parameters x the tokens, are the stage's FLOPs
    t, c = rec["teacher"], rec["compute"]
    assert (t["source"], t["run_id"], t["stage"]) == (str(tiny_sft.output_dir), tiny_sft.record["run_id"], "sft")
    assert (
        t["params_total"] == sum(p.numel() for p in teacher.parameters()) == tiny_sft.record["model"]["params_total"]
    )
    tokens = rec["data"]["tokens_seen"]
    assert tokens > 0 and c["flops_teacher"] == 2 * t["params_total"] * tokens
    assert c["flops_6nd"] == 6 * rec["model"]["params_total"] * tokens + c["flops_teacher"]
    assert rec["model"]["params_total"] < 0.6 * t["params_total"]
    card = (out.output_dir / "README.md").read_text()
    assert f"`{tiny_sft.output_dir}`" in card and "teacher_agreement" in card


def _teacher_files(tiny_sft, folder, edit) -> str:
    """A teacher folder holding the tiny SFT model's config and tokenizer files with one edit, and no weights: the
    vocabulary check reads files only."""
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_sft.output_dir / name, folder / name)
    edit(folder)
    return str(folder)


def _rename_a_token(folder) -> None:
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[40:42]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (folder / "tokenizer.json").write_text(json.dumps(tok))


def _widen_the_head(folder) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] += 64
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "edit, words",
    [
        (_rename_a_token, ["do not share a vocabulary", "2 ids name other tokens", "in the student"]),
        (_widen_the_head, ["do not share a vocabulary", "vocab_size", "(teacher)"]),
        (None, ["teacher_model_name_or_path", "./no/such/teacher", "does not exist"]),
    ],
    ids=["a-token-renamed", "a-wider-head", "missing"],
)
def test_a_teacher_without_the_students_vocabulary_is_refused_before_any_model_loads(
    edit, words, student, tiny_sft, tmp_path, monkeypatch
):
    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the teacher was refused")

    monkeypatch.setattr(modeling, "load_pretrained", no_loading)
    monkeypatch.setattr(modeling, "load_merged", no_loading)
    teacher = _teacher_files(tiny_sft, tmp_path / "teacher", edit) if edit else "./no/such/teacher"
    with pytest.raises(UsageError) as e:
        hfrecipes.distill(
            "tiny/distill",
            model_name_or_path=str(student),
            teacher_model_name_or_path=teacher,
            output_dir=str(tmp_path / "out"),
        )
    for w in words + ([teacher, str(student)] if edit else []):
        assert w in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()


def test_the_teacher_is_required():
    with pytest.raises(UsageError, match="teacher_model_name_or_path is required"):
        hfrecipes.parse_stage_args("distill", "tiny/distill", teacher_model_name_or_path=None)


def test_the_gold_check_keeps_the_best_students_weights(student, tiny_sft, tmp_path, monkeypatch):
    """Distillation samples, so it carries the gold check: with the step-0 check scripted best, the saved student is
    the starting one although four steps trained it, and the record and card say so."""
    from hfrecipes import gold

    golds = iter([0.5, 0.1, 0.2])
    monkeypatch.setattr(gold.GoldCheck, "evaluate", lambda self, model: {"accuracy": next(golds)})
    out = hfrecipes.distill(
        "tiny/distill",
        model_name_or_path=str(student),
        teacher_model_name_or_path=str(tiny_sft.output_dir),
        output_dir=str(tmp_path / "distill"),
        max_steps=4,
        dataset_test_split=None,
        logging_steps=1,
        save_strategy="no",
        gold_dataset_name="tiny:prompts",
        gold_split="validation",
        gold_samples=8,
        gold_every=2,
        gold_keep_best=True,
    )
    m = out.record["metrics"]
    g = m["gold"]
    assert [h["step"] for h in g["history"]] == [0, 2, 4] and m["steps"] == 4
    assert g["kept_step"] == 0 and g["best"] == {"step": 0, "gold": 0.5} and g["hacking"] is None
    assert all(h["proxy"] is None for h in g["history"])  # no proxy reward: nothing to game
    start, saved = load_file(student / "model.safetensors"), load_file(out.output_dir / "model.safetensors")
    assert saved.keys() == start.keys() and all(torch.equal(saved[k], start[k]) for k in saved)
    assert not list(out.output_dir.glob("checkpoint-*"))
    assert "### Gold check" in (out.output_dir / "README.md").read_text()
