"""The model card: `cards/<template>.md` (Jinja) + the stage record, rendered through huggingface_hub's ModelCard.

Every number in the card comes from `record.json` and its parents (`report.lineage` sums and prices them; the card
formats them); nothing is typed in by hand. A stage writes its card with `write_card(folder, record)` after
`record.write_record`, and its trainer subclass takes `OwnsCard` first in its bases so Transformers and TRL never
write their own README.md over it:

    class SFTTrainer(card.OwnsCard, trl.SFTTrainer): ...

An `inference` block (`hfrecipes generate`) makes the serving cost the measured one. A measurement that is no part of
the model's record, `bench/serving.py`'s throughput curve, lives in its own file in the folder (`serving_bench.json`,
with `serving.png`); the card shows it as a measured artifact, saying when, where and with what it was measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hfrecipes import record as records
from hfrecipes.errors import UsageError
from hfrecipes.modeling import HEADS, head_of
from hfrecipes.recipe import resource_dir
from hfrecipes.record import Record
from hfrecipes.report import format as fmt
from hfrecipes.report import planned as plans
from hfrecipes.report import plots as plotting
from hfrecipes.report.lineage import EXPORT, Lineage, is_hub_id, kv_block, lineage_numbers, serving_numbers, trained

TRAINING_TYPES = {"pretrain": "pre-training"}
SERVING_BENCH = "serving_bench.json"  # `bench/serving.py`'s measured curve, beside the model's record


class OwnsCard:
    """Trainer mixin: README.md is ours, written from the stage record, never Transformers' or TRL's template.

    TRL calls `create_model_card` on every checkpoint save; here it (re)writes our card once the record exists.
    """

    def create_model_card(self, *args, **kwargs):
        path = Path(self.args.output_dir)
        if (path / records.RECORD).is_file() and self.is_world_process_zero():
            write_card(path, records.read_record(path), plots=False)


def cards_root() -> Path:
    return resource_dir("cards")


# --------------------------------------------------------------------------------------------------- lineage


def base_model(r: Record) -> str | None:
    """The parent's Hub id (known once the parent was pushed), or the Hub model the first stage started from."""
    parent = trained(r).parent
    if parent is not None:
        return parent.hub.repo_id if parent.hub else None
    return r.model.source if is_hub_id(r.model.source) else None


def first_base(first: Record) -> str | None:
    """The model the lineage (whose first record is `first`) started from when it did not start from random weights
    and has no record of its own past, e.g. a Hub checkpoint (a converted GGUF's base record puts that past in the
    lineage instead)."""
    source = first.model.source or ""
    if not source or source.startswith("random init") or first.stage == records.BASE:
        return None
    return source if is_hub_id(source) else Path(source).name  # a local path says nothing on the Hub


def base_text(base: Record | None) -> dict[str, Any] | None:
    """What the card says under the lineage table about the base row: its source file and where each figure came
    from."""
    if base is None:
        return None
    info, gguf = base.base or records.BaseBlock(), base.gguf or records.GGUFBlock()
    return {
        "name": info.name or base.model.source,
        "hub_id": info.hub_id,
        "file": gguf.file,
        "quantization": gguf.quantization,
        "sha256": (gguf.sha256 or "")[:12],
        "sources": info.sources,
    }


def _row(n: dict[str, Any], missing: dict[str, list[str]] | None = None) -> dict[str, str]:
    est = "~" if n.get("estimate") else ""  # an estimate from published figures, marked in the table
    partial = {k: "≥" if k in (missing or {}) else "" for k in n}  # a total that leaves out a stage
    return {
        "tokens": partial["tokens"] + fmt.si(n["tokens"]),
        "steps": partial["steps"] + ("n/a" if n["steps"] is None else str(n["steps"])),
        "wall": partial["wall_seconds"] + fmt.duration(n["wall_seconds"]),
        "device_hours": est + partial["device_hours"] + fmt.num(n["device_hours"]),
        "flops": est + partial["flops"] + fmt.si(n["flops"]),
        "dollars": est + partial["dollars"] + fmt.money(n["dollars"]),
    }


