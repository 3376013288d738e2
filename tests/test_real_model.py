"""The real SmolLM2-135M-Instruct (dequantized from its GGUF) through convert, SFT (full, LoRA, QLoRA) and export
into vLLM, a few steps each: the held-out loss falls, adapters move while the base stays as converted, general
answers survive a LoRA run on unrelated data, and vLLM's greedy tokens equal transformers' on the export. The LoRA
stage exported back to GGUF (q8_0) reads back with the stage's own tokenizer and greedy replies, and runs in llama.cpp
itself with the stage's replies.

    pytest -m realmodel
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMOLLM2_GGUF, needs_llama_cpp, needs_vllm
from safetensors.torch import load_file

import hfrecipes
from hfrecipes import converting
from hfrecipes.errors import UsageError
from hfrecipes.tiny import task

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]

GENERAL = [  # general questions the instruct model answers; a short LoRA run on sums must not break them
    ("What is the capital of France?", "Paris"),
    ("What color is the sky on a clear day?", "blue"),
]


@pytest.fixture(scope="module")
def sums(tmp_path_factory):
    """Addition conversations: 48 to train on, 16 held out (never trained on)."""
    folder = tmp_path_factory.mktemp("sums")
    pairs = task.split_pairs()
    for name, chosen in (("train", pairs["sft"][:48]), ("test", pairs["heldout"][:16])):
        rows = [{"messages": task.conversation(a, b)} for a, b in chosen]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def sft(parent, out, data, **overrides):
    return hfrecipes.sft(
        "tiny/sft",
        model_name_or_path=str(parent),
        dataset_name=str(data),
        output_dir=str(out),
        max_length=48,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=16,
        logging_steps=1,
        save_strategy="no",
        warmup_steps=0,
        lr_scheduler_type="constant",
        # no gold check: the tiny task's 200 validation replies, at the start and the end, cost more than the training
        gold_dataset_name=None,
        gold_patience=None,
        gold_keep_best=False,
        **overrides,
    )


def heldout_loss(model, tok, data) -> float:
    """Mean loss over the assistant replies of the held-out conversations (prompt tokens masked)."""
    losses = []
    for line in (data / "test.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(messages, tokenize=False)
        ids = tok(full, return_tensors="pt", add_special_tokens=False).input_ids
        labels = ids.clone()
        labels[:, : len(tok(prompt, add_special_tokens=False).input_ids)] = -100
        with torch.no_grad():
            losses.append(model(input_ids=ids, labels=labels).loss.item())
    return sum(losses) / len(losses)


def greedy(model, tok, question: str, max_new_tokens: int = 24) -> str:
    ids = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def base(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(smollm2).eval(), AutoTokenizer.from_pretrained(smollm2)


def test_convert_records_the_source_and_the_base_models_pretraining(smollm2):
    rec = json.loads((smollm2 / "record.json").read_text())
    assert rec["stage"] == "base" and rec["status"] == "complete"
    assert rec["gguf"]["quantization"] == "Q4_1" and len(rec["gguf"]["sha256"]) == 64
    assert rec["gguf"]["sha256"] == converting.sha256(SMOLLM2_GGUF)
    assert rec["model"]["params_total"] == 134_515_008
    assert rec["data"]["tokens_seen"] == 2_000_000_000_000  # the published figure of SmolLM2-135M
    assert rec["compute"]["flops_6nd"] == pytest.approx(6 * 134_515_008 * 2e12)
    assert rec["compute"]["estimate"] is True and rec["base"]["sources"]["pretraining_tokens"]
    assert rec["data"]["knowledge_cutoff"]["date"] is None  # SmolLM2 publishes none; the card says so
    for name in ("model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (smollm2 / name).is_file(), name
    assert json.loads((smollm2 / "config.json").read_text())["model_type"] == "llama"
    assert "quantization_config" not in json.loads((smollm2 / "config.json").read_text())


def test_full_sft_from_the_gguf_path_lowers_heldout_loss(smollm2, base, sums, tmp_path):
    """The GGUF path itself is the model: the stage starts from the cached conversion and chains to its record."""
    from transformers import AutoModelForCausalLM

    model, tok = base
    before = heldout_loss(model, tok, sums)
    result = sft(SMOLLM2_GGUF, tmp_path / "full", sums, max_steps=6, learning_rate=5e-5)
    rec = result.record
    assert rec["parent"]["stage"] == "base" and rec["model"]["source"] == str(smollm2)
    assert rec["metrics"]["assistant_only_loss"] is True
    trained = AutoModelForCausalLM.from_pretrained(result.output_dir).eval()
    after = heldout_loss(trained, tok, sums)
    assert after < 0.8 * before, (before, after)


@pytest.fixture(scope="module")
def lora_sft(smollm2, sums, tmp_path_factory):
    from conftest import capture_trainers

    mp = pytest.MonkeyPatch()
    trainers = capture_trainers(mp)
    try:
        result = sft(smollm2, tmp_path_factory.mktemp("lora") / "sft", sums, max_steps=6, use_peft=True)
    finally:
        mp.undo()
    return result, trainers[0]


def test_lora_sft_moves_adapters_keeps_the_base_and_general_answers(smollm2, base, sums, lora_sft):
    from peft import PeftModel

    model, tok = base
    result, trainer = lora_sft
    converted = load_file(str(smollm2 / "model.safetensors"))
    trained = trainer.model
    for name, p in trained.named_parameters():
        if "lora_" in name:
            continue
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert not p.requires_grad, name
        assert torch.equal(p.detach(), converted[key]), f"{name} changed"
    moved = [n for n, p in trained.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert moved, "no LoRA B matrix moved from zero"
    assert result.record["model"]["adapter"]["type"] == "lora"

    adapted = PeftModel.from_pretrained(model, result.output_dir).eval()
    after = heldout_loss(adapted, tok, sums)
    answers = [greedy(adapted, tok, q) for q, _ in GENERAL]
    adapted.unload()  # the module-scoped base model comes back as it was
    before = heldout_loss(model, tok, sums)
    assert after < 0.8 * before, (before, after)
    for (question, expected), reply in zip(GENERAL, answers, strict=True):
        assert expected.lower() in reply.lower(), (question, reply)


def test_qlora_trains_adapters_on_a_4bit_base(smollm2, sums, tmp_path):
    pytest.importorskip("bitsandbytes")
    result = sft(smollm2, tmp_path / "qlora", sums, max_steps=3, use_peft=True, load_in_4bit=True)
    rec = result.record
    assert rec["model"]["adapter"]["type"] == "qlora"
    assert rec["model"]["adapter"]["base_quantization"].startswith("4-bit")
    losses = [json.loads(line).get("loss") for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [x for x in losses if x is not None]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    adapter = load_file(str(result.output_dir / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())


@needs_vllm
def test_export_merges_the_adapter_and_vllm_matches_transformers(smollm2, lora_sft, tmp_path):
    result, _ = lora_sft
    out = hfrecipes.export(result.output_dir, tmp_path / "export", dtype="float32").output_dir
    verify = json.loads((out / "record.json").read_text())["export"]["verify"]
    assert verify["transformers_loads"] is True
    assert verify["vllm"]["greedy_matches"] == verify["vllm"]["of"] == verify["prompts"], verify
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "base (published, estimated)" in card and "SmolLM2-135M" in card and "~$" in card
    assert "sha256 " + json.loads((smollm2 / "record.json").read_text())["gguf"]["sha256"][:12] in card


@pytest.mark.parametrize(
    "arch, message",
    [
        ("rwkv6", r"'rwkv6' model, an architecture transformers cannot dequantize.*safetensors checkpoint"),
        ("mamba", r"could not be dequantized \(.*tokenizer.*safetensors checkpoint"),  # no tokenizer in the file
    ],
)
def test_a_gguf_transformers_cannot_dequantize_is_refused_with_nothing_written(tmp_path, arch, message):
    import gguf

    bad = tmp_path / f"{arch}.gguf"
    w = gguf.GGUFWriter(str(bad), arch)
    w.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UsageError, match=message):
        hfrecipes.convert(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_a_gguf_cut_short_is_refused_before_anything_loads(smollm2, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(SMOLLM2_GGUF.read_bytes()[: 4 << 20])
    with pytest.raises(UsageError, match=r"cut\.gguf is not a readable GGUF file.*cut short"):
        hfrecipes.convert(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_folder_that_holds_files(smollm2, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="holds files.*--force"):
        hfrecipes.convert(SMOLLM2_GGUF, out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_gguf_without_a_chat_template_on_conversations_names_the_file(smollm2, sums, tmp_path):
    """The converted folder of a GGUF that carries no chat template: one message naming the GGUF and the fix,
    before any weights load, and no output folder."""
    import shutil

    folder = tmp_path / "no-template"
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "record.json"):
        shutil.copy2(smollm2 / name, folder / name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match=r"converted from SmolLM2-135M-Instruct\.Q4_1\.gguf.*chat_template_path"):
        sft(folder, tmp_path / "out", sums, max_steps=1)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def lora_gguf(lora_sft, tmp_path_factory):
    """The LoRA stage exported to GGUF q8_0 (adapter merged, not verified here), and the stage merged in fp32 with its
    tokenizer: (export folder, GGUF file, source model, tokenizer)."""
    from hfrecipes.modeling import load_merged

    result, _ = lora_sft
    out = tmp_path_factory.mktemp("lora-gguf") / "gguf"
    exported = hfrecipes.export(result.output_dir, out, format="gguf", quant="q8_0", verify_load=False)
    assert exported.record["model"]["merged_adapter"] is True
    source, tok = load_merged(result.output_dir, "float32")
    return out, out / exported.record["export"]["gguf"]["file"], source.eval(), tok


def questions(sums) -> list[str]:
    """Two general questions and two held-out sums."""
    held_out = [json.loads(line)["messages"][0]["content"] for line in (sums / "test.jsonl").read_text().splitlines()]
    return [q for q, _ in GENERAL] + held_out[:2]


def test_gguf_q8_0_of_the_lora_stage_reads_back_with_the_sources_replies(lora_gguf, sums):
    """SmolLM2's GGUF -> LoRA SFT -> GGUF q8_0 (adapter merged) -> read back by transformers' GGUF loader: the
    tokenizer and the greedy replies to general and held-out questions are the LoRA stage's own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, file, source, tok = lora_gguf
    assert file.stat().st_size < 0.6 * 2 * 134_515_008
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file=file.name, dtype=torch.float32).eval()
    back_tok = AutoTokenizer.from_pretrained(out, gguf_file=file.name)
    for q in questions(sums):
        chat = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        assert back_tok(chat)["input_ids"] == tok(chat)["input_ids"], q
    replies = [(greedy(source, tok, q), greedy(back, back_tok, q)) for q in questions(sums)]
    assert all(a == b for a, b in replies), replies
    modelfile = (out / "Modelfile").read_text()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile


