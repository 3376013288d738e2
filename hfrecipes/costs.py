"""What training and serving a model costs: FLOPs, device-hours, dollars, energy, CO2, and the break-even.

hfrecipes cost --params 7e9 --tokens 2e12 --device h100 --num-devices 64 --daily-tokens 1e9

Training FLOPs are 6·N·D (forward 2·N, backward 4·N per token; Kaplan et al. 2020, "Scaling Laws for Neural
Language Models", section 2.1), plus an optional attention term 6·n_layers·seq_len·d_model per token; a distillation
adds its frozen teacher's forward passes over the same tokens, 2·N_teacher·D. Serving
costs 2·N FLOPs per token (plus 2·n_layers·context·d_model for attention). Device-hours follow from a device's
peak dense BF16 throughput and a utilisation (MFU); dollars from a price per device-hour; energy from device
power x hours x PUE; CO2 from energy x grid intensity, or codecarbon's measurement when it is installed (a
measurement that fails says so, with its reason, beside the estimate that replaces it).

Input and output tokens are priced apart. A prompt is read in one forward pass over all its tokens (prefill): many
tokens share each read of the weights, so it is compute-bound, and is estimated at the training MFU of peak over
2·N FLOPs per token. Every generated token is a forward pass of its own (decode): each step reads all the weights
and the KV cache of every sequence in the batch to make one token per sequence, so it is memory-bound, and is
estimated as batch x memory bandwidth / (weight bytes + batch x context x KV bytes per token), the batch being the
sequences whose KV cache fits beside the weights (capped at vLLM's default `max_num_seqs`) and never above the
compute bound. Simplifications: every sequence holds the full context; activations, the attention FLOPs and
kernel efficiency are left out; a model is spread over as many devices as it takes for its weights to fill at
most half of their memory (tensor parallel: the per-device rates are the same), the rest going to the cache.
The KV cache costs 2 (K and V) x layers x KV heads x head dim x dtype bytes per token of context.

Every default below is a planning figure, not a quote: override it in a recipe (`device_price_per_hour`,
`device_power_watts`, `pue`, `grid_gco2_per_kwh`, `cost_device`) or on the command line.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

from hfrecipes.errors import UsageError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Device:
    """One row of the device table. `peak_flops`: dense BF16/FP16 tensor throughput per device (vendor data
    sheets, without sparsity); `power_watts`: board power (TDP); `price_per_hour`: a typical on-demand cloud price
    per device-hour in USD (2025), a default to override; `memory_bytes` and `memory_bandwidth`: device memory and
    its peak bandwidth as the vendor's data sheet states them (decimal GB and TB/s)."""

    label: str
    peak_flops: float
    power_watts: float
    price_per_hour: float
    pattern: str  # matched against torch's device name, e.g. "NVIDIA H100 80GB HBM3"
    memory_bytes: float | None = None
    memory_bandwidth: float | None = None


# Memory and bandwidth: NVIDIA's data sheets (B200 as in HGX/DGX B200: 180 GB HBM3e at 8 TB/s; H200 141 GB at
# 4.8 TB/s; H100 SXM 80 GB HBM3 at 3.35 TB/s; A100 80GB SXM 2,039 GB/s; L40S 48 GB at 864 GB/s; A10 24 GB at
# 600 GB/s; L4 24 GB at 300 GB/s; V100 SXM2 16 GB at 900 GB/s; T4 16 GB at 320 GB/s), AMD's MI300X data sheet
# (192 GB HBM3 at 5.3 TB/s). CPU and Apple silicon memory is whatever the host has; their bandwidths are rough
# figures (a process on a few DDR channels; a base M-series chip), to override with a measurement.
DEVICES: dict[str, Device] = {
    "b200": Device("NVIDIA B200", 2250e12, 1000, 6.00, r"\bb200\b", 180e9, 8.0e12),
    "h200": Device("NVIDIA H200", 989e12, 700, 3.80, r"\bh200\b", 141e9, 4.8e12),
    "h100": Device("NVIDIA H100 SXM", 989e12, 700, 3.00, r"\bh100\b", 80e9, 3.35e12),
    "a100": Device("NVIDIA A100 80GB SXM", 312e12, 400, 1.80, r"\ba100\b", 80e9, 2.039e12),
    "l40s": Device("NVIDIA L40S", 362e12, 350, 1.00, r"\bl40s\b", 48e9, 864e9),
    "a10": Device("NVIDIA A10 / A10G", 125e12, 150, 0.75, r"\ba10g?\b", 24e9, 600e9),
    "l4": Device("NVIDIA L4", 121e12, 72, 0.80, r"\bl4\b", 24e9, 300e9),
    "v100": Device("NVIDIA V100", 125e12, 300, 1.00, r"\bv100\b", 16e9, 900e9),
    "t4": Device("NVIDIA T4", 65e12, 70, 0.40, r"\bt4\b", 16e9, 320e9),
    "mi300x": Device("AMD MI300X", 1307e12, 750, 2.50, r"\bmi300x?\b", 192e9, 5.3e12),
    # A CPU "device" is one training process on a few cores of a cloud VM; peak is a rough AVX-512 figure.
    "cpu": Device("CPU (one process)", 1e12, 65, 0.10, r"^$", None, 50e9),
    "mps": Device("Apple silicon (MPS)", 14e12, 30, 0.00, r"\bmps\b", None, 100e9),
}

