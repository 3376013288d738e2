"""The GPU measurements `bench/gpu.sh` runs, one part per subcommand, each printing its own lines (`--smoke` shrinks
every shape so the same code runs on a CPU in seconds).

    python bench/gpu_bench.py pretrain            # bf16 matmul rate; MFU of a ~125M Llama: SDPA, + Liger, + compile
    python bench/gpu_bench.py build DIR           # a ~125M Llama with the tiny tokenizer, saved to DIR (no downloads)
    python bench/gpu_bench.py grpo DIR [--vllm]   # GRPO seconds per step, transformers or vLLM (colocate) generation
    python bench/gpu_bench.py pretrain --smoke --device cpu

MFU counts 6*N FLOPs per trained token plus the attention's 12*layers*hidden*seq, over the card's nominal dense bf16
peak (H100/H200 SXM: 989 TFLOP/s) and over the matmul rate measured here. Models are built from configs with random
weights; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

NOMINAL_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
LLAMA_125M = dict(
    vocab_size=49152,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=12,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
LLAMA_SMOKE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: str, smoke: bool) -> float:
    import torch

    n, dtype = (512, torch.float32) if smoke else (8192, torch.bfloat16)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 5 if smoke else 50
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def nominal_peak(device: str) -> float | None:
    import torch

    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in NOMINAL_BF16.items() if k in name), None)


def pretrain_variant(variant: str, shape: dict, device: str, batch: int, seq: int, steps: int, warmup: int):
    """Tokens/s and peak memory of a plain bf16-autocast training loop (AdamW, clipping) on random tokens."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if "liger" in variant:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    config = AutoConfig.for_model("llama", **shape, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device)
    n = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device == "cuda")
    step_model = torch.compile(model) if "compile" in variant else model
    data = torch.randint(0, shape["vocab_size"], (steps, batch, seq), device=device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps):
        start = time.perf_counter()
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            loss = step_model(input_ids=data[i], labels=data[i]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    del model, step_model, opt
    if device == "cuda":
        torch.cuda.empty_cache()
    return batch * seq / statistics.median(times[warmup:]), peak, n


def cmd_pretrain(args) -> None:
    import importlib.util

    import torch

    shape = LLAMA_SMOKE if args.smoke else LLAMA_125M
    batch, seq = (4, 64) if args.smoke else (args.batch, args.seq)
    steps, warmup = (6, 2) if args.smoke else (args.steps, args.warmup)
    rate = matmul_rate(args.device, args.smoke)
    peak = nominal_peak(args.device)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {device_name}; torch {torch.__version__}")
    print(
        f"measured {'bf16' if not args.smoke else 'fp32'} matmul rate: {rate / 1e12:.3g} TFLOP/s"
        + (f" (nominal dense bf16 peak {peak / 1e12:.0f})" if peak else "")
    )
    variants = ["sdpa"]
    if importlib.util.find_spec("liger_kernel"):
        variants.append("sdpa+liger")
    else:
        print("skipped: Liger kernels (liger_kernel not installed)")
    # Liger patches the Llama classes for the rest of the process, so its variants come last
    variants.insert(1, "sdpa+compile")
    if "sdpa+liger" in variants:
        variants.append("sdpa+liger+compile")
    print(f"{'variant':<22}{'tokens/s':>12}{'MFU (nominal)':>15}{'MFU (measured mm)':>19}{'peak GiB':>10}")
    best = None
    for variant in variants:
        try:
            tps, mem, n = pretrain_variant(variant, shape, args.device, batch, seq, steps, warmup)
        except Exception as e:  # one variant failing (a kernel, the compiler) leaves the others
            print(f"{variant:<22} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            continue
        layers, hidden = shape["num_hidden_layers"], shape["hidden_size"]
        flops = (6 * n + 12 * layers * hidden * seq) * tps
        mfu = flops / peak if peak else float("nan")
        nominal = f"{mfu:.1%}" if peak else "n/a"
        print(f"{variant:<22}{tps:>12.0f}{nominal:>15}{flops / rate:>19.1%}{mem:>10.1f}")
        if best is None or tps > best[1]:
            best = (variant, tps, mfu, flops / rate)
    print(
        f"pretrain model: Llama {n / 1e6:.3g}M parameters, batch {batch} x {seq} tokens, bf16 autocast, AdamW; "
        f"{steps - warmup} timed steps after {warmup}"
    )
    if best:
        print(
            f"summary pretrain: best {best[0]} at {best[1]:.0f} tokens/s, MFU "
            f"{f'{best[2]:.1%}' if peak else 'n/a'} of the nominal peak, "
            f"{best[3]:.1%} of the measured matmul rate (target on an H100: >= 40%)"
        )


def cmd_build(args) -> None:
    """A random-weight Llama with the tiny tokenizer (chat template included), saved as a model folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from hfrecipes.tiny import corpus, task
    from hfrecipes.tiny.tokenizer import train_tokenizer

    texts = [d["text"] for d in corpus.documents(2000)] + [task.answer(a, b) for a, b in task.all_pairs()[:2000]]
    tok = train_tokenizer(texts, vocab_size=2048, model_max_length=2048)
    shape = dict(LLAMA_SMOKE if args.smoke else LLAMA_125M, vocab_size=len(tok))
    config = AutoConfig.for_model(
        "llama",
        **shape,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if args.device == "cuda" else torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(args.dir)
    tok.save_pretrained(args.dir)
    print(f"built {args.dir}: Llama {sum(p.numel() for p in model.parameters()) / 1e6:.3g}M parameters")


def cmd_grpo(args) -> None:
    """Seconds per GRPO step with transformers generation, or with vLLM in colocate mode (same process, same GPU)."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from hfrecipes.tiny import task

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "localhost")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", "29511")
    tok = AutoTokenizer.from_pretrained(args.dir)
    tok.padding_side = "left"
    pairs = task.split_pairs()["rl"]
    prompts = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": task.question(a, b)}]} for a, b in pairs[:512]]
    )

    def length_reward(completions, **kwargs):  # any cheap reward: the timing is what is measured
        return [float(len(c[0]["content"]) % 7) for c in completions]

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    gen = 8 if args.smoke else args.max_completion_length
    config = GRPOConfig(
        output_dir=f"{args.dir}/grpo-{'vllm' if args.vllm else 'hf'}",
        per_device_train_batch_size=16 if args.smoke else 64,
        num_generations=8,
        max_completion_length=gen,
        max_steps=3 if args.smoke else args.steps,
        learning_rate=1e-6,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=args.device == "cuda",
        use_cpu=args.device == "cpu",
        gradient_checkpointing=False,
        use_vllm=args.vllm,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.3,
    )
    trainer = GRPOTrainer(
        model=args.dir,
        reward_funcs=length_reward,
        args=config,
        train_dataset=prompts,
        processing_class=tok,
        callbacks=[Stamp()],
    )
    trainer.train()
    per_step = [b - a for a, b in itertools.pairwise(stamps[1:])] or [stamps[-1] - stamps[0]]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(
        f"grpo {'vLLM colocate' if args.vllm else 'transformers'}: {statistics.median(per_step):.3f} s/step "
        f"(median of {len(per_step)} steps after 2; {config.per_device_train_batch_size // 8} prompts x 8 replies of "
        f"{gen} tokens; {device_name})"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("pretrain", "build", "grpo"):
        s = sub.add_parser(name)
        s.add_argument("--smoke", action="store_true", help="tiny shapes, runs on a CPU in seconds")
        s.add_argument("--device", default=None)
        if name in ("build", "grpo"):
            s.add_argument("dir")
    sub.choices["pretrain"].add_argument("--batch", type=int, default=16)
    sub.choices["pretrain"].add_argument("--seq", type=int, default=2048)
    sub.choices["pretrain"].add_argument("--steps", type=int, default=16)
    sub.choices["pretrain"].add_argument("--warmup", type=int, default=6)
    sub.choices["grpo"].add_argument("--vllm", action="store_true")
    sub.choices["grpo"].add_argument("--steps", type=int, default=5)
    sub.choices["grpo"].add_argument("--max_completion_length", type=int, default=128)
    args = p.parse_args()
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    {"pretrain": cmd_pretrain, "build": cmd_build, "grpo": cmd_grpo}[args.cmd](args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
