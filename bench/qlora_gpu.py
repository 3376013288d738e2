"""Full fine-tuning vs LoRA vs QLoRA on one GPU: peak memory and step time, measured side by side in one run.

A ~0.5B Qwen2-shaped model is built from a config with random weights (no downloads), saved once as safetensors,
and trained for a few steps three ways on the same random batches: every weight (bf16 weights, AdamW), LoRA
(rank-16 adapters on every linear layer, bf16 base), and QLoRA (the same adapters on a 4-bit NF4 base with double
quantisation, bf16 compute). Gradient checkpointing is on in all three, so the comparison is of the weights,
gradients and optimizer state. Needs only torch, transformers, peft, accelerate and bitsandbytes. About 2-4 minutes
on an H100.

    python bench/qlora_gpu.py                       # prints a table and the ratios to full fine-tuning
    python bench/qlora_gpu.py --json out.json       # also writes the numbers
    python bench/qlora_gpu.py --tiny --device cpu   # a seconds-long smoke run of the same code on a CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

# Qwen2.5-0.5B's shape: 494M parameters, 136M of them in the (tied) embedding.
HALF_B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_checkpoint(folder: Path, shape: dict, seed: int) -> int:
    """Random weights from the config, saved as bf16 safetensors; returns the parameter count."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen2", **shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    del model
    return n


def load(folder: Path, mode: str, device: str, rank: int):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": torch.bfloat16}
    if mode == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": 0} if device == "cuda" else None
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if mode != "qlora":
        model.to(device)
    if mode == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode in ("lora", "qlora"):
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
        model = get_peft_model(model, config)
        if mode == "lora":
            model.enable_input_require_grads()
    model.config.use_cache = False
    return model


def measure(folder: Path, mode: str, args, batches: list[torch.Tensor]) -> dict:
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = load(folder, mode, args.device, args.rank)
    model.train()
    weights_gib = torch.cuda.memory_allocated() / 2**30 if cuda else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, fused=cuda)
    times, losses = [], []
    for step, ids in enumerate(batches):
        ids = ids.to(args.device)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss.item())
    out = {
        "mode": mode,
        "params_trainable": sum(p.numel() for p in trainable),
        "weights_gib": weights_gib,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "step_seconds_median": statistics.median(times),
        "tokens_per_second": args.batch_size * args.seq_len / statistics.median(times),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }
    del model, optimizer, trainable
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="a 2-layer toy model instead of the ~0.5B one (smoke run)")
    p.add_argument("--modes", default="full,lora,qlora", help="comma-separated: full, lora, qlora")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=12, help="steps per mode, warm-up included")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA GPU here; run with --device cpu (and --tiny) for a smoke run")
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    shape = TINY if args.tiny else HALF_B
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    generator = torch.Generator().manual_seed(args.seed)
    batches = [
        torch.randint(0, shape["vocab_size"], (args.batch_size, args.seq_len), generator=generator)
        for _ in range(args.steps)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        n_params = build_checkpoint(Path(tmp), shape, args.seed)
        print(f"model: qwen2 shape, {n_params / 1e6:.0f}M parameters; batch {args.batch_size} x {args.seq_len} tokens")
        results = [measure(Path(tmp), mode, args, batches) for mode in modes]

    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"\ndevice: {device}\n")
    print(f"{'mode':<6} {'trainable':>12} {'weights GiB':>12} {'peak GiB':>9} {'s/step':>8} {'tok/s':>9} {'loss':>15}")
    for r in results:
        w = f"{r['weights_gib']:.2f}" if r["weights_gib"] is not None else "n/a"
        pk = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
        loss = f"{r['first_loss']:.2f}->{r['last_loss']:.2f}"
        print(
            f"{r['mode']:<6} {r['params_trainable']:>12,} {w:>12} {pk:>9} {r['step_seconds_median']:>8.3f} "
            f"{r['tokens_per_second']:>9.0f} {loss:>15}"
        )
    base = next((r for r in results if r["mode"] == "full"), None)
    if base is not None:
        print("\nratios to full fine-tuning:")
        for r in results:
            if r is base:
                continue
            mem = f"peak memory x{r['peak_gib'] / base['peak_gib']:.2f}" if base["peak_gib"] else "peak memory n/a"
            print(f"  {r['mode']:<6} {mem}, step time x{r['step_seconds_median'] / base['step_seconds_median']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "params": n_params, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
