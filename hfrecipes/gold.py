"""The gold check during training: greedy accuracy on a validation split no stage trains on, every `gold_every`
steps, beside the stage's own (proxy) reward. It stops SFT at its plateau, flags RL gaming its reward (gold falls
while the proxy rises), and can keep the best gold check's weights.

    hfrecipes sft --config tiny/sft --gold_dataset_name tiny:prompts --gold_patience 3
    hfrecipes grpo --config tiny/grpo --gold_dataset_name tiny:prompts --gold_keep_best true
    pytest tests/test_gold.py

The decisions are `GoldMonitor`'s, pure and fed (step, gold, proxy); `GoldCheck` evaluates and says which check's
weights to keep; `BestCheckpoint` keeps them as Trainer's `load_best_model_at_end` does, under every engine;
`GoldCallback` drives both from a TRL trainer, PPO's own loop calls them directly.

Deliberate simplifications: a resumed run starts a fresh history at its resume step (the best check before the kill
is forgotten); the proxy of the step-0 check is the first proxy logged after it (the reward of replies the untrained
policy sampled).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hfrecipes import data, engines, evaluation, record
from hfrecipes.errors import UsageError

logger = logging.getLogger(__name__)

PLATEAU = "plateau"
HACKING = "reward_hacking"
_EPS = 1e-9  # accuracies are ratios of counts: compare them with a margin, not bit for bit


@dataclass
class GoldOptions:
    """The gold-check keys of the sft, grpo, rloo, ppo and distill configs; off until `gold_dataset_name` is set."""

    gold_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Dataset of the gold check (e.g. tiny:prompts), never trained on; None: no gold check."},
    )
    gold_split: str = field(default="validation", metadata={"help": "Split of gold_dataset_name to check on."})
    gold_prompt_column: str = field(default="prompt", metadata={"help": "Column of the gold prompts."})
    gold_answer_column: str = field(
        default="solution", metadata={"help": "Column of the gold references (tiny: the whole expected reply)."}
    )
    gold_group_column: str | None = field(
        default=None, metadata={"help": "Column labelling each problem (e.g. kind): adds per-group accuracy."}
    )
    gold_metric: str = field(
        default="answer_accuracy", metadata={"help": "`evaluate` metric of the gold check (bundled or a Hub id)."}
    )
    gold_samples: int | None = field(default=None, metadata={"help": "Gold prompts per check (default all)."})
    gold_every: int = field(
        default=50,
        metadata={
            "help": "Steps between gold checks (also one before the first step and one at the end). GRPO's proxy "
            "reward is read from its logs: log at least every gold_every steps."
        },
    )
    gold_max_new_tokens: int = field(default=16, metadata={"help": "Tokens per greedy gold reply."})
    gold_patience: int | None = field(
        default=None,
        metadata={"help": "Stop once this many checks in a row fail to beat the best gold by gold_min_delta."},
    )
    gold_min_delta: float = field(
        default=0.0, metadata={"help": "Gold must beat its best by more than this to count as a new best."}
    )
    gold_min_steps: int = field(
        default=0,
        metadata={
            "help": "No plateau stop before this step: a task whose accuracy stays flat until a learning transition "
            "would otherwise stop before it."
        },
    )
    gold_min_gold: float = field(
        default=0.0,
        metadata={
            "help": "No plateau stop while the best gold is below this: a run still before its learning transition "
            "has not plateaued, however late that transition comes."
        },
    )
    gold_drop: float = field(
        default=0.1,
        metadata={"help": "Reward hacking: gold at least this far below its best while the proxy reward is higher."},
    )
    gold_stop_on_hacking: bool = field(default=False, metadata={"help": "Stop training when hacking is flagged."})
    gold_keep_best: bool = field(
        default=False, metadata={"help": "Save the weights of the best gold check, not the last step's."}
    )

    def __post_init__(self):
        super().__post_init__()
        for key, low in (("gold_every", 1), ("gold_max_new_tokens", 1), ("gold_samples", 1), ("gold_patience", 1)):
            value = getattr(self, key)
            if value is not None and value < low:
                raise ValueError(f"{key} must be at least {low}, got {value}")
        if self.gold_min_steps < 0:
            raise ValueError(f"gold_min_steps must be >= 0, got {self.gold_min_steps}")
        if self.gold_min_delta < 0:
            raise ValueError(f"gold_min_delta must be >= 0, got {self.gold_min_delta}")
        if not 0 <= self.gold_min_gold <= 1:
            raise ValueError(f"gold_min_gold must be in [0, 1] (an accuracy), got {self.gold_min_gold}")
        if not self.gold_drop > 0:
            raise ValueError(f"gold_drop must be > 0 (a fall in gold accuracy), got {self.gold_drop}")


# ------------------------------------------------------------------------------------------------- decisions


class Decision(NamedTuple):
    """What one check means: a new best (keep its weights), the first hacking flag, and why to stop (or None)."""

    new_best: bool
    hacking: dict[str, Any] | None
    stop: str | None


class GoldMonitor:
    """The gold check's decisions from (step, gold, proxy) alone, so they are tested by hand.

    Plateau: `patience` checks in a row that do not beat the best gold by more than `min_delta`, at a step of at
    least `min_steps`, once the best gold has reached `min_gold`; checks before that count no staleness. The best
    check is the latest of those with the highest gold (at equal gold the later weights have trained more, so
    keep-best keeps them). Hacking: gold at least `drop` below its best while the proxy is above its value at the
    best check (a proxy that falls with gold is a policy getting worse, not one gaming its reward)."""

    def __init__(
        self,
        patience: int | None = None,
        min_delta: float = 0.0,
        drop: float = 0.1,
        stop_on_hacking: bool = False,
        min_steps: int = 0,
        min_gold: float = 0.0,
    ):
        self.patience, self.min_delta, self.drop, self.stop_on_hacking = patience, min_delta, drop, stop_on_hacking
        self.min_steps, self.min_gold = min_steps, min_gold
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None  # the history entry of the best check
        self.hacking: dict[str, Any] | None = None
        self.stale = 0  # checks since the last gain

    def fill_proxy(self, proxy: float | None) -> None:
        """Give checks logged before any proxy existed (step 0) the first proxy seen after them."""
        if proxy is not None and all(entry["proxy"] is None for entry in self.history):
            for entry in self.history:
                entry["proxy"] = proxy

    def update(self, step: int, gold: float, proxy: float | None, **extra) -> Decision:
        entry = {"step": step, "gold": gold, "proxy": proxy, **extra}
        self.history.append(entry)
        gain = self.best is None or gold > self.best["gold"] + self.min_delta + _EPS
        new_best = self.best is None or gold >= self.best["gold"] - _EPS
        if new_best:
            self.best = entry
        # below the floor the run has not started learning the task: nothing to be stale about yet
        self.stale = 0 if gain or self.best["gold"] < self.min_gold - _EPS else self.stale + 1
        flag = None
        best_proxy = self.best["proxy"]
        if (
            not new_best
            and self.best["gold"] - gold >= self.drop - _EPS
            and proxy is not None
            and best_proxy is not None
            and proxy > best_proxy
        ):
            flag = {
                "step": step,
                "gold": gold,
                "proxy": proxy,
                "best_gold": self.best["gold"],
                "proxy_at_best": best_proxy,
                "best_step": self.best["step"],
            }
            self.hacking = self.hacking or flag
        stop = None
        if flag and self.stop_on_hacking:
            stop = HACKING
        elif self.patience is not None and self.stale >= self.patience and step >= self.min_steps:
            stop = PLATEAU
        return Decision(new_best, flag, stop)


# ------------------------------------------------------------------------------------------------------ data


class GoldSet(NamedTuple):
    name: str
    split: str
    prompts: list
    references: list
    groups: list | None


def load(script_args, args: GoldOptions, stage: str) -> GoldSet | None:
    """The gold prompts, checked before any model loads: split, columns and metric."""
    if not args.gold_dataset_name:
        used = [k for k in ("gold_patience", "gold_keep_best", "gold_stop_on_hacking") if getattr(args, k)]
        if used:
            raise UsageError(f"{', '.join(used)} set without gold_dataset_name: name the gold check's dataset.")
        return None
    name, split = args.gold_dataset_name, args.gold_split
    gold_args = copy.copy(script_args)
    # the training data's column mapping is not the gold set's; a single local file is the gold split itself
    gold_args.dataset_name, gold_args.dataset_columns, gold_args.dataset_train_split = name, None, split
    try:
        ds = data.load_split(gold_args, split)
    except UsageError as e:
        raise UsageError(f"gold_dataset_name '{name}' (gold_split '{split}'): {e}") from None
    if ds is None:
        raise UsageError(f"gold_dataset_name '{name}' has no split '{split}' (gold_split).")
    keys = {"gold_prompt_column": args.gold_prompt_column, "gold_answer_column": args.gold_answer_column}
    if args.gold_group_column:
        keys["gold_group_column"] = args.gold_group_column
    missing = {k: c for k, c in keys.items() if c not in ds.column_names}
    if missing:
        raise UsageError(
            f"gold dataset '{name}' ({split}) lacks column(s) {list(missing.values())}; it has {ds.column_names}. "
            f"Set {', '.join(missing)} to one of them."
        )
    data.check_columns(ds, [[args.gold_prompt_column, args.gold_answer_column]], stage, f"{name} ({split})")
    try:
        evaluation.load_metric(args.gold_metric)
    except UsageError as e:
        raise UsageError(f"gold_metric: {e}") from None
    if args.gold_samples is not None:
        ds = ds.select(range(min(args.gold_samples, len(ds))))
    groups = ds[args.gold_group_column] if args.gold_group_column else None
    return GoldSet(name, split, ds[args.gold_prompt_column], ds[args.gold_answer_column], groups)


# ------------------------------------------------------------------------------------------------- the check


class GoldCheck:
    """Evaluates the gold set, feeds the monitor, says when to keep weights and writes the record's `gold` block.

    `evaluates`: this process generates (the main one; every one under a sharded engine, whose forwards need all).
    Decisions are the main process's, broadcast so that every process stops, and keeps weights, at the same step."""

    def __init__(self, gold: GoldSet, args: GoldOptions, tokenizer, evaluates: bool, main: bool):
        self.gold, self.args, self.tokenizer = gold, args, tokenizer
        self.evaluates, self.main = evaluates, main
        self.monitor = GoldMonitor(
            patience=args.gold_patience,
            min_delta=args.gold_min_delta,
            drop=args.gold_drop,
            stop_on_hacking=args.gold_stop_on_hacking,
            min_steps=args.gold_min_steps,
            min_gold=args.gold_min_gold,
        )
        self.last_step: int | None = None
        self.stopped: str | None = None
        self.kept_step: int | None = None  # the step whose weights the stage saves

    def due(self, step: int) -> bool:
        return step % self.args.gold_every == 0 and step != self.last_step

    def evaluate(self, model) -> dict[str, Any]:
        return evaluation.heldout_accuracy(
            model,
            self.tokenizer,
            self.gold.prompts,
            self.gold.references,
            self.args.gold_metric,
            self.args.gold_max_new_tokens,
            groups=self.gold.groups,
        )

    def check(
        self,
        step: int,
        whole_model: Callable[[], contextlib.AbstractContextManager],
        keep: Callable[[int, float | None], None],
        proxies: list[float],
        final: bool = False,
    ) -> str | None:
        """One gold check at `step`: `whole_model()` gives the model to generate with (every process enters it
        under a sharded engine), `keep(step, gold)` keeps this step's weights at a new best (gold_keep_best; every
        process calls it; `gold` is None but on the main process), `proxies` the proxy rewards logged since the
        previous check. Returns why to stop, or None (always at the `final` check: training has ended, nothing to
        stop, and the weights in training are this check's)."""
        self.last_step = step
        result = {}
        if self.evaluates:
            with whole_model() as model:
                result = self.evaluate(model)
        decision = None
        if self.main:
            proxy = sum(proxies) / len(proxies) if proxies else None
            self.monitor.fill_proxy(proxies[0] if proxies else None)
            by_group = {k: v.get("accuracy") for k, v in result.get("by_group", {}).items()}
            extra = {"by_group": by_group} if by_group else {}
            value = score(result, self.args.gold_metric)
            decision = self.monitor.update(step, value, proxy, **extra)
            logger.info("gold check at step %d: %s %.4g, proxy %s", step, self.args.gold_metric, value, proxy)
            if decision.hacking:
                h = decision.hacking
                logger.warning(
                    "gold check: reward hacking at step %d: gold %s %.3f, %.3f below its best %.3f (step %d), while "
                    "the proxy reward rose to %.4g from %.4g at the best check%s",
                    step, self.gold.name, h["gold"], h["best_gold"] - h["gold"], h["best_gold"], h["best_step"],
                    h["proxy"], h["proxy_at_best"], "; stopping" if decision.stop == HACKING and not final else "",
                )  # fmt: skip
            elif decision.stop == PLATEAU and not final:
                logger.info(
                    "gold check: plateau at step %d, no gain over %.3f (step %d) in %d checks; stopping",
                    step, self.monitor.best["gold"], self.monitor.best["step"], self.monitor.stale,
                )  # fmt: skip
        decision = _broadcast(decision)
        if decision.new_best and self.args.gold_keep_best:
            if not final:
                keep(step, self.monitor.best["gold"] if self.main else None)
            self.kept_step = step
        if final:
            return None
        self.stopped = decision.stop
        return decision.stop

    def finish(self, step: int, whole_model, best: BestCheckpoint, proxies: list[float]) -> None:
        """At the end of training: a last check unless `step` was one, then the best check's weights back and the
        checkpoints kept only for the check removed (gold_keep_best)."""
        if step != self.last_step:
            self.check(step, whole_model, best.keep, proxies, final=True)
        if not self.args.gold_keep_best:
            self.kept_step = step
            return
        if self.kept_step != step:
            best.restore(self.kept_step)
        best.close()

    def record(self) -> dict[str, Any]:
        """The record's `metrics.gold` block."""
        m = self.monitor
        return {
            "metric": self.args.gold_metric,
            "dataset": self.gold.name,
            "split": self.gold.split,
            "examples": len(self.gold.prompts),
            "every": self.args.gold_every,
            "history": m.history,
            "best": {"step": m.best["step"], "gold": m.best["gold"]} if m.best else None,
            "hacking": m.hacking,
            "stopped": self.stopped,
            "kept_step": self.kept_step,
        }


