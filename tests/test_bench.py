"""The benchmark helpers measure what they claim: padding-free SFT is exact, the step timer sees every step, the
serving curve's percentiles, ratios and record block are what they say and the card shows them; every part of the
GPU benchmark runs (tiny shapes) and writes its results.

pytest tests/test_bench.py
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, subprocess_env

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` lives at the top of the repository


def test_padding_free_matches_padding_token_by_token(tiny_pretrained):
    from bench.packing import exactness, mixed_conversations

    rows = mixed_conversations(8, max_turns=4, seed=0)
    result = exactness(str(tiny_pretrained.output_dir), rows, max_length=256)
    assert result["tokens"] > 0
    assert result["max_abs_logp_packed"] < 1e-4
    assert result["max_abs_logp_wrapped"] > 1e-3  # the contrast is real: wrapped attends across examples


def test_step_timer_sees_every_step_and_runs_the_hook_between(tiny_pretrained, tmp_path):
    import hfrecipes
    from bench.common import timed_steps

    hooked = []
    with timed_steps(after_step=hooked.append) as times:
        hfrecipes.sft(
            "tiny/sft",
            model_name_or_path=str(tiny_pretrained.output_dir),
            max_steps=4,
            per_device_train_batch_size=4,
            output_dir=str(tmp_path / "sft"),
            save_strategy="no",
            dataset_test_split="",
        )
    assert hooked == [1, 2, 3, 4]
    assert len(times.stamps) == len(times.resumed) == 4
    assert times.train_dataloader is not None
    assert all(s > 0 for s in times.per_step(skip=0))


DEVICE = {"kind": "cpu", "name": "x86_64", "count": 1}
MEASURED = "2026-01-01T00:00:00+00:00"


def _levels():
    """Two levels of a serving curve as `bench/serving.py` measures them, from hand-made requests."""
    from bench.serving import Sample, level_stats

    one = [Sample(latency=0.2 + 0.02 * i, ttft=0.02, output_tokens=32) for i in range(8)]
    four = [Sample(latency=0.4 + 0.02 * i, ttft=0.05 + 0.01 * i, output_tokens=32) for i in range(8)]
    return [level_stats(4, four, wall=1.0), level_stats(1, one, wall=2.0)]


def test_percentile_interpolates_between_ranks():
    from bench.serving import percentile

    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(xs, 50) == 3.0 and percentile(xs, 0) == 1.0 and percentile(xs, 100) == 5.0
    assert percentile(xs, 95) == pytest.approx(4.8)  # 95% of the way from rank 0 to rank 4
    assert percentile([1.0, 2.0], 50) == 1.5 and percentile([7.0], 95) == 7.0
    assert math.isnan(percentile([], 50))


def test_serving_levels_and_ratios_against_one_at_a_time():
    from bench.serving import round_order, serving_block, summary, table

    assert round_order([16, 1, 4], 3) == [1, 4, 16, 16, 4, 1, 1, 4, 16]

    block = serving_block(_levels(), DEVICE, MEASURED, "vllm 0.0", max_tokens=32, requests_per_level=8)
    assert set(block) >= {"levels", "device", "measured", "engine"} and block["engine"] == "vllm 0.0"
    one, four = block["levels"]  # sorted by concurrency
    assert (one["concurrency"], four["concurrency"]) == (1, 4)
    assert one["output_tokens"] == 256 and one["output_tokens_per_second"] == 128.0
    assert four["requests_per_second"] == 8.0
    assert one["latency_p50_seconds"] == pytest.approx(0.27) and four["latency_p95_seconds"] == pytest.approx(0.533)
    assert four["tokens_per_second_ratio"] == 2.0 and four["requests_per_second_ratio"] == 2.0
    assert four["latency_p50_ratio"] == pytest.approx(0.47 / 0.27) and four["ttft_p50_ratio"] == pytest.approx(4.25)
    assert all(one[k] == 1.0 for k in ("tokens_per_second_ratio", "latency_p95_ratio", "ttft_p50_ratio"))
    json.dumps(block)  # goes into record.json as it is
    lines = table(block["levels"]).splitlines()
    assert len(lines) == 3 and lines[2].split()[:3] == ["4", "256", "2.00x"]
    assert summary(block["levels"]).startswith("summary: 4 concurrent requests 2.00x the output tokens/s")


def test_card_shows_the_serving_curve_with_its_plot(tmp_path):
    """The bench writes its own file beside the record, never into it; the card reads that file as a measurement."""
    from bench.serving import serving_block
    from hfrecipes import record
    from hfrecipes.errors import UsageError
    from hfrecipes.report import card

    rec = record.new_record("sft", {"path": None, "values": {}}, None)
    rec.update(
        status="complete",
        model={"model_type": "llama", "params_total": 1000, "source": "random init", "adapter": None},
        data={"datasets": [{"name": "tiny:sft"}], "tokens_seen": 10},
        compute=record.compute_summary(1000, 10, 0.0, 36.0, DEVICE),
        metrics={"steps": 1},
    )
    record.write_record(tmp_path, rec)
    card.write_card(tmp_path, rec)
    assert "Throughput against concurrency" not in (tmp_path / "README.md").read_text()
    block = serving_block(_levels(), DEVICE, MEASURED, "vllm 0.0", max_tokens=32, requests_per_level=8)
    (tmp_path / card.SERVING_BENCH).write_text(json.dumps(block))
    card.write_card(tmp_path, rec)
    assert record.read_record(tmp_path) == rec  # the product record is untouched
    text = (tmp_path / "README.md").read_text()
    assert "Throughput against concurrency" in text and "vllm 0.0" in text and "1 x x86_64" in text
    assert "| 1 | 128 | 1.00x | 4 | 270 ms | 333 ms | 20 ms |" in text
    assert "| 4 | 256 | 2.00x | 8 | 470 ms | 533 ms | 85 ms |" in text
    assert "serving.png" not in text  # no plot in the folder: the table alone
    (tmp_path / "serving.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    card.write_card(tmp_path, rec, plots=False)
    text = (tmp_path / "README.md").read_text()
    assert text.count("](serving.png)") == 1 and "## Training curves" not in text  # in the serving section only
    (tmp_path / card.SERVING_BENCH).write_text("{not json")
    with pytest.raises(UsageError, match="serving_bench.json: not valid JSON"):
        card.write_card(tmp_path, rec)
    (tmp_path / card.SERVING_BENCH).write_text(json.dumps(block))
    assert text.index("](serving.png)") < text.index("## Evaluation results")


# Every measurement `bench/gpu.sh` makes, by name as its smoke run writes them (tiny shapes); Liger and QLoRA appear
# where CUDA runs them and print a "skipped:" line elsewhere.
GPU_BENCH_ROWS = (
    "pretrain stage, default flags: tokens/s",
    "pretrain stage, default flags: MFU of the measured matmul rate",
    "pretrain stage, torch_compile=True: tokens/s",
    "pretrain stage, torch_compile=True: MFU of the measured matmul rate",
    "sft stage: steady seconds per step",
    "reward stage: steady seconds per step",
    "dpo stage: steady seconds per step",
    "grpo stage: seconds per step",
    "grpo stage: share of a step spent generating",
    "ppo stage: seconds per step",
    "ppo stage: share of a step spent generating",
    "tiny Llama full fine-tuning: seconds per step",
    "tiny Llama LoRA r16: seconds per step",
)
CUDA_ROWS = {
    "pretrain stage, use_liger_kernel=True: tokens/s": "skipped: pretrain stage with use_liger_kernel=True",
    "tiny Llama QLoRA r16 (NF4): seconds per step": "skipped: QLoRA",
}


def test_gpu_bench_smoke_runs_every_part_and_writes_its_results(tmp_path):
    """`bash bench/gpu.sh --smoke`: every part runs its code path to the end (no part stops, no stage or loop fails)
    and each measurement is one JSON line whose ratio and target verdict follow from its own numbers."""
    from bench.gpu_bench import RESULTS_KEYS

    out = tmp_path / "out"
    run = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), "--smoke"],
        env=subprocess_env(PYTHON=sys.executable, BENCH_OUT=str(out), BUDGET="900"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert "stopped (exit" not in log and ": failed:" not in log, log[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    names = {r["name"] for r in rows}
    assert set(GPU_BENCH_ROWS) <= names, set(GPU_BENCH_ROWS) - names
    for row, skipped in CUDA_ROWS.items():
        assert row in names or skipped in log, row
    for r in rows:
        assert set(r) == set(RESULTS_KEYS) and r["smoke"] is True, r
        assert r["value"] > 0 and math.isfinite(r["value"]) and f"{r['name']}: " in log, r
        if (
            r["ratio"] is not None
        ):  # measured over baseline, but for time per step: the stage's speed over the baseline's
            stage, base = (
                (r["baseline_value"], r["value"]) if r["unit"] == "s/step" else (r["value"], r["baseline_value"])
            )
            assert r["ratio"] == pytest.approx(stage / base), r
        if r["target"]:
            x = r["ratio"] if r["target"]["on"] == "ratio" else r["value"]
            assert r["met"] == (
                x >= r["target"]["threshold"] if r["target"]["op"] == ">=" else x <= r["target"]["threshold"]
            )
    default = next(r for r in rows if r["name"] == "pretrain stage, default flags: tokens/s")
    assert default["baseline"] == "hand-written loop" and default["target"]["threshold"] == 0.95
    assert "| pretrain stage, default flags: tokens/s |" in log  # the summary table, ready for docs/performance.md
