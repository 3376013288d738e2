"""SFT trains for real on the tiny task: full, LoRA and QLoRA are recipe switches of one stage.

Full SFT runs once per session (the `tiny_sft` fixture); LoRA and QLoRA runs here are short and start from the
same pretrained checkpoint.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import default_lm_head, lm_head_kind, stage_base_unchanged, stage_precision
from safetensors.torch import load_file

import hfrecipes
from hfrecipes import record
from hfrecipes.tiny import task


def test_full_sft_loss_falls_and_the_record_chains_to_pretraining(tiny_sft, tiny_pretrained):
    rec = tiny_sft.record
    m = rec["metrics"]
    assert m["last_logged_loss"] < 0.8 * m["first_logged_loss"], m
    assert m["heldout"]["metric"] == "eval_loss" and m["heldout"]["higher_is_better"] is False
    assert m["heldout"]["after"] < m["first_logged_loss"] and m["heldout"]["examples"] > 0
    assert m["assistant_only_loss"] is True
    assert rec["status"] == "complete" and rec["stage"] == "sft"
    assert [r["stage"] for r in record.lineage(rec)] == ["pretrain", "sft"]
    assert rec["parent"]["run_id"] == tiny_pretrained.record["run_id"]
    assert rec["model"]["adapter"] is None and rec["model"]["params_trainable"] == rec["model"]["params_total"]
    assert rec["data"]["tokens_seen"] > 0 and rec["compute"]["flops_6nd"] > 0
    assert rec["data"]["model_cutoff"]["date"] == tiny_pretrained.record["data"]["model_cutoff"]["date"]
    out = tiny_sft.output_dir
    assert (out / "model.safetensors").is_file() and (out / "chat_template.jinja").is_file()
    assert "- hfrecipes\n- sft\n" in (out / "README.md").read_text()  # our card, not TRL's
    assert not (out / record.MARKER).exists()


@pytest.fixture(scope="module")
def lora_run(tiny_sft_lora):
    """The session's short LoRA SFT run (`tiny_sft_lora`), with its trainer."""
    return tiny_sft_lora


def test_loss_mask_covers_assistant_tokens_only(lora_run):
    _, trainer = lora_run
    tok = trainer.processing_class
    rows = [trainer.train_dataset[i] for i in range(8)]
    batch = trainer.data_collator(rows)
    flawed = task.flawed(task.split_pairs()["sft"])
    seen = 0
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        text = tok.decode(ids[ids != tok.pad_token_id])
        question = text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        a, b = (int(x) for x in question.removeprefix("What is ").removesuffix("?").split(" plus "))
        trained = tok.decode(ids[labels != -100])
        # the annotators' reply, flaw included: the right sum, or the carry dropped where they got it wrong
        written = task.answer(a, b, task.dropped_carry(a, b)) if (a, b) in flawed else task.answer(a, b)
        assert trained == written + tok.eos_token, (text, trained)
        seen += 1
    assert seen == 8


def test_lora_leaves_base_bit_identical_and_moves_the_adapter(lora_run, tiny_pretrained):
    result, trainer = lora_run
    stage_base_unchanged(trainer.model, tiny_pretrained.output_dir / "model.safetensors")
    adapter = load_file(result.output_dir / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "LoRA B starts at zero; training must move it"
    assert not (result.output_dir / "model.safetensors").exists(), "a LoRA stage saves only the adapter"
    rec = result.record
    assert rec["model"]["adapter"]["type"] == "lora" and rec["model"]["adapter"]["r"] == 16
    assert rec["model"]["params_trainable"] < rec["model"]["params_total"] / 5
    assert rec["metrics"]["last_logged_loss"] < rec["metrics"]["first_logged_loss"]


def test_saved_adapter_reloads_with_peft(lora_run, tiny_pretrained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result, trainer = lora_run
    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["peft_type"] == "LORA"
    trained = trainer.model.eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_pretrained.output_dir)
    reloaded = PeftModel.from_pretrained(base, result.output_dir).to(trained.device).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]], device=trained.device)
    with torch.no_grad():
        # the trained model runs in the stage's precision (the trainer's autocast stays on its forward): the reloaded
        # one is run in it too, on the same device
        with stage_precision(trainer.args):
            assert torch.allclose(reloaded(ids).logits.float(), trained(ids).logits.float(), atol=1e-5)
        adapted = reloaded(ids).logits
        with reloaded.disable_adapter():
            assert not torch.allclose(reloaded(ids).logits, adapted, atol=1e-3), "the adapter changes nothing"


