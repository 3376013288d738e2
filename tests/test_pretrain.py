"""Pretraining the tiny model for real: the loss falls, the folder reloads elsewhere, the record is right."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import TWO_PROCESSES, device_kind, needs_processes, subprocess_env

import hfrecipes
from hfrecipes.errors import UsageError

ENV = subprocess_env(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def test_loss_falls_clearly(tiny_pretrained):
    m = tiny_pretrained.record["metrics"]
    assert m["steps"] == 80
    assert m["last_logged_loss"] < 0.6 * m["first_logged_loss"], m
    assert m["heldout"]["metric"] == "eval_loss" and m["heldout"]["after"] < 3.0, m
    assert m["heldout"]["detail"]["eval_perplexity"] > 1.0


def test_folder_reloads_and_generates(tiny_pretrained):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tiny_pretrained.output_dir
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("One sunny day, Mia went to the", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(gen[0]) > ids["input_ids"].shape[1] and text.strip()
    # digits are single tokens and the chat template survives the save
    assert tok.tokenize("47") == ["4", "7"]
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert tok.model_max_length < 10**6


def test_record_holds_params_tokens_flops_cutoff(tiny_pretrained):
    rec = json.loads((tiny_pretrained.output_dir / "record.json").read_text())
    assert rec == tiny_pretrained.record
    assert rec["status"] == "complete" and rec["stage"] == "pretrain" and rec["parent"] is None
    n, d = rec["model"]["params_total"], rec["data"]["tokens_seen"]
    assert d == 80 * 16 * 128
    assert rec["compute"]["flops_6nd"] == 6 * n * d
    # the trainer's own count leaves out embeddings: smaller, same order
    assert 0.5 * rec["compute"]["flops_6nd"] < rec["compute"]["flops_trainer"] < rec["compute"]["flops_6nd"]
    assert rec["compute"]["wall_seconds"] > 0
    assert (rec["compute"]["device"]["kind"], rec["compute"]["device"]["count"]) == (device_kind(), 1)
    cutoff = rec["data"]["knowledge_cutoff"]
    assert cutoff["source"] == "data" and cutoff["date"] == "2024-06-30"
    assert rec["recipe"]["values"]["max_steps"] == 80
    card = (tiny_pretrained.output_dir / "README.md").read_text()
    assert "2024-06-30" in card and "pretrain" in card
    lines = (tiny_pretrained.output_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if "loss" in json.loads(x)] == [10, 20, 30, 40, 50, 60, 70, 80]


def test_declared_cutoff_wins_and_says_so(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"content": f"counting {i} {i + 1} {i + 2} " * 20}) for i in range(40)))
    tok_dir = tmp_path / "tok"
    from hfrecipes.tiny.tokenizer import train_tokenizer

    train_tokenizer(["counting 0 1 2 3"], vocab_size=300).save_pretrained(tok_dir)
    out = hfrecipes.pretrain(
        "tiny/pretrain",
        dataset_name=str(docs),
        dataset_columns={"text": "content"},
        dataset_test_split=None,
        train_tokenizer=False,
        tokenizer_name_or_path=str(tok_dir),
        knowledge_cutoff="2023-01-31",
        max_steps=3,
        per_device_train_batch_size=2,
        block_size=32,
        output_dir=str(tmp_path / "out"),
    )
    assert out.record["data"]["knowledge_cutoff"]["source"] == "declared"
    assert out.record["data"]["knowledge_cutoff"]["date"] == "2023-01-31"


def test_existing_folder_is_refused_untouched(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(UsageError, match="holds other files"):
        hfrecipes.pretrain("tiny/pretrain", max_steps=2, output_dir=str(out))
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"


def test_finished_folder_is_refused(tiny_pretrained):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_pretrained.output_dir.iterdir()}
    with pytest.raises(UsageError, match="already holds a finished stage"):
        hfrecipes.pretrain("tiny/pretrain", max_steps=2, output_dir=str(tiny_pretrained.output_dir))
    assert before == {p.name: p.stat().st_mtime_ns for p in tiny_pretrained.output_dir.iterdir()}


def _cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "hfrecipes", *args], env=ENV, capture_output=True, text=True, timeout=timeout
    )


def test_cli_runs_a_stage_with_flag_overrides(tmp_path):
    out = tmp_path / "cli"
    r = _cli(
        "pretrain",
        "--config",
        "tiny/pretrain",
        "--max_steps",
        "4",
        "--logging_steps",
        "2",
        "--output_dir",
        str(out),
        "--dataset_test_split",
        "",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((out / "record.json").read_text())
    assert rec["metrics"]["steps"] == 4 and rec["recipe"]["values"]["max_steps"] == 4


def test_cli_lists_and_checks_recipes():
    r = _cli("recipes")
    assert r.returncode == 0 and "tiny/pretrain" in r.stdout.split()
    r = _cli("check", "tiny/pretrain", "tiny/sft")  # both configs built, the stages' libraries imported
    assert r.returncode == 0 and r.stdout.count("ok") == 2, r.stdout + r.stderr
    # nothing printed the user can do nothing about (see tests/test_quiet.py)
    assert "gemm_4bit_forward" not in r.stderr and "`gradient_checkpointing` is deprecated" not in r.stderr, r.stderr


@pytest.mark.slow
@needs_processes(2)
def test_accelerate_launch_two_processes(tmp_path):
    """`--multi_gpu --num_processes 2` gives two real processes: gloo on CPU (`--cpu` would silently run one), a GPU
    each on a GPU machine."""
    out = tmp_path / "ddp"
    cmd = [
        *TWO_PROCESSES,
        "-m",
        "hfrecipes",
        "pretrain",
        "--config",
        "tiny/pretrain",
        "--max_steps",
        "6",
        "--logging_steps",
        "2",
        "--output_dir",
        str(out),
        "--dataset_test_split",
        "",
        "--max_train_samples",  # the tokenizer trains on these documents only
        "512",
    ]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    rec = json.loads((out / "record.json").read_text())
    assert rec["compute"]["device"]["count"] == 2
    assert rec["data"]["tokens_seen"] == 6 * 16 * 128 * 2
    assert (out / "model.safetensors").is_file()


def test_report_to_tensorboard_logs_through_the_trainer(tmp_path):
    out = hfrecipes.pretrain(
        "tiny/pretrain",
        max_steps=3,
        logging_steps=1,
        report_to="tensorboard",
        output_dir=str(tmp_path / "tb"),
        dataset_test_split="",
    )
    assert list(out.output_dir.rglob("events.out.tfevents.*"))
