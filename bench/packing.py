"""Packing: effective (non-padding) tokens/s of the SFT stage with padded batches, TRL's `bfd` packing (padding-free,
exact) and `wrapped` packing, on conversations of mixed lengths, in the same run; and the loss of padded and packed
layouts on the same examples, token by token.

    python bench/packing.py                         # mixed-length multi-turn data, ~2-3 min on one CPU core
    python bench/packing.py --data tiny             # the bundled tiny SFT conversations as they are (short, uniform)

Mixed-length data: the tiny SFT conversations (one question, one answer, ~20 tokens) joined into multi-turn
conversations of 1 to `--max_turns` turns (uniform), so lengths spread from ~20 to ~`--max_length` tokens. Every side
trains the same tiny pretrained model with the assistant-only loss from `recipes/tiny/sft.yaml`. Padded batches hold
`--batch` conversations, drawn at random or grouped by length (transformers' `train_sampling_strategy:
group_by_length` sorts each window of 50 batches by length, so a batch pads little: exact too, it only changes which
examples share a batch); packed batches hold `--packed_rows` rows of `--max_length` tokens. Effective tokens are the
tokens that are not padding, as TRL counts them (`num_tokens`), over the steps after the first `--skip`, divided by
those steps' time; 50 timed steps cover one whole window of the length-grouped sampler (its first batches are its
longest). With `--repeats` above 1 the sides alternate.

Exactness: the same examples go through the same model padded (one row each, attention mask) and padding-free (one
row, positions restarting at every example: what `bfd` feeds the model); the per-token log-probabilities of every
trained token are compared. The `wrapped` layout (examples back to back, one causal attention over all of them) is
shown for contrast: it is not exact.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile

from bench.common import median, parents, timed_steps

SIDES = {
    "padded": dict(packing=False),
    "padded, length-grouped": dict(packing=False, train_sampling_strategy="group_by_length"),
    "bfd (padding-free)": dict(packing=True, packing_strategy="bfd"),
    "wrapped": dict(packing=True, packing_strategy="wrapped"),
}


def mixed_conversations(n: int, max_turns: int, seed: int) -> list[dict]:
    from hfrecipes.data import tiny_rows

    rows = tiny_rows("sft", "train")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        turns = rng.randint(1, max_turns)
        out.append({"messages": [m for r in rng.sample(rows, turns) for m in r["messages"]]})
    return out


def stage_side(side: str, parent: str, data: str, args, workdir: str, i: int):
    import hfrecipes

    batch = args.packed_rows if side.split()[0] in ("bfd", "wrapped") else args.batch
    out = f"{workdir}/{side.split()[0].strip(',')}{len(side)}_{i}"
    with timed_steps() as times:
        hfrecipes.sft(
            "tiny/sft",
            model_name_or_path=parent,
            dataset_name=data,
            dataset_test_split="",
            max_length=args.max_length,
            per_device_train_batch_size=batch,
            max_steps=args.steps,
            warmup_steps=0,
            output_dir=out,
            logging_steps=args.skip,
            save_strategy="no",
            report_to="none",
            **SIDES[side],
        )
    # TRL logs `num_tokens`, the tokens trained on that are not padding (attention mask, or the packed length);
    # logged every `skip` steps, so the tokens of the timed steps (after the first `skip`) are known exactly
    logs = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    seen = {row["step"]: row["num_tokens"] for row in logs if "num_tokens" in row}
    tokens = seen[args.steps] - seen[args.skip]
    seconds = times.stamps[args.steps - 1] - times.stamps[args.skip - 1]
    return seconds / (args.steps - args.skip), tokens / (args.steps - args.skip)


def exactness(parent: str, rows: list[dict], max_length: int) -> dict[str, float]:
    """Max |difference| of per-token log-probs (trained tokens only), padded vs padding-free and vs wrapped."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from hfrecipes.modeling import load_tokenizer

    tok = load_tokenizer(parent)
    model = AutoModelForCausalLM.from_pretrained(parent).eval()
    examples = []
    for r in rows:
        enc = tok.apply_chat_template(
            r["messages"], return_dict=True, return_assistant_tokens_mask=True, tokenize=True
        )
        ids = enc["input_ids"][:max_length]
        mask = enc["assistant_masks"][:max_length]
        examples.append({"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask, strict=True)]})

    def logps(batch):
        with torch.no_grad():
            logits = model(**batch, use_cache=False).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        lp = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0)[..., None]).squeeze(-1)
        return lp[labels != -100]

    padded = logps(DataCollatorForLanguageModeling(tok.pad_token_id)(examples))
    free = DataCollatorForLanguageModeling(tok.pad_token_id, padding_free=True)(examples)
    packed = logps({k: free[k] for k in ("input_ids", "labels", "position_ids")})
    wrapped_pos = torch.arange(free["input_ids"].shape[1])[None]
    wrapped = logps({"input_ids": free["input_ids"], "labels": free["labels"], "position_ids": wrapped_pos})
    return {
        "tokens": int(padded.numel()),
        "loss_padded": float(-padded.mean()),
        "loss_packed": float(-packed.mean()),
        "loss_wrapped": float(-wrapped.mean()),
        "max_abs_logp_packed": float((padded - packed).abs().max()),
        "max_abs_logp_wrapped": float((padded - wrapped).abs().max()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=["mixed", "tiny"], default="mixed")
    p.add_argument("--max_turns", type=int, default=10)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="conversations per padded batch")
    p.add_argument("--packed_rows", type=int, default=4, help="rows of max_length tokens per packed batch")
    p.add_argument("--steps", type=int, default=55)
    p.add_argument("--skip", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |log-prob difference| counted as exact")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    results = {side: ([], []) for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        pre, _ = parents(tmp)
        if args.data == "mixed":
            rows = mixed_conversations(2000, args.max_turns, seed=0)
            data = f"{tmp}/mixed.jsonl"
            with open(data, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        else:
            from hfrecipes.data import tiny_rows

            rows, data = tiny_rows("sft", "train"), "tiny:sft"
        for i in range(args.repeats):
            for side in SIDES:
                step, tokens = stage_side(side, pre, data, args, tmp, i)
                results[side][0].append(step)
                results[side][1].append(tokens)
        exact = exactness(pre, rows[:16], args.max_length)

    print(
        f"SFT of the tiny Llama on {'mixed-length multi-turn' if args.data == 'mixed' else 'the tiny'} "
        f"conversations; max_length {args.max_length}; padded batch {args.batch} conversations, packed batch "
        f"{args.packed_rows} rows; {args.steps} steps (first {args.skip} skipped) x {args.repeats} alternating runs; "
        f"torch threads {args.threads}"
    )
    print(f"{'side':<22}{'s/step':>10}{'real tokens/step':>18}{'effective tok/s':>17}{'vs padded':>11}")
    rate = {}
    for side, (steps, tokens) in results.items():
        rate[side] = median(tokens) / median(steps)
        print(
            f"{side:<22}{median(steps):>10.3f}{median(tokens):>18.0f}{rate[side]:>17.0f}"
            f"{rate[side] / rate['padded']:>10.2f}x"
        )
    print(
        f"same {exact['tokens']} trained tokens of 16 conversations, one model: "
        f"loss padded {exact['loss_padded']:.6f}, "
        f"padding-free {exact['loss_packed']:.6f} (max |d log p| {exact['max_abs_logp_packed']:.1e}), wrapped "
        f"{exact['loss_wrapped']:.6f} (max |d log p| {exact['max_abs_logp_wrapped']:.1e})"
    )
    ok = exact["max_abs_logp_packed"] <= args.tolerance
    gain = {side: rate[side] / rate["padded"] for side in rate}
    print(
        f"summary: effective tokens/s over padded batches: length-grouped {gain['padded, length-grouped']:.2f}x "
        f"(exact), bfd padding-free {gain['bfd (padding-free)']:.2f}x ("
        + (f"exact: max |d log p| {exact['max_abs_logp_packed']:.1e}" if ok else "NOT exact")
        + f"), wrapped {gain['wrapped']:.2f}x (not exact: {exact['max_abs_logp_wrapped']:.1e}); goal >= 1.5x"
    )


if __name__ == "__main__":
    main()
