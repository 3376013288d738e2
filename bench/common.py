"""Helpers the benchmarks share: a step timer slipped into a stage's trainer, a timer of every generation call, tiny
parent checkpoints, medians.

Not a benchmark itself; see `bench/training_overhead.py`, `bench/packing.py`, `bench/rl_rollouts.py`, `bench/gpu.sh`.
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import time


class StepTimes:
    """Timestamps of every optimizer step of the stage's trainer, and the dataloader it trained from."""

    def __init__(self):
        self.stamps: list[float] = []  # step ends
        self.resumed: list[float] = []  # when the trainer got control back after the `after_step` hook
        self.train_dataloader = None
        self.trainer_args = None
        self.model_dtype = None  # of the trained weights, e.g. "float32"
        self.attn_implementation = None

    def per_step(self, skip: int) -> list[float]:
        """Seconds of each step of the stage (the hook's time left out), the first `skip` steps left out (warm-up)."""
        return [b - a for a, b in zip(self.resumed[skip:-1], self.stamps[skip + 1 :], strict=True)]


@contextlib.contextmanager
def timed_steps(on_begin=None, after_step=None, sync_steps: set[int] | None = None):
    """Inside this block every stage's trainer also reports its step ends to the yielded `StepTimes`.

    `on_begin(train_dataloader, args)` runs when training begins; `after_step(step)` after every step, outside the
    stage's timing (so a hand-written loop can take one step between two of the stage's, and both sides see the
    same moments of a noisy machine). The stages build their callbacks with `record.metrics_callback(output_dir)`;
    this wraps that one callback, so the stage itself runs unchanged. On a CUDA device the stamps of the steps in
    `sync_steps` (None: every step) first wait for the queued kernels, so the time between two of them is the
    device's, not the host's, which runs ahead; a wait at every step would idle the device while the host prepares
    the next one, so a rate over a window syncs at its two ends only.
    """
    import torch

    from hfrecipes import record

    times = StepTimes()
    original = record.metrics_callback
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def wrapped(output_dir):
        inner = original(output_dir)

        class Timed(type(inner)):
            def on_train_begin(self, args, state, control, train_dataloader=None, model=None, **kwargs):
                times.train_dataloader, times.trainer_args = train_dataloader, args
                if model is not None:
                    times.model_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
                    times.attn_implementation = getattr(model.config, "_attn_implementation", None)
                if on_begin is not None:
                    on_begin(train_dataloader, args)

            def on_step_end(self, args, state, control, **kwargs):
                if sync_steps is None or state.global_step in sync_steps:
                    sync()
                times.stamps.append(time.perf_counter())
                if after_step is not None:
                    after_step(state.global_step)
                times.resumed.append(time.perf_counter())

        timed = Timed.__new__(Timed)
        timed.__dict__.update(inner.__dict__)
        return timed

    record.metrics_callback = wrapped
    try:
        yield times
    finally:
        record.metrics_callback = original


@contextlib.contextmanager
def timed_generate():
    """Yields a list that collects (start, end) of every generation call made inside the block: transformers'
    `generate`, and with vLLM TRL's colocated `generate` and the weight sync before it."""
    from transformers.generation.utils import GenerationMixin

    from hfrecipes import vllm_support

    targets = [(GenerationMixin, "generate")]
    if vllm_support.vllm_available():
        from trl.generation.vllm_generation import VLLMGeneration

        # TRL's sync, or the one hfrecipes binds to the instance under vLLM >= 0.32 (looked up when it binds it)
        targets += [
            (VLLMGeneration, "generate"),
            (VLLMGeneration, "sync_weights"),
            (vllm_support, "colocate_reload_weights"),
        ]
    calls: list[tuple[float, float]] = []
    originals = [(owner, name, getattr(owner, name)) for owner, name in targets]

    def timed(original):
        def call(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                calls.append((start, time.perf_counter()))

        return call

    for owner, name, original in originals:
        setattr(owner, name, timed(original))
    try:
        yield calls
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def shares(stamps: list[float], begins: list[float], calls: list[tuple[float, float]], skip: int):
    """(seconds per step, generation seconds per step) of each step after the first `skip`."""
    out = []
    for i in range(skip, len(stamps)):
        begin, end = begins[i], stamps[i]
        gen = sum(min(e, end) - max(s, begin) for s, e in calls if e > begin and s < end)
        out.append((end - begin, gen))
    return out


def generation_shares(stage: str, recipe: str | None, overrides: dict, skip: int):
    """Run `stage` from `recipe` (None: the stage's defaults) with `overrides`; returns `shares` of its steps: the
    seconds of each step after the first `skip`, and the seconds of it spent in generation calls."""
    import hfrecipes
    from hfrecipes import record

    begins: list[float] = []
    with timed_steps() as times, timed_generate() as calls:
        timed = record.metrics_callback  # the step-end timer of `timed_steps`; step begins are added here

        def with_begin(output_dir):
            cb = timed(output_dir)
            cb.on_step_begin = lambda *a, **k: begins.append(time.perf_counter())
            return cb

        record.metrics_callback = with_begin
        try:
            getattr(hfrecipes, stage)(recipe, **overrides)
        finally:
            record.metrics_callback = timed
    return shares(times.stamps, begins, calls, skip)


def parents(workdir: str, steps: int = 10) -> tuple[str, str]:
    """A tiny pretrained checkpoint and a tiny SFT checkpoint on top of it (a few steps each; only shapes matter)."""
    import hfrecipes

    quiet = dict(save_strategy="no", report_to="none", dataset_test_split="", logging_steps=steps)
    pre = hfrecipes.pretrain("tiny/pretrain", max_steps=steps, output_dir=f"{workdir}/pretrain", **quiet)
    sft = hfrecipes.sft(
        "tiny/sft", model_name_or_path=str(pre.output_dir), max_steps=steps, output_dir=f"{workdir}/sft", **quiet
    )
    return str(pre.output_dir), str(sft.output_dir)


def deltas(stamps: list[float]) -> list[float]:
    """Differences of consecutive timestamps."""
    return [b - a for a, b in itertools.pairwise(stamps)]


def quantile(xs: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of xs."""
    xs = sorted(xs)
    return xs[min(int(q * len(xs)), len(xs) - 1)] if xs else float("nan")


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def matmul_rate(n: int = 1024, repeats: int = 4, trials: int = 5) -> float:
    """Measured fp32 FLOP/s of an n x n matmul on this machine and thread count: the best of a few short trials, as
    other processes only ever slow a trial down."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start))
    return best
