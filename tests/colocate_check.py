"""GRPO (LoRA) with vLLM colocated, three steps, then: how far the engine's greedy log-probabilities are from the
trained policy's and from the parent's. Run by `test_grpo.py` in a process of its own; prints one JSON line.

    python tests/colocate_check.py <sft folder> <output folder>
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


def gap(model, reply) -> float:
    """Max |log p| difference between `model` and the engine over the engine's greedy reply."""
    ids = reply.prompt_token_ids + list(reply.outputs[0].token_ids)
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    n = len(reply.prompt_token_ids)
    ours = logp[torch.arange(n - 1, len(ids) - 1), torch.tensor(ids[n:])]
    engine = torch.tensor([next(iter(d.values())).logprob for d in reply.outputs[0].logprobs])
    return (ours - engine).abs().max().item()


def main(parent_dir: str, output_dir: str) -> None:
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        trainers = capture_trainers(mp)
        out = hfrecipes.grpo(
            "tiny/grpo_lora",
            model_name_or_path=parent_dir,
            output_dir=output_dir,
            max_steps=3,
            eval_before=False,
            eval_samples=8,
            save_strategy="no",
            learning_rate=5e-2,
            reward_funcs=["length"],  # a dense reward: every group has a spread, so the adapter moves
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
    trained = copy.deepcopy(trainer.model).merge_and_unload().eval()
    parent = AutoModelForCausalLM.from_pretrained(parent_dir).eval()
    result = {
        "status": out.record["status"],
        "sync": generation.sync_weights.__func__.__module__,
        "gap_trained": [gap(trained, r) for r in replies],
        "gap_parent": [gap(parent, r) for r in replies],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:3])
