"""The knowledge cutoff, shown by a probe: the corpus' dated world runs past the cutoff, pretraining drops what is
dated after it (`dataset_max_date`), and `hfrecipes.probe` counts the facts a model knows on either side."""

from __future__ import annotations

import json
import math
import re

import pytest

import hfrecipes
from hfrecipes import data, modeling, probe
from hfrecipes.errors import UsageError
from hfrecipes.tiny import corpus

CUTOFF = "2024-06-30"


def _dataset(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


def _docs(path, dates):
    with path.open("w") as f:
        for i, date in enumerate(dates):
            f.write(json.dumps({"text": f"the cat sat on the mat {i} " * 12, "date": date}) + "\n")
    return str(path)


def _no_model(monkeypatch):
    monkeypatch.setattr(modeling, "train_tiny_tokenizer", lambda *a, **k: pytest.fail("a tokenizer was trained"))
    monkeypatch.setattr(modeling, "init_model", lambda *a, **k: pytest.fail("a model was built"))


# ------------------------------------------------------------------------------------------ the dated world


def test_the_world_runs_past_the_cutoff_and_its_facts_are_dated():
    rows = data.tiny_rows("facts", "test")
    assert rows == data.tiny_rows("facts", "test") and rows != data.tiny_rows("facts", "test", seed=1)
    assert len(rows) == corpus.N_FACTS_BEFORE + corpus.N_FACTS_AFTER
    assert sum(r["date"] <= CUTOFF for r in rows) == corpus.N_FACTS_BEFORE
    assert all(r["answer"] in r["choices"] and len(r["choices"]) == 6 for r in rows)
    assert len({r["prompt"] for r in rows}) == len(rows)
    docs = corpus.documents()
    assert max(d["date"] for d in docs) > CUTOFF
    for fact in corpus.facts():
        mentions = [d for d in docs if re.search(rf"\b{fact['town']}\b", d["text"])]
        assert len(mentions) >= 20, fact
        assert all(d["date"] >= fact["date"] for d in mentions), fact  # nobody reports it before it happened
        assert all(d["text"].count(f"painted its bridge {fact['color']}") == 1 for d in mentions), fact
        assert all(d["date"] <= CUTOFF for d in mentions) == (fact["date"] <= CUTOFF), fact
    # the news comes on top: the plain documents up to the cutoff, addition statements included, are as many as
    # without it, in the same shares
    plain = [d for d in docs if d["date"] <= CUTOFF and "bridge" not in d["text"]]
    share = sum(bool(re.search(r"\d (plus|\+|and) \d|add \d|found \d", d["text"])) for d in plain) / len(plain)
    assert 0.35 < share < 0.45 and len(plain) == corpus.N_DOCS
    # and the news is short: a small share of the text the pretraining reads
    seen = [d for d in docs if d["date"] <= CUTOFF]
    news = sum(len(d["text"]) for d in seen if "bridge" in d["text"]) / sum(len(d["text"]) for d in seen)
    assert news < 0.15, news


def test_tiny_facts_has_one_split():
    with pytest.raises(UsageError, match=r"split 'train' of 'tiny:facts'.*\['test'\]"):
        data.tiny_rows("facts", "train")


# --------------------------------------------------------------------------------------------- date filter

FILTER_CASES = [
    # rows' dates, date column(s), max date, rows kept, dropped
    (["2020-01-01", "2024-06-30", "2024-07-01", "2026-01-01"], "date", CUTOFF, [0, 1], 2),
    (["2024-06-30T23:59:00Z", "2024-07-01T00:00:00", None, "not a date"], "date", CUTOFF, [0, 2, 3], 1),
    (["2019-01-01", "2019-01-02"], "date", "2018-12-31", [], 2),
    (["2019-01-01", "2019-01-02"], "date", "2030-01-01", [0, 1], 0),
]


@pytest.mark.parametrize("dates,column,max_date,kept,dropped", FILTER_CASES)
def test_rows_dated_after_the_max_date_are_dropped(dates, column, max_date, kept, dropped):
    ds = _dataset([{"text": str(i), "date": d} for i, d in enumerate(dates)])
    out, n = data.drop_after(ds, column, max_date, "d")
    assert [int(t) for t in out["text"]] == kept and n == dropped


def test_any_date_column_after_the_max_date_drops_the_row():
    ds = _dataset(
        [{"text": "a", "date": "2020-01-01", "published": "2025-01-01"}, {"text": "b", "date": "2020-01-01"}]
    )
    out, n = data.drop_after(ds, "date, published", CUTOFF, "d")
    assert out["text"] == ["b"] and n == 1


def test_undated_data_is_refused_unless_a_declared_cutoff_covers_it():
    ds = _dataset([{"text": "a"}])
    with pytest.raises(UsageError, match="dataset_max_date.*'date'.*dataset_date_column"):
        data.drop_after(ds, "date", CUTOFF, "mine.jsonl")
    with pytest.raises(UsageError, match="dataset_max_date"):
        data.drop_after(ds, "date", CUTOFF, "mine.jsonl", declared="2025-01-01")
    assert data.drop_after(ds, "date", CUTOFF, "mine.jsonl", declared="2023-01-01") == (ds, 0)


def test_pretraining_records_the_cutoff_and_what_was_dropped(tmp_path):
    """A local dated file: the rows after dataset_max_date never reach training, the record counts them, and the
    recorded cutoff is the newest date kept."""
    dates = ["2021-03-01"] * 30 + ["2023-05-02"] * 10 + ["2025-01-01"] * 20
    out = hfrecipes.pretrain(
        "tiny/pretrain",
        dataset_name=_docs(tmp_path / "docs.jsonl", dates),
        dataset_test_split=None,
        dataset_max_date="2024-01-01",
        knowledge_probe=None,
        max_steps=2,
        per_device_train_batch_size=2,
        block_size=32,
        tokenizer_vocab_size=300,
        save_strategy="no",
        output_dir=str(tmp_path / "out"),
    )
    cutoff = out.record["data"]["knowledge_cutoff"]
    assert cutoff["date"] == "2023-05-02" and cutoff["source"] == "data"
    assert cutoff["max_date"] == "2024-01-01" and cutoff["dropped"] == 20
    assert out.record["data"]["datasets"][0]["documents"] == 40
    assert "20 rows dated after 2024-01-01 were dropped" in (out.output_dir / "README.md").read_text()


BAD_INPUT = {
    "not_a_date": (dict(dataset_max_date="30/06/2024"), ["dataset_max_date", "YYYY-MM-DD"]),
    "undated_file": (dict(dataset_max_date=CUTOFF, dates=None), ["dataset_max_date", "dataset_date_column"]),
    "all_after": (dict(dataset_max_date="2019-01-01"), ["dataset_max_date", "every one of its 8 training rows"]),
    "probe_without_columns": (dict(knowledge_probe="{probe}"), ["knowledge_probe", "choices"]),
    "probe_without_cutoff": (dict(dataset_max_date=None, dates=None), ["knowledge_probe", "knowledge cutoff"]),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_usage_error_before_any_model(case, tmp_path, monkeypatch):
    overrides, words = BAD_INPUT[case]
    overrides = dict(overrides)
    dates = overrides.pop("dates", ["2020-01-01"] * 8)
    docs = tmp_path / "docs.jsonl"
    if dates is None:
        docs.write_text("\n".join(json.dumps({"text": f"words {i}"}) for i in range(8)))
    else:
        _docs(docs, dates)
    if overrides.get("knowledge_probe") == "{probe}":
        (tmp_path / "probe.jsonl").write_text(json.dumps({"prompt": "p", "answer": "a", "date": "2020-01-01"}))
        overrides["knowledge_probe"] = str(tmp_path / "probe.jsonl")
    _no_model(monkeypatch)
    with pytest.raises(UsageError) as e:
        hfrecipes.pretrain(
            "tiny/pretrain",
            dataset_name=str(docs),
            dataset_test_split=None,
            output_dir=str(tmp_path / "out"),
            **overrides,
        )
    assert all(w in str(e.value) for w in words), str(e.value)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- the probe

ROWS = [
    {"prompt": "p0", "answer": "a", "choices": ["a", "b"], "date": "2020-01-01"},
    {"prompt": "p1", "answer": "b", "choices": ["a", "b"], "date": "2024-06-30"},
    {"prompt": "p2", "answer": "c", "choices": ["a", "b", "c", "d"], "date": "2024-07-01"},
    {"prompt": "p3", "answer": "a", "choices": ["a", "b", "c", "d"], "date": "2026-01-01"},
]
TALLY_CASES = [
    # scores per row, known before, known after, the choice topping the most rows and in how many
    ([[0, -1], [0, -1], [-9, -9, 0, -9], [0, -1, -2, -3]], 1, 2, ("a", 3)),  # "a" first everywhere but p2
    ([[-1, 0], [-1, 0], [0, 0, 0, 0], [-1, 0, 0, 0]], 1, 0, ("b", 3)),  # a tie is not known
    ([[5, 1], [1, 5], [1, 1, 2, 1], [3, 2, 1, 0]], 2, 2, ("a", 2)),
]


@pytest.mark.parametrize("scores,before,after,top", TALLY_CASES)
def test_tally_counts_known_facts_either_side_of_the_cutoff(scores, before, after, top):
    out = probe.tally(ROWS, scores, CUTOFF)
    assert out["top_choice"] == {"choice": top[0], "rows": top[1], "total": 4}
    assert out["cutoff"] == CUTOFF
    assert out["before"] == {"known": before, "total": 2, "accuracy": before / 2}
    assert out["after"] == {"known": after, "total": 2, "accuracy": after / 2}
    assert out["chance"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 4 + 1 / 4) / 4)


class OneTokenModel:
    """A stand-in causal LM whose next token is always `token` (logit 10, all others 0)."""

    training = False

    def __init__(self, token: int, vocab: int):
        import torch

        self.token, self.vocab, self.weight = token, vocab, torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        yield self.weight

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def __call__(self, input_ids, attention_mask):
        import torch
        from transformers.modeling_outputs import CausalLMOutput

        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.token] = 10.0
        return CausalLMOutput(logits=logits)


