"""`hfrecipes eval`: lm-evaluation-harness on the bundled tasks, offline; results, contamination and the probe in the
record and the card; bad input refused before any model loads."""

import json
import shutil

import pytest
import yaml
from conftest import needs_vllm

import hfrecipes
from hfrecipes import cli, harness
from hfrecipes.errors import UsageError
from hfrecipes.tiny import task as tiny_task

TASKS = ["tiny_addition", "tiny_addition_choice", "tiny_facts"]


def _copy(folder, tmp_path, name="model"):
    """Evaluation writes into the folder's record: the shared fixtures are parents of other tests, so a copy."""
    return shutil.copytree(folder, tmp_path / name)


def _front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def test_the_shipped_task_files_are_the_tiny_task_they_describe():
    rows = harness.bundled_rows()
    for name, file in harness.DATA_FILES.items():
        shipped = [json.loads(line) for line in (harness.TASKS_DIR / file).read_text().splitlines()]
        assert shipped == rows[name], f"{file} differs from harness.bundled_rows(); run python -m hfrecipes.harness"
    heldout = tiny_task.split_pairs()["heldout"]
    assert [(r["a"], r["b"]) for r in rows["tiny_addition"]] == heldout
    for row in rows["tiny_addition_choice"]:
        assert len(set(row["choices"])) == 4
        assert row["choices"][row["label"]] == tiny_task.answer(row["a"], row["b"])
        if tiny_task.carries(row["a"], row["b"]):  # the annotators' flaw is among the wrong replies
            assert tiny_task.answer(row["a"], row["b"], tiny_task.dropped_carry(row["a"], row["b"])) in row["choices"]


