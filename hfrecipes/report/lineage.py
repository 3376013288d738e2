"""The numbers of a model's lineage, computed once: one row per stage that trained its weights, their totals, and
what serving the model costs against them. The card, the lifecycle summary and `hfrecipes cost` read these; none
sums or prices on its own.

One rule for every summed key: a total is the sum of the rows that recorded the number, and `missing` names the rows
that did not, so a total never silently covers fewer rows for one key than for another.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple

from hfrecipes import record as records
from hfrecipes.costs import (
    DEFAULT_DAILY_INPUT_TOKENS,
    DEFAULT_DAILY_OUTPUT_TOKENS,
    DTYPE_BYTES,
    break_even,
    lifetime,
    serving,
)
from hfrecipes.record import Record

EXPORT = "export"  # the one record that trains nothing: it merges and writes a serving folder
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The compute block's summed fields by the names the card's front matter gives them (6·N·D is its `flops`).
COMPUTE_NAMES = {k: {"flops_6nd": "flops"}.get(k, k) for k in records.summed_fields(records.ComputeBlock)}
SUMMED = ("tokens", "steps", *COMPUTE_NAMES.values())


class Lineage(NamedTuple):
    """The stages' numbers, first to last; their totals; for each total the stages that did not record it."""

    stages: list[dict[str, Any]]
    total: dict[str, Any]
    missing: dict[str, list[str]]


def is_hub_id(name: str | None) -> bool:
    return bool(name) and bool(HUB_ID.match(name)) and not Path(name).expanduser().exists()


def trained(r: Record) -> Record:
    """The record of the stage that trained the weights: an export's parent, else the record itself."""
    return r.parent if r.stage == EXPORT and r.parent is not None else r


def training_lineage(r: Record) -> list[Record]:
    """The stages that trained this model, first to last (an export trains nothing and is not one of them; an export
    of a model with no record of its own training is its one entry)."""
    chain = r.lineage()
    return [x for x in chain if x.stage != EXPORT] or chain[-1:]


def _data_name(name: str) -> str:
    """A Hub id or bundled name as it is; a local file by its file name (its folder means nothing to a reader)."""
    return Path(name).name if Path(name).expanduser().exists() else name


def stage_numbers(r: Record) -> dict[str, Any]:
    """The numbers of one stage, as the record holds them (`estimate`: published figures and a priced estimate, not
    a run of ours)."""
    return {
        "stage": r.stage,
        "estimate": r.compute.estimate,
        "run_id": r.run_id,
        "data": ", ".join(_data_name(str(x["name"])) for x in r.data.datasets) or "n/a",
        "tokens": r.data.tokens_seen,
        "steps": r.metrics.steps,
        **{name: getattr(r.compute, key) for key, name in COMPUTE_NAMES.items()},
        "knowledge_cutoff": (r.data.knowledge_cutoff or {}).get("date"),
        **cutoff_change(r),
    }


def cutoff_change(r: Record) -> dict[str, Any]:
    """The model's cutoff after stage `r` and what `r` did to it: `set` (the lineage's first date), `moved` (its data
    is dated after the parent's cutoff), `inherited` (its data is undated or no newer), or None where no date is
    known. Read from the record's `moved_from` and `inherited_from`; a record written before those keys existed is
    told from its date against its parent's."""
    cutoff = r.data.model_cutoff or r.data.knowledge_cutoff or {}
    date = cutoff.get("date")
    if not date:
        return {"model_cutoff": None, "cutoff_change": None}
    if "inherited_from" in cutoff:
        change = "inherited"
    elif "moved_from" in cutoff:
        change = "moved"
    else:
        before = ((r.parent.data.model_cutoff if r.parent else None) or {}).get("date")
        change = "set" if not before else "moved" if date > before else "inherited"
    return {"model_cutoff": date, "cutoff_change": change}


