"""Export (full and LoRA stages) to a folder vLLM serves as is, and batched inference that never changes weights."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import needs_vllm

import hfrecipes
from hfrecipes import record
from hfrecipes.errors import UsageError


@pytest.fixture(scope="module")
def lora_stage(tiny_pretrained, tmp_path_factory):
    """A LoRA stage folder: adapter (random non-zero B, so merging changes weights) + tokenizer + record."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("lora") / "stage"
    base = AutoModelForCausalLM.from_pretrained(tiny_pretrained.output_dir)
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, cfg)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_pretrained.output_dir).save_pretrained(out)
    rec = record.new_record("sft", {"path": None, "values": {}}, tiny_pretrained.record)
    rec["status"] = "complete"
    record.write_record(out, rec)
    return out


def _logits(model_dir_or_model, text="What is 12 plus 30?"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir_or_model if isinstance(model_dir_or_model, os.PathLike) else None)
    model = AutoModelForCausalLM.from_pretrained(model_dir_or_model)
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits


def test_export_full_stage(tiny_pretrained, tmp_path):
    import torch

    out = hfrecipes.export(tiny_pretrained.output_dir, tmp_path / "exp", use_vllm=False)
    d = out.output_dir
    assert (d / "model.safetensors").is_file() and not list(d.glob("*.bin"))
    assert torch.allclose(_logits(d), _logits(tiny_pretrained.output_dir), atol=1e-6)
    gen = json.loads((d / "generation_config.json").read_text())
    tok = json.loads((d / "tokenizer_config.json").read_text())
    assert gen["eos_token_id"] == 2 or 2 in gen["eos_token_id"]  # <|im_end|>, the chat template's end of turn
    assert gen["pad_token_id"] == 3 and tok["pad_token"] == "<|pad|>"
    assert (d / "chat_template.jinja").is_file()
    rec = record.read_record(d)
    assert rec["stage"] == "export" and rec["parent"]["run_id"] == tiny_pretrained.record["run_id"]
    assert rec["export"]["verify"]["transformers_loads"] is True
    card_text = (d / "README.md").read_text()
    assert str(d) in card_text and ".tmp" not in card_text
    assert "steps" not in rec["metrics"] and rec["metrics"]["heldout"] == tiny_pretrained.record["metrics"]["heldout"]
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".exp.tmp")]


def test_export_lora_merges_base_plus_delta(lora_stage, tiny_pretrained, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = hfrecipes.export(lora_stage, tmp_path / "merged", use_vllm=False)
    merged = load_file(out.output_dir / "model.safetensors")
    base = load_file(tiny_pretrained.output_dir / "model.safetensors")
    adapter = load_file(lora_stage / "adapter_model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    a = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    expected = base[key] + (8 / 4) * b @ a
    assert torch.allclose(merged[key], expected, atol=1e-6)
    assert not torch.allclose(merged[key], base[key])
    k_key = "model.layers.0.self_attn.k_proj.weight"  # not a LoRA target: untouched
    assert torch.equal(merged[k_key], base[k_key])
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_pretrained.output_dir), lora_stage
    )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lora_stage)
    with torch.no_grad():
        ref = peft_model(**tok("What is 12 plus 30?", return_tensors="pt")).logits
    assert torch.allclose(_logits(out.output_dir), ref, atol=1e-5)
    assert out.record["model"]["merged_adapter"] is True


def test_export_refuses_to_overwrite_unless_forced(tiny_pretrained, tmp_path):
    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep")
    with pytest.raises(UsageError, match="--force"):
        hfrecipes.export(tiny_pretrained.output_dir, dest, verify_load=False)
    assert [p.name for p in dest.iterdir()] == ["mine.txt"]
    hfrecipes.export(tiny_pretrained.output_dir, dest, verify_load=False, force=True)
    assert (dest / "model.safetensors").is_file() and not (dest / "mine.txt").exists()


def _broken_adapter(src, dst):
    shutil.copytree(src, dst)
    (dst / "adapter_config.json").write_text("{not json")


def _adapter_without_weights(src, dst):
    shutil.copytree(src, dst)
    (dst / "adapter_model.safetensors").unlink()


