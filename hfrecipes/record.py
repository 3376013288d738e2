"""The stage record (`record.json`): what a stage saw, did and cost. Read, written atomically, chained to its parent.

Every stage calls, in order: `check_output_dir` (before anything expensive), `start_run` (marks the folder as
this run's), `new_record`, then `finish_record` + `write_record` after training. The card (`card.py`) is rendered
from the record alone.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import platform
import tempfile
import uuid
from pathlib import Path
from typing import Any

from hfrecipes.errors import NonFiniteLoss, UsageError

RECORD = "record.json"
MARKER = ".hfrecipes-run.json"
SCHEMA_VERSION = 1

logger = logging.getLogger(__name__)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: a kill leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def read_record(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON ({e}); the stage record is damaged.") from None


def write_record(folder: str | Path, record: dict[str, Any]) -> Path:
    path = Path(folder) / RECORD
    atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")
    return path


def is_complete(folder: str | Path) -> bool:
    rec = read_record(folder)
    return bool(rec and rec.get("status") == "complete")


def check_output_dir(output_dir: str | Path, stage: str) -> str | None:
    """Refuse a folder that holds anything but an interrupted run of this stage; say which checkpoint to resume.

    Returns the last checkpoint of an interrupted run of the same stage, or None for a new or empty folder. Writes
    nothing, so a refusal leaves the user's files as they were.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output_dir '{out}' is a file. Set output_dir to a new folder.")
    if not out.exists() or not any(out.iterdir()):
        return None
    if is_complete(out):
        raise UsageError(
            f"output_dir '{out}' already holds a finished stage. Set output_dir to a new folder, or delete it "
            "to train again."
        )
    marker = out / MARKER
    if not marker.is_file():
        raise UsageError(
            f"output_dir '{out}' exists and holds other files. Set output_dir to a new or empty folder; "
            "nothing in it was changed."
        )
    info = json.loads(marker.read_text())
    if info.get("stage") != stage:
        raise UsageError(
            f"output_dir '{out}' holds an unfinished '{info.get('stage')}' run, not a '{stage}' run. "
            "Set output_dir to another folder."
        )
    return last_checkpoint(out)


