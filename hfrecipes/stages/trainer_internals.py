"""The private parts of `transformers.Trainer` that a training loop of our own drives, fenced in one place.

`Trainer.train()` runs Transformers' loop; PPO (`stages/ppo_trainer.py`) runs its own (rollouts, then epochs of
minibatch updates) and still wants the Trainer's optimizer and scheduler, callbacks, logging, checkpoints and resume.
Those pieces are not public API: `Trainer._inner_training_loop` drives them, and no hook lets another loop do so.
These functions are the only code that touches them, each saying why; `CALLS` lists what they need of the installed
transformers, and `check()` compares the two (tests/test_ppo.py runs it, so an upstream rename or a changed
signature fails there, by name, rather than halfway through a run).
`WholeCheckpoints` holds the overrides of private methods that every stage's trainer carries, whichever loop runs.
Delete a function here when transformers offers a public way to do what it does.

    pytest tests/test_ppo.py -k internals
"""

from __future__ import annotations

import contextlib
import inspect
import time
from pathlib import Path
from typing import Any

import transformers
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import TrainOutput

# What the functions below call on a Trainer: method -> (positional arguments after self, keyword names, why).
CALLS: dict[str, tuple[int, tuple[str, ...], str]] = {
    "create_optimizer": (0, (), "build the optimizer over the trainable parameters"),
    "create_scheduler": (0, ("num_training_steps", "optimizer"), "build the learning-rate schedule for N updates"),
    "_load_optimizer_and_scheduler": (1, (), "restore optimizer and scheduler from a checkpoint on resume"),
    "_load_rng_state": (1, (), "restore the RNG states of a checkpoint, so a resumed run samples the same replies"),
    "_save_checkpoint": (1, ("trial",), "write a checkpoint: model, optimizer, scheduler, RNG, state, rotation"),
    "save_model": (1, ("_internal_call",), "overridden; `_save_checkpoint` calls it with _internal_call=True"),
    "store_flos": (0, (), "add the loop's FLOP count (`current_flos`) to state.total_flos"),
    "_load_best_model": (0, (), "load the best gold check's checkpoint back at the end (gold_keep_best)"),
    "_save": (1, ("state_dict",), "overridden: the final weights without a gathered copy of tied weights"),
    "log": (1, (), "append to state.log_history and fire on_log"),
}
# Attributes Trainer.__init__ sets that the loop reads or replaces.
ATTRIBUTES: dict[str, str] = {
    "accelerator": "backward, no_sync, gather and prepare for the loop's own steps",
    "callback_handler": "fire the callback events the loop passes through",
    "control": "the callbacks' answer (should_log, should_save, should_training_stop)",
    "state": "step, epoch, log history and FLOPs, saved in every checkpoint",
    "current_flos": "the per-process FLOP counter `store_flos` adds up",
    "model_wrapped": "the model as `accelerator.prepare` wrapped it (DDP, a DeepSpeed engine); `_save_checkpoint` "
    "and unwrap read it",
    "is_deepspeed_enabled": "DeepSpeed accumulates, steps and resumes its engine itself",
}
EVENTS = ("on_train_begin", "on_step_begin", "on_step_end", "on_save", "on_train_end")  # (args, state, control)
STATE_FIELDS = (
    "global_step", "epoch", "max_steps", "logging_steps", "save_steps", "is_local_process_zero",
    "is_world_process_zero", "total_flos", "log_history", "stateful_callbacks", "best_global_step",
    "best_model_checkpoint", "best_metric",
)  # fmt: skip
CONTROL_FLAGS = ("should_log", "should_save", "should_training_stop")


class WholeCheckpoints:
    """Trainer mixin: a checkpoint is whole once `trainer_state.json` is on disk, in every process, and a saved model
    holds the same tensors whatever engine trained it.

    `Trainer._save_checkpoint` has each process write its own `rng_state_<rank>.pth`, then the main process writes
    `trainer_state.json`, with nothing in between that waits for the others. A job killed in that gap leaves a
    checkpoint that looks complete (`record.checkpoint_is_complete`) but lacks another rank's RNG state, and
    `_load_rng_state` then only warns: that rank samples other replies than the uninterrupted run would. Waiting for
    every process after the RNG save closes the gap (a no-op in one process).

    Under ZeRO-2 and FSDP2 Trainer saves a state dict the engine gathered, in which tied weights (the tiny model's
    input and output embeddings) are separate copies: `save_pretrained` drops a tied weight only where it shares
    storage with its source, so the file would carry the embeddings twice where one process's save holds them once."""

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if state_dict is not None:
            state_dict = without_tied_copies(self.accelerator.unwrap_model(self.model), state_dict)
        super()._save(output_dir, state_dict=state_dict)