# Planning defaults. PUE 1.2: a modern cloud data centre (Uptime Institute's 2023 survey average is 1.58;
# hyperscalers report 1.1-1.2). 475 gCO2/kWh: the world average grid intensity (IEA, Global Energy & CO2
# Status Report 2019). MFU 0.4 for training: what well-tuned dense LLM training reaches (Llama 3 reports
# 38-43% on H100s); prefill is dense matmuls over many tokens too, so serving estimates use the same share.
DEFAULT_PUE = 1.2
DEFAULT_GRID_GCO2_PER_KWH = 475.0
DEFAULT_MFU = 0.4
# vLLM 0.32's defaults (`CacheConfig.gpu_memory_utilization`; `EngineArgs` sets `max_num_seqs` to 1024 on GPUs
# of 70 GiB or more other than the A100, else 256): the share of device memory it takes for weights and KV cache,
# and the most sequences it decodes in one step.
SERVE_MEMORY_UTILIZATION = 0.92
# Decoding batch when the KV cache per token is not known (the planner given only a parameter count): a planning
# figure, well under what fits for 7-70B models at a 4k context on 80 GB devices; its KV reads are left out.
DEFAULT_DECODE_BATCH = 32
DEFAULT_CONTEXT = 4096
# The device whose memory the KV-cache fit is stated for when the serving device's memory is not in the table.
REFERENCE_DEVICE = "h100"
# Traffic the card states the lifetime cost for unless the record holds one (`generate(daily_input_tokens=...,
# daily_output_tokens=...)`): a modest assistant, some 5,000 conversations a day of 2,000 prompt and 400 reply
# tokens.
DEFAULT_DAILY_INPUT_TOKENS = 1e7
DEFAULT_DAILY_OUTPUT_TOKENS = 2e6
DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float8_e4m3fn": 1, "fp8": 1}


def device_key(device: dict[str, Any] | str | None) -> str | None:
    """The table key for a recorded device (`{"kind", "name"}`) or a name the user typed; None if unknown."""
    if device is None:
        return None
    if isinstance(device, str):
        key = device.strip().lower()
        if key in DEVICES:
            return key
        name, kind = key, None
    else:
        name, kind = str(device.get("name") or "").lower(), device.get("kind")
        if kind in ("cpu", "mps"):
            return kind
    for key, dev in DEVICES.items():
        if re.search(dev.pattern, name):
            return key
    return kind if kind in DEVICES else None


# ------------------------------------------------------------------------------------------------ formulas


def training_flops(
    params: float,
    tokens: float,
    n_layers: int | None = None,
    seq_len: int | None = None,
    d_model: int | None = None,
) -> float:
    """6·N·D, plus 6·n_layers·seq_len·d_model·D for attention scores when the shape is given."""
    flops = 6.0 * params * tokens
    if n_layers and seq_len and d_model:
        flops += 6.0 * n_layers * seq_len * d_model * tokens
    return flops


def teacher_forward_flops(params: float, tokens: float) -> float:
    """A distillation teacher's share of a stage's FLOPs: one forward pass, 2·N per token, over the D tokens the
    student trained on (frozen, so no backward)."""
    return inference_flops_per_token(params) * tokens