def test_qlora_trains_adapters_on_a_4bit_base(tiny_pretrained, tmp_path, captured_trainers, monkeypatch):
    """QLoRA trains its adapters on a 4-bit base. bitsandbytes repacks a 4-bit layer for inference after an eval-mode
    forward on an AVX512-BF16 CPU, and that layout has no backward: the stage's model keeps the trainable layout,
    whatever the CPU reports."""
    import bitsandbytes as bnb
    import torch

    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    result = hfrecipes.sft(
        "tiny/sft_lora",
        model_name_or_path=str(tiny_pretrained.output_dir),
        output_dir=str(tmp_path / "qlora"),
        load_in_4bit=True,
        max_steps=12,
        logging_steps=4,
        max_train_samples=384,
        save_strategy="no",
    )
    model = captured_trainers[0].model
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers, "the base is not 4-bit"
    assert not any(m.support_avx512bf16_for_cpu for m in layers)
    monkeypatch.undo()  # the forwards below run the kernels this CPU really has
    assert model.base_model.model.config.quantization_config.bnb_4bit_quant_type == "nf4"
    rec = result.record
    assert rec["model"]["adapter"]["type"] == "qlora" and rec["model"]["adapter"]["base_quantization"] == "4-bit nf4"
    assert rec["metrics"]["last_logged_loss"] < rec["metrics"]["first_logged_loss"], rec["metrics"]
    adapter = load_file(result.output_dir / "adapter_model.safetensors")
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)

    ids = torch.tensor([[5, 6, 7, 8, 9, 10]], device=model.device)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_prompt_completion_file_with_column_mapping(tiny_pretrained, tmp_path, captured_trainers):
    """A local jsonl whose columns have other names: mapped in the recipe, loss on the completion only."""
    rows = [{"question": task.question(a, b), "reply": task.answer(a, b)} for a, b in task.split_pairs()["sft"][:64]]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = hfrecipes.sft(
        "tiny/sft",
        model_name_or_path=str(tiny_pretrained.output_dir),
        output_dir=str(tmp_path / "pc"),
        dataset_name=str(data),
        dataset_columns={"prompt": "question", "completion": "reply"},
        assistant_only_loss=None,  # the recipe's `true` is for conversations; unset, the data decides
        max_steps=2,
        per_device_train_batch_size=8,
        save_strategy="no",
    )
    assert result.record["metrics"]["completion_only_loss"] is True
    assert result.record["metrics"]["assistant_only_loss"] is False
    trainer = captured_trainers[0]
    tok = trainer.processing_class
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        trained = tok.decode(ids[labels != -100])
        assert trained.endswith(tok.eos_token) and " plus " in trained and "What is" not in trained, trained


def test_recipe_cost_overrides_reach_a_fine_tuning_record(tiny_pretrained, tmp_path):
    out = hfrecipes.sft(
        "tiny/sft",
        model_name_or_path=str(tiny_pretrained.output_dir),
        max_steps=2,
        output_dir=str(tmp_path / "priced"),
        save_strategy="no",
        dataset_test_split="",
        device_price_per_hour=2.0,
        device_power_watts=300.0,
    )
    c = out.record["compute"]
    assert (c["price_per_hour"], c["price_source"], c["power_watts"]) == (2.0, "recipe", 300.0)
    assert c["dollars"] == pytest.approx(c["device_hours"] * 2.0)


def test_tokens_are_scored_with_the_devices_default_head(lora_run):
    """The logits head where TRL's fused head has no Triton kernel (a CPU), TRL's fused head where it has."""
    _, trainer = lora_run
    assert trainer.args.logits_lm_head is (default_lm_head() == "logits")
    assert lm_head_kind(trainer.model) == default_lm_head()
