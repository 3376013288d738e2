"""The model card: `cards/<template>.md` (Jinja) + the stage record, rendered through huggingface_hub's ModelCard.

Every number in the card comes from `record.json` and its parents; nothing is typed in by hand. A stage writes
its card with `write_card(folder, record)` after `record.write_record`, and its trainer subclass takes `OwnsCard`
first in its bases so Transformers and TRL never write their own README.md over it:

    class SFTTrainer(card.OwnsCard, trl.SFTTrainer): ...

An inference run that measured throughput adds `record["inference"] = {"prefill_tokens_per_second": ...,
"decode_tokens_per_second": ..., "device": {...}, "kv_cache": {...}}` to the folder's record; the card then shows
measured serving cost per input and per output token instead of an estimate. A `serving` block (the throughput
curve `bench/serving.py` measures against vLLM's server) adds its table, and `serving.png` where the folder holds it.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

from hfrecipes import record as records
from hfrecipes.costs import (
    DEFAULT_DAILY_INPUT_TOKENS,
    DEFAULT_DAILY_OUTPUT_TOKENS,
    DTYPE_BYTES,
    break_even,
    format_share,
    lifetime,
    overtake_day,
    serving,
)
from hfrecipes.costs import format_dollars as _money
from hfrecipes.recipe import _resource_dir
from hfrecipes.record import Record

PIPELINE_TAGS = {"reward": "text-classification"}
AUTO_CLASSES = {"reward": "AutoModelForSequenceClassification"}
TRAINING_TYPES = {"pretrain": "pre-training"}
EXPORT = "export"  # the one record that trains nothing: it merges and writes a serving folder
SERVING_PLOT = "serving.png"  # the throughput curve `bench/serving.py` measures and draws
GOLD_PLOT = "gold.png"  # the gold check's history (`hfrecipes.gold`): proxy reward and gold accuracy by step
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class OwnsCard:
    """Trainer mixin: README.md is ours, written from the stage record, never Transformers' or TRL's template.

    TRL calls `create_model_card` on every checkpoint save; here it (re)writes our card once the record exists.
    """

    def create_model_card(self, *args, **kwargs):
        path = Path(self.args.output_dir)
        if (path / records.RECORD).is_file() and self.is_world_process_zero():
            write_card(path, records.read_record(path), plots=False)


def cards_root() -> Path:
    return _resource_dir("cards")


# ----------------------------------------------------------------------------------------------- formatting


def _si(x: float | None, unit: str = "") -> str:
    if not isinstance(x, (int, float)):  # None, or a field the record does not hold (Jinja's Undefined)
        return "n/a"
    prefixes = ((1e24, "Y"), (1e21, "Z"), (1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))
    for factor, prefix in prefixes:
        if abs(x) >= factor:
            return f"{x / factor:.3g} {prefix}{unit}".rstrip()
    return f"{x:.3g} {unit}".rstrip()


def _duration(seconds: float | None) -> str:
    if not isinstance(seconds, (int, float)):
        return "n/a"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _num(x: float | None) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) else "n/a"


FORMATS = {
    "si": _si,
    "duration": _duration,
    "money": _money,
    "num": _num,
    "share": format_share,
    "overtake_day": overtake_day,
}


# --------------------------------------------------------------------------------------------------- lineage


def is_hub_id(name: str | None) -> bool:
    return bool(name) and bool(HUB_ID.match(name)) and not Path(name).expanduser().exists()


def base_model(rec: dict[str, Any]) -> str | None:
    """The parent's Hub id (known once the parent was pushed), or the Hub model the first stage started from."""
    parent = trained(rec).get("parent")
    if parent:
        return (parent.get("hub") or {}).get("repo_id")
    source = (rec.get("model") or {}).get("source")
    return source if is_hub_id(source) else None


def trained(rec: dict[str, Any]) -> dict[str, Any]:
    """The record of the stage that trained the weights: an export's parent, else the record itself."""
    return rec["parent"] if rec.get("stage") == EXPORT and rec.get("parent") else rec


def training_lineage(rec: dict[str, Any]) -> list[Record]:
    """The stages that trained this model, first to last (an export trains nothing and is not one of them; an export
    of a model with no record of its own training is its one entry)."""
    chain = Record.parse(rec).lineage()
    return [r for r in chain if r.stage != EXPORT] or chain[-1:]


