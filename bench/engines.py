"""Distributed engines: DDP, DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 on the same model, data and batch, in the same run,
two gloo processes each; what each rank holds, the memory it uses and its step time, as ratios to DDP.

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/engines.py                      # ~41M-parameter Llama, 12 steps
    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/engines.py --repeats 3 --hidden 768 --layers 8
    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/engines.py --smoke              # tiny model, 3 steps: a quick check

Each engine runs the pretrain stage under `accelerate launch --config_file recipes/accelerate/<engine>.yaml
--num_processes 2 --mixed_precision no`: a randomly initialised Llama sized by --hidden and --layers (fp32 weights,
gradients and two AdamW moments: 16 bytes a parameter under DDP), one tokenizer trained once beforehand and shared
by every run. Each rank (this file re-invoked with --worker) reports:
- params/rank: the parameter elements it holds locally (a ZeRO-3 parameter's `ds_tensor`, an FSDP2 DTensor's local
  shard), as a fraction of the model; Adam/rank: the same for the optimizer's state, as a fraction of two moments of
  the whole model. Both are read when training ends, before the stage's save gathers full weights;
- peak RSS (`ru_maxrss`, whole process), and its growth: the peak less the RSS just before the model was built,
  which leaves out the large baseline of Python, torch and the data; train: the same for the peak during training
  only (the high-water mark restarted when training begins, after freed heap memory is handed back to the OS), so
  setup copies that are freed before the first step drop out;
- the median step time after the first --skip steps (warm-up), the ranks' steps pooled.
The table shows the worst rank's memory, medians over --repeats rounds; the order of engines alternates between
rounds, so a burst of load from other processes does not always hit the same engine.

How to read it. Against DDP (which also keeps its gradient buckets beside the gradients), ZeRO-2 shards gradients and
optimizer state (Adam/rank about 1/2 on two ranks) but each rank keeps full weights, and DeepSpeed keeps an fp32 copy
of its partition of the weights (its master copy, cloned even when training in fp32), so it saves less than 8 of the 16
bytes a parameter. ZeRO-3 and FSDP2 shard the weights too (params/rank about 1/2), which is what their resting state
holds; during a step they gather each layer's full weights. FSDP2 (`fsdp_reshard_after_forward`) frees them after the
layer's forward and gathers them again for its backward. ZeRO-3 runs with DeepSpeed's defaults here (accelerate's
generated config sets neither): `stage3_max_live_parameters` and `stage3_max_reuse_distance` of 1e9 let it keep
gathered weights until they are used again, so for a model under a billion parameters the full weights stay resident,
beside the shards, from their forward through the backward, and its peak need not be below ZeRO-2's. RSS counts what
the allocator keeps, not live tensors: glibc keeps freed blocks under its mmap threshold resident, so per-layer
gather-and-free patterns can read above the live bytes. Time goes the other way: every step, ZeRO-2 reduce-scatters
gradients and all-gathers the updated weights, ZeRO-3 and FSDP2 all-gather each layer's weights in the forward and
again in the backward; on CPU all of it runs over gloo through loopback TCP, from the same core that computes, and
DeepSpeed adds its own bucketing and flattening copies. A GPU run with NCCL overlaps most of that communication with
compute; here it is mostly added time, so the step-time ratios are upper bounds of what the engines cost. Deliberate
simplifications: one model size per run, fp32 only, no activation checkpointing, no CPU offload.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import median, timed_steps

ENGINES = ["ddp", "zero2", "zero3", "fsdp2"]
ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now; VmHWM: its high-water mark), in bytes."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def rss_peak() -> int:
    """Peak resident bytes of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def restart_high_water() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it resident), then restart the RSS high-water mark from
    the RSS now, so the mark that follows counts what training allocates, not what setup freed. This resets
    ru_maxrss too."""
    import ctypes

    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def held(t) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole tensor) for a plain, ZeRO-3 or FSDP2 (DTensor) tensor."""
    if hasattr(t, "ds_tensor"):  # ZeRO-3: outside a gather the parameter itself is an empty placeholder
        return t.ds_tensor.numel(), t.ds_numel
    if hasattr(t, "to_local"):
        return t.to_local().numel(), t.numel()
    return t.numel(), t.numel()


def optimizer_elements(optimizer) -> int:
    """Elements of optimizer state (AdamW's moments) this rank holds, under accelerate's and DeepSpeed's wrappers."""
    import torch

    while hasattr(optimizer, "optimizer"):  # AcceleratedOptimizer / DeepSpeed's wrapper -> ZeRO optimizer -> AdamW
        optimizer = optimizer.optimizer
    return sum(
        held(v)[0] for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0
    )