def without_tied_copies(model, state_dict: dict) -> dict:
    """`state_dict` less each tied weight (`model.all_tied_weights_keys`: target -> source) whose source it also
    holds with the same values, as `save_pretrained` drops it from the model's own state dict."""
    import torch

    tied = getattr(model, "all_tied_weights_keys", None) or {}
    drop = {
        target
        for target, source in tied.items()
        if target in state_dict and source in state_dict and torch.equal(state_dict[target], state_dict[source])
    }
    return {k: v for k, v in state_dict.items() if k not in drop} if drop else state_dict


def begin_training(trainer: transformers.Trainer, num_updates: int, max_steps: int, resume_from: str | None) -> int:
    """Optimizer, scheduler and `accelerator.prepare`; a fresh `TrainerState` (or the checkpoint's, with optimizer,
    scheduler and RNG states); `on_train_begin`. Returns the step to start from.

    The model's own weights must be loaded before this (the optimizer is built on its parameters)."""
    trainer.create_optimizer()
    # DeepSpeed drops parameter groups that hold no parameter (under LoRA nothing trainable is exempt from weight
    # decay); a scheduler built on the groups it dropped would step a different number of groups than it has
    trainer.optimizer.param_groups[:] = [g for g in trainer.optimizer.param_groups if g["params"]]
    trainer.create_scheduler(num_training_steps=num_updates, optimizer=trainer.optimizer)
    trainer.model_wrapped, trainer.optimizer, trainer.lr_scheduler = trainer.accelerator.prepare(
        trainer.model, trainer.optimizer, trainer.lr_scheduler
    )
    # As Trainer's own loop builds it: `_save_checkpoint` looks up each stateful callback by name in this list.
    trainer.state = transformers.TrainerState(
        stateful_callbacks=[
            c for c in [*trainer.callback_handler.callbacks, trainer.control] if isinstance(c, ExportableState)
        ]
    )
    state = trainer.state
    state.max_steps = max_steps
    state.logging_steps = trainer.args.logging_steps
    state.save_steps = trainer.args.save_steps
    state.is_local_process_zero = trainer.is_local_process_zero()
    state.is_world_process_zero = trainer.is_world_process_zero()
    if resume_from:
        trainer.state = transformers.TrainerState.load_from_json(str(Path(resume_from) / "trainer_state.json"))
        if trainer.is_deepspeed_enabled:
            # the engine's checkpoint holds weights (each process's partition) and optimizer state together, as
            # Trainer's own loop restores them; `_load_optimizer_and_scheduler` then loads the scheduler alone
            from transformers.integrations.deepspeed import deepspeed_load_checkpoint

            deepspeed_load_checkpoint(trainer.model_wrapped, resume_from)
        trainer._load_optimizer_and_scheduler(resume_from)
        trainer._load_rng_state(resume_from)
    start_step = trainer.state.global_step
    fire(trainer, "on_train_begin")
    trainer.current_flos = 0.0
    return start_step


@contextlib.contextmanager
def micro_batch(trainer: transformers.Trainer, model, last: bool):
    """One micro-batch of gradient accumulation: gradients are synchronised (and DeepSpeed's engine steps) after the
    last only. DDP skips its all-reduce under `no_sync`; DeepSpeed's engine steps inside `accelerator.backward`
    whenever the accelerator's `sync_gradients` is set (ZeRO-2/3 refuse `no_sync`), and only Trainer's own loop,
    through `accelerator.accumulate`, clears it."""
    if not trainer.is_deepspeed_enabled:
        with contextlib.nullcontext() if last else trainer.accelerator.no_sync(model):
            yield
        return
    state = trainer.accelerator.gradient_state
    state._set_sync_gradients(last)
    try:
        yield
    finally:
        state._set_sync_gradients(True)


def fire(trainer: transformers.Trainer, event: str) -> None:
    """One callback event (`on_step_begin`, ...), as Trainer's loop fires it."""
    trainer.control = getattr(trainer.callback_handler, event)(trainer.args, trainer.state, trainer.control)


def add_flos(trainer: transformers.Trainer, flos: float) -> None:
    """Count FLOPs the loop did; Trainer's own count (`floating_point_ops`) assumes one forward-backward per batch."""
    trainer.current_flos += flos