def score(result: dict[str, Any], metric: str) -> float:
    """The metric's headline number: `accuracy`, else its one numeric result."""
    if isinstance(result.get("accuracy"), (int, float)):
        return float(result["accuracy"])
    numbers = [v for k, v in result.items() if isinstance(v, float)]
    if len(numbers) != 1:
        raise UsageError(f"gold_metric '{metric}' returned {sorted(result)}: no `accuracy` and not one number.")
    return numbers[0]


def _broadcast(value):
    """The main process's `value` (a decision) on every process (each one else trains, stops or saves on its own)."""
    from accelerate import PartialState

    if PartialState().num_processes > 1:
        from accelerate.utils import broadcast_object_list

        value = broadcast_object_list([value], from_process=0)[0]
    return value


# ------------------------------------------------------------------------------------------ the best weights


class BestCheckpoint:
    """gold_keep_best as Trainer's `load_best_model_at_end` keeps its best model, so under every engine: the best
    check's weights are Trainer's own checkpoint `checkpoint-<step>` (each process writes its part under ZeRO and
    FSDP), marked `state.best_model_checkpoint` so that `save_total_limit` rotation keeps it while it is best, and
    loaded back at the end by Trainer's `_load_best_model` (DeepSpeed's engine checkpoint, accelerate's FSDP loader,
    else the safetensors or the adapter). A checkpoint written for the gold check alone is removed once a better one
    replaces it and at the end; one the save schedule (or the resumed run) wrote stays."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.own: str | None = None  # the checkpoint written for the gold check alone

    def path(self, step: int) -> str:
        return os.path.join(self.trainer.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")

    def keep(self, step: int, gold: float | None, control=None) -> None:
        """Keep the weights of `step`, the state's global step. `control`: Trainer's, inside its step (its loop
        saves right after `on_step_end` where asked to); otherwise the checkpoint is saved here. Every process."""
        trainer, path = self.trainer, self.path(step)
        state = trainer.state
        state.best_global_step, state.best_model_checkpoint = step, path
        if gold is not None:
            state.best_metric = gold
        previous, self.own = self.own, None
        if not _broadcast(trainer.args.should_save and record.checkpoint_is_complete(Path(path))):
            if control is not None:
                self.own = None if control.should_save else path
                control.should_save = True
                self._remove(previous)
                return
            trainer._save_checkpoint(trainer.model_wrapped, trial=None)
            self.own = path
        self._check_every_process_reads(path)
        self._remove(previous)

    def restore(self, step: int) -> None:
        """The weights of the kept `step` back into the model in training, on every process."""
        trainer, path = self.trainer, Path(self.path(step))
        trainer.state.best_model_checkpoint = str(path)
        tags = sorted(p.name for p in path.glob("global_step*"))
        if trainer.is_deepspeed_enabled and trainer.args.should_save and len(tags) == 1:
            # DeepSpeed names the tag to load in a `latest` file that only the first process writes, also where
            # each machine keeps its own copy of the checkpoint (save_on_each_node): give each copy its own
            latest = path / "latest"
            if not latest.is_file():
                latest.write_text(tags[0])
        trainer.accelerator.wait_for_everyone()
        logger.info("gold check: loading the weights of step %d, the best check", step)
        trainer._load_best_model()

    def close(self) -> None:
        """Remove the checkpoint kept for the gold check alone, once every process has loaded it."""
        self._remove(self.own)
        if self.own is not None and self.trainer.state.best_model_checkpoint == self.own:
            self.trainer.state.best_model_checkpoint = None
        self.own = None

    def _check_every_process_reads(self, path: str) -> None:
        """Every process loads the checkpoint back at the end: one that cannot read it (another machine whose
        output_dir is not the same storage) stops the run now, at the first check, not after training."""
        from accelerate.utils import gather_object

        self.trainer.accelerator.wait_for_everyone()  # the main process writes trainer_state.json last
        blind = [i for i, seen in enumerate(gather_object([record.checkpoint_is_complete(Path(path))])) if not seen]
        if blind:
            raise UsageError(
                f"gold_keep_best: process(es) {blind} cannot read the checkpoint {path} the main process saved, so "
                "they could not load the best weights back at the end. Put output_dir on storage every machine "
                "shares, or set save_on_each_node: true (each machine then keeps its own copy)."
            )

    def _remove(self, path: str | None) -> None:
        self.trainer.accelerator.wait_for_everyone()
        if path is not None and self.trainer.args.should_save:
            shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------- TRL trainers


def attach(
    trainer,
    gold: GoldSet | None,
    args: GoldOptions,
    tokenizer,
    proxy_key: str | None,
    whole_model: Callable[[], contextlib.AbstractContextManager],
) -> GoldCheck | None:
    """Add the gold check to a TRL trainer as a callback. `proxy_key`: the logged proxy reward (None in SFT, which
    has none); `whole_model()`: the trained model whole, to generate with (the stage's `whole_weights`). Returns the
    check, whose `record()` goes into the stage's metrics; None without a gold set."""
    check = new_check(gold, args, tokenizer)
    if check is not None:
        trainer.add_callback(GoldCallback(check, trainer, proxy_key, whole_model))
    return check


def new_check(gold: GoldSet | None, args, tokenizer) -> GoldCheck | None:
    """The check of a training loop; the main process decides, and every process replies under a sharded engine."""
    if gold is None:
        return None
    main = args.process_index == 0
    return GoldCheck(gold, args, tokenizer, main or engines.requested() in engines.SHARDED, main)


class GoldCallback(TrainerCallback):
    """The gold check in Trainer's loop: at train begin, at every `gold_every`-th step end (stopping through
    `control.should_training_stop`, keeping a new best through `control.should_save`), and at train end, where the
    best weights come back before the stage saves. Trainer logs a step after `on_step_end`, so a check's proxy is
    what was logged up to the step before it."""

    def __init__(self, check: GoldCheck, trainer, proxy_key: str | None, whole_model):
        self.check, self.trainer, self.proxy_key, self.whole_model = check, trainer, proxy_key, whole_model
        self.best = BestCheckpoint(trainer)
        self.seen = 0  # log_history entries already read for the proxy

    def proxies(self, state) -> list[float]:
        logs, self.seen = state.log_history[self.seen :], len(state.log_history)
        key = self.proxy_key
        return [x[key] for x in logs if key and isinstance(x.get(key), (int, float))]

    def on_train_begin(self, args, state, control, **kwargs):
        self.seen = len(state.log_history)
        self.check.check(state.global_step, self.whole_model, self.best.keep, [])

    def on_step_end(self, args, state, control, **kwargs):
        if self.check.due(state.global_step):
            keep = functools.partial(self.best.keep, control=control)
            if self.check.check(state.global_step, self.whole_model, keep, self.proxies(state)):
                control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.check.finish(state.global_step, self.whole_model, self.best, self.proxies(state))


# ----------------------------------------------------------------------------------------------------- record


def metrics(check: GoldCheck | None) -> dict[str, Any]:
    """The stage metrics' `gold` key (nothing without a gold check)."""
    return {"gold": check.record()} if check is not None else {}