def totals(
    rows: list[dict[str, Any]], keys: tuple[str, ...] = SUMMED, name: str = "stage"
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Each key's sum over the rows that recorded it (None where none did), and the rows (by `name`) that did not,
    for the keys some rows lack."""
    total, missing = {}, {}
    for key in keys:
        values = [row[key] for row in rows if row[key] is not None]
        total[key] = sum(values) if values else None
        lacking = [str(row[name]) for row in rows if row[key] is None]
        if values and lacking:
            missing[key] = lacking
    return total, missing


def lineage_numbers(r: Record) -> Lineage:
    """One entry per training stage from the first to this one, and their totals."""
    stages = [stage_numbers(x) for x in training_lineage(r)]
    return Lineage(stages, *totals(stages))


# --------------------------------------------------------------------------------------------------- serving


def weight_bytes(model: records.ModelBlock) -> float | None:
    """Bytes of the weights from the record's parameter count and dtype (2 bytes a parameter if it is not known)."""
    if not model.params_total:
        return None
    return model.params_total * DTYPE_BYTES.get(str(model.dtype or "").replace("torch.", ""), 2)


def kv_block(r: Record) -> dict[str, Any] | None:
    """The KV cache an inference run or the export measured from the model's config (`costs.kv_cache`)."""
    return (r.inference.kv_cache if r.inference else None) or (r.export.kv_cache if r.export else None)


def serving_cost(r: Record) -> dict[str, Any]:
    """What serving the model costs per input and per output token (`costs.serving`): the answer generation
    recorded with its measured rates, else priced from the record (the rates an older inference block holds, or an
    estimate on the device the last stage trained on)."""
    inference = r.inference
    if inference is not None and inference.serving:
        return inference.serving
    compute = trained(r).compute
    kv = kv_block(r) or {}
    measured = inference or records.InferenceBlock()
    return serving(
        r.model.params_total or 0,
        measured.device or compute.cost_device or compute.device,
        measured.tokens_per_second,
        measured.price_per_hour if measured.device else compute.price_per_hour,
        prefill_tokens_per_second=measured.prefill_tokens_per_second,
        decode_tokens_per_second=measured.decode_tokens_per_second,
        weight_bytes=kv.get("weight_bytes") or weight_bytes(r.model),
        kv_bytes_per_token=kv.get("bytes_per_token"),
        context=kv.get("context"),
    )


def serving_traffic(r: Record) -> tuple[float, float, str]:
    """Input and output tokens a day the lifetime cost is stated for, and where they come from: the record
    (`generate(daily_input_tokens=..., daily_output_tokens=...)`), else the default of `hfrecipes.costs`."""
    traffic = (r.inference.traffic if r.inference else None) or {}
    daily_in, daily_out = traffic.get("daily_input_tokens"), traffic.get("daily_output_tokens")
    if isinstance(daily_in, (int, float)) and isinstance(daily_out, (int, float)):
        return float(daily_in), float(daily_out), "the traffic recorded with this folder's inference run"
    return (
        DEFAULT_DAILY_INPUT_TOKENS,
        DEFAULT_DAILY_OUTPUT_TOKENS,
        "hfrecipes' default traffic, `DEFAULT_DAILY_INPUT_TOKENS` and `DEFAULT_DAILY_OUTPUT_TOKENS` in "
        "`hfrecipes/costs.py`; record your own with `hfrecipes.generate(..., daily_input_tokens=..., "
        "daily_output_tokens=...)`",
    )


class Serving(NamedTuple):
    """Serving against the lineage's training: the price per token, when serving has cost more than training (in
    output tokens, and in FLOPs), the lifetime cost at a stated traffic and where that traffic comes from."""

    cost: dict[str, Any]
    break_even: dict[str, float | None]
    flops_break_even: float | None
    lifetime: dict[str, float | None]
    traffic_source: str


def serving_numbers(r: Record, total: dict[str, Any]) -> Serving:
    serve = serving_cost(r)
    daily_in, daily_out, source = serving_traffic(r)
    dollars, flops = total["dollars"], total["flops"]
    return Serving(
        serve,
        break_even(dollars or 0.0, serve["dollars_per_million_output_tokens"]),
        flops / serve["flops_per_token"] if flops and r.model.params_total else None,
        lifetime(
            dollars,
            serve["dollars_per_million_input_tokens"],
            serve["dollars_per_million_output_tokens"],
            daily_in,
            daily_out,
        ),
        source,
    )