def worker(spec: dict) -> None:
    """One rank of one engine's run: the pretrain stage with its steps timed, then what this rank held and used,
    written to `<spec['out']>/rank<N>.json`."""
    import torch
    import transformers

    import hfrecipes
    from hfrecipes import engines, modeling

    torch.set_num_threads(1)
    seen: dict = {}
    init_model, save_model = modeling.init_model, transformers.Trainer.save_model

    def measured_init(config, seed):
        seen["rss_before"] = status_bytes("VmRSS")
        return init_model(config, seed)

    def begin(train_dataloader, args):  # the model and optimizer are wrapped by now; no step has run
        seen["setup_peak"] = rss_peak()
        restart_high_water()
        seen["rss_train_start"] = status_bytes("VmRSS")

    def measured_save(self, output_dir=None, _internal_call=False):
        if not _internal_call and "train_peak" not in seen:  # training is over; the save may gather full weights
            local, total = map(sum, zip(*(held(p) for p in self.model.parameters()), strict=True))
            seen.update(train_peak=status_bytes("VmHWM"), rss_end=status_bytes("VmRSS"))
            seen.update(params_local=local, params=total, optimizer_local=optimizer_elements(self.optimizer))
            seen["distributed_type"] = str(self.accelerator.distributed_type).split(".")[-1]
        return save_model(self, output_dir, _internal_call)

    modeling.init_model, transformers.Trainer.save_model = measured_init, measured_save
    with timed_steps(on_begin=begin) as times:
        hfrecipes.pretrain("tiny/pretrain", **spec["overrides"])
    rank = int(os.environ.get("RANK", "0"))
    result = {**seen, "rank": rank, "engine": engines.requested(), "steps": times.per_step(spec["skip"])}
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(result))


def train_tokenizer(workdir: str, docs: int) -> str:
    """A tokenizer trained once on the first `docs` documents (a one-step tiny pretrain writes it to its folder)."""
    import hfrecipes

    quiet = dict(save_strategy="no", dataset_test_split="", logging_steps=1, report_to="none")
    out = hfrecipes.pretrain(
        "tiny/pretrain", max_steps=1, max_train_samples=docs, output_dir=f"{workdir}/tok", **quiet
    )
    return str(out.output_dir)


def launch(engine: str, overrides: dict, skip: int, out: Path, env: dict, timeout: int) -> dict:
    """One `accelerate launch` of the pretrain stage under `engine`, two processes: the ranks' reports and its wall
    time, or the error it ended with."""
    from hfrecipes.recipe import recipes_root

    out.mkdir(parents=True)
    spec = dict(overrides={**overrides, "output_dir": str(out / "stage")}, out=str(out), skip=skip)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    cmd += [str(recipes_root() / "accelerate" / f"{engine}.yaml"), "--num_processes", "2", "--mixed_precision", "no"]
    cmd += ["--main_process_port", "0", str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    start = time.perf_counter()
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout} s"}
    wall = time.perf_counter() - start
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    if r.returncode != 0 or len(ranks) != 2:
        lines = [x for x in r.stderr.splitlines() if x.strip() and "Warning" not in x]
        return {"error": f"exit code {r.returncode}: " + " | ".join(lines[-3:])[-600:]}
    return {"ranks": ranks, "wall": wall}


def peak(rank: dict) -> int:
    """A rank's peak RSS over its whole life: before training began, or during it."""
    return max(rank["setup_peak"], rank["train_peak"])