def first_base(first: Record) -> str | None:
    """The model the lineage (whose first record is `first`) started from when it did not start from random weights
    and has no record of its own past, e.g. a Hub checkpoint (a converted GGUF's base record puts that past in the
    lineage instead)."""
    source = first.model.source or ""
    if not source or source.startswith("random init") or first.stage == records.BASE:
        return None
    return source if is_hub_id(source) else Path(source).name  # a local path says nothing on the Hub


def _data_name(name: str) -> str:
    """A Hub id or bundled name as it is; a local file by its file name (its folder means nothing to a reader)."""
    return Path(name).name if Path(name).expanduser().exists() else name


def base_text(base: Record | None) -> dict[str, Any] | None:
    """What the card says under the lineage table about the base row: its source file and where each figure came
    from."""
    if base is None:
        return None
    info, gguf = base.extra.get("base") or {}, base.extra.get("gguf") or {}
    return {
        "name": info.get("name") or base.model.source,
        "hub_id": info.get("hub_id"),
        "file": gguf.get("file"),
        "quantization": gguf.get("quantization"),
        "sha256": (gguf.get("sha256") or "")[:12],
        "sources": info.get("sources") or {},
    }


def stage_numbers(r: Record) -> dict[str, Any]:
    """The numbers of one stage, as the record holds them (`estimate`: published figures and a priced estimate, not
    a run of ours)."""
    return {
        "stage": r.stage,
        "estimate": bool(r.compute.extra.get("estimate")),
        "run_id": r.run_id,
        "data": ", ".join(_data_name(str(x["name"])) for x in r.data.datasets) or "n/a",
        "tokens": r.data.tokens_seen,
        "steps": r.metrics.steps,
        "wall_seconds": r.compute.wall_seconds,
        "device_hours": r.compute.device_hours,
        "flops": r.compute.flops_6nd,
        "dollars": r.compute.dollars,
        "energy_kwh": r.compute.energy_kwh,
        "co2_kg": r.compute.co2_kg,
        "knowledge_cutoff": (r.data.knowledge_cutoff or {}).get("date"),
    }


SUMMED = ("tokens", "steps", "wall_seconds", "device_hours", "flops", "dollars", "energy_kwh", "co2_kg")