def cutoff_cell(s: dict[str, Any]) -> str:
    """The lineage table's cutoff for one stage: the model's cutoff after it, and whether the stage moved it or
    inherited it (with its own data's older date, where it has one); "unknown" only when nothing before knows."""
    date, change, own = s["model_cutoff"], s["cutoff_change"], s["knowledge_cutoff"]
    if not date:
        return "not published" if s["estimate"] else "unknown"
    if change == "inherited":
        return f"{date} (inherited; its data ends {own})" if own and own != date else f"{date} (inherited)"
    return f"{date} (moved)" if change == "moved" else date


def lineage_rows(lineage: Lineage) -> tuple[list[dict[str, str]], dict[str, str]]:
    """The lineage table of the card: formatted rows and the total row (a total that leaves out a stage that did not
    record the number is marked ≥)."""
    rows = [
        {
            "stage": s["stage"] + (" (published, estimated)" if s["estimate"] else ""),
            "data": s["data"],
            "cutoff": cutoff_cell(s),
            **_row(s),
        }
        for s in lineage.stages
    ]
    estimate = any(s["estimate"] for s in lineage.stages)
    return rows, _row({**lineage.total, "estimate": estimate}, lineage.missing)


def total_text(lineage: Lineage) -> dict[str, str]:
    """The whole lineage's energy and CO2 (and the rest) as the card's cost table shows them: ≥ where a stage did not
    record the number, and which."""
    out = {}
    for key, value in lineage.total.items():
        text = (
            fmt.money(value) if key == "dollars" else fmt.si(value) if key in ("tokens", "flops") else fmt.num(value)
        )
        if key in lineage.missing:
            text = f"≥{text} (not recorded for {', '.join(lineage.missing[key])})"
        out[key] = text
    return out


# ----------------------------------------------------------------------------------------------------- render


def head(r: Record) -> str:
    """The head of the model that trained the weights: the record's, else read from its architecture."""
    model = trained(r).model
    return model.head or head_of(model.architecture or "") or "causal_lm"


def card_data(r: Record, lineage: Lineage, model_name: str | None = None):
    """The front matter: Hub metadata (`model-index` from the evaluations, named `model_name`), plus an `hfrecipes`
    block with the exact numbers of every stage."""
    from huggingface_hub import ModelCardData

    chain = [x for x in r.lineage() if x.stage != EXPORT] or [r]
    last = trained(r)
    compute = last.compute
    datasets = [d["name"] for x in chain for d in x.data.datasets if is_hub_id(str(d["name"]))]
    base = base_model(r)
    adapter = r.model.adapter
    license_ = next((lic for x in chain[::-1] if (lic := x.recipe.get("values", {}).get("license"))), None)
    co2 = None
    if compute.co2_kg is not None:
        device = compute.device or {}
        co2 = {
            "emissions": float(f"{compute.co2_kg * 1000:.6g}"),  # grams, as the Hub expects
            "source": f"hfrecipes ({compute.co2_source})",
            "training_type": TRAINING_TYPES.get(last.stage, "fine-tuning"),
            "hardware_used": f"{device.get('count', 1)} x {device.get('name') or device.get('kind')}",
        }
    cutoff = r.data.model_cutoff or {}
    results = eval_results(r)
    return ModelCardData(
        model_name=model_name if results else None,
        eval_results=results or None,
        library_name="peft" if adapter else "transformers",
        pipeline_tag=HEADS[head(r)].pipeline_tag,
        tags=list(dict.fromkeys(["hfrecipes", last.stage, r.stage])),
        license=license_,
        base_model=base,
        base_model_relation=("adapter" if adapter else "finetune") if base else None,
        datasets=list(dict.fromkeys(datasets)) or None,
        co2_eq_emissions=co2,
        hfrecipes={
            "stage": r.stage,
            "run_id": r.run_id,
            "knowledge_cutoff": cutoff.get("date"),
            "knowledge_cutoff_source": cutoff.get("source", "unknown"),
            "lineage": lineage.stages,
            "total": lineage.total,
        },
    )


