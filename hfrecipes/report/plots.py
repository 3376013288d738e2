"""The PNG plots a card or the lifecycle summary links: training curves from `metrics.jsonl`, the gold check's
history, the knowledge probe by month, held-out accuracy by lifecycle stage. Each is drawn from what a run
recorded, never from a recomputation.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from hfrecipes import record as records
from hfrecipes.record import Record

GOLD_PLOT = "gold.png"  # the gold check's history (`hfrecipes.gold`): proxy reward and gold accuracy by step
SERVING_PLOT = "serving.png"  # the throughput curve `bench/serving.py` measures and draws beside its own file
PROBE_PLOT = "knowledge_probe.png"  # the knowledge probe (`hfrecipes.probe`): facts known by the month of the fact


def _figure(width: float, height: float, dpi: int = 100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version stamp: the same plot, the same bytes
    return buf.getvalue()


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
    fig = _figure(6, 3.5)
    ax = fig.add_subplot()
    for key, points in sorted(series.items()):
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="." if len(points) < 30 else None, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def existing_plots(folder: str | Path) -> list[dict[str, str]]:
    return [{"title": n, "file": f"{n}.png"} for n in ("loss", "reward") if (Path(folder) / f"{n}.png").is_file()]


def write_gold_plot(folder: str | Path, r: Record) -> list[dict[str, str]]:
    """`gold.png` from the record's gold check: gold accuracy and the proxy reward against step, on twin axes (the
    two have different scales), the best check and a hacking flag marked."""
    gold = r.metrics.gold
    if gold is None or not gold.history:
        return []
    records.atomic_write_bytes(Path(folder) / GOLD_PLOT, _gold_plot(gold))
    return [{"title": "gold", "file": GOLD_PLOT}]


def _gold_plot(gold: records.GoldBlock) -> bytes:
    history = gold.history
    fig = _figure(6, 3.5)
    ax = fig.add_subplot()
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["gold"] for h in history], marker=".", color="tab:blue", label=f"gold {gold.metric}")
    ax.set_xlabel("step")
    ax.set_ylabel(f"gold ({gold.dataset}, {gold.split})", color="tab:blue")
    ax.grid(alpha=0.3)
    best, flag = gold.best or {}, gold.hacking
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
    return _png(fig)


def gold_plots(folder: str | Path) -> list[dict[str, str]]:
    return [{"title": "gold", "file": GOLD_PLOT}] if (Path(folder) / GOLD_PLOT).is_file() else []


def write_probe_plot(folder: str | Path, probe: dict[str, Any] | None) -> str | None:
    """`knowledge_probe.png` from a knowledge probe's counts (`probe.tally`): the file name, or None where the probe
    counted nothing by month (a record written before `by_month` existed)."""
    chart = probe_chart(probe) if probe else None
    if chart is None:
        return None
    records.atomic_write_bytes(Path(folder) / PROBE_PLOT, chart)
    return PROBE_PLOT


def probe_chart(probe: dict[str, Any]) -> bytes | None:
    """Facts known against the month of the fact: one point a month (at its middle, on a time axis so a gap between
    months shows), its size the number of facts that month; the cutoff a vertical line at its day, chance a dashed
    line across."""
    import datetime as dt

    from matplotlib import dates as mdates

    by_month = probe.get("by_month") or {}
    if not by_month:
        return None
    xs = [dt.date.fromisoformat(f"{month}-15") for month in by_month]
    ys = [100 * v["accuracy"] for v in by_month.values()]
    fig = _figure(7, 3.5)
    ax = fig.add_subplot()
    ax.plot(xs, ys, color="tab:blue", alpha=0.4)
    sizes = [12 + 12 * v["total"] for v in by_month.values()]
    ax.scatter(xs, ys, s=sizes, color="tab:blue", zorder=3, label=f"facts known ({probe.get('dataset') or 'probe'})")
    cutoff = dt.date.fromisoformat(probe["cutoff"])
    ax.axvline(cutoff, color="tab:red", label=f"cutoff {cutoff}")
    if probe.get("chance") is not None:
        ax.axhline(100 * probe["chance"], color="grey", linestyle="--", label="chance")
    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax.set_xlabel("month of the fact (point size: facts that month)")
    ax.set_ylabel("facts known (%)")
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _png(fig)


def summary_chart(summary: dict[str, Any]) -> bytes | None:
    """Held-out accuracy by stage: the mean over seeds with its min-max where there are several, the SFT ceiling as
    a dashed line across, the control in grey beside the stages."""
    rows = [summary["start"]] if summary.get("start") else []
    rows += summary["stages"] + ([summary["control"]] if summary["control"] else [])
    rows = [r for r in rows if r["heldout_accuracy"] is not None]
    if not rows:
        return None
    seeds = (summary.get("seeds") or {}).get("stages") or {}
    # the first `beats` claim's stages: the bar they should pass (drawn across) and the contenders (coloured)
    beats = next((c for c in summary.get("claims_spec") or [] if c["kind"] == "beats"), {})
    spec = {"ceiling": beats.get("over"), "rl": beats.get("best_of", [])}
    control_id = summary["control"]["id"] if summary["control"] else None
    fig = _figure(7.5, 3.6, dpi=110)
    ax = fig.add_subplot()
    means = [100 * (seeds[r["id"]]["mean"] if r["id"] in seeds else r["heldout_accuracy"]) for r in rows]
    colors = ["#999999" if r["id"] == control_id else "#DD8452" if r["id"] in spec.get("rl", []) else "#4C72B0"
              for r in rows]  # fmt: skip
    ax.bar([r["id"] for r in rows], means, color=colors)
    if seeds:
        # clamped at 0: the mean of equal values can round a hair past them, and matplotlib refuses a negative bar
        spread = [seeds.get(r["id"]) for r in rows]
        low = [max(0, m - 100 * s["min"]) if s else 0 for s, m in zip(spread, means, strict=True)]
        high = [max(0, 100 * s["max"] - m) if s else 0 for s, m in zip(spread, means, strict=True)]
        ax.errorbar(range(len(rows)), means, yerr=[low, high], fmt="none", ecolor="black", capsize=3, lw=1)
    for i, v in enumerate(means):
        ax.text(i, min(v + 2, 101), f"{v:.1f}%", ha="center", fontsize=7)
    ceiling = next((r for r in rows if r["id"] == spec.get("ceiling")), None)
    if ceiling is not None:
        level = means[rows.index(ceiling)]
        ax.axhline(level, ls="--", color="#C44E52", lw=1)
        ax.text(len(rows) - 0.5, level + 1.5, f"SFT ceiling {level:.1f}%", ha="right", fontsize=7, color="#C44E52")
    ax.set_ylabel(f"held-out {summary['metric'] or 'accuracy'} (%)")
    ax.set_ylim(0, 108)
    ax.tick_params(axis="x", labelsize=7)
    n = len((summary.get("seeds") or {}).get("seeds") or [None])
    spread = f", mean and min-max of {n} seeds" if n > 1 else ", one seed"
    ax.set_title(f"lifecycle {summary['name']}: held-out accuracy by stage{spread}", fontsize=9)
    return _png(fig)
