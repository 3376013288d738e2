"""Pretraining throughput: the hfrecipes pretrain stage against a hand-written PyTorch loop, same model, data and
batch, in the same run; and model FLOP utilisation against this machine's measured fp32 matmul rate.

    python bench/pretrain_throughput.py --steps 60 --threads 1

Both sides train the tiny Llama from the same initial weights on the same packed blocks with AdamW; the stage's
time is `Trainer.train()` (its record's wall time), the loop's is its own steps. Runs alternate (loop, stage, loop,
stage, ...) and the medians are compared, so a noisy neighbour hits both.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from bench.common import matmul_rate


def hand_loop(blocks, config, steps: int, batch: int, lr: float, seed: int) -> float:
    """Tokens/s of a plain PyTorch loop: forward, loss on every position, backward, clip, AdamW, zero_grad."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    data = torch.tensor(blocks[: steps * batch])
    start = time.perf_counter()
    for i in range(steps):
        x = data[i * batch : (i + 1) * batch]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batch * data.shape[1] / (time.perf_counter() - start)


def stage_run(steps: int, batch: int, lr: float, seed: int, workdir: str, i: int) -> tuple[float, dict]:
    import hfrecipes

    out = hfrecipes.pretrain(
        "tiny/pretrain",
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        seed=seed,
        output_dir=f"{workdir}/stage{i}",
        save_strategy="no",
        logging_steps=max(steps // 4, 1),
        dataset_test_split="",
        warmup_steps=0,
    )
    return out.record["compute"]["tokens_per_second"], out.record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import datasets

    from hfrecipes.data import tiny_rows
    from hfrecipes.modeling import config_from, load_tokenizer
    from hfrecipes.stages.pretrain import pack

    lr, seed = 2e-3, 42
    with tempfile.TemporaryDirectory() as tmp:
        # one stage run first: it trains the tokenizer the hand loop then reuses, and warms caches
        _, rec = stage_run(5, args.batch, lr, seed, tmp, 0)
        tok = load_tokenizer(f"{tmp}/stage0")
        config = config_from("tiny", None, tok)
        corpus = datasets.Dataset.from_list(tiny_rows("corpus", "train"))
        blocks = pack(corpus, tok, "text", 128)["input_ids"]
        loop, stage, rates = [], [], []
        for i in range(args.repeats):
            loop.append(hand_loop(blocks, config, args.steps, args.batch, lr, seed))
            tps, rec = stage_run(args.steps, args.batch, lr, seed, tmp, i + 1)
            stage.append(tps)
            rates.append(matmul_rate())
    # other processes only ever slow a measurement down, so the machine's rate is the best one seen
    rate = max(rates)
    n = rec["model"]["params_total"]
    loop_tps, stage_tps = statistics.median(loop), statistics.median(stage)
    print(
        f"model: tiny Llama, {n / 1e6:.2f}M parameters; batch {args.batch} x 128 tokens; {args.steps} steps; "
        f"torch threads {args.threads}; device {rec['compute']['device']['name']}"
    )
    print(f"{'side':<22}{'tokens/s (median)':>20}{'runs':>40}")
    print(f"{'hand-written loop':<22}{loop_tps:>20.0f}{str([round(x) for x in loop]):>40}")
    print(f"{'hfrecipes pretrain':<22}{stage_tps:>20.0f}{str([round(x) for x in stage]):>40}")
    print(f"measured fp32 matmul rate: {rate / 1e9:.1f} GFLOP/s")
    for name, tps in (("hand-written loop", loop_tps), ("hfrecipes pretrain", stage_tps)):
        print(f"MFU {name}: {6 * n * tps / rate:.1%} (6*N*tokens/s over the matmul rate)")
    print(
        f"summary: hfrecipes pretrain runs at {stage_tps / loop_tps:.2f}x the hand-written loop's tokens/s "
        f"(goal: >= 0.90)"
    )


if __name__ == "__main__":
    main()