def eval_results(r: Record) -> list:
    """The Hub's `model-index` entries: one per task scored by `hfrecipes eval` (its headline metric)."""
    from huggingface_hub import EvalResult

    ev = r.evaluations
    if ev is None:
        return []
    task_types = {"acc": "multiple-choice", "acc_norm": "multiple-choice"}
    return [
        EvalResult(
            task_type=task_types.get(e["metric"], HEADS[head(r)].pipeline_tag or "text-generation"),
            dataset_type=name,
            dataset_name=name,
            dataset_split="test",
            metric_type=e["metric"],
            metric_value=round(e["value"], 4),
            metric_name=f"{e['metric']} ({e['shots'] or 0}-shot, lm-evaluation-harness)",
        )
        for name, e in ev.tasks.items()
        if e.get("value") is not None
    ]


def evaluations_text(r: Record) -> dict[str, Any] | None:
    """The card's Evaluation table and contamination table from the record's `evaluations` block."""
    ev = r.evaluations
    if ev is None or not ev.tasks:
        return None
    sets = (ev.contamination or {}).get("sets") or {}
    rows = []
    for name, e in ev.tasks.items():
        c = sets.get(name) or {}
        value = fmt.num(e.get("value"))
        if e.get("stderr") is not None:
            value += f" ± {fmt.num(e['stderr'])}"
        rows.append({
            "task": f"{name} (part of {e['group']})" if e.get("group") else name,
            "metric": e["metric"],
            "value": value,
            "examples": e.get("examples") if e.get("examples") is not None else "",
            "shots": e.get("shots") or 0,
            "overlap": fmt.share(c["share"]) if c.get("share") is not None else "",
            "clean": fmt.num(c["clean_score"]) if c.get("clean_score") is not None else ("none clean" if c else ""),
            "seconds": fmt.duration(e["seconds"]) if e.get("seconds") is not None else "",
            "flops": fmt.si(e.get("inference_flops")) if e.get("inference_flops") else "",
            "dollars": fmt.money(e.get("dollars")) if e.get("dollars") is not None else "",
        })  # fmt: skip
    contamination = ev.contamination
    heldout = [
        {"set": name, "stage": c.get("stage"), "count": c["items"], "overlap": fmt.share(c["share"])}
        for name, c in sets.items()
        if name not in ev.tasks and c.get("share") is not None
    ]
    return {
        "rows": rows,
        "engine": ev.engine,
        "chat_template": ev.chat_template,
        "device": (ev.device or {}).get("name"),
        "contamination": contamination,
        "heldout": heldout,
        "sources": ", ".join(f"{k} ({v.get('documents', '?')} documents)" for k, v in
                             ((contamination or {}).get("sources") or {}).items()),
        "not_checked": "; ".join(f"{u['stage']}: {u['why']}" for u in (contamination or {}).get("not_checked") or []),
    }  # fmt: skip


