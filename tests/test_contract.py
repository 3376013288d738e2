"""The stage contract checked across stages: every finished folder holds a record the schema reads, a card, no
pickle and no run marker; measured CO2 reaches every stage's record and card; no import cycle anywhere in the package.

pytest tests/test_contract.py -q
"""

from __future__ import annotations

import ast
import json
import sys
import types
from pathlib import Path

import pytest

import hfrecipes
from hfrecipes import record
from hfrecipes.report import card
from hfrecipes.report import format as fmt

PACKAGE = Path(hfrecipes.__file__).parent
FAST = {"max_steps": 2, "logging_steps": 1, "save_strategy": "no"}


class StandIn:
    """codecarbon's `OfflineEmissionsTracker` where codecarbon is not installed: its interface, a fixed figure."""

    def __init__(self, **kwargs):
        pass

    def start(self):
        pass

    def stop(self):
        return 0.000123


@pytest.fixture(scope="module")
def measured():
    """For the module's stage runs, codecarbon's tracker (the real one where installed) wrapped to keep the figure
    it gave each stage folder, by folder."""
    figures = {}
    with pytest.MonkeyPatch.context() as mp:
        try:
            import codecarbon
        except ImportError:
            codecarbon = types.SimpleNamespace(OfflineEmissionsTracker=StandIn)
            mp.setitem(sys.modules, "codecarbon", codecarbon)

        class Kept(codecarbon.OfflineEmissionsTracker):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                self.folder = Path(kwargs["output_dir"]).resolve()

            def stop(self):
                figures[self.folder] = super().stop()
                return figures[self.folder]

        mp.setattr(codecarbon, "OfflineEmissionsTracker", Kept)
        yield figures


@pytest.fixture(scope="module")
def finished(measured, tiny_pretrained, tiny_sft, tmp_path_factory):
    """One finished folder per trained stage (a few steps each) and an export."""
    root = tmp_path_factory.mktemp("contract")
    parent = {"model_name_or_path": str(tiny_sft.output_dir)}
    folders = {"pretrain": tiny_pretrained, "sft": tiny_sft}
    folders["sft_lora"] = hfrecipes.sft("tiny/sft_lora", output_dir=str(root / "sft_lora"), **parent, **FAST)
    folders["reward"] = hfrecipes.reward("tiny/reward", output_dir=str(root / "reward"), **parent, **FAST)
    folders["dpo"] = hfrecipes.dpo("tiny/dpo", output_dir=str(root / "dpo"), max_train_samples=64, **parent, **FAST)
    folders["kto"] = hfrecipes.kto(
        "tiny/kto", output_dir=str(root / "kto"), max_train_samples=64, max_eval_samples=64, **parent, **FAST
    )
    folders["grpo"] = hfrecipes.grpo("tiny/grpo", output_dir=str(root / "grpo"), eval_samples=8, **parent, **FAST)
    folders["rloo"] = hfrecipes.rloo(
        "tiny/rloo", output_dir=str(root / "rloo"), eval_samples=8, gold_samples=8, **parent, **FAST
    )
    folders["ppo"] = hfrecipes.ppo(
        "tiny/ppo",
        output_dir=str(root / "ppo"),
        reward_model_path=str(folders["reward"].output_dir),
        per_device_train_batch_size=8,
        num_mini_batches=1,
        num_ppo_epochs=1,
        heldout_max_prompts=8,
        gold_samples=8,
        **parent,
        **FAST,
    )
    folders["distill"] = hfrecipes.distill(
        "tiny/distill",
        output_dir=str(root / "distill"),
        model_name_or_path=str(tiny_pretrained.output_dir),
        teacher_model_name_or_path=str(tiny_sft.output_dir),
        per_device_train_batch_size=8,
        max_eval_samples=8,
        **FAST,
    )
    folders["export"] = hfrecipes.export(tiny_sft.output_dir, root / "tiny" / "export", use_vllm=False)
    return folders


STAGES = ["pretrain", "sft", "sft_lora", "reward", "dpo", "kto", "grpo", "rloo", "ppo", "distill", "export"]