def lineage_numbers(rec: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One entry per training stage from the first to this one, and their sums (None where no stage recorded one)."""
    stages = [stage_numbers(r) for r in training_lineage(rec)]
    total = {}
    for key in SUMMED:
        values = [s[key] for s in stages if s[key] is not None]
        total[key] = sum(values) if values else None
    return stages, total


def _row(n: dict[str, Any]) -> dict[str, str]:
    est = "~" if n.get("estimate") else ""  # an estimate from published figures, marked in the table
    return {
        "tokens": _si(n["tokens"]),
        "steps": "n/a" if n["steps"] is None else str(n["steps"]),
        "wall": _duration(n["wall_seconds"]),
        "device_hours": est + _num(n["device_hours"]),
        "flops": est + _si(n["flops"]),
        "dollars": est + _money(n["dollars"]),
    }


def lineage_rows(rec: dict[str, Any]) -> tuple[list[dict[str, str]], dict[str, str]]:
    """The lineage table of the card: formatted rows and the total row."""
    return _rows(*lineage_numbers(rec))


def _rows(stages: list[dict[str, Any]], total: dict[str, Any]) -> tuple[list[dict[str, str]], dict[str, str]]:
    rows = [
        {
            "stage": s["stage"] + (" (published, estimated)" if s.get("estimate") else ""),
            "data": s["data"],
            "cutoff": s["knowledge_cutoff"] or ("not published" if s.get("estimate") else "unknown"),
            **_row(s),
        }
        for s in stages
    ]
    return rows, _row({**total, "estimate": any(s.get("estimate") for s in stages)})


# ------------------------------------------------------------------------------------------------------ plots


def write_plots(folder: str | Path) -> list[dict[str, str]]:
    """PNG plots from `metrics.jsonl`: loss (train and eval), and reward where the stage logged one."""
    folder = Path(folder)
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    logs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    groups = {
        "loss": ("loss", lambda k: k in ("loss", "eval_loss")),
        "reward": ("reward", lambda k: "reward" in k and not k.endswith(("_std", "/std"))),
    }
    written = []
    for name, (title, wanted) in groups.items():
        series: dict[str, list[tuple[float, float]]] = {}
        for log in logs:
            for key, value in log.items():
                if wanted(key) and isinstance(value, (int, float)) and "step" in log:
                    series.setdefault(key, []).append((log["step"], value))
        if not series:
            continue
        filename = f"{name}.png"
        records.atomic_write_bytes(folder / filename, _plot(series, title))
        written.append({"title": title, "file": filename})
    return written


def _plot(series: dict[str, list[tuple[float, float]]], title: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, points in sorted(series.items()):
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="." if len(points) < 30 else None, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def existing_plots(folder: str | Path) -> list[dict[str, str]]:
    return [{"title": n, "file": f"{n}.png"} for n in ("loss", "reward") if (Path(folder) / f"{n}.png").is_file()]


def write_gold_plot(folder: str | Path, rec: dict[str, Any]) -> list[dict[str, str]]:
    """`gold.png` from the record's gold check: gold accuracy and the proxy reward against step, on twin axes (the
    two have different scales), the best check and a hacking flag marked."""
    gold = (rec.get("metrics") or {}).get("gold")
    if not isinstance(gold, dict) or not gold.get("history"):
        return []
    records.atomic_write_bytes(Path(folder) / GOLD_PLOT, _gold_plot(gold))
    return [{"title": "gold", "file": GOLD_PLOT}]


def _gold_plot(gold: dict[str, Any]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    history = gold["history"]
    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["gold"] for h in history], marker=".", color="tab:blue", label=f"gold {gold.get('metric')}")
    ax.set_xlabel("step")
    ax.set_ylabel(f"gold ({gold.get('dataset')}, {gold.get('split')})", color="tab:blue")
    ax.grid(alpha=0.3)
    best, flag = gold.get("best") or {}, gold.get("hacking")
    if best.get("step") is not None:
        ax.axvline(best["step"], color="tab:green", linestyle=":", label=f"best gold (step {best['step']})")
    if flag:
        ax.axvline(flag["step"], color="tab:red", linestyle="--", label=f"hacking flagged (step {flag['step']})")
    handles, labels = ax.get_legend_handles_labels()
    proxy = [(h["step"], h["proxy"]) for h in history if isinstance(h.get("proxy"), (int, float))]
    if proxy:
        twin = ax.twinx()
        xs, ys = zip(*proxy, strict=True)
        twin.plot(xs, ys, marker=".", color="tab:orange", label="proxy reward")
        twin.set_ylabel("proxy reward", color="tab:orange")
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def gold_plots(folder: str | Path) -> list[dict[str, str]]:
    return [{"title": "gold", "file": GOLD_PLOT}] if (Path(folder) / GOLD_PLOT).is_file() else []


def measured_plots(folder: str | Path) -> list[dict[str, str]]:
    """Plots a measurement wrote into the folder (not made from `metrics.jsonl`): the serving curve of
    `bench/serving.py`. The card shows it in its serving section, beside the curve's table."""
    return [{"title": "serving", "file": SERVING_PLOT}] if (Path(folder) / SERVING_PLOT).is_file() else []


# ----------------------------------------------------------------------------------------------------- render


def card_data(rec: dict[str, Any], stages: list[dict[str, Any]], total: dict[str, Any]):
    """The front matter: Hub metadata, plus an `hfrecipes` block with the exact numbers of every stage."""
    from huggingface_hub import ModelCardData

    chain = training_lineage(rec)
    last = chain[-1]
    compute = last.compute
    datasets = [d["name"] for r in chain for d in r.data.datasets if is_hub_id(str(d["name"]))]
    base = base_model(rec)
    adapter = (rec.get("model") or {}).get("adapter")
    license_ = next((lic for r in chain[::-1] if (lic := r.recipe.get("values", {}).get("license"))), None)
    co2 = None
    if compute.co2_kg is not None:
        device = compute.device or {}
        co2 = {
            "emissions": float(f"{compute.co2_kg * 1000:.6g}"),  # grams, as the Hub expects
            "source": f"hfrecipes ({compute.co2_source})",
            "training_type": TRAINING_TYPES.get(last.stage, "fine-tuning"),
            "hardware_used": f"{device.get('count', 1)} x {device.get('name') or device.get('kind')}",
        }
    cutoff = (rec.get("data") or {}).get("model_cutoff") or {}
    return ModelCardData(
        library_name="peft" if adapter else "transformers",
        pipeline_tag=PIPELINE_TAGS.get(last.stage, "text-generation"),
        tags=list(dict.fromkeys(["hfrecipes", last.stage, rec["stage"]])),
        license=license_,
        base_model=base,
        base_model_relation=("adapter" if adapter else "finetune") if base else None,
        datasets=list(dict.fromkeys(datasets)) or None,
        co2_eq_emissions=co2,
        hfrecipes={
            "stage": rec["stage"],
            "run_id": rec.get("run_id"),
            "knowledge_cutoff": cutoff.get("date"),
            "knowledge_cutoff_source": cutoff.get("source", "unknown"),
            "lineage": stages,
            "total": total,
        },
    )


