"""The benchmark helpers measure what they claim: padding-free SFT is exact, the step timer sees every step.

pytest tests/test_bench.py
"""

from __future__ import annotations

import sys
from pathlib import Path

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
