"""The knowledge cutoff along the lineage: a stage whose data is dated after its parent's cutoff moves it, and the
card says which stage moved it and from when; the knowledge probe counted by the month of the fact, drawn on the
card, and taken by any model folder on the user's own dated facts.

pytest tests/test_cutoff_lineage.py -q
"""

from __future__ import annotations

import json

import pytest
from conftest import built_once, markdown_table

import hfrecipes
from hfrecipes import data, probe, record
from hfrecipes.errors import UsageError
from hfrecipes.report import card, plots

PNG = b"\x89PNG\r\n\x1a\n"
FACTS = [  # months on either side of the pretraining data's newest date, 2023-05-02
    {"prompt": "The cat sat on the", "answer": "mat", "choices": ["mat", "dog"], "date": "2022-01-10"},
    {"prompt": "The dog sat on the", "answer": "cat", "choices": ["mat", "cat"], "date": "2022-01-20"},
    {"prompt": "The cat ran to the", "answer": "river", "choices": ["river", "town"], "date": "2023-04-02"},
    {"prompt": "The mat lay by the", "answer": "town", "choices": ["river", "town"], "date": "2024-02-15"},
    {"prompt": "The town had a", "answer": "bridge", "choices": ["bridge", "mat", "cat"], "date": "2025-07-01"},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _flat(text: str) -> str:
    return " ".join(text.split())  # as read, not as wrapped


# --------------------------------------------------------------------------------- the rule, by hand

PRE = {"date": "2024-06-30", "stage": "pretrain", "source": "data"}
MODEL_CUTOFF_CASES = [
    # stage, its data's date, the parent's model cutoff, expected: date, stage, moved_from, inherited_from
    ("pretrain", "2024-06-30", None, ("2024-06-30", "pretrain", None, None)),
    ("sft", "2025-03-01", PRE, ("2025-03-01", "sft", PRE, None)),
    ("sft", None, PRE, ("2024-06-30", "pretrain", None, "pretrain")),
    ("sft", "2021-01-01", PRE, ("2024-06-30", "pretrain", None, "pretrain")),
    ("sft", "2024-06-30", PRE, ("2024-06-30", "pretrain", None, "pretrain")),  # the same date moves nothing
    ("sft", "2023-01-01", {"date": None, "stage": "pretrain"}, ("2023-01-01", "sft", None, None)),
    ("sft", None, None, (None, "sft", None, None)),
]


@pytest.mark.parametrize("stage,own,inherited,expected", MODEL_CUTOFF_CASES)
def test_model_cutoff_is_set_moved_or_inherited(stage, own, inherited, expected):
    parent = {"stage": "pretrain", "data": {"model_cutoff": inherited}} if inherited else None
    out = data.model_cutoff({"date": own, "source": "data" if own else "unknown", "detail": "d"}, parent, stage)
    assert (out["date"], out["stage"], out.get("moved_from"), out.get("inherited_from")) == expected


def test_a_move_is_kept_by_the_stages_that_inherit_it():
    moved = {"date": "2025-03-01", "stage": "sft", "moved_from": {"date": "2024-06-30", "stage": "pretrain"}}
    child = data.model_cutoff({"date": None}, {"stage": "sft", "data": {"model_cutoff": moved}}, "dpo")
    grandchild = data.model_cutoff({"date": None}, {"stage": "dpo", "data": {"model_cutoff": child}}, "kto")
    assert child == {**moved, "inherited_from": "sft"}
    assert grandchild == {**moved, "inherited_from": "dpo"}


def _stage(stage: str, own: str | None, parent: dict | None = None, **cutoff) -> dict:
    """A complete record of `stage` whose data is dated `own` (None: undated), its model cutoff by the real rule."""
    rec = record.new_record(stage, {"path": None, "values": {}}, parent)
    stage_cutoff = {"date": own, "source": "data" if own else "unknown", "detail": "from the test", **cutoff}
    rec.update(
        status="complete",
        model={"model_type": "llama", "params_total": 1000, "source": "random init", "adapter": None},
        data={
            "datasets": [{"name": f"{stage}.jsonl"}],
            "tokens_seen": 10,
            "knowledge_cutoff": stage_cutoff,
            "model_cutoff": data.model_cutoff(stage_cutoff, parent, stage),
        },
        compute=record.compute_summary(1000, 10, 0.0, 36.0, {"kind": "cpu", "name": "x86_64", "count": 1}),
        metrics={"steps": 1},
    )
    return rec


def test_the_card_says_who_set_the_cutoff_who_moved_it_and_who_inherited_it():
    pre = _stage("pretrain", "2024-06-30")
    sft = _stage("sft", "2025-03-01", pre)  # the planted post-cutoff row
    dpo = _stage("dpo", None, sft)
    kto = _stage("kto", "2021-01-01", dpo)
    cells = [row[2] for row in markdown_table(str(card.render(kto)), "| stage | data |")[:-1]]
    assert cells == [
        "2024-06-30",
        "2025-03-01 (moved)",
        "2025-03-01 (inherited)",
        "2025-03-01 (inherited; its data ends 2021-01-01)",
    ]
    for rec in (sft, dpo, kto):
        text = _flat(str(card.render(rec)))
        assert "**2025-03-01**, set by the sft stage (data)" in text
        assert "Moved from 2024-06-30 (set by the pretrain stage) to 2025-03-01 by the sft stage." in text
    text = _flat(str(card.render(pre)))
    assert "**2024-06-30**, set by the pretrain stage" in text and "Moved from" not in text


def test_unknown_only_when_nothing_in_the_lineage_knows():
    pre = _stage("pretrain", None)
    sft = _stage("sft", None, pre)
    assert [row[2] for row in markdown_table(str(card.render(sft)), "| stage | data |")[:-1]] == ["unknown", "unknown"]
    assert "**unknown** (unknown)" in _flat(str(card.render(sft)))


def test_a_record_without_the_new_keys_is_read_from_its_dates():
    pre = _stage("pretrain", "2024-06-30")
    sft = _stage("sft", "2025-03-01", pre)
    dpo = _stage("dpo", None, sft)
    for rec in (sft, dpo):
        for key in ("moved_from", "inherited_from"):
            rec["data"]["model_cutoff"].pop(key, None)
    dpo["parent"] = sft
    assert [row[2] for row in markdown_table(str(card.render(dpo)), "| stage | data |")[:-1]] == [
        "2024-06-30",
        "2025-03-01 (moved)",
        "2025-03-01 (inherited)",
    ]


# ----------------------------------------------------------------------------------------- by month


def test_tally_counts_facts_by_month():
    rows = [
        {"prompt": "p0", "answer": "a", "choices": ["a", "b"], "date": "2024-06-30"},
        {"prompt": "p1", "answer": "b", "choices": ["a", "b"], "date": "2024-06-02T10:00:00Z"},
        {"prompt": "p2", "answer": "a", "choices": ["a", "b"], "date": "2023-01-05"},
        {"prompt": "p3", "answer": "a", "choices": ["a", "b", "c"], "date": "2024-07-01"},
    ]
    out = probe.tally(rows, [[0, -1], [0, -1], [0, 0], [1, 0, 0]], "2024-06-30")
    assert list(out["by_month"]) == ["2023-01", "2024-06", "2024-07"]
    assert out["by_month"]["2024-06"] == {"known": 1, "total": 2, "accuracy": 0.5}
    assert out["by_month"]["2023-01"] == {"known": 0, "total": 1, "accuracy": 0.0}  # a tie is not known
    assert out["by_month"]["2024-07"] == {"known": 1, "total": 1, "accuracy": 1.0}
    assert sum(m["total"] for m in out["by_month"].values()) == out["before"]["total"] + out["after"]["total"]


def test_the_probe_plot_is_written_beside_the_record_and_shown_under_the_cutoff(tmp_path):
    found = probe.tally(FACTS, [[1, 0], [1, 0], [0, 1], [0, 1], [0, 1, 2]], "2023-05-02")
    assert plots.write_probe_plot(tmp_path / "none", {k: v for k, v in found.items() if k != "by_month"}) is None
    pre = _stage("pretrain", "2023-05-02", knowledge_probe={"dataset": "facts.jsonl", **found})
    card.write_card(tmp_path, pre)
    assert (tmp_path / plots.PROBE_PLOT).read_bytes()[:8] == PNG
    text = (tmp_path / "README.md").read_text()
    cutoff_section = text[text.index("## Knowledge cutoff") : text.index("## Lineage")]
    assert f"]({plots.PROBE_PLOT})" in cutoff_section and text.count(plots.PROBE_PLOT) == 1
    assert "Knowledge probe of the pretrain model (facts.jsonl): 1/3 facts dated before" in _flat(cutoff_section)
    child = tmp_path / "sft"  # an undated stage inherits the cutoff and cites its probe; the curve stays with pretrain
    child.mkdir()
    card.write_card(child, _stage("sft", None, pre))
    text = _flat((child / "README.md").read_text())
    assert "Knowledge probe of the pretrain model (facts.jsonl)" in text and plots.PROBE_PLOT not in text
    assert not (child / plots.PROBE_PLOT).exists()


def test_the_facts_months_in_the_bundled_probe_lie_on_both_sides_of_its_cutoff():
    months = {r["date"][:7] for r in data.tiny_rows("facts", "test")}
    assert sum(m <= "2024-06" for m in months) >= 6 and sum(m > "2024-06" for m in months) >= 6


# ------------------------------------------------------------------------------- the real stage path


@pytest.fixture(scope="module")
def dated(shared_dir):
    """A one-step pretraining on documents dated up to 2023-05-02, probed on FACTS; then a one-step SFT whose rows
    are dated 2025-03-01, after that cutoff. Built by one test worker, read by the others."""
    root = shared_dir / "cutoff_lineage"
    root.mkdir(exist_ok=True)
    docs = [{"text": f"the cat sat on the mat by the river in town {i} " * 6, "date": d} for i, d in
            enumerate(["2021-03-01", "2023-05-02"] * 20)]  # fmt: skip
    pre = built_once(
        root / "pre",
        lambda out: hfrecipes.pretrain(
            "tiny/pretrain",
            dataset_name=_jsonl(root / "docs.jsonl", docs),
            dataset_test_split=None,
            knowledge_probe=_jsonl(root / "facts.jsonl", FACTS),
            max_steps=1,
            per_device_train_batch_size=2,
            block_size=32,
            tokenizer_vocab_size=300,
            save_strategy="no",
            output_dir=str(out),
        ),
    )
    rows = [{"prompt": f"the cat {i}", "completion": " sat on the mat", "date": "2025-03-01"} for i in range(8)]
    sft = built_once(
        root / "sft",
        lambda out: hfrecipes.sft(
            "tiny/sft",
            model_name_or_path=str(pre.output_dir),
            dataset_name=_jsonl(root / "sft.jsonl", rows),
            dataset_test_split=None,
            assistant_only_loss=False,
            gold_dataset_name=None,
            gold_patience=None,
            gold_keep_best=False,
            max_steps=1,
            per_device_train_batch_size=4,
            warmup_steps=0,
            save_strategy="no",
            output_dir=str(out),
        ),
    )
    return root, pre, sft


def test_a_fine_tuning_stage_with_newer_dates_moves_the_cutoff(dated):
    _, pre, sft = dated
    assert pre.record["data"]["model_cutoff"]["date"] == "2023-05-02"
    cutoff = sft.record["data"]["model_cutoff"]
    assert (cutoff["date"], cutoff["stage"], cutoff["source"]) == ("2025-03-01", "sft", "data")
    assert cutoff["moved_from"] == {"date": "2023-05-02", "stage": "pretrain", "source": "data"}
    assert "inherited_from" not in cutoff and "knowledge_probe" not in cutoff  # the probe scored the parent
    text = (sft.output_dir / "README.md").read_text()
    assert "Moved from 2023-05-02 (set by the pretrain stage) to 2025-03-01 by the sft stage." in _flat(text)
    assert [row[2] for row in markdown_table(text, "| stage | data |")[:-1]] == ["2023-05-02", "2025-03-01 (moved)"]


def test_the_pretrain_card_draws_its_probe_by_month(dated):
    _, pre, _ = dated
    found = pre.record["data"]["knowledge_cutoff"]["knowledge_probe"]
    assert list(found["by_month"]) == ["2022-01", "2023-04", "2024-02", "2025-07"]
    assert found["by_month"]["2022-01"]["total"] == 2
    assert (found["before"]["total"], found["after"]["total"]) == (3, 2)
    assert (pre.output_dir / plots.PROBE_PLOT).read_bytes()[:8] == PNG
    assert f"]({plots.PROBE_PLOT})" in (pre.output_dir / "README.md").read_text()


def test_any_folder_takes_the_probe_on_the_users_dated_facts(dated):
    root, pre, sft = dated
    out = probe.evaluate(sft.output_dir, str(root / "facts.jsonl"))  # the cutoff: the one sft's record states
    assert out["cutoff"] == "2025-03-01" and out["dataset"] == str(root / "facts.jsonl")
    assert (out["before"]["total"], out["after"]["total"]) == (4, 1)
    assert list(out["by_month"]) == ["2022-01", "2023-04", "2024-02", "2025-07"]
    again = probe.evaluate(pre.output_dir, str(root / "facts.jsonl"), cutoff="2023-05")  # a published month
    recorded = pre.record["data"]["knowledge_cutoff"]["knowledge_probe"]
    assert again["cutoff"] == "2023-05-31" and again["by_month"] == recorded["by_month"]


def test_the_probe_needs_a_cutoff_before_any_model_loads(dated, tmp_path):
    root, pre, _ = dated
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in pre.output_dir.iterdir():
        if f.name != record.RECORD and f.is_file():
            (bare / f.name).write_bytes(f.read_bytes())
    with pytest.raises(UsageError, match="needs a cutoff: it has no hfrecipes record.json"):
        probe.evaluate(bare, str(root / "facts.jsonl"))
    with pytest.raises(UsageError, match="not a date"):
        probe.evaluate(bare, str(root / "facts.jsonl"), cutoff="June 2024")