def gold_text(gold: records.GoldBlock | None, plots: list[dict[str, str]]) -> dict[str, Any] | None:
    """The card's gold-check section from the record's `metrics.gold`: what was checked, the best check, the hacking
    flag, why training stopped and whose weights were saved; None without a gold check."""
    if gold is None or not gold.history:
        return None
    history, best, flag = gold.history, gold.best or {}, gold.hacking
    last = history[-1]["step"]
    groups = next((h.get("by_group") for h in history if h["step"] == best.get("step")), None) or {}
    if flag:
        hacking = (
            f"Reward hacking flagged at step {flag['step']}: gold accuracy fell to {fmt.pct(flag['gold'])} from its "
            f"best {fmt.pct(flag['best_gold'])} while the proxy reward rose to {fmt.num(flag['proxy'])} from "
            f"{fmt.num(flag['proxy_at_best'])} at the best check."
        )
    elif any(isinstance(h.get("proxy"), (int, float)) for h in history):
        hacking = "No reward hacking flagged: gold accuracy never fell far below its best while the proxy rose."
    else:
        hacking = None  # a stage with no proxy reward (SFT) has nothing to game
    stopped = gold.stopped
    if stopped == "plateau":
        outcome = f"Training stopped at the plateau at step {last}."
    elif stopped == "reward_hacking":
        outcome = f"Training stopped for reward hacking at step {last}."
    else:
        outcome = f"Training ran to its last step ({last})."
    kept = gold.kept_step
    if kept is not None:
        which = "the best gold check" if kept == best.get("step") and kept != last else "the last step"
        outcome += f" The saved weights are those of step {kept} ({which})."
    return {
        "metric": gold.metric,
        "dataset": gold.dataset,
        "split": gold.split,
        "examples": gold.examples,
        "every": gold.every,
        "checks": len(history),
        "best_step": best.get("step"),
        "best": fmt.pct(best.get("gold")),
        "best_groups": ", ".join(f"{k} {fmt.pct(v)}" for k, v in groups.items()) or None,
        "hacking": hacking,
        "outcome": outcome,
        "plot": next((p["file"] for p in plots if p["file"] == plotting.GOLD_PLOT), None),
    }


def heldout_line(heldout: records.Heldout | None) -> str | None:
    """One sentence of the stage's own held-out evaluation, e.g. 'pair_accuracy 0.52 -> 0.71 on 64 held-out rows'."""
    if heldout is None:
        return None
    change = fmt.num(heldout.after)
    if heldout.before is not None:
        change = f"{fmt.num(heldout.before)} before training, {change} after"
    better = "higher" if heldout.higher_is_better else "lower"
    rows = f" on {heldout.examples} held-out rows" if heldout.examples else ""
    return f"{heldout.metric}: {change}{rows} ({better} is better)"


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
    memory = fmt.si(kv["device_memory_bytes"], "B")
    return {
        **out,
        "formula": f"2 x {kv['n_layers']} layers x {kv['n_kv_heads']} KV heads of {kv['n_heads']} heads x "
        f"{kv['head_dim']} head dim x {kv['dtype_bytes']} bytes ({kv['dtype']})",
        "bytes_per_token": f"{kv['bytes_per_token']:,.0f} B",
        "fit_label": f"sequences of {kv['context']} tokens whose KV cache fits after the weights in "
        f"{kv['memory_utilization']:.0%} of one {kv['device_label']}'s {memory} ({kv['device_source']})",
        "fit": f"{kv['concurrent_sequences']:,}",
    }


def read_serving_bench(folder: str | Path) -> dict[str, Any] | None:
    """`bench/serving.py`'s curve from the folder's `serving_bench.json`, or None where the folder holds none."""
    path = Path(folder) / SERVING_BENCH
    if not path.is_file():
        return None
    try:
        block = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not valid JSON ({e}); rerun bench/serving.py or delete the file.") from None
    if not isinstance(block, dict) or not isinstance(block.get("levels"), list) or not block["levels"]:
        raise UsageError(f"{path}: expected an object with a list of 'levels'; rerun bench/serving.py.")
    return block