def summarise(runs: list[dict]) -> dict:
    """One engine's row from its runs: the worst rank's holdings and memory, step time over pooled ranks; medians
    over the runs."""
    last = runs[-1]["ranks"]
    steps = [median([s for r in run["ranks"] for s in r["steps"]]) for run in runs]
    return dict(
        params=max(r["params_local"] / r["params"] for r in last),
        optimizer=max(r["optimizer_local"] / (2 * r["params"]) for r in last),
        n=last[0]["params"],
        ran_as=last[0]["distributed_type"],
        peak=median([max(peak(r) for r in run["ranks"]) / MB for run in runs]),
        growth=median([max(peak(r) - r["rss_before"] for r in run["ranks"]) / MB for run in runs]),
        train=median([max(r["train_peak"] - r["rss_before"] for r in run["ranks"]) / MB for run in runs]),
        steps=steps,
        step=median(steps),
        wall=median([run["wall"] for run in runs]),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", nargs="+", default=ENGINES, choices=ENGINES, help="ddp first: the ratios are to it")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=4, help="warm-up steps left out of the step-time medians")
    p.add_argument("--repeats", type=int, default=1, help="rounds of all engines, the order alternating")
    p.add_argument("--hidden", type=int, default=512, help="hidden size; heads of 64, MLP 3x hidden")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--batch", type=int, default=2, help="per-rank batch")
    p.add_argument("--block", type=int, default=128, help="tokens per block")
    p.add_argument("--docs", type=int, default=1000, help="corpus documents trained on (and the tokenizer on)")
    p.add_argument("--tokenizer", help="a tokenizer folder to reuse instead of training one")
    p.add_argument("--timeout", type=int, default=900, help="seconds one engine's launch may take")
    p.add_argument("--smoke", action="store_true", help="tiny model, 3 steps: checks the bench runs, measures little")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if args.smoke:
        args.hidden, args.layers, args.steps, args.skip, args.docs = 128, 2, 3, 1, 200
    if args.hidden % 64:
        p.error(f"--hidden {args.hidden}: must be a multiple of 64 (attention heads of 64)")
    args.skip = min(args.skip, args.steps - 2)
    if args.skip < 0:
        p.error(f"--steps {args.steps}: at least 2, to time one step")

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    heads = args.hidden // 64
    model = dict(
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=64,
        max_position_embeddings=max(512, args.block),
    )
    start = time.perf_counter()
    results: dict[str, list[dict]] = {e: [] for e in args.engines}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = args.tokenizer or train_tokenizer(tmp, args.docs)
        overrides = dict(
            tokenizer_name_or_path=tokenizer,
            train_tokenizer=False,
            model_init_overrides=model,
            max_train_samples=args.docs,
            block_size=args.block,
            per_device_train_batch_size=args.batch,
            max_steps=args.steps,
            logging_steps=args.steps,
            save_strategy="no",
            dataset_test_split="",
            report_to="none",
        )
        for i in range(args.repeats):
            for engine in args.engines if i % 2 == 0 else args.engines[::-1]:
                results[engine].append(
                    launch(engine, overrides, args.skip, Path(tmp, f"{engine}{i}"), env, args.timeout)
                )
                if "error" in results[engine][-1]:
                    print(f"{engine} (round {i + 1}) failed: {results[engine][-1]['error']}", file=sys.stderr)

    rows = {e: summarise(runs) for e, runs in results.items() if all("error" not in r for r in runs)}
    base = rows.get(args.engines[0])
    n = next(iter(rows.values()))["n"] if rows else 0
    print(
        f"Llama {n / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers), fp32, 2 gloo processes x "
        f"batch {args.batch} x {args.block} tokens, {args.steps} steps (first {args.skip} skipped) x {args.repeats} "
        f"rounds; memory: the worst rank; ratios to {args.engines[0]}; {time.perf_counter() - start:.0f} s in all"
    )
    print(
        f"{'engine':<8}{'ran as':<11}{'params/rank':>12}{'Adam/rank':>10}{'peak RSS MB':>13}{'ratio':>7}"
        f"{'growth MB':>11}{'ratio':>7}{'train MB':>10}{'ratio':>7}{'s/step':>9}{'ratio':>7}{'launch s':>10}"
        "   per-round step medians"
    )
    summary = []
    for engine in args.engines:
        if engine not in rows:
            print(f"{engine:<8}failed: {next(r['error'] for r in results[engine] if 'error' in r)}")
            summary.append(f"{engine} failed")
            continue
        r = rows[engine]
        ratio = {k: r[k] / base[k] if base else float("nan") for k in ("peak", "growth", "train", "step")}
        print(
            f"{engine:<8}{r['ran_as']:<11}{r['params']:>12.2f}{r['optimizer']:>10.2f}{r['peak']:>13.0f}"
            f"{ratio['peak']:>6.2f}x{r['growth']:>11.0f}{ratio['growth']:>6.2f}x{r['train']:>10.0f}"
            f"{ratio['train']:>6.2f}x{r['step']:>9.3f}{ratio['step']:>6.2f}x{r['wall']:>10.0f}"
            f"   {[round(s, 3) for s in r['steps']]}"
        )
        if engine != args.engines[0]:
            summary.append(
                f"{engine} growth {ratio['growth']:.2f}x, train {ratio['train']:.2f}x, step {ratio['step']:.2f}x"
            )
    print(f"summary: per rank against {args.engines[0]} (RSS growth, train RSS, step time): {'; '.join(summary)}")


if __name__ == "__main__":
    main()
