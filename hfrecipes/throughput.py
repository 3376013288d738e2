"""Steady-state training throughput: the rate of the steps after warm-up, beside the wall-clock average.

The wall-clock average (`record.compute.tokens_per_second`) divides every token by the whole `train()` time, so it
counts what happens once: CUDA context and kernel selection, `torch.compile` compiling, the first optimizer step
allocating its state, evaluations and checkpoint saves. A long run hides that; a short one is dominated by it, and a
card that quotes it understates speed and overstates cost. `StepClock` stamps the end of every optimizer step, and
`steady` measures the steps after `warmup_steps(steps)` warm-up steps, leaving out the intervals that held an
evaluation or a save.

The stamps are host time, taken without a device synchronisation (one per step would itself slow a GPU run): the host
runs ahead of the GPU by a bounded queue of kernels, so over the many intervals of a window the rate is the device's.

    hfrecipes pretrain --config tiny/pretrain     # record.json: compute.steady
"""

from __future__ import annotations

import math
import time
from typing import Any

MIN_WARMUP_STEPS = 3
MIN_MEASURED_STEPS = 3


def warmup_steps(steps: int) -> int:
    """Steps left out before the steady window: at least 3 (compilation, allocator and kernel warm-up fall in the
    first one or two), 5% of a long run."""
    return max(MIN_WARMUP_STEPS, math.ceil(0.05 * steps))


def steady(stamps: list[tuple[int, float]], excluded: set[int], tokens_per_step: float | None) -> dict[str, Any]:
    """The steady-state rate from `(global_step, seconds)` stamps at the end of each optimizer step.

    `excluded`: steps whose interval (from the previous stamp to this one) held an evaluation or a save.
    `tokens_per_step`: tokens trained per optimizer step, all processes together (None: steps/s only).
    Returns `{"steps", "seconds", "warmup_steps", "steps_per_second", "tokens_per_second"}`, or
    `{"note": why}` where the run had too few steps after warm-up to measure.
    """
    if not stamps:
        return {"note": "no optimizer step was timed"}
    skip = warmup_steps(stamps[-1][0])
    window = [(s, t) for s, t in stamps if s >= stamps[0][0] + skip - 1] if len(stamps) > skip else []
    intervals = [
        (b[1] - a[1]) for a, b in zip(window, window[1:], strict=False) if b[0] == a[0] + 1 and b[0] not in excluded
    ]
    if len(intervals) < MIN_MEASURED_STEPS:
        return {
            "note": f"too few steps to measure a steady state: {len(stamps)} timed, {skip} of them warm-up, "
            f"at least {MIN_MEASURED_STEPS} more needed"
        }
    seconds = sum(intervals)
    rate = len(intervals) / seconds if seconds > 0 else None
    return {
        "steps": len(intervals),
        "seconds": round(seconds, 6),
        "warmup_steps": skip,
        "steps_per_second": rate,
        "tokens_per_second": rate * tokens_per_step if rate and tokens_per_step else None,
    }


def step_clock():
    """A trainer callback that stamps every optimizer step's end (`clock.stamps`) and marks the steps whose interval
    held an evaluation or a save (`clock.excluded`)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.stamps: list[tuple[int, float]] = []
            self.excluded: set[int] = set()

        def on_train_begin(self, args, state, control, **kwargs):
            self.stamps, self.excluded = [], set()

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps.append((state.global_step, time.perf_counter()))

        def _mark(self, state):
            # an evaluation or save runs after on_step_end of step N, inside the interval that ends at step N + 1
            self.excluded.add(state.global_step + 1)

        def on_evaluate(self, args, state, control, **kwargs):
            self._mark(state)

        def on_save(self, args, state, control, **kwargs):
            self._mark(state)

    return StepClock()