def inference_flops_per_token(
    params: float, n_layers: int | None = None, context: int | None = None, d_model: int | None = None
) -> float:
    """2·N per generated token, plus 2·n_layers·context·d_model for attention over the context."""
    flops = 2.0 * params
    if n_layers and context and d_model:
        flops += 2.0 * n_layers * context * d_model
    return flops


def device_hours(wall_seconds: float, count: int = 1) -> float:
    """Device-hours a run took: its wall time on every device it held."""
    return wall_seconds / 3600.0 * count


def device_hours_for(flops: float, peak_flops: float, mfu: float) -> float:
    if peak_flops <= 0 or mfu <= 0:
        raise UsageError(f"peak FLOP/s and MFU must be positive, got {peak_flops} and {mfu}.")
    return flops / (peak_flops * mfu) / 3600.0


def energy_kwh(device_hours: float, power_watts: float, pue: float) -> float:
    return device_hours * power_watts / 1000.0 * pue


def co2_kg(kwh: float, grid_gco2_per_kwh: float) -> float:
    return kwh * grid_gco2_per_kwh / 1000.0


def dollars_per_million_tokens(price_per_hour: float, tokens_per_second: float) -> float | None:
    if not tokens_per_second or tokens_per_second <= 0:
        return None
    return price_per_hour / (tokens_per_second * 3600.0) * 1e6


def traffic_dollars(input_tokens: float, output_tokens: float, input_per_million, output_per_million) -> float | None:
    """What serving `input_tokens` prompt tokens and `output_tokens` generated tokens costs at per-million prices;
    None where a price is unknown for tokens that were served."""
    prices = ((input_tokens, input_per_million), (output_tokens, output_per_million))
    if any(price is None for tokens, price in prices if tokens):
        return None
    return sum(tokens / 1e6 * price for tokens, price in prices if tokens)


def break_even(
    training_dollars: float, per_million: float | None, daily_tokens: float | None = None
) -> dict[str, float | None]:
    """After how many generated tokens (and days at `daily_tokens` a day) serving has cost more than training."""
    if not per_million:
        return {"tokens": None, "days": None}
    tokens = training_dollars / per_million * 1e6
    return {"tokens": tokens, "days": tokens / daily_tokens if daily_tokens else None}


def distillation_payback(
    cost_dollars: float | None, teacher: dict[str, Any], student: dict[str, Any]
) -> dict[str, float | None]:
    """When a distilled student has paid for its making: both models served by the same engine on the same prompts
    (`teacher`, `student`: `prompts`, `input_tokens`, `generated_tokens` and the measured dollars per million input
    and output tokens). A request is priced at the traffic measured (its mean prompt and reply lengths, each model's
    own); the break-even is the requests (and tokens) after which the saving per request has covered
    `cost_dollars`, None where the student saves nothing or a price is unknown."""

    def per_request(m: dict[str, Any]) -> float | None:
        prices = (m.get("dollars_per_million_input_tokens"), m.get("dollars_per_million_output_tokens"))
        if None in prices or not m.get("prompts"):
            return None
        return traffic_dollars(m["input_tokens"], m["generated_tokens"], *prices) / m["prompts"]

    t, s = per_request(teacher), per_request(student)
    saving = t - s if t is not None and s is not None else None
    out: dict[str, float | None] = {
        "teacher_dollars_per_request": t,
        "student_dollars_per_request": s,
        "saving_per_request": saving,
        "saving_share": saving / t if saving is not None and t else None,
        "cost_dollars": cost_dollars,
        "requests": None,
        "tokens": None,
    }
    if saving is None or saving <= 0 or cost_dollars is None:
        return out
    out["requests"] = cost_dollars / saving
    tokens_per_request = (student["input_tokens"] + student["generated_tokens"]) / student["prompts"]
    out["tokens"] = out["requests"] * tokens_per_request
    return out