def _pct(x: float | None) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "n/a"


def gold_text(gold: dict[str, Any] | None, plots: list[dict[str, str]]) -> dict[str, Any] | None:
    """The card's gold-check section from the record's `metrics.gold`: what was checked, the best check, the hacking
    flag, why training stopped and whose weights were saved; None without a gold check."""
    if not isinstance(gold, dict) or not gold.get("history"):
        return None
    history, best, flag = gold["history"], gold.get("best") or {}, gold.get("hacking")
    last = history[-1]["step"]
    groups = next((h.get("by_group") for h in history if h["step"] == best.get("step")), None) or {}
    if flag:
        hacking = (
            f"Reward hacking flagged at step {flag['step']}: gold accuracy fell to {_pct(flag['gold'])} from its best "
            f"{_pct(flag['best_gold'])} while the proxy reward rose to {_num(flag['proxy'])} from "
            f"{_num(flag['proxy_at_best'])} at the best check."
        )
    elif any(isinstance(h.get("proxy"), (int, float)) for h in history):
        hacking = "No reward hacking flagged: gold accuracy never fell far below its best while the proxy rose."
    else:
        hacking = None  # a stage with no proxy reward (SFT) has nothing to game
    stopped = gold.get("stopped")
    if stopped == "plateau":
        outcome = f"Training stopped at the plateau at step {last}."
    elif stopped == "reward_hacking":
        outcome = f"Training stopped for reward hacking at step {last}."
    else:
        outcome = f"Training ran to its last step ({last})."
    kept = gold.get("kept_step")
    if kept is not None:
        which = "the best gold check" if kept == best.get("step") and kept != last else "the last step"
        outcome += f" The saved weights are those of step {kept} ({which})."
    return {
        "metric": gold.get("metric"),
        "dataset": gold.get("dataset"),
        "split": gold.get("split"),
        "examples": gold.get("examples"),
        "every": gold.get("every"),
        "checks": len(history),
        "best_step": best.get("step"),
        "best": _pct(best.get("gold")),
        "best_groups": ", ".join(f"{k} {_pct(v)}" for k, v in groups.items()) or None,
        "hacking": hacking,
        "outcome": outcome,
        "plot": next((p["file"] for p in plots if p["file"] == GOLD_PLOT), None),
    }


def heldout_line(heldout: dict[str, Any] | None) -> str | None:
    """One sentence of the stage's own held-out evaluation, e.g. 'pair_accuracy 0.52 -> 0.71 on 64 held-out rows'."""
    if not heldout:
        return None
    change = _num(heldout.get("after"))
    if heldout.get("before") is not None:
        change = f"{_num(heldout['before'])} before training, {change} after"
    better = "higher" if heldout.get("higher_is_better", True) else "lower"
    rows = f" on {heldout['examples']} held-out rows" if heldout.get("examples") else ""
    return f"{heldout['metric']}: {change}{rows} ({better} is better)"


# --------------------------------------------------------------------------------------------------- serving


def kv_block(rec: dict[str, Any]) -> dict[str, Any] | None:
    """The KV cache an inference run or the export measured from the model's config (`costs.kv_cache`)."""
    return (rec.get("inference") or {}).get("kv_cache") or (rec.get("export") or {}).get("kv_cache")


def weight_bytes(model: dict[str, Any], params: float | None) -> float | None:
    """Bytes of the weights from the record's parameter count and dtype (2 bytes a parameter if it is not known)."""
    if not params:
        return None
    return params * DTYPE_BYTES.get(str(model.get("dtype") or "").replace("torch.", ""), 2)


def serving_traffic(rec: dict[str, Any]) -> tuple[float, float, str]:
    """Input and output tokens a day the card states the lifetime cost for, and where they come from: the record
    (`generate(daily_input_tokens=..., daily_output_tokens=...)`), else the default of `hfrecipes.costs`."""
    traffic = (rec.get("inference") or {}).get("traffic") or {}
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