def last_checkpoint(out: Path) -> str | None:
    """The newest complete `checkpoint-N` in a stage folder, or None; incomplete ones are named and skipped."""
    checkpoints = sorted(
        (p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    complete = [p for p in checkpoints if checkpoint_is_complete(p)]
    for p in checkpoints:
        if p not in complete:
            logger.warning("%s is incomplete (killed while saving?): it is skipped on resume", p)
    return str(complete[-1]) if complete else None


def checkpoint_is_complete(folder: Path) -> bool:
    """Trainer writes a checkpoint file by file, `trainer_state.json` last: a kill during a save leaves a folder
    without it, or with a weights file cut short (its safetensors header no longer covers the file). Such a folder
    is skipped, so the previous checkpoint is resumed."""
    from safetensors import SafetensorError, safe_open

    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    for path in folder.glob("*.safetensors"):
        try:
            with safe_open(str(path), framework="numpy"):
                pass
        except (SafetensorError, OSError):
            return False
    return True


def start_run(output_dir: str | Path, stage: str, is_main: bool = True) -> None:
    """Mark the folder as this stage's, so a rerun after a kill resumes instead of refusing."""
    if is_main:
        atomic_write_text(Path(output_dir) / MARKER, json.dumps({"stage": stage, "started": now()}) + "\n")


def drop_pickles(folder: str | Path) -> None:
    """Trainer pickles its arguments next to the model; the record holds them as JSON, so the folder stays
    pickle-free (loading a pickle can run code)."""
    (Path(folder) / "training_args.bin").unlink(missing_ok=True)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("hfrecipes", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def device_info(world_size: int) -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        kind, name = "cuda", torch.cuda.get_device_name(0)
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        kind, name = "mps", "Apple MPS"
    else:
        kind, name = "cpu", platform.processor() or platform.machine()
    return {"kind": kind, "name": name, "count": world_size, "torch_threads": torch.get_num_threads()}


def new_record(stage: str, recipe: dict[str, Any], parent: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "stage": stage,
        "run_id": uuid.uuid4().hex[:12],
        "status": "running",
        "started": now(),
        "finished": None,
        "recipe": recipe,
        "versions": versions(),
        "model": {},
        "data": {},
        "compute": {},
        "metrics": {},
        "parent": parent,
    }


def model_summary(model, source: str, dtype: str | None = None) -> dict[str, Any]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    embedding = model.get_input_embeddings().weight.numel() if hasattr(model, "get_input_embeddings") else 0
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "source": source,
        "params_total": total,
        "params_trainable": trainable,
        "params_embedding": embedding,
        "dtype": dtype or str(next(model.parameters()).dtype).replace("torch.", ""),
        "adapter": None,
    }


def compute_summary(
    params: int,
    tokens: int,
    trainer_flos: float,
    wall_seconds: float,
    device: dict[str, Any],
    *,
    script_args: Any = None,
    measured_co2_kg: float | None = None,
) -> dict[str, Any]:
    """FLOPs by 6*N*D (N = all parameters) beside the trainer's own count (which leaves out embeddings), then
    price, dollars, energy, CO2 and MFU from `cost.py` (the recipe's overrides in `script_args`, else the table's).
    """
    from hfrecipes.cost import stage_costs

    hours = wall_seconds / 3600 * device["count"]
    flops = 6.0 * params * tokens
    return {
        "flops_6nd": flops,
        "flops_trainer": float(trainer_flos),
        "wall_seconds": round(wall_seconds, 3),
        "device": device,
        "device_hours": hours,
        "tokens_per_second": tokens / wall_seconds if wall_seconds > 0 else None,
        **stage_costs(flops, wall_seconds, device, script_args, measured_co2_kg),
    }


def lineage(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The chain of records from the first stage to this one."""
    chain = []
    while record:
        chain.append(record)
        record = record.get("parent")
    return chain[::-1]


def metrics_callback(output_dir: str | Path):
    """A trainer callback that appends every log to `metrics.jsonl` (main process only)."""
    from transformers import TrainerCallback

    path = Path(output_dir) / "metrics.jsonl"

    class MetricsCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                with path.open("a") as f:
                    f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    return MetricsCallback()


def finite_loss_callback(output_dir: str | Path):
    """A trainer callback that stops the stage when a logged loss is nan or inf, or, before a checkpoint is saved,
    when a trainable weight is: the last good checkpoint stays the newest, and no final model or record is written.
    Every rank sees the same (gathered) logs, so every rank stops."""
    from transformers import TrainerCallback

    out = Path(output_dir)

    def stop(step: int, what: str):
        good = last_checkpoint(out)
        kept = f"the last good checkpoint, {good}, is kept" if good else "no checkpoint was saved before it"
        raise NonFiniteLoss(
            f"{what} at step {step}: training stopped; {kept}, and no final model or record was written. Lower "
            "learning_rate, set max_grad_norm, or check the data; rerunning the same command resumes from the "
            "last checkpoint."
        )

    class FiniteLossCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss", "train_loss"):
                value = (logs or {}).get(key)
                if isinstance(value, (int, float)) and not math.isfinite(value):
                    stop(state.global_step, f"the training loss is {value}")

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if control.should_save and model is not None:
                import torch

                if any(not torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
                    stop(state.global_step, "a trainable weight is nan or inf")

    return FiniteLossCallback()


def dataset_entry(name: str, split: str, raw, prepared=None) -> dict[str, Any]:
    """One dataset as the record lists it: name, split, fingerprint, rows (and rows after preparation)."""
    entry = {"name": name, "split": split, "fingerprint": getattr(raw, "_fingerprint", None), "rows": len(raw)}
    if prepared is not None:
        entry["rows_prepared"] = len(prepared)
    return entry


def logged(trainer, key: str) -> list[float]:
    """Every training-time value of `key` the trainer logged, in order (evaluation logs left out)."""
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


def finish_record(
    rec: dict[str, Any],
    trainer,
    result,
    wall_seconds: float,
    datasets: list[dict[str, Any]],
    stage_cutoff: dict[str, Any],
    metrics: dict[str, Any],
    script_args: Any = None,
) -> dict[str, Any]:
    """Fill data, compute and metrics of a fine-tuning stage's record from its trainer, and mark it complete.

    `script_args` carries the recipe's cost overrides (device price, power, PUE, grid intensity) to `compute_summary`.

    Tokens seen are TRL's own count (`num_tokens`, every token of every sequence the model read); examples are
    optimizer steps x global batch (a preference pair is one example).
    """
    from hfrecipes.data import model_cutoff

    args = trainer.args
    steps = trainer.state.global_step
    examples = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    tokens = int((logged(trainer, "num_tokens") or [0])[-1])
    losses = logged(trainer, "loss")
    rec["data"] = {
        "datasets": datasets,
        "examples_seen": examples,
        "tokens_seen": tokens,
        "epochs": trainer.state.epoch,
        "knowledge_cutoff": stage_cutoff,
        "model_cutoff": model_cutoff(stage_cutoff, rec.get("parent"), rec["stage"]),
    }
    rec["compute"] = compute_summary(
        rec["model"]["params_total"],
        tokens,
        trainer.state.total_flos,
        wall_seconds,
        device_info(args.world_size),
        script_args=script_args,
    )
    rec["metrics"] = {
        "steps": steps,
        "train_loss": result.training_loss,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        **metrics,
    }
    rec["status"] = "complete"
    rec["finished"] = now()
    return rec


def close_run(output_dir: str | Path, rec: dict[str, Any]) -> None:
    """Write the finished record and its card, then drop the run marker: the folder is a complete stage."""
    from hfrecipes import card

    write_record(output_dir, rec)
    card.write_card(output_dir, rec)
    (Path(output_dir) / MARKER).unlink(missing_ok=True)
