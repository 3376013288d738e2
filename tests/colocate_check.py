"""GRPO or RLOO (the recipe's stage) with vLLM colocated, three steps, then: how far the engine's greedy
log-probabilities are from the trained policy's and from the parent's. Run by `test_grpo.py` in a process of its own;
prints one JSON line.

    python tests/colocate_check.py <sft folder> <output folder> <recipe> <learning rate> [float32|bfloat16]

The engine runs in float32 unless told otherwise. TRL builds it with vLLM's dtype "auto", which serves a float32
checkpoint in bfloat16; the gap between a bfloat16 engine and the float32 policy is then set by the CPU's bfloat16
kernels (AMX, AVX-512-BF16 or neither) and by the scale of the trained weights, so no fixed bound tells a rounding
gap from a layer the sync missed. In float32 both compute the same function up to float32 rounding, whatever the
CPU, and a bound far below a missed layer's gap holds.
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from conftest import capture_trainers
from transformers import AutoModelForCausalLM
from vllm import SamplingParams

import hfrecipes


def gaps(model, reply) -> list[float]:
    """|log p| difference between `model` and the engine at each token of the engine's greedy reply."""
    ids = reply.prompt_token_ids + list(reply.outputs[0].token_ids)
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    n = len(reply.prompt_token_ids)
    ours = logp[torch.arange(n - 1, len(ids) - 1), torch.tensor(ids[n:])]
    engine = torch.tensor([reply.outputs[0].logprobs[i][t].logprob for i, t in enumerate(ids[n:])])
    return (ours - engine).abs().tolist()


def engine_dtype(mp: pytest.MonkeyPatch, dtype: str) -> None:
    """Build TRL's colocated engine in `dtype` (TRL passes vLLM no dtype)."""
    import trl.generation.vllm_generation as vllm_generation

    build = vllm_generation.LLM
    mp.setattr(vllm_generation, "LLM", lambda *a, **k: build(*a, **{**k, "dtype": dtype}))


def main(parent_dir: str, output_dir: str, recipe: str, learning_rate: str, dtype: str = "float32") -> None:
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        engine_dtype(mp, dtype)
        trainers = capture_trainers(mp)
        stage = recipe.split("/")[-1].split("_")[0]  # tiny/grpo_lora -> grpo
        out = getattr(hfrecipes, stage)(
            recipe,
            model_name_or_path=parent_dir,
            output_dir=output_dir,
            max_steps=3,
            eval_before=False,
            eval_samples=8,
            save_strategy="no",
            learning_rate=float(learning_rate),
            reward_funcs=["length"],  # a dense reward: every group has a spread, so the weights move
            use_vllm=True,
            vllm_mode="colocate",
        )
    trainer = trainers[0]
    generation = trainer.vllm_generation
    generation.sync_weights()
    tok = trainer.processing_class
    chats = [[{"role": "user", "content": f"What is {a} plus {b}?"}] for a, b in [(3, 4), (12, 30), (45, 17)]]
    prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    replies = generation.llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, logprobs=0), use_tqdm=False)
    # The trained policy as a plain model holding its (merged) weights: the trainer's model carries a patched
    # forward whose closure would still run the trainer's own copy.
    policy = copy.deepcopy(trainer.model)
    policy = policy.merge_and_unload() if hasattr(policy, "merge_and_unload") else policy
    trained = AutoModelForCausalLM.from_pretrained(parent_dir).eval()
    trained.load_state_dict(policy.state_dict())
    parent = AutoModelForCausalLM.from_pretrained(parent_dir).eval()
    per_token = [gaps(trained, r) for r in replies]
    result = {
        "status": out.record["status"],
        "sync": generation.sync_weights.__func__.__module__,
        "engine_dtype": str(generation.llm.llm_engine.model_config.dtype).removeprefix("torch."),
        "gap_trained": [max(g) for g in per_token],
        "gap_parent": [max(gaps(parent, r)) for r in replies],
        "gap_trained_per_token": per_token,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:6])
