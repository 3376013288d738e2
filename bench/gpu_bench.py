"""hfrecipes' stages on one GPU, each timed beside its baseline in the same run. `bench/gpu.sh` runs every part in
its own process under its own time cap, then prints the summary.

    python bench/gpu_bench.py pretrain   # 1. pretrain stage vs a hand-written loop: default, compile, Liger; MFU
    python bench/gpu_bench.py finetune   # 2. sft, reward, dpo stages vs plain TRL trainers: steady seconds per step
    python bench/gpu_bench.py rl         # 3. grpo and ppo stages: seconds per step, share of it spent generating
    python bench/gpu_bench.py memory     # 4. full vs LoRA vs QLoRA at 7B: peak memory and step time
    python bench/gpu_bench.py summary    # every measurement in $BENCH_OUT/results.jsonl as a markdown table
    python bench/gpu_bench.py pretrain --smoke   # tiny shapes, a few steps, on a CPU: the same code paths

Steady state everywhere: the first steps of every run (CUDA warm-up, the optimizer's first step, compilation) are
left out, and a stage is timed from a callback at each optimizer step's end (`bench.common.timed_steps`). Each
measurement is printed as a plain line as it is made and appended as one JSON line to `$BENCH_OUT/results.jsonl`
(`RESULTS_KEYS`); the stage folders live in a scratch folder (`--work`), and no record is written to.
Models are built from configs with random weights and the data is generated or bundled: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = "results.jsonl"
RESULTS_KEYS = (
    "part", "name", "value", "unit", "baseline", "baseline_value", "ratio", "target", "met", "details", "device",
    "smoke", "commit", "time",
)  # fmt: skip
# Nominal dense bf16 tensor-core peak per device (vendor data sheets, SXM parts).
NOMINAL_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
# The pretraining shape: a SmolLM-like Llama, 123M parameters with the 49,152-token vocabulary (tied embeddings).
LLAMA_125M = dict(
    vocab_size=49152,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=12,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
LLAMA_SMOKE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def nominal_peak() -> float | None:
    """The device's nominal dense bf16 peak in FLOP/s; None on a CPU or an unlisted GPU."""
    name = device_name()
    return next((v for k, v in NOMINAL_BF16.items() if k in name), None) if cuda() else None


def matmul_rate(smoke: bool) -> tuple[float, str]:
    """Measured FLOP/s of a square matmul: bf16 8192^3 on a GPU (fp32 512^3 in a CPU smoke run), and its label."""
    import torch

    n, dtype = (512, torch.float32) if smoke or not cuda() else (8192, torch.bfloat16)
    device = "cuda" if cuda() else "cpu"
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    reps = 5 if smoke else 50
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - start), f"{str(dtype).removeprefix('torch.')} matmul rate, {n}^3"


def missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def window_rate(stamps: list[float], skip: int) -> float:
    """Steps per second between the end of step `skip` and the last stamp (stamps: the end of every step)."""
    if len(stamps) <= skip:
        raise RuntimeError(f"{len(stamps)} steps timed, fewer than the {skip} warm-up steps and one more")
    return (len(stamps) - skip) / (stamps[-1] - stamps[skip - 1])


def quiet_stage(work: Path, name: str) -> dict:
    """Keys every benchmarked stage run takes: a new folder under `work`, no checkpoints, no reporting, no progress
    bars, no held-out split."""
    out = tempfile.mkdtemp(dir=work, prefix=f"{name}-")
    return dict(output_dir=out, save_strategy="no", report_to="none", dataset_test_split="", seed=0, disable_tqdm=True)


def steady_of(record: dict | None) -> dict:
    """What the stage record says about its speed: steady-state and whole-run tokens/s, and MFU."""
    compute = (record or {}).get("compute") or {}
    steady = compute.get("steady") or {}
    return {
        "record_steady_tokens_per_second": steady.get("tokens_per_second"),
        "record_steady_mfu": steady.get("mfu"),
        "record_tokens_per_second": compute.get("tokens_per_second"),
        "record_precision": compute.get("precision"),
    }


