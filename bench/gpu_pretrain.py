"""Part 1 of `bench/gpu.sh`: the pretrain stage against a hand-written PyTorch loop, same model, batch and precision,
in the same process: tokens/s of each and their ratio, first with the stage's default flags, then
`torch_compile=True`, then `use_liger_kernel=True`; MFU over the measured bf16 matmul rate and over the nominal peak.

    python bench/gpu_bench.py pretrain [--smoke]

The model is a SmolLM-like Llama initialised randomly by the stage (`model_init_config`: a config folder written
here), 123M parameters with a 49,152-token vocabulary, batch 16 x 2048 tokens. The text is random words of a
word-level tokenizer with exactly that vocabulary (the embedded tokenizer has 2,048 tokens, and the stage sizes the
vocabulary to its tokenizer); what the words say does not change a step's cost. The loop is what a careful user
writes: bf16 autocast, fused AdamW, SDPA attention, gradient clipping, the same random init, no data loading; with
the stage's switch it compiles the model (`torch.compile`) or applies Liger's kernels the way `Trainer` does.
MFU counts 6*N FLOPs per token (N: every parameter; the tied embedding is the LM head's matmul) plus the attention
scores' 12 * layers * hidden * sequence.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import NamedTuple

from bench.common import timed_steps
from bench.gpu_bench import (
    LLAMA_125M,
    LLAMA_SMOKE,
    cuda,
    free_memory,
    matmul_rate,
    missing,
    nominal_peak,
    quiet_stage,
    short,
    steady_of,
    sync,
    window_rate,
)

LR = 3e-4


class Setup(NamedTuple):
    work: Path
    data: Path
    tokenizer: Path
    config: Path
    vocab: int
    block: int
    batch: int
    steps: int  # per run, warm-up included
    skip: int  # warm-up steps left out of the rate
    compile_kwargs: dict
    flops_per_token: float


def prepare(work: Path, smoke: bool) -> Setup:
    """The tokenizer, the model config and the random-word text the stage and the loop share."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    shape = LLAMA_SMOKE if smoke else LLAMA_125M
    vocab, block, batch = shape["vocab_size"], (64 if smoke else 2048), (4 if smoke else 16)
    folder = work / "pretrain"
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    words = {tok: i for i, tok in enumerate(specials)} | {f"w{i}": i for i in range(len(specials), vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.model_max_length = block
    fast.save_pretrained(folder / "tokenizer")
    config = AutoConfig.for_model("llama", **shape)
    config.save_pretrained(folder / "config")
    # 25 steps of text: the trainer starts over where it runs out
    docs, per_doc = (40, 200) if smoke else (400, 2048)
    rng = random.Random(0)
    with (folder / "text.jsonl").open("w") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": " ".join(f"w{rng.randrange(len(specials), vocab)}" for _ in range(per_doc))}))
            f.write("\n")
    with torch.device("meta"):
        n = AutoModelForCausalLM.from_config(config).num_parameters()
    layers, hidden = shape["num_hidden_layers"], shape["hidden_size"]
    print(
        f"pretrain model: Llama {n / 1e6:.0f}M parameters ({layers} layers, hidden {hidden}, vocabulary {vocab}), "
        f"batch {batch} x {block} tokens"
    )
    return Setup(
        work=folder,
        data=folder / "text.jsonl",
        tokenizer=folder / "tokenizer",
        config=folder / "config",
        vocab=vocab,
        block=block,
        batch=batch,
        steps=8 if smoke else 60,
        skip=3 if smoke else 10,
        # a CPU smoke run traces with dynamo but skips inductor's C++ build, which takes minutes on two cores
        compile_kwargs={"backend": "eager"} if smoke else {},
        flops_per_token=6 * n + 12 * layers * hidden * block,
    )


def stage(setup: Setup, flags: dict, run: int) -> tuple[float, dict]:
    """Steady tokens/s of the pretrain stage with `flags` (the step timer's), and its record."""
    import hfrecipes

    if flags.get("torch_compile") and setup.compile_kwargs:
        flags = {**flags, "torch_compile_backend": setup.compile_kwargs["backend"]}
    with timed_steps(sync_steps={setup.skip, setup.steps}) as times:
        out = hfrecipes.pretrain(
            None,
            **quiet_stage(setup.work, f"stage-{run}"),
            dataset_name=str(setup.data),
            model_init_config=str(setup.config),
            tokenizer_name_or_path=str(setup.tokenizer),
            block_size=setup.block,
            per_device_train_batch_size=setup.batch,
            max_steps=setup.steps,
            learning_rate=LR,
            **flags,
        )
    rate = window_rate(times.stamps, setup.skip) * setup.batch * setup.block
    free_memory()
    return rate, out.record


def hand_loop(setup: Setup, compile_model: bool, liger: bool) -> float:
    """Steady tokens/s of a plain loop: forward under bf16 autocast (fp32 on a CPU), backward, clip, fused AdamW."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    device = "cuda" if cuda() else "cpu"
    config = AutoConfig.from_pretrained(setup.config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device)
    if liger:  # as Trainer applies it for use_liger_kernel
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(model, None)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=device == "cuda")
    forward = torch.compile(model, **setup.compile_kwargs) if compile_model else model
    batches = torch.randint(4, setup.vocab, (4, setup.batch, setup.block), device=device)
    start = time.perf_counter()
    for i in range(setup.steps):
        if i == setup.skip:
            sync()
            start = time.perf_counter()
        x = batches[i % len(batches)]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = forward(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    rate = (setup.steps - setup.skip) * setup.batch * setup.block / (time.perf_counter() - start)
    del model, forward, opt, batches
    free_memory()
    return rate


def pretrain(work: Path, smoke: bool, results) -> None:
    setup = prepare(work, smoke)
    rate, label = matmul_rate(smoke)
    peak = nominal_peak()
    results.emit(
        label,
        rate / 1e12,
        "TFLOP/s",
        baseline="nominal dense bf16 peak" if peak else None,
        baseline_value=peak / 1e12 if peak else None,
        ratio=rate / peak if peak else None,
    )
    # Liger patches the model classes for the rest of the process, so it comes last
    variants = [
        ("default flags", {}, "hand-written loop"),
        ("torch_compile=True", {"torch_compile": True}, "hand-written loop + torch.compile"),
        ("use_liger_kernel=True", {"use_liger_kernel": True}, "hand-written loop + Liger"),
    ]
    for run, (label, flags, loop) in enumerate(variants):
        if flags.get("use_liger_kernel") and (not cuda() or missing("liger_kernel")):
            why = "no CUDA device" if not cuda() else "liger_kernel not installed"
            print(f"skipped: pretrain stage with use_liger_kernel=True ({why})")
            continue
        try:
            stage_rate, record = stage(setup, flags, run)
        except Exception as e:  # a kernel or the compiler failing leaves the other variants
            print(f"pretrain stage, {label}: failed: {short(e)}")
            free_memory()
            continue
        try:
            hand_rate = hand_loop(setup, "torch_compile" in flags, "use_liger_kernel" in flags)
        except Exception as e:
            print(f"{loop}: failed: {short(e)}")
            free_memory()
            hand_rate = None
        said = steady_of(record)
        ratio = stage_rate / hand_rate if hand_rate else None
        details = dict(said, steps=setup.steps, warmup_steps=setup.skip, batch=setup.batch, block=setup.block)
        results.emit(
            f"pretrain stage, {label}: tokens/s",
            stage_rate,
            "tokens/s",
            baseline=loop,
            baseline_value=hand_rate,
            ratio=ratio,
            target=("ratio", ">=", 0.95) if not flags else None,
            **details,
        )
        flops = setup.flops_per_token
        # the 40% target is of the rate this GPU's matmuls reach here; the nominal peak is the data sheet's
        for over, label_over, target in (
            (rate, "the measured matmul rate", ("value", ">=", 0.40) if flags else None),
            (peak, "the nominal bf16 peak", None),
        ):
            if over:
                results.emit(
                    f"pretrain stage, {label}: MFU of {label_over}",
                    flops * stage_rate / over,
                    "fraction",
                    baseline=loop,
                    baseline_value=flops * hand_rate / over if hand_rate else None,
                    ratio=ratio,
                    target=target,
                )
        if said["record_steady_tokens_per_second"]:
            results.emit(
                f"pretrain stage, {label}: the record's compute.steady tokens/s",
                said["record_steady_tokens_per_second"],
                "tokens/s",
                baseline="this bench's step timer",
                baseline_value=stage_rate,
                ratio=said["record_steady_tokens_per_second"] / stage_rate,
                whole_run_tokens_per_second=said["record_tokens_per_second"],
                steady_mfu=said["record_steady_mfu"],
            )
        else:
            print(f"  the record has no compute.steady tokens/s (whole run: {said['record_tokens_per_second']})")