@pytest.mark.parametrize("name", STAGES)
def test_finished_folder_holds_record_card_and_no_pickle(finished, name):
    out = finished[name].output_dir
    assert not list(out.glob("*.bin")), "a finished stage folder holds no pickle"
    assert not (out / record.MARKER).exists()
    rec = record.load_record(out)
    assert rec.status == "complete" and rec.schema == record.SCHEMA_VERSION
    assert rec.model.params_total > 0 and rec.compute.wall_seconds > 0
    assert "<!--" not in (out / "README.md").read_text()[:20]  # our template rendered, not a placeholder
    if name != "export":
        assert rec.metrics.steps == FAST["max_steps"] or name in ("pretrain", "sft")


@pytest.mark.parametrize("name", ["pretrain", "sft", "reward", "dpo", "kto", "grpo", "rloo", "ppo", "distill"])
def test_each_stage_records_one_heldout_block_the_card_shows(finished, name):
    rec = record.load_record(finished[name].output_dir)
    h = rec.metrics.heldout
    assert h is not None and isinstance(h.after, float) and h.examples > 0, h
    if name in ("reward", "dpo", "kto", "grpo", "rloo", "ppo", "distill"):  # measured before training as well
        assert isinstance(h.before, float)
    text = (finished[name].output_dir / "README.md").read_text()
    assert f"Held-out evaluation of the {rec.stage} stage: {h.metric}:" in text


def test_export_card_names_the_model_and_lists_only_training_stages(finished, tiny_sft):
    out = finished["export"].output_dir
    text = (out / "README.md").read_text()
    assert text.split("\n# ", 1)[1].startswith("tiny-sft\n"), "heading: the run's name and the trained stage"
    lineage = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "|" in line[2:]]
    assert "export" not in lineage and "pretrain" in lineage and "sft" in lineage
    assert "0 tokens/s" not in text
    sft_wall = fmt.duration(tiny_sft.record["compute"]["wall_seconds"])
    assert f"for {sft_wall}" in text, "the compute paragraph describes the stage that trained the weights"
    rec = record.load_record(out)
    meta = card.card_data(rec, card.lineage_numbers(rec))
    assert [s["stage"] for s in meta.hfrecipes["lineage"]] == ["pretrain", "sft"]


@pytest.mark.parametrize("name", ["sft_lora", "reward", "dpo", "kto", "grpo", "rloo", "ppo", "distill"])
def test_measured_co2_reaches_every_stage_record_and_card(finished, measured, name):
    """The figure codecarbon gave (the real offline tracker where it is installed) is the record's, said to be
    measured, in every stage, not only pretraining."""
    out = finished[name].output_dir
    compute = record.read_record(out)["compute"]
    assert compute["co2_source"] == "codecarbon", compute["co2_source"]
    assert compute["co2_kg"] == measured[out.resolve()] and compute["co2_kg"] > 0
    assert "(CO2: codecarbon)" in (out / "README.md").read_text()


def test_a_damaged_record_is_one_clear_error(tmp_path):
    from hfrecipes.errors import UsageError

    (tmp_path / record.RECORD).write_text(json.dumps({"stage": "sft", "run_id": "x", "status": "complete"}))
    assert record.load_record(tmp_path).metrics.heldout is None  # a minimal record reads
    bad = {"stage": "sft", "run_id": "x", "status": "complete", "compute": {"wall_seconds": "fast"}}
    (tmp_path / record.RECORD).write_text(json.dumps(bad))
    with pytest.raises(UsageError, match="compute.wall_seconds: expected a number"):
        record.read_record(tmp_path)
    bad = {"stage": "sft", "run_id": "x", "status": "complete", "metrics": {"heldout": {"after": 0.5}}}
    (tmp_path / record.RECORD).write_text(json.dumps(bad))
    with pytest.raises(UsageError, match="metrics.heldout: a held-out block needs a 'metric'"):
        record.read_record(tmp_path)


# ---------------------------------------------------------------------------------------------- import graph


def _imports(path: Path, module: str) -> set[str]:
    """Every hfrecipes module `path` imports, at module level or inside a function."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("hfrecipes")}


def _graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        # `from hfrecipes import x` names module hfrecipes.x when there is one; the package itself otherwise
        graph[name] = {m for m in _imports(path, name) if m in modules and m != name}
    # importing a submodule runs its package's __init__ first, which is not an edge of the submodule's own
    return {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                cycles.append(stack[stack.index(m) :] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return cycles


def test_no_import_cycle_in_the_package_not_even_inside_a_function():
    graph = _graph()
    assert "hfrecipes.report.card" in graph["hfrecipes.stagerun"]
    assert "hfrecipes.record" in graph["hfrecipes.report.card"]
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