def lifetime(
    training_dollars: float | None,
    input_per_million: float | None,
    output_per_million: float | None,
    daily_input_tokens: float,
    daily_output_tokens: float,
    days: int = 365,
) -> dict[str, float | None]:
    """Serving at a stated traffic against the training that made the model: dollars a day, the day serving's
    running total passes the training cost (`overtakes_days`, fractional: serving passes it during day
    ceil(overtakes_days)), and serving's share of training plus `days` of serving."""
    daily = traffic_dollars(daily_input_tokens, daily_output_tokens, input_per_million, output_per_million)
    out: dict[str, float | None] = {
        "daily_input_tokens": daily_input_tokens,
        "daily_output_tokens": daily_output_tokens,
        "daily_dollars": daily,
        "days": days,
        "overtakes_days": None,
        "serving_dollars": None,
        "serving_share": None,
    }
    if daily is None or training_dollars is None:
        return out
    out["serving_dollars"] = daily * days
    out["overtakes_days"] = training_dollars / daily if daily > 0 else None
    whole = training_dollars + daily * days
    out["serving_share"] = daily * days / whole if whole > 0 else None
    return out


# ----------------------------------------------------------------------------------------------- KV cache


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype_bytes: float) -> float:
    """2 (K and V) x layers x KV heads x head dim x bytes: the cache one token of context holds."""
    return 2.0 * n_layers * n_kv_heads * head_dim * dtype_bytes


