"""The KV cache, measured: greedy decoding with the cache against decoding without it (`use_cache=False`, every
step recomputes attention over the whole sequence), side by side in one run, and the bytes the cache holds per
token against 2 x layers x KV heads x head dim x dtype bytes from the model's config.

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/kv_cache.py                    # tiny model pretrained here (~1 min)
    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/kv_cache.py runs/tiny/export   # any stage or export folder

Both sides decode the same left-padded batch of tiny-task prompts for exactly `--max_new_tokens` tokens
(`min_new_tokens` holds EOS back), greedy, timed without model loading; the sides alternate for `--trials` trials
and the median of each is taken. Without the cache a step costs a forward over the prompt and everything generated
so far, so the gap grows with the number of tokens generated; each length in `--lengths` is one row.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from bench.common import median


def decode_seconds(model, input_ids, mask, new_tokens: int, use_cache: bool, pad: int):
    """Wall seconds and generated ids of one greedy decode of exactly `new_tokens` tokens."""
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=pad,
        )
    return time.perf_counter() - start, out[:, input_ids.shape[1] :]


def measured_bytes_per_token(model, input_ids, mask) -> float:
    """Bytes of the cache a forward over the batch leaves, per token position held (padding positions included:
    the cache holds them too)."""
    import torch

    from hfrecipes.inference import cache_bytes

    with torch.no_grad():
        cache = model(input_ids=input_ids, attention_mask=mask, use_cache=True).past_key_values
    return cache_bytes(cache) / input_ids.numel()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", nargs="?", help="a stage or export folder; default: pretrain the tiny model here")
    p.add_argument("--prompts", type=int, default=8, help="prompts in the batch")
    p.add_argument("--lengths", default="32,128", help="tokens generated, one row each (comma-separated)")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--pretrain_steps", type=int, default=80, help="steps of the tiny model when no folder is given")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model_dir
    scratch = tempfile.TemporaryDirectory(prefix="kv_cache-")  # the tiny model pretrained here, removed at exit
    if model_dir is None:
        import hfrecipes

        work = scratch.name
        quiet = dict(save_strategy="no", report_to="none", dataset_test_split="", logging_steps=args.pretrain_steps)
        model_dir = str(
            hfrecipes.pretrain(
                "tiny/pretrain", max_steps=args.pretrain_steps, output_dir=f"{work}/pretrain", **quiet
            ).output_dir
        )

    from hfrecipes.inference import kv_cache_of, left_padded, prompt_ids
    from hfrecipes.record import device_info
    from hfrecipes.tiny import task

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    pairs = task.split_pairs()["heldout"][: args.prompts]
    ids = prompt_ids(tok, [[{"role": "user", "content": task.question(a, b)}] for a, b in pairs])
    input_ids, mask = left_padded(ids, pad)
    lengths = [int(x) for x in args.lengths.split(",")]
    longest = model.config.max_position_embeddings
    if input_ids.shape[1] + max(lengths) > longest:
        p.error(f"prompt ({input_ids.shape[1]}) + {max(lengths)} new tokens exceed the model's {longest} positions")

    kv = kv_cache_of(model_dir, device_info(1))
    formula = kv["bytes_per_token"] if kv else float("nan")
    measured = measured_bytes_per_token(model, input_ids, mask)
    decode_seconds(model, input_ids, mask, 4, True, pad)  # warm-up
    decode_seconds(model, input_ids, mask, 4, False, pad)

    print(
        f"model {model_dir}: {sum(x.numel() for x in model.parameters()) / 1e6:.2f}M parameters, "
        f"{model.config.num_hidden_layers} layers, {kv['n_kv_heads'] if kv else '?'} KV heads of "
        f"{model.config.num_attention_heads}, head dim {kv['head_dim'] if kv else '?'}, {model.dtype}; "
        f"batch {input_ids.shape[0]} x {input_ids.shape[1]} prompt tokens; greedy; {args.trials} trials, sides "
        f"alternating; torch threads {torch.get_num_threads()}"
    )
    print(f"KV cache per token: {measured:,.0f} B measured in the cache, {formula:,.0f} B by the formula")
    print(f"{'new tokens':>10}{'cache s':>10}{'no cache s':>12}{'cache tok/s':>13}{'no cache tok/s':>16}"
          f"{'speed-up':>10}{'same tokens':>13}")  # fmt: skip
    ratios = []
    for n in lengths:
        times: dict[bool, list[float]] = {True: [], False: []}
        outs = {}
        for _ in range(args.trials):
            for use_cache in (True, False):
                seconds, outs[use_cache] = decode_seconds(model, input_ids, mask, n, use_cache, pad)
                times[use_cache].append(seconds)
        cached, uncached = median(times[True]), median(times[False])
        tokens = input_ids.shape[0] * n
        same = sum(bool(torch.equal(a, b)) for a, b in zip(outs[True], outs[False], strict=True))
        ratios.append((n, uncached / cached))
        print(
            f"{n:>10}{cached:>10.3f}{uncached:>12.3f}{tokens / cached:>13.0f}{tokens / uncached:>16.0f}"
            f"{uncached / cached:>9.2f}x{same:>7}/{input_ids.shape[0]}"
        )
    speedups = ", ".join(f"{r:.2f}x at {n} new tokens" for n, r in ratios)
    print(f"summary: decoding with the KV cache {speedups} faster than without; cache {measured:,.0f} B/token "
          f"measured, {formula:,.0f} B by 2 x layers x KV heads x head dim x bytes")  # fmt: skip


if __name__ == "__main__":
    main()
