"""Kill and resume: a stage killed with SIGKILL mid-training, started again with the same command, resumes from
its last complete checkpoint (skipping one cut short by the kill) and logs the same losses, step for step, as an
uninterrupted run: pretrain, sft, reward, dpo and grpo. A nan/inf loss stops a stage naming the step, keeping the last
good checkpoint and writing no final model or record: pretrain and sft."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import subprocess_env

from hfrecipes import cli, record
from hfrecipes.stagerun import StageRun

ENV = subprocess_env()
# Short runs: a loss every step, no held-out evaluation, every checkpoint kept
QUICK = ["--logging_steps", "1", "--dataset_test_split", "", "--save_total_limit", "3"]
# pretraining on enough of the corpus for its steps, its tokenizer trained on that part; no knowledge probe at the end
PRETRAIN = ["--max_train_samples", "2000", "--knowledge_probe", ""]
FROM_SFT = ["--max_steps", "6", "--save_steps", "2", "--max_train_samples", "256"]

# stage: (flags, the fixture whose folder the stage starts from, the checkpoint after which the run is killed, whether
# that checkpoint's weights are then cut short (a kill during its save), the logged values compared step by step)
RESUMES = {
    "pretrain": (
        ["--config", "tiny/pretrain", *PRETRAIN, "--max_steps", "14", "--save_steps", "4"],
        None,
        8,
        True,
        ["loss"],
    ),
    "sft": (
        ["--config", "tiny/sft", "--max_steps", "12", "--save_steps", "4", "--per_device_train_batch_size", "8"]
        + ["--max_train_samples", "512"],
        "tiny_pretrained",
        4,
        False,
        ["loss"],
    ),
    "reward": (["--config", "tiny/reward", *FROM_SFT], "tiny_sft", 2, False, ["loss", "accuracy"]),
    "dpo": (["--config", "tiny/dpo", *FROM_SFT], "tiny_sft", 2, False, ["loss", "rewards/margins"]),
    # sampled replies: the same rewards, step for step, show the generator's random state was restored too
    "grpo": (
        ["--config", "tiny/grpo", *FROM_SFT, "--per_device_train_batch_size", "32", "--gold_dataset_name", ""],
        "tiny_sft",
        2,
        False,
        ["loss", "reward"],
    ),
}


def _logged(folder: Path, key: str) -> dict[int, float]:
    """A logged value per step; a step logged twice (by the killed run, then by the resumed one) keeps the later."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


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
        weights = next((out / f"checkpoint-{kill_after}").glob("*.safetensors"))
        os.truncate(weights, weights.stat().st_size // 2)
    resume_from = record.check_output_dir(out, stage)
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert record.is_complete(out)
    return int(resume_from.rsplit("-", 1)[1])


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(RESUMES))
def test_a_stage_killed_mid_training_resumes_with_the_same_curve(stage, request, tmp_path):
    flags, parent, kill_after, cut_short, keys = RESUMES[stage]
    if parent is not None:
        flags = [*flags, "--model_name_or_path", str(request.getfixturevalue(parent).output_dir)]
    flags = [*flags, *QUICK]
    resumed_from = _kill_and_resume(stage, flags, tmp_path / "killed", kill_after, cut_short)
    save_steps, steps = (int(flags[flags.index(f) + 1]) for f in ("--save_steps", "--max_steps"))
    # a checkpoint cut short is skipped for the one before it; else the run went on from the one it was killed after
    assert resumed_from == kill_after - save_steps if cut_short else resumed_from >= kill_after
    # the uninterrupted run, in this process (the same command through the same entry point)
    assert cli.main([stage, *flags, "--output_dir", str(tmp_path / "reference")]) == 0
    for key in keys:
        a, b = _logged(tmp_path / "killed", key), _logged(tmp_path / "reference", key)
        assert sorted(a) == sorted(b) == list(range(1, steps + 1)), key
        diff = max(abs(a[s] - b[s]) for s in range(resumed_from + 1, steps + 1))
        assert diff < 1e-5, (key, a, b)
        print(f"{stage}: resumed from step {resumed_from}; max |{key} difference| after it: {diff:.3g}")


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


# stage: (flags, the fixture whose folder the stage starts from)
DIVERGES = {
    "pretrain": (["--config", "tiny/pretrain", *PRETRAIN], None),
    "sft": (
        ["--config", "tiny/sft", "--per_device_train_batch_size", "8", "--max_train_samples", "256"],
        "tiny_pretrained",
    ),
}


@pytest.mark.parametrize("stage", list(DIVERGES))
def test_non_finite_loss_stops_naming_the_step(stage, request, tmp_path, capsys):
    """A learning rate of 1e30 sends the loss to nan or inf within a few steps: the stage stops with one message
    naming the step, keeps the last checkpoint saved before it (whose weights are finite), and writes neither a
    final model nor a record."""
    flags, parent = DIVERGES[stage]
    if parent is not None:
        flags = [*flags, "--model_name_or_path", str(request.getfixturevalue(parent).output_dir)]
    out = tmp_path / "diverged"
    argv = [stage, *flags, "--max_steps", "8", "--save_steps", "1", *QUICK, "--save_total_limit", "2"]
    argv += ["--learning_rate", "1e30", "--warmup_steps", "0", "--lr_scheduler_type", "constant"]
    assert cli.main([*argv, "--max_grad_norm", "0", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("hfrecipes: error:") == 1, err
    assert "at step" in err and ("nan" in err or "inf" in err), err
    assert "last good checkpoint" in err
    assert not (out / record.RECORD).exists()
    assert not (out / "model.safetensors").exists()
    good = record.check_output_dir(out, stage)
    assert good is not None and Path(good).name in err, err
    from safetensors.torch import load_file

    weights = load_file(next(Path(good).glob("*.safetensors")))
    assert all(t.isfinite().all() for t in weights.values() if t.is_floating_point())
