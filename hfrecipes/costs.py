"""What training and serving a model costs: FLOPs, device-hours, dollars, energy, CO2, and the break-even.

hfrecipes cost --params 7e9 --tokens 2e12 --device h100 --num-devices 64 --daily-tokens 1e9

Training FLOPs are 6·N·D (forward 2·N, backward 4·N per token; Kaplan et al. 2020, "Scaling Laws for Neural
Language Models", section 2.1), plus an optional attention term 6·n_layers·seq_len·d_model per token. Serving
costs 2·N FLOPs per generated token (plus 2·n_layers·context·d_model for attention). Device-hours follow from a
device's peak dense BF16 throughput and a utilisation (MFU); dollars from a price per device-hour; energy from
device power x hours x PUE; CO2 from energy x grid intensity, or codecarbon's measurement when it is installed.

Every default below is a planning figure, not a quote: override it in a recipe (`device_price_per_hour`,
`device_power_watts`, `pue`, `grid_gco2_per_kwh`, `cost_device`) or on the command line.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Any

from hfrecipes.errors import UsageError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Device:
    """One row of the device table. `peak_flops`: dense BF16/FP16 tensor throughput per device (vendor data
    sheets, without sparsity); `power_watts`: board power (TDP); `price_per_hour`: a typical on-demand cloud price
    per device-hour in USD (2025), a default to override."""

    label: str
    peak_flops: float
    power_watts: float
    price_per_hour: float
    pattern: str  # matched against torch's device name, e.g. "NVIDIA H100 80GB HBM3"


DEVICES: dict[str, Device] = {
    "b200": Device("NVIDIA B200", 2250e12, 1000, 6.00, r"\bb200\b"),
    "h200": Device("NVIDIA H200", 989e12, 700, 3.80, r"\bh200\b"),
    "h100": Device("NVIDIA H100 SXM", 989e12, 700, 3.00, r"\bh100\b"),
    "a100": Device("NVIDIA A100 80GB SXM", 312e12, 400, 1.80, r"\ba100\b"),
    "l40s": Device("NVIDIA L40S", 362e12, 350, 1.00, r"\bl40s\b"),
    "a10": Device("NVIDIA A10 / A10G", 125e12, 150, 0.75, r"\ba10g?\b"),
    "l4": Device("NVIDIA L4", 121e12, 72, 0.80, r"\bl4\b"),
    "v100": Device("NVIDIA V100", 125e12, 300, 1.00, r"\bv100\b"),
    "t4": Device("NVIDIA T4", 65e12, 70, 0.40, r"\bt4\b"),
    "mi300x": Device("AMD MI300X", 1307e12, 750, 2.50, r"\bmi300x?\b"),
    # A CPU "device" is one training process on a few cores of a cloud VM; peak is a rough AVX-512 figure.
    "cpu": Device("CPU (one process)", 1e12, 65, 0.10, r"^$"),
    "mps": Device("Apple silicon (MPS)", 14e12, 30, 0.00, r"\bmps\b"),
}

# Planning defaults. PUE 1.2: a modern cloud data centre (Uptime Institute's 2023 survey average is 1.58;
# hyperscalers report 1.1-1.2). 475 gCO2/kWh: the world average grid intensity (IEA, Global Energy & CO2
# Status Report 2019). MFU 0.4 for training: what well-tuned dense LLM training reaches (Llama 3 reports
# 38-43% on H100s). Serving at 0.2: batched decoding is memory-bound, so it reaches a smaller share of peak.
DEFAULT_PUE = 1.2
DEFAULT_GRID_GCO2_PER_KWH = 475.0
DEFAULT_MFU = 0.4
DEFAULT_SERVE_MFU = 0.2


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


def inference_flops_per_token(
    params: float, n_layers: int | None = None, context: int | None = None, d_model: int | None = None
) -> float:
    """2·N per generated token, plus 2·n_layers·context·d_model for attention over the context."""
    flops = 2.0 * params
    if n_layers and context and d_model:
        flops += 2.0 * n_layers * context * d_model
    return flops


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


def break_even(
    training_dollars: float, per_million: float | None, daily_tokens: float | None = None
) -> dict[str, float | None]:
    """After how many generated tokens (and days at `daily_tokens` a day) serving has cost more than training."""
    if not per_million:
        return {"tokens": None, "days": None}
    tokens = training_dollars / per_million * 1e6
    return {"tokens": tokens, "days": tokens / daily_tokens if daily_tokens else None}


# ------------------------------------------------------------------------------------------ stage records


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
) -> dict[str, Any]:
    """Dollars, energy, CO2 and MFU of a finished stage, for `record.compute_summary`."""
    p = prices(device, script_args)
    hours = wall_seconds / 3600.0 * device.get("count", 1)
    kwh = energy_kwh(hours, p["power_watts"], p["pue"]) if p["power_watts"] is not None else None
    if measured_co2_kg is not None:
        co2, co2_source = measured_co2_kg, "codecarbon"
    else:
        co2 = co2_kg(kwh, p["grid_gco2_per_kwh"]) if kwh is not None else None
        co2_source = "estimate: energy x grid intensity" if co2 is not None else "unknown"
    peak = p.pop("peak_flops")
    return {
        **p,
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
    serve_mfu: float = DEFAULT_SERVE_MFU,
) -> dict[str, Any]:
    """Serving cost per generated token: measured tokens/s where an inference run recorded it, else estimated."""
    key = device_key(device)
    row = DEVICES.get(key) if key else None
    price = price_per_hour if price_per_hour is not None else (row.price_per_hour if row else None)
    if tokens_per_second:
        source = "measured"
    elif row and params > 0:
        tokens_per_second = row.peak_flops * serve_mfu / inference_flops_per_token(params)
        source = f"estimated: {serve_mfu:.0%} of {row.label} peak / 2·N"
    else:
        source = "unknown device" if row is None else "unknown parameter count"
    per_million = dollars_per_million_tokens(price, tokens_per_second) if price is not None else None
    return {
        "flops_per_token": inference_flops_per_token(params),
        "device": key,
        "tokens_per_second": tokens_per_second,
        "tokens_per_second_source": source,
        "price_per_hour": price,
        "dollars_per_million_tokens": per_million,
    }


@contextlib.contextmanager
def measured_emissions(output_dir: str, enabled: bool = True):
    """Measure CO2 with codecarbon around a block when it is installed; `.kg` stays None otherwise.

    with cost.measured_emissions(output_dir) as co2:
        trainer.train()
    record.compute_summary(..., measured_co2_kg=co2.kg)
    """

    class Measurement:
        kg: float | None = None

    result = Measurement()
    tracker = None
    if enabled:
        try:
            from codecarbon import OfflineEmissionsTracker
        except ImportError:
            OfflineEmissionsTracker = None
        if OfflineEmissionsTracker is not None:
            try:
                tracker = OfflineEmissionsTracker(output_dir=str(output_dir), save_to_file=False, log_level="error")
                tracker.start()
            except Exception as e:  # a tracker that cannot read the hardware must not stop training
                logger.warning("codecarbon could not start (%s); CO2 will be estimated instead", e)
                tracker = None
    try:
        yield result
    finally:
        if tracker is not None:
            try:
                kg = tracker.stop()
                result.kg = float(kg) if kg is not None else None
            except Exception as e:
                logger.warning("codecarbon could not measure (%s); CO2 will be estimated instead", e)


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
    serve_mfu: float = DEFAULT_SERVE_MFU,
    serve_tokens_per_second: float | None = None,
    serve_price_per_hour: float | None = None,
    daily_tokens: float | None = None,
) -> dict[str, Any]:
    """A run before it happens: training FLOPs, device-hours, dollars, energy, CO2; serving cost and break-even."""
    if params <= 0 or tokens <= 0:
        raise UsageError(f"params and tokens must be positive, got {params:g} and {tokens:g}.")
    if num_devices < 1:
        raise UsageError(f"num_devices must be at least 1, got {num_devices}.")
    key = device_key(device)
    if key is None:
        raise UsageError(f"device '{device}' is not in the cost table; use one of {', '.join(DEVICES)}.")
    row = DEVICES[key]
    price = price_per_hour if price_per_hour is not None else row.price_per_hour
    power = power_watts if power_watts is not None else row.power_watts
    flops = training_flops(params, tokens, n_layers, seq_len, d_model)
    hours = device_hours_for(flops, row.peak_flops, mfu)
    kwh = energy_kwh(hours, power, pue)
    dollars = hours * price
    serve = serving(params, key, serve_tokens_per_second, serve_price_per_hour or price, serve_mfu)
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
        "break_even": break_even(dollars, serve["dollars_per_million_tokens"], daily_tokens),
        "daily_tokens": daily_tokens,
    }


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def format_dollars(x: float | None) -> str:
    if not isinstance(x, (int, float)):  # None, or a field the record does not hold (Jinja's Undefined)
        return "n/a"
    return f"${x:,.0f}" if abs(x) >= 1000 else f"${x:.3g}"


def format_plan(p: dict[str, Any]) -> str:
    i, t, s, b = p["inputs"], p["training"], p["serving"], p["break_even"]
    lines = [
        f"model {_num(i['params'])} parameters, {_num(i['tokens'])} training tokens, "
        f"{i['num_devices']} x {DEVICES[i['device']].label} at {i['mfu']:.0%} MFU, ${i['price_per_hour']:.2f}/h",
        "training",
        f"  FLOPs               {_num(t['flops'])}" + (" (6·N·D + attention)" if i["attention"] else " (6·N·D)"),
        f"  device-hours        {_num(t['device_hours'])}",
        f"  wall time           {_num(t['wall_hours'])} h ({_num(t['wall_hours'] / 24)} days)",
        f"  dollars             {format_dollars(t['dollars'])}",
        f"  energy              {_num(t['energy_kwh'])} kWh (PUE {i['pue']:g})",
        f"  CO2                 {_num(t['co2_kg'] / 1000)} t ({i['grid_gco2_per_kwh']:g} gCO2/kWh)",
        "serving",
        f"  FLOPs per token     {_num(s['flops_per_token'])} (2·N)",
        f"  tokens/s per device {_num(s['tokens_per_second'])} ({s['tokens_per_second_source']})",
        f"  $ per 1M tokens     {format_dollars(s['dollars_per_million_tokens'])}",
        "break-even (serving has cost more than training)",
        f"  after               {_num(b['tokens'])} generated tokens",
    ]
    if b["days"] is not None:
        lines.append(f"  days                {_num(b['days'])} at {_num(p['daily_tokens'])} generated tokens a day")
    return "\n".join(lines)
