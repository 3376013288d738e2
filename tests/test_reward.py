"""The reward stage trains for real: a one-output head on the tiny SFT model learns to rank the right reply above
the wrong one on 300 held-out problems no stage trains on."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import stage_precision
from safetensors.torch import load_file

import hfrecipes
from hfrecipes import record
from hfrecipes.tiny import task


def test_reward_model_ranks_held_out_pairs(tiny_sft, tmp_path, captured_trainers):
    result = hfrecipes.reward(
        "tiny/reward",
        model_name_or_path=str(tiny_sft.output_dir),
        output_dir=str(tmp_path / "reward"),
        logging_steps=25,
        save_strategy="no",
    )
    m = result.record["metrics"]
    h = m["heldout"]
    assert h["metric"] == "pair_accuracy" and h["examples"] == 300
    assert m["last_logged_loss"] < m["first_logged_loss"]
    rec = result.record
    assert rec["model"]["architecture"] == "LlamaForSequenceClassification"
    assert [r["stage"] for r in record.lineage(rec)] == ["pretrain", "sft", "reward"]
    # The saved folder is a one-output classifier that scores the held-out pairs as the evaluation did: on the
    # trainer's device, in its precision (bf16 on a GPU rounds the near-ties of a weak model another way than fp32).
    from transformers import AutoModelForSequenceClassification

    args = captured_trainers[0].args
    model = AutoModelForSequenceClassification.from_pretrained(result.output_dir).to(args.device).eval()
    assert model.config.num_labels == 1
    tok = captured_trainers[0].processing_class
    rows = task.preference_rows(task.split_pairs()["heldout"], seed=0)
    texts = [tok.apply_chat_template(r["prompt"] + r[k], tokenize=False) for r in rows for k in ("chosen", "rejected")]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(args.device)
    with torch.no_grad(), stage_precision(args):
        scores = model(**batch).logits.float().squeeze(-1).view(-1, 2)
    gap = scores[:, 0] - scores[:, 1]
    accuracy = (gap > 0).float().mean().item()
    assert abs(accuracy - h["after"]) < 0.03, (accuracy, h["after"])
    assert h["detail"]["margin"] == pytest.approx(gap.mean().item(), abs=0.05), (h, gap.mean().item())
    # Pairs no stage trained on are ranked better than chance, by more than two standard errors of a coin on 300
    # pairs, and better than by the untrained head; the score gap, about zero under the untrained head, grew by
    # more than three standard errors of its mean over the pairs.
    print("reward held-out:", h, "gap", gap.mean().item(), "+-", gap.std().item() / len(gap) ** 0.5)
    assert h["after"] > 0.5 + 2 * (0.25 / len(rows)) ** 0.5 and h["after"] > h["before"], h
    assert h["detail"]["margin"] - h["detail"]["margin_before"] > 3 * gap.std().item() / len(gap) ** 0.5, h


def test_lora_reward_with_implicit_prompt_trains_adapters_and_head(tiny_sft, tmp_path):
    """Pairs without a prompt column (the prompt is the shared start of both conversations), from a local file."""
    rows = [
        {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
        for r in task.preference_rows(task.split_pairs()["sft"][:256], seed=0)
    ]
    data = tmp_path / "implicit.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = hfrecipes.reward(
        "tiny/reward_lora",
        model_name_or_path=str(tiny_sft.output_dir),
        output_dir=str(tmp_path / "reward_lora"),
        dataset_name=str(data),
        max_steps=6,
        logging_steps=2,
        save_strategy="no",
    )
    rec = result.record
    assert rec["model"]["adapter"]["type"] == "lora"
    assert rec["metrics"]["heldout"] is None  # a single file is the training split only
    adapter = load_file(result.output_dir / "adapter_model.safetensors")
    assert any("score" in k for k in adapter), "the new head is trained and saved with the adapter"
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
