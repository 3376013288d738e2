"""The measured table of a lifecycle run, for the README: per stage steps, wall time, tokens/s, MFU against this
machine's measured fp32 matmul rate, and held-out accuracy (from the run's records and summary.json).

    hfrecipes lifecycle smollm2-135m-instruct/lifecycle_cpu
    PYTHONPATH=. python bench/lifecycle_table.py runs/smollm2-135m-instruct-cpu --threads 2

MFU here is the model FLOPs a stage did per second over the rate torch's fp32 matmul reaches on this machine with
the same thread count, so it compares a stage with the hardware, not with a data sheet. Model FLOPs per token are
6·N for full training and 4·N for LoRA (N all parameters, as the records count): the frozen base gets no weight
gradients, only the forward pass (2·N) and the activation gradients (2·N). GRPO's tokens include the replies it
generated, which cost only a forward pass each, so its MFU is an upper bound; evaluation counts nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import matmul_rate


def rows(run_dir: Path) -> list[dict]:
    from hfrecipes.record import load_record

    summary = json.loads((run_dir / "summary.json").read_text())
    out = []
    start = summary.get("start")
    if start:
        out.append({**start, "id": "start (the converted GGUF, before any stage)", "tps": None})
    for row in summary["stages"] + ([summary["control"]] if summary.get("control") else []):
        rec = load_record(run_dir / row["id"])
        per_token = (4 if rec.model.adapter else 6) * rec.model.params_total
        out.append({**row, "tps": rec.compute.tokens_per_second, "flops_per_token": per_token})
    return out


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--threads", type=int, default=2, help="torch threads the lifecycle ran with")
    p.add_argument("--rate", type=float, help="a matmul rate measured before (FLOP/s), instead of measuring now")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rate = args.rate or matmul_rate()
    print(f"fp32 matmul rate: {rate / 1e9:.1f} GFLOP/s ({args.threads} threads)")
    print("| stage | steps | wall time | tokens/s | MFU (vs measured matmul) | held-out accuracy |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows(args.run_dir):
        tps, acc = r.get("tps"), r.get("heldout_accuracy")
        mfu = f"{100 * r['flops_per_token'] * tps / rate:.0f}%" if tps else "—"
        wall = f"{r['wall_seconds']:.0f} s" if r.get("wall_seconds") else "—"
        print(
            f"| {r['id']} | {r.get('steps') or '—'} | {wall} | {f'{tps:.0f}' if tps else '—'} | {mfu} | "
            f"{'—' if acc is None else f'{100 * acc:.1f}%'} |"
        )
    summary = json.loads((args.run_dir / "summary.json").read_text())
    print(f"summary: end to end {summary.get('wall_seconds_this_time')} s this run")


if __name__ == "__main__":
    main()