def _adapter_with_missing_base(src, dst):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(dst / "no-such-base")
    (dst / "adapter_config.json").write_text(json.dumps(cfg))


def _adapter_with_wrong_rank(src, dst):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["r"] = 16
    (dst / "adapter_config.json").write_text(json.dumps(cfg))


def _without_tokenizer(src, dst):
    shutil.copytree(src, dst)
    (dst / "tokenizer_config.json").unlink()


@pytest.mark.parametrize(
    "damage,words",
    [
        (_broken_adapter, ["adapter_config.json", "not valid JSON"]),
        (_adapter_without_weights, ["adapter_model.safetensors"]),
        (_adapter_with_missing_base, ["base model", "does not exist"]),
        (_adapter_with_wrong_rank, ["does not fit"]),
        (_without_tokenizer, ["no tokenizer"]),
    ],
)
def test_export_bad_stage_folder(lora_stage, tmp_path, damage, words):
    src = tmp_path / "damaged"
    damage(lora_stage, src)
    with pytest.raises(UsageError) as e:
        hfrecipes.export(src, tmp_path / "out", use_vllm=False)
    for w in words:
        assert w in str(e.value)
    assert not (tmp_path / "out").exists()


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_generate_transformers_batched_equals_one_by_one(tiny_pretrained, tmp_path):
    exp = hfrecipes.export(tiny_pretrained.output_dir, tmp_path / "exp", use_vllm=False).output_dir
    weights = _digest(exp / "model.safetensors")
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} plus {a + 7}?"}]} for a in range(9)]
    rows += [{"prompt": "One sunny day, Ben went to the"}, {"messages": [{"role": "user", "content": "Hi"}]}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    batched, stats = hfrecipes.generate(
        exp,
        prompts,
        tmp_path / "out.jsonl",
        engine="transformers",
        max_new_tokens=12,
        batch_size=4,
        price_per_hour=1.0,
    )
    single, _ = hfrecipes.generate(
        exp, prompts, engine="transformers", max_new_tokens=12, batch_size=1, record_stats=False
    )
    assert [r["completions"] for r in batched] == [r["completions"] for r in single]
    assert len(batched) == len(rows) and all(r["completion_tokens"][0] >= 1 for r in batched)
    assert stats["generated_tokens"] == sum(r["completion_tokens"][0] for r in batched)
    assert stats["inference_flops"] == 2 * stats["params"] * stats["generated_tokens"]
    assert stats["params"] == tiny_pretrained.record["model"]["params_total"]
    assert stats["tokens_per_second"] > 0 and stats["dollars_per_million_tokens"] > 0
    written = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [w["completions"] for w in written] == [r["completions"] for r in batched]
    assert record.read_record(exp)["inference"]["generated_tokens"] == stats["generated_tokens"]
    assert "measured" in (exp / "README.md").read_text()
    assert _digest(exp / "model.safetensors") == weights  # inference never changes weights


def test_generate_sampling_n_and_seed(tiny_pretrained, tmp_path, monkeypatch):
    from hfrecipes import inference
    from hfrecipes.record import device_info

    exp = hfrecipes.export(tiny_pretrained.output_dir, tmp_path / "exp", verify_load=False).output_dir
    prompts = ["We count: 1, 2,", "Tom saw a"]
    ran_on, generate_ids = set(), inference.generate_ids

    def spy(model, *args, **kwargs):
        ran_on.add(next(model.parameters()).device.type)
        return generate_ids(model, *args, **kwargs)

    monkeypatch.setattr(inference, "generate_ids", spy)

    def completions(**kwargs):
        rows, _ = hfrecipes.generate(exp, prompts, engine="transformers", n=3, max_new_tokens=8, record_stats=False,
                                     **kwargs)  # fmt: skip
        return [r["completions"] for r in rows]

    a = completions(temperature=1.0, seed=7)
    assert [len(c) for c in a] == [3, 3]
    assert a == completions(temperature=1.0, seed=7)  # the seed fixes the samples
    # three samples of eight tokens at temperature 1 from a barely trained model differ (each token is drawn from a
    # wide distribution), where copies of one reply would be the same
    assert all(len(set(c)) > 1 for c in a), a
    assert ran_on == {device_info(1)["kind"]}, "generation runs on the device the record names"


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"engine": "tpu"}, ["engine"]),
        ({"temperature": -1.0}, ["temperature"]),
        ({"n": 0}, ["n >= 1"]),
    ],
)
def test_generate_bad_input(tiny_pretrained, kwargs, words):
    with pytest.raises(UsageError) as e:
        hfrecipes.generate(tiny_pretrained.output_dir, ["hi"], **kwargs)
    for w in words:
        assert w in str(e.value)