def kv_shape(config: dict[str, Any]) -> dict[str, int] | None:
    """Layers, attention heads, KV heads and head dim from a transformers `config.json` (as a dict); None when the
    config does not say. GQA/MQA configs name fewer KV heads (`num_key_value_heads`, Falcon's `multi_query`) than
    query heads; `head_dim` is given (Gemma, Qwen3) or hidden size / heads. Tied embeddings change the weights, not
    the cache. Sliding-window layers and latent (MLA) caches are counted as full attention: an upper bound."""
    cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config

    def first(*names):
        return next((cfg[n] for n in names if isinstance(cfg.get(n), int) and cfg[n] > 0), None)

    layers = first("num_hidden_layers", "n_layer", "num_layers")
    heads = first("num_attention_heads", "n_head")
    hidden = first("hidden_size", "n_embd", "d_model")
    if not layers or not heads:
        return None
    kv_heads = first("num_key_value_heads", "num_kv_heads", "n_head_kv") or (1 if cfg.get("multi_query") else heads)
    head_dim = first("head_dim") or (hidden // heads if hidden else None)
    if not head_dim:
        return None
    return {"n_layers": layers, "n_heads": heads, "n_kv_heads": kv_heads, "head_dim": head_dim}


def concurrent_sequences(
    memory_bytes: float, weight_bytes: float, bytes_per_token: float, context: int, devices: int = 1
) -> int:
    """Sequences of `context` tokens whose KV cache fits in the share of `devices` devices' memory a serving engine
    takes (`SERVE_MEMORY_UTILIZATION`), after the weights; activations are left out."""
    free = devices * memory_bytes * SERVE_MEMORY_UTILIZATION - weight_bytes
    return max(0, math.floor(free / (context * bytes_per_token))) if bytes_per_token > 0 and context > 0 else 0


def kv_cache(
    config: dict[str, Any],
    weight_bytes: float,
    device: dict[str, Any] | str | None,
    context: int | None = None,
    dtype: str | None = None,
) -> dict[str, Any] | None:
    """The KV cache of a model: bytes per token, and how many sequences of `context` tokens (default 4096, capped
    at the model's `max_position_embeddings`) fit in one device's memory after the weights. The device is the
    serving device when the table knows its memory, else `REFERENCE_DEVICE`. The cache holds the model's dtype
    (vLLM's `kv_cache_dtype="auto"`)."""
    shape = kv_shape(config)
    if shape is None:
        return None
    cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    dtype = str(dtype or cfg.get("dtype") or cfg.get("torch_dtype") or config.get("dtype") or "float32")
    dtype = dtype.replace("torch.", "")
    size = DTYPE_BYTES.get(dtype, 2)
    per_token = kv_bytes_per_token(shape["n_layers"], shape["n_kv_heads"], shape["head_dim"], size)
    longest = cfg.get("max_position_embeddings")
    context = int(context or (min(DEFAULT_CONTEXT, longest) if isinstance(longest, int) else DEFAULT_CONTEXT))
    key = device_key(device)
    if key is None or DEVICES[key].memory_bytes is None:
        key, where = REFERENCE_DEVICE, "a reference device: the serving device's memory is not in the table"
    else:
        where = "the serving device"
    row = DEVICES[key]
    return {
        **shape,
        "dtype": dtype,
        "dtype_bytes": size,
        "bytes_per_token": per_token,
        "context": context,
        "bytes_per_sequence": per_token * context,
        "weight_bytes": weight_bytes,
        "device": key,
        "device_label": row.label,
        "device_source": where,
        "device_memory_bytes": row.memory_bytes,
        "memory_utilization": SERVE_MEMORY_UTILIZATION,
        "concurrent_sequences": concurrent_sequences(row.memory_bytes, weight_bytes, per_token, context),
    }


def max_decode_batch(row: Device) -> int:
    """vLLM's default `max_num_seqs` for a device (see `SERVE_MEMORY_UTILIZATION`)."""
    big = row.memory_bytes is not None and row.memory_bytes >= 70 * 2**30 and "A100" not in row.label
    return 1024 if big else 256


def decode_estimate(
    params: float,
    row: Device,
    weight_bytes: float,
    kv_bytes: float | None = None,
    context: int | None = None,
    mfu: float = DEFAULT_MFU,
) -> tuple[float | None, int | None, str]:
    """Generated tokens/s per device, memory-bound: batch x bandwidth / bytes read per step, never above the
    compute bound (mfu x peak / 2·N). Returns (tokens/s, batch, how it was estimated)."""
    if not row.memory_bandwidth or params <= 0 or weight_bytes <= 0:
        return None, None, "unknown memory bandwidth" if params > 0 else "unknown parameter count"
    compute = row.peak_flops * mfu / inference_flops_per_token(params)
    bandwidth = f"{row.memory_bandwidth / 1e12:.3g} TB/s"
    if kv_bytes and row.memory_bytes:
        context = context or DEFAULT_CONTEXT
        devices = math.ceil(2 * weight_bytes / (row.memory_bytes * SERVE_MEMORY_UTILIZATION))
        fit = concurrent_sequences(row.memory_bytes, weight_bytes, kv_bytes, context, devices)
        batch = max(1, min(fit, max_decode_batch(row)))
        step = weight_bytes + batch * context * kv_bytes
        how = f"{batch} sequences of {context} tokens a step, weights + KV cache over {bandwidth}"
    else:
        batch = DEFAULT_DECODE_BATCH
        step = weight_bytes + (batch * (context or DEFAULT_CONTEXT) * kv_bytes if kv_bytes else 0.0)
        what = "weights + KV cache" if kv_bytes else "weights only"
        how = f"{batch} sequences a step, {what} over {bandwidth}"
    memory = batch * row.memory_bandwidth / step
    if compute < memory:
        return compute, batch, f"estimated: compute-bound, {mfu:.0%} of {row.label} peak / 2·N"
    return memory, batch, f"estimated: memory-bound, {how}"


# ------------------------------------------------------------------------------------------ stage records


def published_training(params: float, tokens: float, device: str = REFERENCE_DEVICE, mfu: float = DEFAULT_MFU):
    """A pretraining we did not run, priced from its published size: 6·N·D on `device` at `mfu` of peak, with the
    table's price and power and the default PUE and grid intensity (a converted base's record). Every figure is an
    estimate; the keys are a stage record's compute block's."""
    row = DEVICES[device]
    flops = training_flops(params, tokens)
    hours = device_hours_for(flops, row.peak_flops, mfu)
    kwh = energy_kwh(hours, row.power_watts, DEFAULT_PUE)
    return {
        "estimate": True,
        "flops_6nd": flops,
        "device_hours": hours,
        "cost_device": device,
        "price_per_hour": row.price_per_hour,
        "price_source": f"hfrecipes' cost table, {row.label} at {mfu:.0%} MFU, an estimate",
        "dollars": hours * row.price_per_hour,
        "power_watts": row.power_watts,
        "pue": DEFAULT_PUE,
        "energy_kwh": kwh,
        "grid_gco2_per_kwh": DEFAULT_GRID_GCO2_PER_KWH,
        "co2_kg": co2_kg(kwh, DEFAULT_GRID_GCO2_PER_KWH),
        "co2_source": "estimate: energy x grid intensity",
    }


def prices(device: dict[str, Any], script_args: Any = None) -> dict[str, Any]:
    """Price, power, PUE and grid intensity for a recorded device: the recipe's values, else the table's."""

    def override(name):
        return getattr(script_args, name, None) if script_args is not None else None

    key = device_key(override("cost_device") or device)
    row = DEVICES.get(key) if key else None
    price, power = override("device_price_per_hour"), override("device_power_watts")
    return {
        "cost_device": key,
        "price_per_hour": price if price is not None else (row.price_per_hour if row else None),
        "price_source": "recipe" if price is not None else (f"default for {key}" if row else "unknown device"),
        "power_watts": power if power is not None else (row.power_watts if row else None),
        "peak_flops": row.peak_flops if row else None,
        "pue": override("pue") or DEFAULT_PUE,
        "grid_gco2_per_kwh": override("grid_gco2_per_kwh") or DEFAULT_GRID_GCO2_PER_KWH,
    }


def stage_costs(
    flops: float,
    wall_seconds: float,
    device: dict[str, Any],
    script_args: Any = None,
    measured_co2_kg: float | None = None,
    co2_failure: str | None = None,
) -> dict[str, Any]:
    """Dollars, energy, CO2 and MFU of a finished stage, for `record.compute_summary`. `measured_co2_kg` and
    `co2_failure` are a `Measurement`'s `kg` and `failure` (`measured_emissions`)."""
    p = prices(device, script_args)
    hours = device_hours(wall_seconds, device.get("count", 1))
    kwh = energy_kwh(hours, p["power_watts"], p["pue"]) if p["power_watts"] is not None else None
    if measured_co2_kg is not None:
        co2, co2_source = measured_co2_kg, "codecarbon"
    else:
        co2 = co2_kg(kwh, p["grid_gco2_per_kwh"]) if kwh is not None else None
        co2_source = "estimate: energy x grid intensity" if co2 is not None else "unknown"
        if co2_failure:
            co2_source += f", as the measurement failed ({co2_failure})"
    peak = p.pop("peak_flops")
    return {
        **p,
        "device_hours": hours,
        "dollars": hours * p["price_per_hour"] if p["price_per_hour"] is not None else None,
        "energy_kwh": kwh,
        "co2_kg": co2,
        "co2_source": co2_source,
        "mfu": flops / (hours * 3600.0 * peak) if peak and hours > 0 else None,
    }


def serving(
    params: float,
    device: dict[str, Any] | str | None,
    tokens_per_second: float | None = None,
    price_per_hour: float | None = None,
    serve_mfu: float = DEFAULT_MFU,
    prefill_tokens_per_second: float | None = None,
    decode_tokens_per_second: float | None = None,
    weight_bytes: float | None = None,
    kv_bytes_per_token: float | None = None,
    context: int | None = None,
) -> dict[str, Any]:
    """Serving cost per input (prompt) token and per output (generated) token: measured rates where an inference
    run recorded them, else estimated (prefill compute-bound at `serve_mfu` of peak, decode memory-bound; see the
    module docstring). `tokens_per_second` is an older record's one rate, generated tokens over the whole run: it
    stands for the decode rate when no decode rate was measured. `weight_bytes` defaults to 2 bytes a parameter.
    The `tokens_per_second`, `tokens_per_second_source` and `dollars_per_million_tokens` keys are the output side."""
    key = device_key(device)
    row = DEVICES.get(key) if key else None
    price = price_per_hour if price_per_hour is not None else (row.price_per_hour if row else None)
    unknown = "unknown device" if row is None else "unknown parameter count"
    batch = None
    if prefill_tokens_per_second:
        prefill, prefill_source = prefill_tokens_per_second, "measured"
    elif row and params > 0:
        prefill = row.peak_flops * serve_mfu / inference_flops_per_token(params)
        prefill_source = f"estimated: compute-bound, {serve_mfu:.0%} of {row.label} peak / 2·N"
    else:
        prefill, prefill_source = None, unknown
    if decode_tokens_per_second or tokens_per_second:
        decode, decode_source = decode_tokens_per_second or tokens_per_second, "measured"
    elif row and params > 0:
        decode, batch, decode_source = decode_estimate(
            params, row, weight_bytes or 2.0 * params, kv_bytes_per_token, context, serve_mfu
        )
    else:
        decode, decode_source = None, unknown
    same_kind = (prefill_source == "measured") == (decode_source == "measured")
    per_input = dollars_per_million_tokens(price, prefill) if price is not None else None
    per_output = dollars_per_million_tokens(price, decode) if price is not None else None
    return {
        "flops_per_token": inference_flops_per_token(params),
        "device": key,
        "price_per_hour": price,
        "prefill_tokens_per_second": prefill,
        "prefill_source": prefill_source,
        "decode_tokens_per_second": decode,
        "decode_source": decode_source,
        "decode_batch": batch,
        "dollars_per_million_input_tokens": per_input,
        "dollars_per_million_output_tokens": per_output,
        # a measured rate against an estimated one says more about the estimate than about serving
        "output_input_price_ratio": prefill / decode if prefill and decode and same_kind else None,
        "tokens_per_second": decode,
        "tokens_per_second_source": decode_source,
        "dollars_per_million_tokens": per_output,
    }


@dataclass
class Measurement:
    """What `measured_emissions` measured: `kg` of CO2, or None; `failure` says why codecarbon, though installed,
    gave no figure (None where it measured, or where it is not installed and the estimate is all there is)."""

    kg: float | None = None
    failure: str | None = None

    def failed(self, what: str, error: BaseException | None = None) -> None:
        self.kg = None
        self.failure = f"codecarbon {what}" + (f": {type(error).__name__}: {error}" if error is not None else "")
        logger.warning("%s; the record's CO2 is estimated from energy x grid intensity instead", self.failure)


@contextlib.contextmanager
def measured_emissions(output_dir: str, enabled: bool = True):
    """Measure CO2 with codecarbon around a block when it is installed; `.kg` stays None otherwise. A tracker that
    cannot start or stop does not stop training: it logs a warning and leaves its reason in `.failure`, which the
    record's `co2_source` repeats beside the estimate.

    with cost.measured_emissions(output_dir) as co2:
        trainer.train()
    record.compute_summary(..., measured_co2_kg=co2.kg, co2_failure=co2.failure)

    codecarbon's offline tracker reads no network: the grid intensity comes from its bundled data, for the
    country named by its own settings (`CODECARBON_COUNTRY_ISO_CODE`, `.codecarbon.config`), else the world's.
    """
    result = Measurement()
    tracker = None
    if enabled:
        try:
            from codecarbon import OfflineEmissionsTracker
        except ImportError:
            OfflineEmissionsTracker = None
        if OfflineEmissionsTracker is not None:
            # codecarbon logs its start-up notes before it applies log_level
            logging.getLogger("codecarbon").setLevel(logging.ERROR)
            options = {"output_dir": str(output_dir), "log_level": "error"}
            try:
                try:  # no emissions file: `output_methods` where codecarbon has it (it deprecates `save_to_file`)
                    tracker = OfflineEmissionsTracker(**options, output_methods=[])
                except TypeError:
                    tracker = OfflineEmissionsTracker(**options, save_to_file=False)
                tracker.start()
            except Exception as e:  # a tracker that cannot read the hardware must not stop training
                result.failed("could not start", e)
                tracker = None
    try:
        yield result
    finally:
        if tracker is not None:
            try:
                kg = tracker.stop()
            except Exception as e:
                result.failed("could not measure", e)
            else:
                if isinstance(kg, (int, float)) and math.isfinite(kg) and kg >= 0:
                    result.kg = float(kg)
                else:
                    result.failed(f"measured no figure (it gave {kg!r})")


# ------------------------------------------------------------------------------------------------ planner


def plan(
    params: float,
    tokens: float,
    device: str = "h100",
    num_devices: int = 1,
    mfu: float = DEFAULT_MFU,
    price_per_hour: float | None = None,
    power_watts: float | None = None,
    pue: float = DEFAULT_PUE,
    grid_gco2_per_kwh: float = DEFAULT_GRID_GCO2_PER_KWH,
    n_layers: int | None = None,
    seq_len: int | None = None,
    d_model: int | None = None,
    serve_mfu: float | None = None,
    serve_tokens_per_second: float | None = None,
    serve_prefill_tokens_per_second: float | None = None,
    serve_price_per_hour: float | None = None,
    daily_tokens: float | None = None,
    daily_input_tokens: float | None = None,
    daily_output_tokens: float | None = None,
    kv_bytes_per_token: float | None = None,
    context: int | None = None,
    weight_bytes: float | None = None,
) -> dict[str, Any]:
    """A run before it happens: training FLOPs, device-hours, dollars, energy, CO2; serving cost per input and per
    output token, the break-even and, given a daily traffic, the lifetime cost.

    `daily_tokens` is generated (output) tokens a day, the same as `daily_output_tokens`. `serve_tokens_per_second`
    is a measured decode rate, `serve_prefill_tokens_per_second` a measured prefill rate; `serve_mfu` (default: `mfu`)
    is the share of peak prefill reaches. `kv_bytes_per_token` (and `context`) let the decode estimate size its batch
    by the KV cache that fits; `weight_bytes` defaults to 2 bytes a parameter (BF16)."""
    if params <= 0 or tokens <= 0:
        raise UsageError(f"params and tokens must be positive, got {params:g} and {tokens:g}.")
    if num_devices < 1:
        raise UsageError(f"num_devices must be at least 1, got {num_devices}.")
    key = device_key(device)
    if key is None:
        raise UsageError(f"device '{device}' is not in the cost table; use one of {', '.join(DEVICES)}.")
    if daily_tokens is not None and daily_output_tokens is not None and daily_tokens != daily_output_tokens:
        raise UsageError(
            f"--daily-tokens ({daily_tokens:g}) and --daily-output-tokens ({daily_output_tokens:g}) both give "
            "generated tokens a day and disagree; pass one of them."
        )
    daily_output = daily_output_tokens if daily_output_tokens is not None else daily_tokens
    for name, value, least in (
        ("daily_input_tokens", daily_input_tokens, 0),
        ("daily_output_tokens", daily_output, 0),
        ("kv_bytes_per_token", kv_bytes_per_token, None),
        ("context", context, None),
        ("weight_bytes", weight_bytes, None),
    ):
        if value is not None and (value < 0 if least == 0 else value <= 0):
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{name} ({flag}) must be {'zero or more' if least == 0 else 'positive'}, got {value:g}.")
    row = DEVICES[key]
    price = price_per_hour if price_per_hour is not None else row.price_per_hour
    power = power_watts if power_watts is not None else row.power_watts
    flops = training_flops(params, tokens, n_layers, seq_len, d_model)
    hours = device_hours_for(flops, row.peak_flops, mfu)
    kwh = energy_kwh(hours, power, pue)
    dollars = hours * price
    serve = serving(
        params,
        key,
        price_per_hour=serve_price_per_hour or price,
        serve_mfu=serve_mfu or mfu,
        prefill_tokens_per_second=serve_prefill_tokens_per_second,
        decode_tokens_per_second=serve_tokens_per_second,
        weight_bytes=weight_bytes,
        kv_bytes_per_token=kv_bytes_per_token,
        context=context,
    )
    traffic = daily_input_tokens is not None or daily_output is not None
    return {
        "inputs": {
            "params": params,
            "tokens": tokens,
            "device": key,
            "num_devices": num_devices,
            "mfu": mfu,
            "price_per_hour": price,
            "power_watts": power,
            "pue": pue,
            "grid_gco2_per_kwh": grid_gco2_per_kwh,
            "attention": {"n_layers": n_layers, "seq_len": seq_len, "d_model": d_model} if n_layers else None,
        },
        "training": {
            "flops": flops,
            "flops_6nd": 6.0 * params * tokens,
            "device_hours": hours,
            "wall_hours": hours / num_devices,
            "dollars": dollars,
            "energy_kwh": kwh,
            "co2_kg": co2_kg(kwh, grid_gco2_per_kwh),
        },
        "serving": serve,
        "break_even": break_even(dollars, serve["dollars_per_million_output_tokens"], daily_output),
        "daily_tokens": daily_output,
        "daily_input_tokens": daily_input_tokens,
        "lifetime": lifetime(
            dollars,
            serve["dollars_per_million_input_tokens"],
            serve["dollars_per_million_output_tokens"],
            daily_input_tokens or 0.0,
            daily_output or 0.0,
        )
        if traffic
        else None,
    }


def overtake_day(days: float) -> int:
    """The day (counting from 1) during which serving's running total passes the training cost."""
    return max(1, math.ceil(days))