def test_eval_writes_scores_contamination_and_model_index(tiny_sft, tmp_path, capsys):
    folder = _copy(tiny_sft.output_dir, tmp_path)
    before = json.loads((folder / "record.json").read_text())
    code = cli.main([
        "eval", str(folder), "--tasks", ",".join(TASKS), "--limit", "8", "--engine", "transformers",
        "--probe", "tiny:facts",
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "tiny_addition_choice" in printed and "knowledge probe" in printed
    rec = json.loads((folder / "record.json").read_text())
    assert {k: v for k, v in rec.items() if k != "evaluations"} == before  # nothing else in the record changed
    ev = rec["evaluations"]
    assert ev["engine"] == "transformers" and ev["chat_template"] is True
    tasks = ev["tasks"]
    assert set(tasks) == {"tiny_addition", "tiny_addition_carry", "tiny_addition_no_carry", *TASKS}
    params = rec["model"]["params_total"]
    for name in TASKS:
        e = tasks[name]
        assert 0.0 <= e["value"] <= 1.0 and e["stderr"] is not None and e["shots"] == 0
        assert e["seconds"] > 0 and e["tokens"] > 0 and e["dollars"] > 0
        assert e["inference_flops"] == pytest.approx(2 * params * e["tokens"])
    assert tasks["tiny_addition_carry"]["examples"] == 8 and tasks["tiny_addition"]["examples"] == 16
    assert tasks["tiny_addition"]["metric"] == "exact_match" and tasks["tiny_facts"]["metric"] == "acc"

    # Contamination: the held-out addition problems are in no stage's training data; the first facts (dated before
    # the pretraining cutoff) are in the pretraining corpus, so every one of them overlaps.
    c = ev["contamination"]
    assert c["ngram"] == 13 and set(c["sources"]) == {"pretrain: tiny:corpus", "sft: tiny:sft"}
    assert c["sets"]["tiny_addition"]["share"] == 0.0 and c["sets"]["tiny_addition_choice"]["share"] == 0.0
    assert c["sets"]["tiny_facts"]["share"] == 1.0 and c["sets"]["tiny_facts"]["clean_score"] is None
    assert c["sets"]["held-out tiny:sft (test)"]["share"] == 0.0

    # The probe, month by month, split at the record's cutoff.
    probe = ev["probe"]
    assert probe["cutoff"] == rec["data"]["model_cutoff"]["date"]
    assert sum(m["total"] for m in probe["by_month"].values()) == probe["before"]["total"] + probe["after"]["total"]

    card = (folder / "README.md").read_text()
    assert "### Benchmarks" in card and "| tiny_addition_choice | acc |" in card
    assert "knowledge_probe.png" in card and (folder / "knowledge_probe.png").is_file()
    index = _front_matter(card)["model-index"][0]
    named = {r["dataset"]["name"]: r["metrics"][0] for r in index["results"]}
    assert named["tiny_facts"]["type"] == "acc"
    assert named["tiny_facts"]["value"] == pytest.approx(tasks["tiny_facts"]["value"], abs=1e-4)

    # A second evaluation of one task keeps the others' results.
    hfrecipes.evaluate(folder, ["tiny_facts"], limit=4, engine="transformers", contamination_check=False)
    again = json.loads((folder / "record.json").read_text())["evaluations"]
    assert again["tasks"]["tiny_facts"]["examples"] == 4 and "tiny_addition_choice" in again["tasks"]
    assert again["probe"] == probe


def test_a_planted_heldout_problem_is_found_and_scored_apart(tiny_pretrained, tmp_path):
    """An SFT set that holds one held-out problem word for word: its lineage's evaluation flags that item alone."""
    a, b = tiny_task.split_pairs()["heldout"][0]  # the first held-out problem: the no-carry task's first item
    assert not tiny_task.carries(a, b)
    rows = [{"messages": tiny_task.conversation(x, y)} for x, y in tiny_task.split_pairs()["sft"][:15]]
    rows.insert(7, {"messages": tiny_task.conversation(a, b)})
    data = tmp_path / "planted.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = hfrecipes.sft(
        "tiny/sft", model_name_or_path=str(tiny_pretrained.output_dir), output_dir=str(tmp_path / "sft"),
        dataset_name=str(data), dataset_test_split=None, max_steps=2, logging_steps=1, save_strategy="no",
        gold_dataset_name=None, gold_patience=None, gold_keep_best=False, eval_strategy="no",
    )  # fmt: skip
    block = hfrecipes.evaluate(out.output_dir, ["tiny_addition"], limit=6, engine="transformers")
    sets = block["contamination"]["sets"]
    assert sets["tiny_addition_no_carry"]["contaminated"] == 1 and sets["tiny_addition_carry"]["contaminated"] == 0
    assert sets["tiny_addition"]["share"] == pytest.approx(1 / 12)
    assert sets["tiny_addition_no_carry"]["clean_items"] == 5
    sources = block["contamination"]["sources"]
    assert sources[f"sft: {data}"]["contaminated"] == 1  # the planted problem; the corpus flags none of the task's
    card = (out.output_dir / "README.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith("| tiny_addition_no_carry"))
    assert "| 16.7% |" in row or "| 16.67% |" in row, row  # 1 of its 6 items


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "no_such_task"], "no_such_task not found among lm-eval's tasks"),
        ([], "nothing to evaluate"),
        (["--tasks", "tiny_facts", "--engine", "tpu"], "--engine must be one of"),
        (["--tasks", "tiny_facts", "--limit", "0"], "--limit"),
        (["--tasks", "tiny_facts", "--probe", "tiny:sft"], "lacks column"),
        (["--tasks", "tiny_facts", "--include_path", "no/such/folder"], "is not a folder"),
        (["--tasks", "tiny_facts", "--ngram", "0"], "--ngram"),
    ],
)
def test_bad_input_is_one_message_before_any_model_loads(tiny_sft, tmp_path, argv, message, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(harness, "_language_model", no_model)
    folder = _copy(tiny_sft.output_dir, tmp_path)
    before = (folder / "record.json").read_text()
    assert cli.main(["eval", str(folder), *argv]) == cli.EXIT_USAGE
    assert message in capsys.readouterr().err
    assert (folder / "record.json").read_text() == before


def test_eval_of_a_missing_folder_names_it(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        hfrecipes.evaluate(tmp_path / "nothing", ["tiny_facts"])


@needs_vllm
@pytest.mark.slow
def test_the_vllm_engine_scores_as_transformers_does(tiny_taught, tmp_path):
    folder = _copy(tiny_taught.output_dir, tmp_path)
    kwargs = dict(limit=6, contamination_check=False, write=False)
    on_vllm = hfrecipes.evaluate(folder, ["tiny_addition", "tiny_facts"], engine="vllm", **kwargs)
    on_hf = hfrecipes.evaluate(folder, ["tiny_addition", "tiny_facts"], engine="transformers", **kwargs)
    assert on_vllm["engine"] == "vllm"
    for name in ("tiny_addition_carry", "tiny_addition_no_carry", "tiny_facts"):
        assert on_vllm["tasks"][name]["value"] == pytest.approx(on_hf["tasks"][name]["value"]), name


@pytest.mark.realmodel
@pytest.mark.slow
def test_smollm2_is_scored_on_the_bundled_tasks_with_its_card(smollm2, tmp_path):
    """The real SmolLM2-135M-Instruct, converted from its GGUF: lm-eval scores it on the bundled tasks, its base
    record (whose corpus is not published) says what the contamination check could not read, and the card carries
    the table, the check and the probe's curve."""
    folder = _copy(smollm2, tmp_path, "smollm2")
    block = hfrecipes.evaluate(
        folder, TASKS, limit=12, engine="transformers", probe="tiny:facts", cutoff="2024-06-30", batch_size=8
    )
    tasks = block["tasks"]
    for name in TASKS:
        e = tasks[name]
        assert 0.0 <= e["value"] <= 1.0 and e["stderr"] is not None and e["tokens"] > 0 and e["seconds"] > 0
    assert tasks["tiny_addition"]["examples"] == 24 and tasks["tiny_facts"]["examples"] == 12
    c = block["contamination"]
    assert c["sources"] == {} and c["not_checked"][0]["stage"] == "base"
    assert block["probe"]["cutoff"] == "2024-06-30" and block["probe"]["by_month"]
    card = (folder / "README.md").read_text()
    assert "### Benchmarks" in card and "not checked: base" in card
    assert "knowledge_probe.png" in card and (folder / "knowledge_probe.png").is_file()
    assert _front_matter(card)["model-index"][0]["results"]