def kv_text(kv: dict[str, Any] | None, serve: dict[str, Any]) -> dict[str, str]:
    """The serving table's KV-cache and price-ratio cells."""
    ratio = serve.get("output_input_price_ratio")
    out = {"ratio": f"{ratio:.3g}x" if ratio else "n/a"}
    if not kv:
        return {
            **out,
            "formula": "2 x layers x KV heads x head dim x dtype bytes",
            "bytes_per_token": "n/a (no model config recorded: export the model or run `hfrecipes generate`)",
            "fit_label": "concurrent sequences that fit in one device's memory after the weights",
            "fit": "n/a",
        }
    memory = _si(kv["device_memory_bytes"], "B")
    return {
        **out,
        "formula": f"2 x {kv['n_layers']} layers x {kv['n_kv_heads']} KV heads of {kv['n_heads']} heads x "
        f"{kv['head_dim']} head dim x {kv['dtype_bytes']} bytes ({kv['dtype']})",
        "bytes_per_token": f"{kv['bytes_per_token']:,.0f} B",
        "fit_label": f"sequences of {kv['context']} tokens whose KV cache fits after the weights in "
        f"{kv['memory_utilization']:.0%} of one {kv['device_label']}'s {memory} ({kv['device_source']})",
        "fit": f"{kv['concurrent_sequences']:,}",
    }


def _seconds(x: float | None) -> str:
    if not isinstance(x, (int, float)):
        return "n/a"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def _ratio(x: float | None) -> str:
    return f"{x:.2f}x" if isinstance(x, (int, float)) else "n/a"


def serving_curve(rec: dict[str, Any], plots: list[dict[str, str]]) -> dict[str, Any] | None:
    """The card's throughput curve from the record's `serving` block (`bench/serving.py`): one formatted row per
    level of concurrency, and the plot when the folder holds it. None without a `serving` block."""
    block = rec.get("serving")
    if not isinstance(block, dict) or not block.get("levels"):
        return None
    rows = [
        {
            "concurrency": lv.get("concurrency"),
            "tokens_per_second": _si(lv.get("output_tokens_per_second")),
            "ratio": _ratio(lv.get("tokens_per_second_ratio")),
            "requests_per_second": _si(lv.get("requests_per_second")),
            "p50": _seconds(lv.get("latency_p50_seconds")),
            "p95": _seconds(lv.get("latency_p95_seconds")),
            "ttft": _seconds(lv.get("ttft_p50_seconds")),
        }
        for lv in block["levels"]
    ]
    device = block.get("device") or {}
    return {
        "rows": rows,
        "engine": block.get("engine") or "vLLM",
        "device": f"{device.get('count', 1)} x {device.get('name') or device.get('kind') or 'unknown device'}",
        "measured": block.get("measured") or "unknown date",
        "requests": block["levels"][0].get("requests"),
        "max_tokens": block.get("max_tokens"),
        "stop_at_eos": bool(block.get("stop_at_eos")),
        "plot": next((p["file"] for p in plots if p["file"] == SERVING_PLOT), None),
    }


