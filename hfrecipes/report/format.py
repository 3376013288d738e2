"""How a number reads, in the card, the lifecycle summary and `hfrecipes cost` alike: one formatter per kind of
number, each writing 'n/a' for a number not measured.

    hfrecipes cost --params 7e9 --tokens 2e12 --device h100   # format_plan
"""

from __future__ import annotations

from typing import Any

from hfrecipes.costs import DEVICES, overtake_day

PREFIXES = ((1e24, "Y"), (1e21, "Z"), (1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def _known(x: Any) -> bool:
    # None, or a field the record does not hold (Jinja's Undefined), is not a number; nor is a bool
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def si(x: float | None, unit: str = "") -> str:
    """3 significant digits and an SI prefix: 1.23 T, 456 kB."""
    if not _known(x):
        return "n/a"
    x = float(f"{x:.3g}")  # rounded first, so 999.96 reads 1 k, not 1e+03
    for factor, prefix in PREFIXES:
        if abs(x) >= factor:
            return f"{x / factor:.3g} {prefix}{unit}".rstrip()
    return f"{x:.3g} {unit}".rstrip()


def duration(seconds: float | None) -> str:
    if not _known(seconds):
        return "n/a"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def num(x: float | None, digits: int = 4) -> str:
    return f"{x:.{digits}g}" if _known(x) else "n/a"


def money(x: float | None) -> str:
    if not _known(x):
        return "n/a"
    return f"${x:,.0f}" if abs(x) >= 1000 else f"${x:.3g}"


def share(x: float | None) -> str:
    """A share as a percentage that never rounds a small share to 0% or a large one to 100%."""
    if not _known(x):
        return "n/a"
    if 0 < x < 0.001:
        return "<0.1%"
    if 0.999 < x < 1:
        return ">99.9%"
    return f"{100 * x:.3g}%"


def pct(x: float | None) -> str:
    """A fraction as a percentage with one decimal (accuracies)."""
    return f"{100 * x:.1f}%" if _known(x) else "n/a"


def seconds(x: float | None) -> str:
    """A latency: milliseconds under a second."""
    if not _known(x):
        return "n/a"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def ratio(x: float | None) -> str:
    return f"{x:.2f}x" if _known(x) else "n/a"


FORMATS = {  # the names the card and summary templates call
    "si": si,
    "duration": duration,
    "money": money,
    "num": num,
    "share": share,
    "pct": pct,
    "overtake_day": overtake_day,
}


# ---------------------------------------------------------------------------------------------- hfrecipes cost


def lifetime_lines(life: dict[str, Any] | None, indent: str = "  ") -> list[str]:
    """The lifetime cost in words: dollars a day, the day serving overtakes training, serving's share of a year."""
    if not life:
        return []
    days = life["overtakes_days"]
    when = "n/a" if days is None else f"day {overtake_day(days)}"
    return [
        f"{indent}serving a day        {money(life['daily_dollars'])} "
        f"({num(life['daily_input_tokens'], 3)} input + {num(life['daily_output_tokens'], 3)} output tokens)",
        f"{indent}overtakes training   {when}",
        f"{indent}after {life['days']} days       serving is {share(life['serving_share'])} of the whole cost "
        f"({money(life['serving_dollars'])} serving)",
    ]


def format_plan(p: dict[str, Any]) -> str:
    """`costs.plan`'s answer as `hfrecipes cost` prints it."""
    i, t, s, b = p["inputs"], p["training"], p["serving"], p["break_even"]
    r = s["output_input_price_ratio"]

    def n3(x):
        return num(x, 3)

    lines = [
        f"model {n3(i['params'])} parameters, {n3(i['tokens'])} training tokens, "
        f"{i['num_devices']} x {DEVICES[i['device']].label} at {i['mfu']:.0%} MFU, ${i['price_per_hour']:.2f}/h",
        "training",
        f"  FLOPs               {n3(t['flops'])}" + (" (6·N·D + attention)" if i["attention"] else " (6·N·D)"),
        f"  device-hours        {n3(t['device_hours'])}",
        f"  wall time           {n3(t['wall_hours'])} h ({n3(t['wall_hours'] / 24)} days)",
        f"  dollars             {money(t['dollars'])}",
        f"  energy              {n3(t['energy_kwh'])} kWh (PUE {i['pue']:g})",
        f"  CO2                 {n3(t['co2_kg'] / 1000)} t ({i['grid_gco2_per_kwh']:g} gCO2/kWh)",
        "serving",
        f"  FLOPs per token     {n3(s['flops_per_token'])} (2·N)",
        f"  input tokens/s      {n3(s['prefill_tokens_per_second'])} per device, prefill ({s['prefill_source']})",
        f"  output tokens/s     {n3(s['decode_tokens_per_second'])} per device, decode ({s['decode_source']})",
        f"  $ per 1M input      {money(s['dollars_per_million_input_tokens'])}",
        f"  $ per 1M output     {money(s['dollars_per_million_output_tokens'])}" + (f" ({r:.3g}x input)" if r else ""),
        "break-even (serving has cost more than training)",
        f"  after               {n3(b['tokens'])} generated tokens",
    ]
    if b["days"] is not None:
        lines.append(f"  days                {n3(b['days'])} at {n3(p['daily_tokens'])} generated tokens a day")
    if p.get("lifetime"):
        lines += ["lifetime (input and output tokens a day)", *lifetime_lines(p["lifetime"])]
    return "\n".join(lines)