def test_generate_bad_prompts_file(tiny_pretrained, tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        hfrecipes.generate(tiny_pretrained.output_dir, tmp_path / "none.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    with pytest.raises(UsageError, match="'prompt'"):
        hfrecipes.generate(tiny_pretrained.output_dir, bad)


@pytest.fixture(scope="module")
def one_vllm_engine():
    """vLLM engines built in this module, one per set of weights: an export's check and a generation from the
    exported folder share one. The export checks its folder before renaming it into place, so the weights, not the
    path, say which engine serves them."""
    from hfrecipes import vllm_support

    engines = {}
    build = vllm_support.vllm_engine

    def shared(model_dir, seed=0, max_model_len=None):
        key = (_digest(Path(model_dir) / "model.safetensors"), seed, max_model_len)
        if key not in engines:
            engines[key] = build(model_dir, seed=seed, max_model_len=max_model_len)
        return engines[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vllm_support, "vllm_engine", shared)
        yield engines
    engines.clear()


@needs_vllm
def test_vllm_greedy_tokens_equal_transformers(tiny_pretrained, tmp_path, one_vllm_engine):
    out = hfrecipes.export(tiny_pretrained.output_dir, tmp_path / "exp", use_vllm=True)
    verdict = out.record["export"]["verify"]["vllm"]
    assert verdict["greedy_matches"] == verdict["of"], verdict
    prompts = ["We count: 1, 2,", "Tom saw a"]
    _, stats = hfrecipes.generate(out.output_dir, prompts, engine="vllm", max_new_tokens=8, record_stats=False)
    assert stats["engine"] == "vllm" and stats["generated_tokens"] > 0
    # sampling in the engine: three samples per prompt, not three copies of one reply
    sampled, _ = hfrecipes.generate(
        out.output_dir, prompts, engine="vllm", temperature=1.0, n=3, max_new_tokens=8, record_stats=False
    )
    assert all(len(r["completions"]) == 3 and len(set(r["completions"])) > 1 for r in sampled), sampled
    assert len(one_vllm_engine) == 1, "the export's check and the generations started more than one engine"


def test_a_stage_can_start_from_a_lora_stage(lora_stage, tmp_path):
    """A LoRA parent is merged into its base before the next stage loads it: DPO with its own LoRA, a reward head."""
    import torch
    from safetensors.torch import load_file

    dpo = hfrecipes.dpo(
        "tiny/dpo_lora",
        model_name_or_path=str(lora_stage),
        max_steps=2,
        save_strategy="no",
        output_dir=str(tmp_path / "dpo"),
        max_train_samples=16,
        dataset_test_split="",
    )
    assert dpo.record["parent"]["stage"] == "sft" and (dpo.output_dir / "adapter_model.safetensors").is_file()
    base = json.loads((dpo.output_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(lora_stage / "merged")  # the parent merged once, kept for every stage after it
    assert hfrecipes.export(dpo.output_dir, tmp_path / "dpo-exp", verify_load=False).record["model"]["merged_adapter"]
    merged_parent = hfrecipes.export(lora_stage, tmp_path / "merged", verify_load=False).output_dir
    rm = hfrecipes.reward(
        "tiny/reward",
        model_name_or_path=str(lora_stage),
        max_steps=1,
        save_strategy="no",
        output_dir=str(tmp_path / "rm"),
        max_train_samples=8,
        dataset_test_split="",
        learning_rate=1e-12,
    )
    body = load_file(rm.output_dir / "model.safetensors")
    parent = load_file(merged_parent / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(body[key], parent[key], atol=1e-5)  # the reward body starts from the merged weights