def free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def short(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


# ------------------------------------------------------------------------------------------------ results


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "fraction":
        return f"{value:.1%}"
    if unit == "tokens/s":
        return f"{value:,.0f} tokens/s"
    if unit == "s/step":
        return f"{value:.3g} s/step"
    if unit == "GiB":
        return f"{value:.2f} GiB"
    return f"{value:.3g} {unit}"


def fmt_target(target: dict | None) -> str:
    if not target:
        return ""
    threshold = f"{target['threshold']:.0%}" if target["on"] == "value" else f"{target['threshold']:.2f}x"
    return f"{target['on']} {target['op']} {threshold}"


class Results:
    """Prints each measurement as one plain line and appends it to `$BENCH_OUT/results.jsonl`."""

    def __init__(self, part: str, smoke: bool):
        out = Path(os.environ.get("BENCH_OUT") or tempfile.mkdtemp(prefix="hfrecipes-bench-"))
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / RESULTS
        self.part, self.smoke = part, smoke
        self.device = device_name()
        self.commit = _commit()

    def emit(self, name: str, value: float, unit: str, *, baseline: str | None = None, baseline_value=None,
             ratio: float | None = None, target: tuple[str, str, float] | None = None, **details) -> dict:  # fmt: skip
        """One measurement. `ratio`: the stage against its baseline, oriented so higher is better for speed (and
        lower for memory); `target`: (on "ratio" or "value", ">=" or "<=", threshold)."""
        goal = dict(zip(("on", "op", "threshold"), target, strict=True)) if target else None
        met = None
        if goal:
            x = ratio if goal["on"] == "ratio" else value
            met = None if x is None else (x >= goal["threshold"] if goal["op"] == ">=" else x <= goal["threshold"])
        row = {
            "part": self.part,
            "name": name,
            "value": value,
            "unit": unit,
            "baseline": baseline,
            "baseline_value": baseline_value,
            "ratio": ratio,
            "target": goal,
            "met": met,
            "details": details,
            "device": self.device,
            "smoke": self.smoke,
            "commit": self.commit,
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        line = f"{name}: {fmt(value, unit)}"
        if baseline:
            line += f" | {baseline}: {fmt(baseline_value, unit)}"
        if ratio is not None:
            line += f" | ratio {ratio:.2f}x"
        if goal:
            line += f" | target {fmt_target(goal)}: {'met' if met else 'NOT met'}"
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        return row


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def summary(path: Path) -> str:
    """The markdown table of every measurement in `path`, rows as `docs/performance.md` has them."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    if not rows:
        return f"no measurements in {path}"
    first = rows[0]
    lines = [
        f"device: {first['device']}; commit {first['commit']}; {first['time'][:10]}"
        + ("; SMOKE RUN (tiny shapes on a CPU: not a measurement)" if first["smoke"] else ""),
        "",
        "| part | measurement | result | baseline (same run) | ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = f"{r['baseline']}: {fmt(r['baseline_value'], r['unit'])}" if r["baseline"] else ""
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else ""
        target = fmt_target(r["target"]) + ({True: " (met)", False: " (not met)"}.get(r["met"], ""))
        lines.append(f"| {r['part']} | {r['name']} | {fmt(r['value'], r['unit'])} | {base} | {ratio} | {target} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the fine-tuning model


def finetune_model(work: Path, smoke: bool) -> str:
    """The model parts 2 and 3 fine-tune: the pretraining shape (~125M, 49,152-token vocabulary) with random fp32
    weights and the tiny tokenizer (chat template included; the ids past it are never fed, and a sampled one decodes
    to nothing), built once under `work` (a tiny Llama in a smoke run)."""
    folder = work / "model"
    if (folder / "model.safetensors").is_file():
        return str(folder)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from hfrecipes.tiny.tokenizer import train_tokenizer

    tok = train_tokenizer([d["text"] for d in corpus_documents(smoke)], vocab_size=2048, model_max_length=2048)
    shape = dict(LLAMA_SMOKE, vocab_size=len(tok)) if smoke else LLAMA_125M
    config = AutoConfig.for_model(
        "llama", **shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    staging = Path(tempfile.mkdtemp(dir=work, prefix=".model-"))
    model.save_pretrained(staging)
    tok.save_pretrained(staging)
    staging.rename(folder)  # whole or not there: a part stopped while saving leaves no half model to the next
    print(f"fine-tuning model: Llama {model.num_parameters() / 1e6:.3g}M parameters, random weights, tiny tokenizer")
    return str(folder)


def corpus_documents(smoke: bool) -> list[dict]:
    from hfrecipes.tiny import corpus

    return corpus.documents(200 if smoke else 2000)


# ------------------------------------------------------------------------------------------------ command line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=["pretrain", "finetune", "rl", "memory", "summary"])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, a few steps: the code paths, on a CPU")
    p.add_argument("--work", default=None, help="scratch folder for stage outputs and the built model")
    args = p.parse_args()
    for key in (
        "HF_DATASETS_DISABLE_PROGRESS_BARS",
        "HF_HUB_DISABLE_PROGRESS_BARS",
        "HF_HUB_OFFLINE",
        "HF_DATASETS_OFFLINE",
    ):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # the load reports of random-weight models, mostly
    out = Path(os.environ.get("BENCH_OUT") or tempfile.gettempdir())
    if args.part == "summary":
        print(summary(out / RESULTS))
        return
    lacking = missing("torch", "transformers", "trl", "datasets", "peft", "accelerate")
    if lacking:
        print(f"skipped: part {args.part} ({', '.join(lacking)} not installed)")
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="hfrecipes-bench-work-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.part == "pretrain":
        from bench import gpu_pretrain as part
    elif args.part in ("finetune", "rl"):
        from bench import gpu_stages as part
    else:
        from bench import gpu_memory as part
    results = Results(args.part, args.smoke)
    getattr(part, args.part)(work, args.smoke, results)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
