"""Run or resume a lifecycle: the stages in order, each from its parent's folder, skipping what is complete and
resuming what was cut off; held-out evaluation after every causal-LM stage; the honest control; export of the best
candidate; batched inference on the held-out prompts; the summary (`summary.md`, `.json`, `.png`) in the run folder.

    hfrecipes lifecycle                       # recipes/tiny/lifecycle.yaml -> runs/tiny/
    hfrecipes lifecycle tiny/lifecycle --force grpo --set grpo.max_steps=100
    hfrecipes lifecycle --seeds 3             # the recipe's seed in runs/tiny/, seed+1 and seed+2 in runs/tiny/seeds/

A stage reruns when it is forced, when a stage it reads (its parent, a `{id}` placeholder, for the control also the
stage whose FLOPs or wall time it matches) ran in this invocation, or when its folder has no complete record.
Evaluations, the export and inference are cached in the run folder against the run id of the stage they were made
from.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from hfrecipes import record as records
from hfrecipes.errors import UsageError
from hfrecipes.lifecycles import plan as lifecycle_plan
from hfrecipes.lifecycles import summary as summaries
from hfrecipes.lifecycles.spec import EVERY_STAGE, EXPORT, SEEDS_DIR, SERVED, Lifecycle, StageSpec, load
from hfrecipes.stages import facts

logger = logging.getLogger(__name__)

START = "start"  # the summary's row of the model the first stage started from
STATE = "lifecycle.json"  # cached held-out evaluations, by stage id and run id


def _clear(folder: Path, run_dir: Path) -> None:
    """Remove a stage folder of this run (never anything outside the run folder)."""
    folder, run_dir = folder.resolve(), run_dir.resolve()
    if run_dir not in folder.parents:
        raise UsageError(f"refusing to delete '{folder}': it is outside the run folder '{run_dir}'.")
    shutil.rmtree(folder)


def _eval_rows(life: Lifecycle, samples: int | None):
    from hfrecipes.data import ScriptArguments, load_split

    ev = life.evaluation
    args = ScriptArguments(dataset_name=ev.dataset_name, dataset_config=ev.dataset_config, dataset_test_split=None)
    rows = load_split(args, ev.split)
    if rows is None:
        raise UsageError(f"{life.source}: evaluation: '{ev.dataset_name}' has no '{ev.split}' split.")
    return rows.select(range(min(samples, len(rows)))) if samples else rows


class LifecycleRun:
    """One invocation: which stages ran this time, and the cached evaluations (`lifecycle.json`)."""

    def __init__(self, life: Lifecycle, force: tuple[str, ...]):
        self.life = life
        self.force = set(force)
        self.rerun: set[str] = set()
        self.state_path = life.root / STATE
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {"evaluations": {}}
        self.plans: dict[str, dict[str, Any]] = {}  # each stage's plan, made before the first ran (`plan.json`)

    # ----------------------------------------------------------------------------------------------- stages

    def stage(self, spec: StageSpec, also_after: set[str] = frozenset()) -> dict[str, Any]:
        """The stage's record: read when its folder is complete and nothing upstream ran again, else trained."""
        from hfrecipes.runner import run_stage

        life, folder = self.life, self.life.root / spec.id
        if spec.id in self.force or (spec.refs() | set(also_after)) & self.rerun:
            if folder.exists():
                _clear(folder, life.root)
        elif records.is_complete(folder):
            logger.info("[%s] %s: complete, skipped", life.name, spec.id)
            return records.read_record(folder)
        elif folder.exists() and not (folder / records.MARKER).is_file():
            _clear(folder, life.root)  # a stage folder of this run without a record: its output is stale
        resumed = (folder / records.MARKER).is_file()
        how = "resuming" if resumed else "starting"
        logger.info("[%s] %s: %s (%s from %s)", life.name, spec.id, how, spec.stage, spec.parent or "scratch")
        t = time.perf_counter()
        result = run_stage(spec.stage, spec.recipe, plan=self.plans.get(spec.id), **life.stage_kwargs(spec))
        self.rerun.add(spec.id)
        logger.info("[%s] %s: done in %.1f min", life.name, spec.id, (time.perf_counter() - t) / 60)
        return result.record

    # ------------------------------------------------------------------------------------------- evaluation

    def evaluate(self, spec: StageSpec, rec: dict[str, Any]) -> dict[str, Any]:
        """Held-out task accuracy of a causal-LM stage's folder (adapters merged in memory), cached by run id."""
        if not facts(spec.stage).scored or not self.life.evaluation.dataset_name:
            return {}
        return self._score(spec.id, self.life.root / spec.id, rec["run_id"])

    def benchmarks(self, spec: StageSpec, rec: dict[str, Any]) -> dict[str, Any]:
        """The stage's folder scored on the lm-eval tasks the evaluation block names (`hfrecipes eval`), its record
        and card updated; the record as it then stands. Skipped where the record already holds every task."""
        ev = self.life.evaluation
        if not ev.tasks or not facts(spec.stage).scored:
            return rec
        if set(ev.tasks) <= set((rec.get("evaluations") or {}).get("tasks") or {}):
            return rec
        from hfrecipes import harness
        from hfrecipes.report.card import refresh_card

        folder = self.life.root / spec.id
        harness.evaluate(folder, list(ev.tasks), limit=ev.task_limit, engine=ev.task_engine)
        refresh_card(folder)
        logger.info("[%s] %s: scored on %s", self.life.name, spec.id, ", ".join(ev.tasks))
        return records.read_record(folder)

    def start(self) -> dict[str, Any] | None:
        """The pretrained model the first stage started from, scored like a stage: the ladder's first rung, so
        every stage's gain is measured from it. None for a lifecycle that starts from random weights."""
        first = self.life.stages[0]
        rec = records.read_record(self.life.root / first.id) or {}
        source = Path((rec.get("model") or {}).get("source") or "")
        if not facts(first.stage).scored or first.stage == "pretrain" or not self.life.evaluation.dataset_name:
            return None
        if not (source / "config.json").is_file():
            return None
        parent = rec.get("parent") or records.new_record("start", {}, None) | {"status": "complete"}
        evaluation = self._score(START, source, parent["run_id"])
        return {**summaries.row(START, parent["stage"], parent, evaluation), "source": str(source)}

    def _score(self, key: str, folder: Path, run_id: str) -> dict[str, Any]:
        cached = self.state["evaluations"].get(key)
        if cached and cached.get("run_id") == run_id:
            return cached
        from hfrecipes.evaluation import heldout_accuracy
        from hfrecipes.modeling import load_merged

        ev = self.life.evaluation
        rows = _eval_rows(self.life, ev.samples)
        if ev.group_column and ev.group_column not in rows.column_names:
            raise UsageError(
                f"{self.life.source}: evaluation: group_column '{ev.group_column}' is not a column of "
                f"'{ev.dataset_name}' ({', '.join(rows.column_names)})."
            )
        model, tok = load_merged(folder)
        tok.padding_side = "left"
        groups = rows[ev.group_column] if ev.group_column else None
        scored = heldout_accuracy(
            model, tok, rows[ev.prompt_column], rows[ev.answer_column], ev.metric, ev.max_new_tokens, groups=groups
        )
        keep = ("accuracy", "correct", "total", "metric", "by_group")
        result = {**{k: scored[k] for k in keep if k in scored}, "run_id": run_id}
        self.state["evaluations"][key] = result
        records.atomic_write_text(self.state_path, json.dumps(self.state, indent=2) + "\n")
        logger.info("[%s] %s: held-out accuracy %.1f%%", self.life.name, key, 100 * result["accuracy"])
        return result

    # ---------------------------------------------------------------------------------------------- control

    def control(self, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Train the control's parent further for as many steps as spend the matched stage's training FLOPs (or
        fill its wall time), at the parent's measured FLOPs (or seconds) per step. The parent's steps may differ in
        size from the control's: the summary shows what the control actually spent beside what it matched."""
        c = self.life.control
        parent = records.load_record(self.life.root / c.parent)
        done = max(parent.metrics.steps or 0, 1)
        if c.budget == "flops":
            per_step = (parent.compute.flops_6nd or 0.0) / done
            target = rows[c.matches]["flops"] or 0.0
        else:
            per_step = (parent.compute.wall_seconds or 0.0) / done
            target = rows[c.matches]["wall_seconds"] or 0.0
        steps = max(1, round(target / per_step)) if per_step > 0 else 1
        spec = c.as_stage(steps)
        rec = self.stage(spec, also_after={c.matches})
        row = summaries.row(spec.id, spec.stage, rec, self.evaluate(spec, rec))
        row.update(
            parent=c.parent,
            recipe=c.recipe,
            matches=c.matches,
            budget=c.budget,
            planned_steps=steps,
            parent_per_step=per_step,
        )
        return row

    # ----------------------------------------------------------------------------------------------- export

    def _exported(self, row: dict[str, Any], export_dir: Path, forced: bool, dtype: str, why: str) -> bool:
        """Export the stage of `row` to `export_dir` unless the folder there already holds this run of it; whether
        it was exported now."""
        prev = records.load_record(export_dir) if export_dir.is_dir() else None
        stale = (
            forced
            or prev is None
            or row["id"] in self.rerun
            or prev.parent is None
            or prev.parent.run_id != row["run_id"]
        )
        if stale:
            from hfrecipes.exporting import export

            logger.info("[%s] export: %s to %s (%s)", self.life.name, row["id"], export_dir, why)
            export(self.life.root / row["id"], export_dir, dtype=dtype, force=True)
        else:
            logger.info("[%s] export of %s: complete, skipped", self.life.name, row["id"])
        return stale

    def export(self, rows: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], bool]:
        """Export the candidate with the best held-out accuracy (the first listed on a tie); (row, whether new)."""
        life = self.life
        candidates = [rows[c] for c in dict.fromkeys(life.export.candidates)]
        best = max(candidates, key=lambda r: r["heldout_accuracy"] if r["heldout_accuracy"] is not None else -1.0)
        among = ", ".join(r["id"] for r in candidates)
        why = f"best held-out accuracy among {among}"
        stale = self._exported(best, life.root / EXPORT, EXPORT in self.force, life.export.dtype, why)
        return {"id": EXPORT, "from": best["id"], "candidates": [r["id"] for r in candidates]}, stale

    # -------------------------------------------------------------------------------------------- inference

    def inference(self, stale: bool) -> dict[str, Any]:
        """Batched generation by the export on the evaluation split's prompts; throughput, cost, answers matched."""
        return self._serve(self.life.root / EXPORT, self.life.root, stale)

    def _serve(self, model_dir: Path, into: Path, stale: bool) -> dict[str, Any]:
        """Generation by the exported `model_dir` on the evaluation split's prompts, its rows and numbers cached in
        `into` (generations.jsonl, inference.json) until the export changes."""
        from hfrecipes.inference import generate
        from hfrecipes.report.card import refresh_card
        from hfrecipes.rewards import answers_match

        life, inf, ev = self.life, self.life.inference, self.life.evaluation
        out, cached = into / "generations.jsonl", into / "inference.json"
        if cached.is_file() and out.is_file() and not stale:
            return json.loads(cached.read_text())
        rows = _eval_rows(life, inf.samples)
        prompts, answers = rows[ev.prompt_column], rows[ev.answer_column]
        logger.info("[%s] inference: %d held-out prompts on %s", life.name, len(prompts), model_dir)
        gen_rows, stats = generate(model_dir, prompts, out, engine=inf.engine, max_new_tokens=inf.max_new_tokens)
        refresh_card(model_dir)  # the export's card with the serving cost just measured
        hits = sum(answers_match(r["completions"][0], a) for r, a in zip(gen_rows, answers, strict=True))
        keys = (
            "engine",
            "prompts",
            "input_tokens",
            "generated_tokens",
            "wall_seconds",
            "tokens_per_second",
            "prefill_tokens_per_second",
            "decode_tokens_per_second",
            "flops_per_token",
            "dollars_per_million_tokens",
            "dollars_per_million_input_tokens",
            "dollars_per_million_output_tokens",
            "output_input_price_ratio",
        )
        result = {**{k: stats[k] for k in keys}, "params": stats.get("params"), "accuracy": hits / len(gen_rows)}
        records.atomic_write_text(cached, json.dumps(result, indent=2) + "\n")
        return result

    # ------------------------------------------------------------------------------------------ distillation

    def distillation(self, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Serve the teacher and the student with the same engine on the same prompts, each from its own export
        under `served/`; the student's making (the `cost_of` stages) against the saving per request gives the
        traffic after which distillation has paid for itself. The numbers go into the student's export record (its
        `distillation` block), whose card then says them, and into the summary."""
        from hfrecipes.costs import distillation_payback
        from hfrecipes.report.card import refresh_card
        from hfrecipes.report.lineage import totals

        life, d = self.life, self.life.distillation
        forced = SERVED in self.force
        served = {}
        for role, stage_id in (("teacher", d.teacher), ("student", d.student)):
            folder = life.root / SERVED / stage_id
            stale = self._exported(rows[stage_id], folder, forced, life.export.dtype if life.export else "auto", role)
            served[role] = self._serve(folder, folder, stale)
        # the lineage's one summing rule, but a making with a stage that recorded no number has no total
        total, missing = totals([rows[i] for i in d.cost_of], ("dollars", "flops"), name="id")
        cost, flops = (None if key in missing else total[key] for key in ("dollars", "flops"))
        keep = (
            "engine",
            "prompts",
            "input_tokens",
            "generated_tokens",
            "tokens_per_second",
            "decode_tokens_per_second",
            "dollars_per_million_input_tokens",
            "dollars_per_million_output_tokens",
            "accuracy",
        )
        block = {
            "teacher": d.teacher,
            "student": d.student,
            "engine": served["student"]["engine"],
            "teacher_accuracy": rows[d.teacher]["heldout_accuracy"],
            "student_accuracy": rows[d.student]["heldout_accuracy"],
            "teacher_params": served["teacher"].get("params"),
            "student_params": served["student"].get("params"),
            "teacher_serving": {k: served["teacher"].get(k) for k in keep},
            "student_serving": {k: served["student"].get(k) for k in keep},
            "cost_of": list(d.cost_of),
            "cost_flops": flops,
            "payback": distillation_payback(cost, served["teacher"], served["student"]),
        }
        student_dir = life.root / SERVED / d.student
        rec = records.read_record(student_dir)
        if rec is not None and rec.get("distillation") != block:
            rec["distillation"] = block
            records.write_record(student_dir, rec)
            refresh_card(student_dir)
        return block


def run(
    recipe: str | Path = "tiny/lifecycle",
    run_dir: str | Path | None = None,
    force: tuple[str, ...] = (),
    overrides: dict[str, dict[str, Any]] | None = None,
    seeds: int = 1,
) -> dict[str, Any]:
    """Run (or resume) a lifecycle; returns the summary (also written as summary.json/.md/.png in the run folder).

    `seeds` > 1 runs the whole lifecycle again with every stage's `seed` raised by 1, 2, ...: the recipe's own seed
    in the run folder, the others in `<run_dir>/seeds/<seed>/`; the run folder's summary then adds the mean and the
    min-max of every stage over the seeds, and checks its claims on each seed."""
    if seeds < 1:
        raise UsageError(f"--seeds {seeds}: run at least one seed.")
    life = load(recipe, run_dir, overrides, force)
    if seeds == 1:
        return _run_one(life, force)
    base = _recipe_seed(life)
    summaries_by_seed = [_run_one(life, force)]
    for k in range(1, seeds):
        extra = {key: dict(value) for key, value in (overrides or {}).items()}
        extra.setdefault(EVERY_STAGE, {})["seed"] = base + k
        seeded = load(recipe, life.root / SEEDS_DIR / str(base + k), extra, force)
        summaries_by_seed.append(_run_one(seeded, force))
    summary = summaries.with_seeds(summaries_by_seed[0], summaries_by_seed, [base + k for k in range(seeds)])
    summaries.write(life.root, summary)
    logger.info("[%s] summary over %d seeds: %s", life.name, seeds, life.root / "summary.md")
    return summary


def _recipe_seed(life: Lifecycle) -> int:
    """The seed the recipe's first stage trains with, which the extra seeds count up from."""
    from hfrecipes.runner import parse_stage_args

    first = life.stages[0]
    _, resolved = parse_stage_args(first.stage, first.recipe, **life.stage_kwargs(first))
    return int(resolved["values"].get("seed", 42))


