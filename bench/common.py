"""Helpers the CPU benchmarks share: a step timer slipped into a stage's trainer, tiny parent checkpoints, medians.

Not a benchmark itself; see `bench/training_overhead.py`, `bench/packing.py`, `bench/rl_rollouts.py`.
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

    def per_step(self, skip: int) -> list[float]:
        """Seconds of each step of the stage (the hook's time left out), the first `skip` steps left out (warm-up)."""
        return [b - a for a, b in zip(self.resumed[skip:-1], self.stamps[skip + 1 :], strict=True)]


@contextlib.contextmanager
def timed_steps(on_begin=None, after_step=None):
    """Inside this block every stage's trainer also reports its step ends to the yielded `StepTimes`.

    `on_begin(train_dataloader, args)` runs when training begins; `after_step(step)` after every step, outside the
    stage's timing (so a hand-written loop can take one step between two of the stage's, and both sides see the
    same moments of a noisy machine). The stages build their callbacks with `record.metrics_callback(output_dir)`;
    this wraps that one callback, so the stage itself runs unchanged.
    """
    from hfrecipes import record

    times = StepTimes()
    original = record.metrics_callback

    def wrapped(output_dir):
        inner = original(output_dir)

        class Timed(type(inner)):
            def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
                times.train_dataloader, times.trainer_args = train_dataloader, args
                if on_begin is not None:
                    on_begin(train_dataloader, args)

            def on_step_end(self, args, state, control, **kwargs):
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
