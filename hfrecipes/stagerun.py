"""`StageRun`: the one owner of a stage run's record life, used by every stage and by export.

A stage's `run()` keeps its training code in full and calls, in order:

    run = StageRun(STAGE, training_args.output_dir, recipe, parent_dir=model_args.model_name_or_path)
    ...                                   # data and tokenizer checks: nothing written yet
    run.start(training_args.process_index == 0)          # marks the folder as this run's
    trainer = Trainer(..., callbacks=run.callbacks())     # metrics.jsonl, stop on a non-finite loss
    run.describe_model(trainer.model, source, model_args)
    result = run.train(trainer)                           # timed; CO2 measured where codecarbon is installed
    trainer.save_model(...)
    return run.finish(trainer, result, script_args, train_raw, cutoff=..., heldout=Heldout(...), metrics={...})

`finish` fills data, compute and metrics, writes `record.json` and the card, drops Trainer's pickle and the run
marker on the main process, waits for the other processes and returns `(output_dir, record)`. The record module
holds the pieces; this one sits above both it and the card, so neither imports the other.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from hfrecipes import record, throughput
from hfrecipes.costs import measured_emissions
from hfrecipes.data import model_cutoff
from hfrecipes.errors import UsageError
from hfrecipes.record import Heldout
from hfrecipes.report import card


class StageRun:
    """The record of one stage run, from the output-folder check to the closed folder.

    The constructor checks the output folder (a refusal writes nothing) and finds the checkpoint to resume
    (`resume_from`); `parent_dir` is the folder of the checkpoint the stage starts from, whose record becomes the
    parent (None for a model with no hfrecipes record, or no parent at all).
    """

    def __init__(
        self,
        stage: str,
        output_dir: str | Path,
        recipe: dict[str, Any],
        parent_dir: str | Path | None = None,
        check_output: bool = True,
    ):
        self.stage = stage
        self.output_dir = Path(output_dir)
        self.resume_from = record.check_output_dir(self.output_dir, stage) if check_output else None
        self.parent = record.read_record(parent_dir) if parent_dir else None
        self.record = record.new_record(stage, recipe, self.parent)
        self.wall_seconds: float | None = None
        self.co2_kg: float | None = None
        self.co2_failure: str | None = None  # why codecarbon measured nothing, where it failed
        self.clock = throughput.step_clock()

    # ------------------------------------------------------------------------------------------------ start

    def start(self, is_main: bool = True) -> None:
        """Mark the folder as this stage's, so a rerun after a kill resumes instead of refusing. Every process calls
        it, and the main process marks the folder only once every process has checked it (the constructor): a
        process still checking would find the marker's temporary file and refuse the folder as someone else's."""
        from accelerate import PartialState

        PartialState().wait_for_everyone()
        if is_main:
            marker = {"stage": self.stage, "started": record.now()}
            record.atomic_write_text(self.output_dir / record.MARKER, json.dumps(marker) + "\n")

    def callbacks(self) -> list:
        """The trainer callbacks every stage takes: every log to `metrics.jsonl`; stop on a non-finite loss; time each
        step for the steady-state rate."""
        return [record.metrics_callback(self.output_dir), record.finite_loss_callback(self.output_dir), self.clock]

    def describe_model(self, model, source: str, model_args=None, dtype: str | None = None, **extra) -> None:
        """The record's model block: architecture, parameter counts, dtype, the LoRA adapter where there is one."""
        from hfrecipes.modeling import adapter_summary, head_of

        self.record["model"] = record.model_summary(model, source, dtype)
        self.record["model"]["head"] = head_of(self.record["model"]["architecture"])
        if model_args is not None:
            self.record["model"]["adapter"] = adapter_summary(model, model_args)
        self.record["model"].update(extra)

    def describe_teacher(self, model, source: str, teacher_record: dict[str, Any] | None = None) -> None:
        """The record's teacher block (distillation): the frozen model the stage learned from, its own record's run
        and stage where it has one. `fill` prices its forward passes from its parameters."""
        summary = record.model_summary(model, source)
        self.record["teacher"] = {
            **{k: summary[k] for k in ("source", "architecture", "model_type", "params_total", "dtype")},
            "run_id": (teacher_record or {}).get("run_id"),
            "stage": (teacher_record or {}).get("stage"),
        }

    # ------------------------------------------------------------------------------------------------ train

    @contextlib.contextmanager
    def measured(self, enabled: bool = True):
        """Time a block and, where codecarbon is installed and `enabled` (the main process), measure its CO2."""
        start = time.perf_counter()
        with measured_emissions(self.output_dir, enabled=enabled) as co2:
            try:
                yield
            finally:
                self.wall_seconds = time.perf_counter() - start
        self.co2_kg = co2.kg
        self.co2_failure = co2.failure

    def abandon(self) -> None:
        """A new run refused after `start`: the files it made go (its marker, the metrics log its callback opened),
        and the folder too where nothing else is in it."""
        if self.resume_from is None:
            for name in (record.MARKER, "metrics.jsonl"):
                (self.output_dir / name).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.output_dir.rmdir()

    def train(self, trainer, **kwargs):
        """`trainer.train()` from the checkpoint to resume (if any), measured."""
        try:
            check_examples(trainer)
        except UsageError:
            self.abandon()
            raise
        with self.measured(trainer.is_world_process_zero()):
            return trainer.train(resume_from_checkpoint=self.resume_from, **kwargs)

    # ----------------------------------------------------------------------------------------------- finish

    def fill(
        self,
        trainer,
        result,
        script_args,
        train_raw,
        *,
        cutoff: dict[str, Any],
        heldout: Heldout | None = None,
        metrics: dict[str, Any] | None = None,
        datasets: list[dict[str, Any]] | None = None,
        tokens: int | None = None,
        examples: int | None = None,
    ) -> dict[str, Any]:
        """Fill data, compute and metrics from the trainer, and mark the record complete.

        `script_args` names the training data (`train_raw`) and carries the recipe's cost overrides (device price,
        power, PUE, grid intensity); `datasets` replaces the default entry of that data. Tokens seen default to
        TRL's own count (`consumed_tokens`, every token of every sequence the model read); examples to optimizer
        steps x global batch (a preference pair is one example). A teacher (`describe_teacher`) read those tokens
        too: its forward passes count in the FLOPs.
        """
        from hfrecipes.modeling import precision

        args, rec = trainer.args, self.record
        if datasets is None:
            datasets = [record.dataset_entry(script_args.dataset_name, script_args.dataset_train_split, train_raw)]
        steps = trainer.state.global_step
        if examples is None:
            examples = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        if tokens is None:
            tokens = consumed_tokens(trainer)
        losses = record.logged(trainer, "loss")
        rec["data"] = {
            "datasets": datasets,
            "examples_seen": examples,
            "tokens_seen": tokens,
            "epochs": trainer.state.epoch,
            "knowledge_cutoff": cutoff,
            "model_cutoff": model_cutoff(cutoff, self.parent, self.stage),
        }
        rec["compute"] = record.compute_summary(
            rec["model"]["params_total"],
            tokens,
            trainer.state.total_flos,
            self.wall_seconds or 0.0,
            record.device_info(args.world_size),
            script_args=script_args,
            measured_co2_kg=self.co2_kg,
            co2_failure=self.co2_failure,
            distributed=record.engine_info(trainer.accelerator),
            steady=throughput.steady(self.clock.stamps, self.clock.excluded, tokens / steps if steps else None),
            precision=precision(args),
            kernels=_kernels(args, trainer.model),
            teacher_params=(rec.get("teacher") or {}).get("params_total"),
        )
        rec["metrics"] = {
            "steps": steps,
            "train_loss": getattr(result, "training_loss", None),
            "first_logged_loss": losses[0] if losses else None,
            "last_logged_loss": losses[-1] if losses else None,
            "heldout": heldout.to_dict() if heldout is not None else None,
            **(metrics or {}),
        }
        return self.complete()

    def complete(self) -> dict[str, Any]:
        self.record["status"] = "complete"
        self.record["finished"] = record.now()
        record.Record.parse(self.record, f"{self.output_dir / record.RECORD} (being written)")
        return self.record

    def close(self, name: str | Path | None = None) -> None:
        """Write the finished record and its card, then drop Trainer's pickled arguments (the record holds them as
        JSON; loading a pickle can run code) and the run marker: the folder is a complete stage. `name` is the
        path the card calls the model by, when the folder is written under a temporary name first."""
        record.write_record(self.output_dir, self.record)
        card.write_card(self.output_dir, self.record, name=name)
        record.drop_pickles(self.output_dir)
        (self.output_dir / record.MARKER).unlink(missing_ok=True)

    def finish(self, trainer, result, script_args, train_raw, **fill) -> tuple[Path, dict[str, Any]]:
        """On the main process `fill` and `close`; every process then waits for it. Returns (folder, record)."""
        if trainer.is_world_process_zero():
            self.fill(trainer, result, script_args, train_raw, **fill)
            self.close()
        trainer.accelerator.wait_for_everyone()
        return self.output_dir, record.read_record(self.output_dir)