def _run_one(life: Lifecycle, force: tuple[str, ...]) -> dict[str, Any]:
    started = time.perf_counter()
    life.root.mkdir(parents=True, exist_ok=True)
    this = LifecycleRun(life, tuple(force))
    if life.evaluation.tasks:  # an unknown task stops the run before the first stage trains
        from hfrecipes import harness

        harness.check_tasks(list(life.evaluation.tasks), harness.task_manager())
    this.plans = lifecycle_plan.write(life)

    rows: dict[str, dict[str, Any]] = {}
    for spec in life.stages:
        rec = this.benchmarks(spec, this.stage(spec))
        rows[spec.id] = summaries.row(spec.id, spec.stage, rec, this.evaluate(spec, rec))

    start = this.start()
    control = this.control(rows) if life.control else None

    exported, inference = None, None
    if life.export:
        exported, stale = this.export(rows)
        if life.inference:
            inference = this.inference(stale)
    distillation = this.distillation(rows) if life.distillation else None

    summary = summaries.build(
        life,
        list(rows.values()),
        control,
        exported,
        inference,
        sorted(this.rerun),
        time.perf_counter() - started,
        start=start,
        distillation=distillation,
    )
    summaries.write(life.root, summary)
    logger.info("[%s] summary: %s", life.name, life.root / "summary.md")
    return summary
