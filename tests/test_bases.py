"""The base model's own pretraining in the lineage: the bundled table of published figures, checked strictly, and
the card of a model started from a converted GGUF, whose first row is that pretraining marked as an estimate and
summed into the total. No weights are trained or loaded here (the real conversion is in tests/test_real_model.py).
"""

from __future__ import annotations

import pytest

from hfrecipes import converting, costs, record
from hfrecipes.errors import UsageError
from hfrecipes.report import card
from hfrecipes.report import format as fmt

SMOLLM2_META = {"general.basename": "smollm2", "general.size_label": "135M", "quantization": "Q4_1"}


def test_bundled_table_parses_and_matches_smollm2_by_its_gguf_metadata():
    bases = converting.read_bases()
    smol = converting.find_base(SMOLLM2_META, bases)
    assert smol is not None and smol.name == "SmolLM2-135M"
    assert smol.pretraining_tokens == 2e12 and "2 trillion" in smol.pretraining_tokens_source
    assert smol.knowledge_cutoff is None and smol.released
    assert converting.find_base({"general.basename": "smollm2", "general.size_label": "1.7B"}, bases) is None
    for b in bases:
        assert b.pretraining_tokens_source and b.knowledge_cutoff_source and b.match, b.name


@pytest.mark.parametrize(
    "text, words",
    [
        ("bases:\n  - {name: m, pretraining_token: 1.0e+12}\n", ["unknown key", "pretraining_token"]),
        ("bases:\n  - {name: m, pretraining_tokens: 2.0e12}\n", ["pretraining_tokens", "'2.0e12'", "positive number"]),
        ("bases:\n  - {pretraining_tokens: 1.0e+12}\n", ["needs a 'name'"]),
        ("bases: [\n", ["not valid YAML"]),
    ],
)
def test_a_bad_base_file_is_one_clear_message(tmp_path, text, words):
    path = tmp_path / "bases.yaml"
    path.write_text(text)
    with pytest.raises(UsageError) as e:
        converting.read_bases(path)
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.fixture
def base_rec(tmp_path):
    """The base record `convert` writes for SmolLM2-135M, on the tiny model as a stand-in for its weights."""
    from transformers import AutoModelForCausalLM

    from hfrecipes.tiny import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config())
    facts = converting.find_base(SMOLLM2_META, converting.read_bases())
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")  # its size is recorded; its bytes are not read here
    return converting.base_record(model, gguf, "ab" * 32, SMOLLM2_META, facts, "float32")


def test_base_record_prices_the_published_pretraining_as_an_estimate(base_rec):
    n = base_rec["model"]["params_total"]
    c = base_rec["compute"]
    assert base_rec["stage"] == "base" and base_rec["status"] == "complete"
    assert c["estimate"] is True and c["flops_6nd"] == pytest.approx(6 * n * 2e12)
    ref = costs.DEVICES[costs.REFERENCE_DEVICE]
    hours = 6 * n * 2e12 / (ref.peak_flops * costs.DEFAULT_MFU) / 3600
    assert c["device_hours"] == pytest.approx(hours) and c["dollars"] == pytest.approx(hours * ref.price_per_hour)
    assert base_rec["gguf"]["quantization"] == "Q4_1" and base_rec["gguf"]["sha256"] == "ab" * 32
    assert set(base_rec["base"]["sources"]) >= {"params", "pretraining_tokens", "knowledge_cutoff", "flops", "dollars"}


def test_card_of_a_model_started_from_it_leads_its_lineage_with_the_base_row(base_rec):
    child = record.new_record("sft", {"values": {}}, base_rec)
    child["model"] = {**base_rec["model"], "source": "/cache/gguf/SmolLM2"}
    child["data"] = {
        "datasets": [{"name": "tiny:sft", "split": "train"}],
        "tokens_seen": 1000,
        "knowledge_cutoff": {"date": None, "source": "none", "detail": "the data carries no dates"},
        "model_cutoff": {"date": None, "source": "none", "detail": "the data carries no dates", "stage": "sft"},
    }
    child["compute"] = {"flops_6nd": 6e12, "dollars": 0.01, "wall_seconds": 60.0, "device_hours": 1 / 60}
    child["metrics"] = {"steps": 5}
    child["status"] = "complete"
    numbers = card.lineage_numbers(record.Record.parse(child))
    rows, total = card.lineage_rows(numbers)
    assert [r["stage"] for r in rows] == ["base (published, estimated)", "sft"]
    assert rows[0]["dollars"].startswith("~$") and rows[0]["flops"].startswith("~") and rows[0]["tokens"] == "2 T"
    assert rows[1]["dollars"] == fmt.money(0.01)
    sums = numbers.total
    assert sums["dollars"] == pytest.approx(base_rec["compute"]["dollars"] + 0.01)
    # one rule for every summed key: the base row's energy and CO2 are both in their totals, or both said missing
    assert sums["energy_kwh"] == pytest.approx(base_rec["compute"]["energy_kwh"])  # the sft row records none
    assert sums["co2_kg"] == pytest.approx(base_rec["compute"]["co2_kg"])
    assert base_rec["compute"]["co2_kg"] == pytest.approx(base_rec["compute"]["energy_kwh"] * 0.475)
    assert numbers.missing == {"steps": ["base"], "wall_seconds": ["base"], "energy_kwh": ["sft"], "co2_kg": ["sft"]}
    # a published pretraining states no steps or wall time: the totals say they cover the sft only
    assert (total["steps"], total["wall"]) == ("≥5", "≥60.0 s")
    assert total["dollars"].startswith("~$")
    text = str(card.render(child, "me/smol-sft"))
    assert "The first row is **SmolLM2-135M**" in text and "sha256 abababababab" in text
    assert "2 trillion tokens" in text and "whose own training cost is not recorded" not in text
    sentence = " ".join(text.split())  # as read, not as wrapped
    priced = "device-hours, dollars, energy and CO2: hfrecipes' cost table, NVIDIA H100 SXM at 40% MFU, an estimate."
    assert priced in sentence
    assert f"| CO2 (kg) | n/a | ≥{fmt.num(sums['co2_kg'])} (not recorded for sft) |" in text