@needs_llama_cpp
def test_llama_cpp_runs_the_lora_stages_gguf_with_its_replies(lora_gguf, sums):
    """The same file in llama.cpp itself (node-llama-cpp's prebuilt CPU binaries): it reads <|im_end|> as the end of
    turn, splits the chat prompts and text with digits, spaces and apostrophes as the stage's tokenizer does, renders
    SmolLM2's chat template (its default system prompt included) as transformers does, and along its greedy replies
    of 24 tokens the fp32 stage picks llama.cpp's token at 90% of the steps or more. Where it does not, the stage had
    the two tokens within the logit error of the file itself: llama.cpp's Q8_0 also rounds the activations, and
    which near-tie that turns depends on the CPU build it loads (AVX2, AVX-512), so how many whole replies stay equal
    is not a property of the file."""
    from hfrecipes import llama_cpp
    from hfrecipes.inference import prompt_ids

    _, file, source, tok = lora_gguf
    prompts = [[{"role": "user", "content": q}] for q in questions(sums)]
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    kw = {"max_new_tokens": 24, "do_sample": False, "eos_token_id": eot, "pad_token_id": eot}
    with torch.no_grad():
        replies = [source.generate(torch.tensor([x]), **kw)[0, len(x) :].tolist() for x in prompt_ids(tok, prompts)]
    got = llama_cpp.compare(file, source, tok, prompts, replies, {eot}, eot, 24)
    assert got["backend"] == "cpu" and got["end_of_turn"] == {"eos": eot, "eot": eot, "expected": eot}, got
    assert got["tokenizer_ids_match"] == got["tokenizer_texts"] == len(prompts) + len(llama_cpp.TOKENIZER_TEXTS), got
    assert got["chat_template_renders_same"] == got["chats"] == len(prompts) + 1, got
    # q8_0 moves SmolLM2's top logits (spread about 8) by about 1; a misread tensor moves them by far more
    assert got["top1_agreement"] >= 0.9 and got["top_logits_max_abs_diff"] < 2.0, got
    assert got["top1_max_source_margin"] <= got["top_logits_max_abs_diff"], got
