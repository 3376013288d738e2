"""Part 4 of `bench/gpu.sh`: full fine-tuning vs LoRA vs QLoRA at 7B, where the weights dominate the memory: peak
memory and steady step time of each, one after the other in one process.

    python bench/gpu_bench.py memory [--smoke]

The model has Llama-2-7B's shape (6.7B parameters, 32,000-token vocabulary) with random bf16 weights, built on the
GPU (a CPU initialisation of 7B takes minutes); QLoRA's NF4 base (double quantisation, bf16 compute) is quantised
there from those weights by bitsandbytes, layer by layer, so nothing is written to disk. Batch 4 x 256 tokens,
gradient checkpointing on in all three, the plain next-token loss. Full fine-tuning keeps bf16 weights, gradients
and AdamW state (8 bytes a parameter; mixed precision with fp32 master weights would need 16); LoRA and QLoRA train
rank-16 adapters on every linear layer of the blocks. Peak memory is `torch.cuda.max_memory_allocated` over the
training steps, counted from the built model (the bf16 weights QLoRA quantises from are gone by then). Where full
fine-tuning does not fit the GPU, the run says so and compares LoRA with QLoRA.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.gpu_bench import LLAMA_SMOKE, cuda, free_memory, missing, short, sync

LLAMA_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16


def build(shape: dict):
    """Random bf16 weights, created where they will train."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda" if cuda() else "cpu"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **shape), dtype=torch.bfloat16)


def quantize_4bit(model) -> None:
    """Replace every targeted linear layer by bitsandbytes' NF4 layer, quantising its weights where they are."""
    import bitsandbytes as bnb
    import torch

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not (isinstance(child, torch.nn.Linear) and name in LORA_TARGETS):
                continue
            layer = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=torch.bfloat16,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            weight = bnb.nn.Params4bit(
                child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=layer
            )
            layer.weight = weight.to(child.weight.device)  # a Params4bit quantises itself when moved to a device
            if child.bias is not None:
                layer.bias = child.bias
            setattr(parent, name, layer)
    model.is_loaded_in_4bit = True  # PEFT then wraps the layers with its 4-bit LoRA layers


def measure(mode: str, shape: dict, batch: int, seq: int, steps: int, skip: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    model = build(shape)
    if mode == "qlora":
        quantize_4bit(model)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode != "full":
        lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=LORA_TARGETS)
        model = get_peft_model(model, lora)
    model.train()
    free_memory()
    if cuda():
        torch.cuda.reset_peak_memory_stats()
    weights = torch.cuda.memory_allocated() / 2**30 if cuda() else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5, fused=cuda())
    device = "cuda" if cuda() else "cpu"
    batches = torch.randint(0, shape["vocab_size"], (2, batch, seq), device=device)
    losses, start = [], time.perf_counter()
    for i in range(steps):
        if i == skip:
            sync()
            start = time.perf_counter()
        x = batches[i % len(batches)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    sync()
    seconds = (time.perf_counter() - start) / (steps - skip)
    out = {
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda() else None,
        "weights_gib": weights,
        "seconds_per_step": seconds,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "first_loss": float(losses[0]),
        "last_loss": float(losses[-1]),
    }
    del model, opt, trainable, batches, losses
    free_memory()
    return out


def memory(work: Path, smoke: bool, results) -> None:
    import torch

    shape, size = (LLAMA_SMOKE, "tiny Llama") if smoke else (LLAMA_7B, "7B Llama")
    batch, seq, steps, skip = (2, 32, 3, 1) if smoke else (4, 256, 6, 2)
    modes = {"full": "full fine-tuning", "lora": f"LoRA r{RANK}", "qlora": f"QLoRA r{RANK} (NF4)"}
    if not cuda() or missing("bitsandbytes"):
        why = "no CUDA device" if not cuda() else "bitsandbytes not installed"
        print(f"skipped: QLoRA ({why}: bitsandbytes' 4-bit layers are measured on a CUDA GPU)")
        del modes["qlora"]
    print(f"{size}: batch {batch} x {seq} tokens, gradient checkpointing, {steps} steps ({skip} warm-up) each")
    found = {}
    for mode, label in modes.items():
        try:
            found[mode] = measure(mode, shape, batch, seq, steps, skip)
        except torch.OutOfMemoryError:
            total = torch.cuda.get_device_properties(0).total_memory / 2**30
            print(f"{size} {label}: does not fit in this GPU's {total:.0f} GiB")
        except Exception as e:
            print(f"{size} {label}: failed: {short(e)}")
        free_memory()  # here, not in the handler, whose traceback still holds a failed run's tensors
    base_mode = "full" if "full" in found else "lora"
    base = found.get(base_mode)
    if base_mode != "full" and base:
        print("no full fine-tuning measured: LoRA is the baseline of QLoRA's memory and step time")
    for mode, got in found.items():
        against = base if mode != base_mode else None
        details = {k: v for k, v in got.items() if k not in ("peak_gib", "seconds_per_step")}
        for key, what, unit in (
            ("peak_gib", "peak memory", "GiB"),
            ("seconds_per_step", "seconds per step", "s/step"),
        ):
            name = f"{size} {modes[mode]}: {what}"
            if got[key] is None:
                print(f"{name}: not measured (no CUDA device)")
                continue
            # memory: the share of the baseline's; time: the baseline's step time over this one's (speed)
            ratio = None
            if against is not None:
                ratio = against[key] / got[key] if unit == "s/step" else got[key] / against[key]
            results.emit(
                name,
                got[key],
                unit,
                baseline=modes[base_mode] if against else None,
                baseline_value=against[key] if against else None,
                ratio=ratio,
                target=("ratio", "<=", 0.40)
                if key == "peak_gib" and mode == "qlora" and base_mode == "full"
                else None,
                **details,
            )