def serving_curve(block: dict[str, Any] | None, plots: list[dict[str, str]]) -> dict[str, Any] | None:
    """The card's throughput curve from `serving_bench.json`: one formatted row per level of concurrency, and the
    plot when the folder holds it. None without a measured curve."""
    if not block:
        return None
    rows = [
        {
            "concurrency": lv.get("concurrency"),
            "tokens_per_second": fmt.si(lv.get("output_tokens_per_second")),
            "ratio": fmt.ratio(lv.get("tokens_per_second_ratio")),
            "requests_per_second": fmt.si(lv.get("requests_per_second")),
            "p50": fmt.seconds(lv.get("latency_p50_seconds")),
            "p95": fmt.seconds(lv.get("latency_p95_seconds")),
            "ttft": fmt.seconds(lv.get("ttft_p50_seconds")),
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
        "plot": next((p["file"] for p in plots if p["file"] == plotting.SERVING_PLOT), None),
    }


def cutoff_text(r: Record, first: Record, plots: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """The model's knowledge cutoff and how far to trust it: a lower bound where the lineage starts from a model
    with no record of its own, or from a base that publishes no cutoff. `moved` says when a later stage's data moved
    it from an earlier stage's date; `probe_stage` names the stage whose model the knowledge probe scored, `plot` its
    curve by month."""
    cutoff = r.data.model_cutoff or {"date": None, "source": "unknown", "detail": "not recorded"}
    moved = cutoff.get("moved_from") or {}
    if moved.get("date"):
        setter = f" (set by the {moved['stage']} stage)" if moved.get("stage") else ""
        cutoff = {
            **cutoff,
            "moved": f"Moved from {moved['date']}{setter} to {cutoff['date']} by the {cutoff.get('stage')} stage.",
        }
    found = cutoff.get("knowledge_probe")
    if found:
        probed = [x.stage for x in r.lineage() if (x.data.knowledge_cutoff or {}).get("knowledge_probe") == found]
        plot = next((p["file"] for p in plots or [] if p["file"] == plotting.PROBE_PLOT), None)
        cutoff = {**cutoff, "probe_stage": probed[-1] if probed else cutoff.get("stage"), "plot": plot}
    own = r.evaluations.probe if r.evaluations else None
    if own:  # `hfrecipes eval --probe` scored this very model: its curve before any parent's
        plot = next((p["file"] for p in plots or [] if p["file"] == plotting.PROBE_PLOT), None)
        cutoff = {**cutoff, "knowledge_probe": own, "probe_stage": trained(r).stage, "plot": plot}
    base = first_base(first)
    if base and cutoff.get("date"):
        note = f"; the starting model '{base}' has no hfrecipes record, so this date is only a lower bound"
        cutoff = {**cutoff, "detail": cutoff.get("detail", "") + note}
    if first.stage == records.BASE and cutoff.get("stage") != records.BASE:
        if not (first.data.knowledge_cutoff or {}).get("date"):
            name = (first.base.name if first.base else None) or "the base model"
            note = f"; {name} publishes no cutoff of its own, so this date is only a lower bound"
            cutoff = {**cutoff, "detail": (cutoff.get("detail") or "") + note}
    return cutoff


def summary_text(r: Record, stages: int) -> str:
    """The card's opening sentence: what the model is, the stage that made it and how it was exported."""
    model, last, exported = r.model, trained(r), r.export if r.stage == EXPORT else None
    version = r.versions.get("hfrecipes")
    text = (
        f"A {model.model_type or ''} model of {fmt.si(model.params_total)} parameters after the **{last.stage}** "
        f"stage ({stages} stage(s) in its lineage), trained with hfrecipes{f' {version}' if version else ''}."
    )
    merged = "adapters merged, " if model.merged_adapter else ""
    if exported and exported.gguf:
        gguf = exported.gguf
        text += (
            f" Exported as one GGUF file for llama.cpp and Ollama ({merged}{gguf['quant']}, "
            f"{fmt.si(gguf['bytes'], 'B')}, sha256 {gguf['sha256'][:12]}...)."
        )
    elif exported:
        text += f" Exported for serving ({merged}dtype {exported.dtype})."
    return text


def render(
    rec: dict[str, Any],
    repo_or_path: str = "path/to/this/folder",
    template: str = "default",
    plots: list[dict[str, str]] | None = None,
    serving_bench: dict[str, Any] | None = None,
):
    """The card as a `huggingface_hub.ModelCard`. An export's card describes the stage that trained its weights
    (an export only merges and writes them) and names the model, not the folder. `serving_bench`: a measured
    throughput curve (`read_serving_bench`)."""
    import yaml
    from huggingface_hub import ModelCard

    r = Record.parse(rec)  # a damaged record is one clear error, not a template traceback
    first, last = r.lineage()[0], trained(r)
    lineage = lineage_numbers(r)
    rows, total_row = lineage_rows(lineage)
    plots = plots or []
    repo = (r.hub.repo_id if r.hub else None) or repo_or_path
    exported = r.export if r.stage == EXPORT else None
    serve = serving_numbers(r, lineage.total)
    kv = kv_block(r)
    values = dict(last.recipe.get("values", {}))
    counters = ("steps", "train_loss", "first_logged_loss", "last_logged_loss")
    metrics = {k: getattr(r.metrics, k) for k in counters if getattr(r.metrics, k) is not None}
    metrics |= r.metrics.extra
    auto_class = HEADS[head(r)].auto_class
    model_name = (exported.model_name if exported else None) or Path(repo).name
    return ModelCard.from_template(
        card_data(r, lineage, model_name),
        template_path=str(cards_root() / f"{template}.md"),
        model_name=model_name,
        summary=summary_text(r, len(rows)),
        stage=last.stage,
        cutoff=cutoff_text(r, first, plots),
        base=first_base(first),
        base_row=base_text(first if first.stage == records.BASE else None),
        lineage=rows,
        total=total_row,
        params=r.model.params_total,
        compute=last.compute,
        teacher=last.teacher,
        planned=plans.rows(plans.compare(last)),
        plan=last.plan,
        lineage_total=lineage.total,
        lineage_total_text=total_text(lineage),
        serve=serve.cost,
        inference=r.inference,
        kv_text=kv_text(kv, serve.cost),
        lifetime=serve.lifetime,
        traffic_source=serve.traffic_source,
        break_even=serve.break_even,
        flops_break_even=serve.flops_break_even,
        heldout=heldout_line(r.metrics.heldout),
        gold=gold_text(r.metrics.gold, plots),
        evaluations=evaluations_text(r),
        metrics=metrics,
        adapter=r.model.adapter,
        gguf=exported.gguf if exported else None,
        gguf_check=exported.verify if exported and exported.gguf else None,
        auto_class=auto_class,
        repo=repo,
        plots=[p for p in plots if p["file"] not in (plotting.SERVING_PLOT, plotting.GOLD_PLOT, plotting.PROBE_PLOT)],
        serving_curve=serving_curve(serving_bench, plots),
        distillation=r.distillation,
        recipe_yaml=yaml.safe_dump(values, sort_keys=False) if values else "{}\n",
        versions=", ".join(f"{k} {v}" for k, v in r.versions.items()),
        **fmt.FORMATS,
    )


def write_card(folder: str | Path, rec: dict[str, Any], plots: bool = True, name: str | Path | None = None) -> None:
    """Write README.md (and, unless `plots=False`, the PNG plots it links) into a stage folder. `name` is the path
    the card calls the model by, when the folder is written under a temporary name first."""
    folder = Path(folder)
    r = Record.parse(rec)
    # the probe's curve is drawn in the folder of the stage (or `hfrecipes eval --probe`) that ran it; a later stage
    # or an export only cites it
    found = (r.evaluations.probe if r.evaluations else None) or (r.data.knowledge_cutoff or {}).get("knowledge_probe")
    if plots:
        made = plotting.write_plots(folder) + plotting.write_gold_plot(folder, r)
        probe_plot = plotting.write_probe_plot(folder, found)
    else:
        made = plotting.existing_plots(folder) + plotting.gold_plots(folder)
        probe_plot = plotting.PROBE_PLOT if found and (folder / plotting.PROBE_PLOT).is_file() else None
    if probe_plot:
        made.append({"title": "knowledge probe", "file": probe_plot})
    bench = read_serving_bench(folder)
    if bench is not None and (folder / plotting.SERVING_PLOT).is_file():
        made.append({"title": "serving", "file": plotting.SERVING_PLOT})
    text = str(render(rec, str(name or folder), plots=made, serving_bench=bench))
    records.atomic_write_text(folder / "README.md", text)


def refresh_card(folder: str | Path) -> None:
    """Render a folder's card again from its record as it now stands (after generation added its `inference`
    block); nothing where the folder holds no record."""
    rec = records.read_record(folder)
    if rec is not None:
        write_card(folder, rec)