def render(
    rec: dict[str, Any],
    repo_or_path: str = "path/to/this/folder",
    template: str = "default",
    plots: list[dict[str, str]] | None = None,
):
    """The card as a `huggingface_hub.ModelCard`. An export's card describes the stage that trained its weights
    (an export only merges and writes them) and names the model, not the folder."""
    import yaml
    from huggingface_hub import ModelCard

    first = Record.parse(rec).lineage()[0]  # a damaged record is one clear error, not a template traceback
    stages, total = lineage_numbers(rec)
    rows, total_row = _rows(stages, total)
    last = trained(rec)
    model, data = rec.get("model") or {}, rec.get("data") or {}
    compute = last.get("compute") or {}
    params = model.get("params_total")
    repo = (rec.get("hub") or {}).get("repo_id") or repo_or_path
    exported = rec.get("export") if rec["stage"] == EXPORT else None

    cutoff = data.get("model_cutoff") or {"date": None, "source": "unknown", "detail": "not recorded"}
    base = first_base(first)
    if base and cutoff.get("date"):
        note = f"; the starting model '{base}' has no hfrecipes record, so this date is only a lower bound"
        cutoff = {**cutoff, "detail": cutoff.get("detail", "") + note}
    head = first if first.stage == records.BASE else None  # the base model's own record, from a converted GGUF
    if head is not None and cutoff.get("stage") != records.BASE and not (head.data.knowledge_cutoff or {}).get("date"):
        name = (head.extra.get("base") or {}).get("name") or "the base model"
        note = f"; {name} publishes no cutoff of its own, so this date is only a lower bound"
        cutoff = {**cutoff, "detail": (cutoff.get("detail") or "") + note}

    inference = rec.get("inference") or {}
    kv = kv_block(rec)
    serve = serving(
        params or 0,
        inference.get("device") or compute.get("cost_device") or compute.get("device"),
        inference.get("tokens_per_second"),
        inference.get("price_per_hour", compute.get("price_per_hour") if not inference.get("device") else None),
        prefill_tokens_per_second=inference.get("prefill_tokens_per_second"),
        decode_tokens_per_second=inference.get("decode_tokens_per_second"),
        weight_bytes=(kv or {}).get("weight_bytes") or weight_bytes(model, params),
        kv_bytes_per_token=(kv or {}).get("bytes_per_token"),
        context=(kv or {}).get("context"),
    )
    even = break_even(total["dollars"] or 0.0, serve["dollars_per_million_output_tokens"])
    daily_in, daily_out, traffic_source = serving_traffic(rec)
    life = lifetime(
        total["dollars"],
        serve["dollars_per_million_input_tokens"],
        serve["dollars_per_million_output_tokens"],
        daily_in,
        daily_out,
    )
    flops_even = total["flops"] / serve["flops_per_token"] if total["flops"] and params else None

    versions = ", ".join(f"{k} {v}" for k, v in rec.get("versions", {}).items())
    values = dict((last.get("recipe") or {}).get("values", {}))
    metrics = dict(rec.get("metrics") or {})
    heldout = metrics.pop("heldout", None)
    gold = metrics.pop("gold", None)
    summary = (
        f"A {model.get('model_type') or ''} model of {_si(params)} parameters after the **{last['stage']}** stage "
        f"({len(rows)} stage(s) in its lineage), trained with [hfrecipes](https://pypi.org/project/hfrecipes/)."
    )
    gguf = (exported or {}).get("gguf")
    merged = "adapters merged, " if model.get("merged_adapter") else ""
    if gguf:
        summary += (
            f" Exported as one GGUF file for llama.cpp and Ollama ({merged}{gguf['quant']}, {_si(gguf['bytes'], 'B')},"
            f" sha256 {gguf['sha256'][:12]}...)."
        )
    elif exported:
        summary += f" Exported for serving ({merged}dtype {exported.get('dtype')})."
    return ModelCard.from_template(
        card_data(rec, stages, total),
        template_path=str(cards_root() / f"{template}.md"),
        model_name=(exported or {}).get("model_name") or Path(repo).name,
        summary=summary,
        stage=last["stage"],
        cutoff=cutoff,
        base=base,
        base_row=base_text(head),
        lineage=rows,
        total=total_row,
        params=params,
        compute=compute,
        lineage_total=total,
        serve=serve,
        inference=inference,
        kv_text=kv_text(kv, serve),
        lifetime=life,
        traffic_source=traffic_source,
        break_even=even,
        flops_break_even=flops_even,
        heldout=heldout_line(heldout),
        gold=gold_text(gold, plots or []),
        metrics=metrics,
        adapter=model.get("adapter"),
        gguf=gguf,
        gguf_check=(exported or {}).get("verify") if gguf else None,
        auto_class=AUTO_CLASSES.get(last["stage"], "AutoModelForCausalLM"),
        repo=repo,
        plots=[p for p in plots or [] if p["file"] not in (SERVING_PLOT, GOLD_PLOT)],
        serving_curve=serving_curve(rec, plots or []),
        recipe_yaml=yaml.safe_dump(values, sort_keys=False) if values else "{}\n",
        versions=versions,
        **FORMATS,
    )


def write_card(folder: str | Path, rec: dict[str, Any], plots: bool = True, name: str | Path | None = None) -> None:
    """Write README.md (and, unless `plots=False`, the PNG plots it links) into a stage folder. `name` is the path
    the card calls the model by, when the folder is written under a temporary name first."""
    folder = Path(folder)
    made = write_plots(folder) + write_gold_plot(folder, rec) if plots else existing_plots(folder) + gold_plots(folder)
    written = made + measured_plots(folder)
    records.atomic_write_text(folder / "README.md", str(render(rec, str(name or folder), plots=written)))
