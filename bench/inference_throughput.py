"""Inference throughput on one model and one prompt set, in one run: vLLM batched, transformers batched (KV cache,
left padding), transformers one prompt at a time. Prints tokens/s and ratios.

    python bench/inference_throughput.py runs/tiny/export --prompts 256 --max_new_tokens 32

Greedy decoding with a fixed token budget, so every engine generates comparable token counts; each side is timed
without model loading. Without vLLM installed, the vLLM row is left out.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", help="an exported folder (hfrecipes export)")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--single", type=int, default=32, help="prompts for the one-at-a-time side (it is slow)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from hfrecipes.inference import generate
    from hfrecipes.tiny import task
    from hfrecipes.vllm_support import vllm_available

    pairs = task.split_pairs()["heldout"]
    prompts = [[{"role": "user", "content": task.question(a, b)}] for a, b in pairs][: args.prompts]
    common = dict(max_new_tokens=args.max_new_tokens, record_stats=False)
    results = {}
    if vllm_available():
        _, results["vLLM batched"] = generate(args.model_dir, prompts, engine="vllm", **common)
    _, results["transformers batched"] = generate(
        args.model_dir, prompts, engine="transformers", batch_size=args.batch_size, **common
    )
    _, results["transformers one at a time"] = generate(
        args.model_dir, prompts[: args.single], engine="transformers", batch_size=1, **common
    )
    base = results["transformers one at a time"]["tokens_per_second"]
    print(
        f"model {args.model_dir}: {results['transformers batched']['params'] / 1e6:.2f}M parameters; "
        f"{args.prompts} prompts ({args.single} one at a time), up to {args.max_new_tokens} new tokens, greedy; "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"{'engine':<30}{'tokens':>10}{'seconds':>10}{'tokens/s':>12}{'vs one at a time':>18}")
    for name, s in results.items():
        print(
            f"{name:<30}{s['generated_tokens']:>10}{s['wall_seconds']:>10.2f}{s['tokens_per_second']:>12.0f}"
            f"{s['tokens_per_second'] / base:>17.1f}x"
        )
    hf = results["transformers batched"]["tokens_per_second"]
    line = f"summary: transformers batched {hf / base:.1f}x one-at-a-time"
    if "vLLM batched" in results:
        line += f"; vLLM batched {results['vLLM batched']['tokens_per_second'] / hf:.2f}x transformers batched"
    print(line)


if __name__ == "__main__":
    main()
