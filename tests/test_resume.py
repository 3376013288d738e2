"""Kill and resume: a stage killed with SIGKILL mid-training, started again with the same command, resumes from
its last complete checkpoint (skipping one cut short by the kill) and logs the same losses, step for step, as an
uninterrupted run. A nan/inf loss stops a stage naming the step, keeping the last good checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hfrecipes
from hfrecipes import cli, record
from hfrecipes.stagerun import StageRun

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(hfrecipes.__file__).parents[1])}


def _losses(folder: Path) -> dict[int, float]:
    """Loss per step; a step logged twice (by the killed run, then by the resumed one) keeps the later value."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _kill_and_resume(stage: str, args: list[str], out: Path, kill_after: int, cut_short: bool) -> int:
    """Run the stage, SIGKILL it once checkpoint-`kill_after` is complete, optionally cut that checkpoint's weights
    short (a kill during its save), rerun the same command; returns the step the rerun resumed from."""
    cmd = [sys.executable, "-m", "hfrecipes", stage, *args, "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / f"checkpoint-{kill_after}" / "trainer_state.json").is_file():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / record.RECORD).exists(), "the run finished before it was killed"
    if cut_short:
        weights = out / f"checkpoint-{kill_after}" / "model.safetensors"
        os.truncate(weights, weights.stat().st_size // 2)
    resume_from = record.check_output_dir(out, stage)
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert record.is_complete(out)
    return int(resume_from.rsplit("-", 1)[1])


def _assert_same_curve(resumed: Path, reference: Path, resumed_from: int, steps: int) -> float:
    a, b = _losses(resumed), _losses(reference)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    diff = max(abs(a[s] - b[s]) for s in range(resumed_from + 1, steps + 1))
    assert diff < 1e-5, (a, b)
    return diff


@pytest.mark.slow
def test_pretrain_killed_during_a_save_resumes_from_the_previous_checkpoint(tmp_path):
    steps = 14
    args = ["--config", "tiny/pretrain", "--max_steps", str(steps), "--save_steps", "4", "--logging_steps", "1"]
    args += ["--dataset_test_split", "", "--save_total_limit", "3"]
    resumed_from = _kill_and_resume("pretrain", args, tmp_path / "killed", kill_after=8, cut_short=True)
    assert resumed_from == 4  # checkpoint-8 was cut short, so the run went back to checkpoint-4
    reference = tmp_path / "reference"
    r = subprocess.run([sys.executable, "-m", "hfrecipes", "pretrain", *args, "--output_dir", str(reference)], env=ENV)
    assert r.returncode == 0
    diff = _assert_same_curve(tmp_path / "killed", reference, resumed_from, steps)
    print(f"pretrain: resumed from step {resumed_from}; max |loss difference| after it: {diff:.3g}")


@pytest.mark.slow
def test_sft_killed_mid_training_resumes_with_the_same_curve(tiny_pretrained, tmp_path):
    steps = 12
    args = ["--config", "tiny/sft", "--model_name_or_path", str(tiny_pretrained.output_dir)]
    args += ["--max_steps", str(steps), "--save_steps", "4", "--logging_steps", "1", "--dataset_test_split", ""]
    args += ["--per_device_train_batch_size", "8", "--max_train_samples", "512", "--save_total_limit", "3"]
    resumed_from = _kill_and_resume("sft", args, tmp_path / "killed", kill_after=4, cut_short=False)
    assert resumed_from >= 4
    reference = tmp_path / "reference"
    r = subprocess.run([sys.executable, "-m", "hfrecipes", "sft", *args, "--output_dir", str(reference)], env=ENV)
    assert r.returncode == 0
    diff = _assert_same_curve(tmp_path / "killed", reference, resumed_from, steps)
    print(f"sft: resumed from step {resumed_from}; max |loss difference| after it: {diff:.3g}")


def test_incomplete_checkpoints_are_skipped(tmp_path):
    out = tmp_path / "run"
    StageRun("sft", out, {}).start()
    for step in (2, 4, 6):
        ck = out / f"checkpoint-{step}"
        ck.mkdir(parents=True)
        (ck / "trainer_state.json").write_text("{}")
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(100, dtype="float32")}, out / "checkpoint-4" / "model.safetensors")
    (out / "checkpoint-6" / "trainer_state.json").unlink()  # killed before its last file
    assert record.check_output_dir(out, "sft") == str(out / "checkpoint-4")
    os.truncate(out / "checkpoint-4" / "model.safetensors", 50)  # killed while writing the weights
    assert record.check_output_dir(out, "sft") == str(out / "checkpoint-2")


def test_non_finite_loss_stops_naming_the_step(tmp_path, capsys):
    out = tmp_path / "diverged"
    argv = ["pretrain", "--config", "tiny/pretrain", "--max_steps", "8", "--save_steps", "1", "--logging_steps", "1"]
    argv += ["--learning_rate", "1e30", "--warmup_steps", "0", "--lr_scheduler_type", "constant"]
    argv += ["--max_grad_norm", "0", "--dataset_test_split", "", "--output_dir", str(out), "--save_total_limit", "2"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "at step" in err and ("nan" in err or "inf" in err), err
    assert "last good checkpoint" in err
    assert not (out / record.RECORD).exists()
    assert not (out / "model.safetensors").exists()
    assert record.check_output_dir(out, "pretrain") is not None