def end_step(
    trainer: transformers.Trainer, global_step: int, epoch: float, logs: dict[str, float], last: bool
) -> bool:
    """After a step: advance the state, `on_step_end`, log and checkpoint where the callbacks ask (always log the last
    step); returns whether the callbacks stop training. Trainer's `_maybe_log_save_evaluate` does this for its loop."""
    trainer.state.global_step = global_step
    trainer.state.epoch = epoch
    fire(trainer, "on_step_end")
    if trainer.control.should_log or last:
        trainer.log(logs)
    if trainer.control.should_save:
        trainer._save_checkpoint(trainer.model_wrapped, trial=None)
        fire(trainer, "on_save")
    return trainer.control.should_training_stop


def finish_training(trainer: transformers.Trainer, train_loss: float, started: float) -> TrainOutput:
    """FLOPs into the state, the closing log (runtime since `started`, a `time.perf_counter()`), `on_train_end`."""
    trainer.store_flos()
    metrics = {
        "train_runtime": time.perf_counter() - started,
        "train_loss": train_loss,
        "total_flos": trainer.state.total_flos,
    }
    trainer.log(metrics)
    fire(trainer, "on_train_end")
    return TrainOutput(trainer.state.global_step, train_loss, metrics)


def check(trainer: transformers.Trainer) -> list[str]:
    """What the functions above need of `trainer` (a built Trainer) that it lacks: one line per missing method,
    changed signature, attribute, callback event or state field. Empty when all is there."""
    problems = []

    def fits(owner: str, fn: Any, positional: int, keywords: tuple[str, ...], why: str) -> None:
        try:
            inspect.signature(fn).bind(*[None] * positional, **dict.fromkeys(keywords))
        except TypeError as e:
            problems.append(
                f"{owner}: takes {inspect.signature(fn)}, called with {positional} positional argument(s) and "
                f"keywords {list(keywords)} ({e}); hfrecipes calls it to {why}"
            )

    for name, (positional, keywords, why) in CALLS.items():
        fn = getattr(trainer, name, None)
        if not callable(fn):
            problems.append(f"transformers.Trainer.{name}: missing; hfrecipes calls it to {why}")
        else:
            fits(f"transformers.Trainer.{name}", fn, positional, keywords, why)
    for name, why in ATTRIBUTES.items():
        if not hasattr(trainer, name):
            problems.append(
                f"transformers.Trainer.{name}: attribute missing after __init__; hfrecipes reads it: {why}"
            )
    for event in EVENTS:
        fn = getattr(getattr(trainer, "callback_handler", None), event, None)
        if not callable(fn):
            problems.append(f"transformers CallbackHandler.{event}: missing; hfrecipes fires it from its own loop")
        else:
            fits(f"transformers CallbackHandler.{event}", fn, 3, (), "fire callback events from its own loop")
    fits("transformers.TrainerState", transformers.TrainerState, 0, ("stateful_callbacks",), "build the state")
    fits("transformers.TrainerState.load_from_json", transformers.TrainerState.load_from_json, 1, (), "resume")
    fields = set(getattr(transformers.TrainerState, "__dataclass_fields__", {}))
    for f in STATE_FIELDS:
        if f not in fields:
            problems.append(f"transformers.TrainerState.{f}: field missing; hfrecipes' loop sets or reads it")
    # `WholeCheckpoints` waits inside `_save_rng_state`, which only helps while Trainer calls it before it writes the
    # trainer state
    upstream = inspect.getsource(transformers.Trainer._save_checkpoint)
    if not 0 <= upstream.find("self._save_rng_state(") < upstream.find("TRAINER_STATE_NAME"):
        problems.append(
            "transformers.Trainer._save_checkpoint: no longer saves the RNG states before trainer_state.json; "
            "hfrecipes waits for every process after the RNG save so a checkpoint with a trainer state is whole"
        )
    gradient_state = getattr(getattr(trainer, "accelerator", None), "gradient_state", None)
    if gradient_state is not None and not callable(getattr(gradient_state, "_set_sync_gradients", None)):
        problems.append("accelerate GradientState._set_sync_gradients: missing; hfrecipes' loop accumulates with it")
    control = getattr(trainer, "control", None)
    for f in CONTROL_FLAGS:
        if control is not None and not hasattr(control, f):
            problems.append(f"transformers.TrainerControl.{f}: missing; hfrecipes' loop reads it")
    return problems