def test_a_model_whose_scores_are_fixed_knows_exactly_those_facts(tiny_pretrained):
    tok = modeling.load_tokenizer(str(tiny_pretrained.output_dir))
    rows = data.tiny_rows("facts", "test")
    assert len(tok(" purple", add_special_tokens=False)["input_ids"]) == 1
    purple = tok(" purple", add_special_tokens=False)["input_ids"][0]
    out = probe.probe(OneTokenModel(purple, len(tok)), tok, rows, CUTOFF)
    purple_before = sum(r["answer"] == "purple" and r["date"] <= CUTOFF for r in rows)
    purple_after = sum(r["answer"] == "purple" and r["date"] > CUTOFF for r in rows)
    assert purple_before > 0 and purple_after > 0
    assert out["before"]["known"] == purple_before and out["before"]["total"] == corpus.N_FACTS_BEFORE
    assert out["after"]["known"] == purple_after and out["after"]["total"] == corpus.N_FACTS_AFTER
    assert out["chance"] == pytest.approx(1 / 6)


def test_choice_scores_are_the_log_likelihood_of_the_continuation(tiny_pretrained):
    import torch
    from transformers import AutoModelForCausalLM

    folder = str(tiny_pretrained.output_dir)
    tok = modeling.load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt, choices = "The town of Quarvel painted its bridge", ["green", "yellow", "black"]
    scores = probe.choice_scores(model, tok, prompt, choices)
    for choice, score in zip(choices, scores, strict=True):
        context = [tok.eos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
        ids = [tok.eos_token_id] + tok(f"{prompt} {choice}", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
        by_hand = sum(logprobs[i - 1, ids[i]].item() for i in range(len(context), len(ids)))
        assert score == pytest.approx(by_hand, abs=1e-4) and score < 0
    assert model.training is False


def test_the_stage_records_the_probe_and_the_card_shows_it(tiny_pretrained):
    """The shared 80-step model: the record keeps the probe beside the cutoff, the dropped rows, and the card."""
    cutoff = tiny_pretrained.record["data"]["knowledge_cutoff"]
    assert cutoff["date"] == CUTOFF and cutoff["max_date"] == CUTOFF and cutoff["dropped"] > 5000
    found = cutoff["knowledge_probe"]
    assert found["dataset"] == "tiny:facts" and found["cutoff"] == CUTOFF
    assert (found["before"]["total"], found["after"]["total"]) == (corpus.N_FACTS_BEFORE, corpus.N_FACTS_AFTER)
    assert math.isclose(found["chance"], 1 / 6)
    assert tiny_pretrained.record["data"]["model_cutoff"]["knowledge_probe"] == found  # later stages inherit it
    card = " ".join((tiny_pretrained.output_dir / "README.md").read_text().split())  # as read, not as wrapped
    before, after = (f"{found[k]['known']}/{found[k]['total']}" for k in ("before", "after"))
    line = f"{before} facts dated before the cutoff known, {after} after"
    assert line in card and "(chance 1/6)" in card


def test_the_probe_runs_on_a_folder(tiny_pretrained):
    rows = probe.load_facts("tiny:facts")
    out = probe.probe(tiny_pretrained.output_dir, None, rows, CUTOFF)
    recorded = tiny_pretrained.record["data"]["knowledge_cutoff"]["knowledge_probe"]
    assert out == {k: v for k, v in recorded.items() if k != "dataset"}