def _kernels(args, model) -> dict[str, Any]:
    """How the stage's steps ran: optimizer, attention, compilation, Liger, TF32, activation checkpointing."""
    config = getattr(model, "config", None)
    return {
        "optimizer": str(getattr(args.optim, "value", args.optim)),
        "attention": getattr(config, "_attn_implementation", None),
        "tf32": bool(getattr(args, "tf32", False)),
        "torch_compile": bool(args.torch_compile),
        "liger_kernel": bool(args.use_liger_kernel),
        "gradient_checkpointing": bool(args.gradient_checkpointing),
    }


def consumed_tokens(trainer) -> int:
    """Every token of every sequence the stage read, as the trainer counts it at each step: TRL's running count
    (SFT, DPO, reward: `_total_train_tokens`; GRPO, RLOO: `state.num_input_tokens_seen`; PPO: `num_tokens`). Its
    last *logged* value misses the steps after the last log, and is absent when a stage stops before its first; the
    running count covers both. After a resume the logged history holds the count before it, so the larger wins."""
    logged = record.logged(trainer, "num_tokens")
    counts = (
        getattr(trainer, "_total_train_tokens", 0),
        trainer.state.num_input_tokens_seen,
        getattr(trainer, "num_tokens", 0),
        logged[-1] if logged else 0,
    )
    return int(max(c for c in counts if isinstance(c, (int, float))))


def check_examples(trainer) -> None:
    """The trainer's tokenized training set holds an example: TRL drops a row that a length limit leaves with no
    token to train on (a prompt as long as max_length), and an empty set fails in the sampler as a bare ValueError."""
    data = getattr(trainer, "train_dataset", None)
    if data is None or not hasattr(data, "__len__") or len(data) > 0:
        return
    limits = [
        f"{k} {getattr(trainer.args, k)}" for k in ("max_length", "block_size") if getattr(trainer.args, k, None)
    ]
    cut = f" and cut to {limits[0]}" if limits else ""
    fix = f"Raise {limits[0].split()[0]}" if limits else "Check the data"
    raise UsageError(
        f"no training example is left once the data is tokenized{cut}: every row lost the tokens it trains on "
        f"(a prompt as long as the limit leaves no reply). {fix}."
    )
