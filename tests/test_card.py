"""The model card of a real tiny lineage: numbers equal the records, totals add up, the cutoff moves with newer data.

pytest tests/test_card.py -q
"""

import copy
import json
import re

import pytest
from conftest import device_kind, markdown_table

import hfrecipes
from hfrecipes import costs, data, record
from hfrecipes.errors import UsageError
from hfrecipes.report import card
from hfrecipes.report import format as fmt

STEPS = 4
COMMON = {
    "max_steps": STEPS,
    "block_size": 64,
    "per_device_train_batch_size": 4,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
}


def _corpus(path, date, n=60):
    words = "the cat sat on a mat and then ran to see the dog who lived by the river in town".split()
    with path.open("w") as f:
        for i in range(n):
            text = " ".join(words[(i + j) % len(words)] for j in range(40))
            f.write(json.dumps({"text": f"{text} {i}.", "published": date}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """Three pretraining stages: the bundled corpus, then newer dated text, then older dated text."""
    root = tmp_path_factory.mktemp("lineage")
    first = hfrecipes.pretrain(
        "tiny/pretrain", output_dir=str(root / "s1"), max_train_samples=600, license="apache-2.0", **COMMON
    )
    newer = hfrecipes.pretrain(
        "tiny/pretrain",
        output_dir=str(root / "s2"),
        model_name_or_path=str(first.output_dir),
        train_tokenizer=False,
        dataset_name=_corpus(root / "newer.jsonl", "2025-03-01"),
        dataset_date_column="date,published",
        dataset_max_date=None,  # newer text moves the cutoff past the recipe's; the card must say so
        cost_device="h100",
        device_price_per_hour=2.0,
        pue=1.1,
        grid_gco2_per_kwh=100.0,
        **COMMON,
    )
    older = hfrecipes.pretrain(
        "tiny/pretrain",
        output_dir=str(root / "s3"),
        model_name_or_path=str(newer.output_dir),
        train_tokenizer=False,
        dataset_name=_corpus(root / "older.jsonl", "2021-01-01"),
        dataset_date_column="published",
        **COMMON,
    )
    return [first, newer, older]


@pytest.fixture(scope="module")
def lora_export(tiny_sft_lora, tmp_path_factory):
    """The session's LoRA SFT stage exported: its adapter merged into a serving folder."""
    return hfrecipes.export(tiny_sft_lora[0].output_dir, tmp_path_factory.mktemp("card") / "export", verify_load=False)


CARDS = {  # a card and its stages' records: pretraining only, fine-tuning, a LoRA adapter, an export of it
    "pretrain lineage": lambda request: request.getfixturevalue("lineage")[-1],
    "sft": lambda request: request.getfixturevalue("tiny_sft"),
    "lora": lambda request: request.getfixturevalue("tiny_sft_lora")[0],
    "export": lambda request: request.getfixturevalue("lora_export"),
}


@pytest.fixture(params=list(CARDS))
def carded(request):
    """A stage folder with its card, and the chain of records of the stages that trained its weights (an export
    trains nothing: its card's lineage is its parent's)."""
    folder = CARDS[request.param](request).output_dir
    rec = record.read_record(folder)
    return folder, rec, [r for r in record.lineage(rec) if r["stage"] != "export"]


def test_front_matter_parses_and_holds_the_records_numbers(carded):
    from huggingface_hub import ModelCard

    folder, rec, chain = carded
    meta = ModelCard.load(folder / "README.md").data.to_dict()
    assert meta["library_name"] == ("peft" if rec["model"]["adapter"] else "transformers")
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == list(dict.fromkeys(["hfrecipes", chain[-1]["stage"], rec["stage"]]))
    assert [s["run_id"] for s in meta["hfrecipes"]["lineage"]] == [r["run_id"] for r in chain]
    for numbers, r in zip(meta["hfrecipes"]["lineage"], chain, strict=True):
        c = r["compute"]
        assert numbers["tokens"] == r["data"]["tokens_seen"]
        assert numbers["steps"] == r["metrics"]["steps"]
        assert numbers["flops"] == c["flops_6nd"] == 6 * r["model"]["params_total"] * r["data"]["tokens_seen"]
        for key in ("wall_seconds", "device_hours", "dollars", "energy_kwh", "co2_kg"):
            assert numbers[key] == c[key]
    total = meta["hfrecipes"]["total"]
    for key in ("tokens", "steps", "flops", "device_hours", "dollars", "energy_kwh", "co2_kg"):
        assert total[key] == pytest.approx(sum(s[key] for s in meta["hfrecipes"]["lineage"]), rel=1e-12)
    co2 = meta["co2_eq_emissions"]  # the last training stage's
    assert co2["emissions"] == pytest.approx(chain[-1]["compute"]["co2_kg"] * 1000, rel=1e-5)
    assert co2["training_type"] == ("pre-training" if chain[-1]["stage"] == "pretrain" else "fine-tuning")


def test_pretrain_lineage_front_matter(lineage):
    from huggingface_hub import ModelCard

    meta = ModelCard.load(lineage[-1].output_dir / "README.md").data.to_dict()
    assert meta["tags"] == ["hfrecipes", "pretrain"]
    assert meta["license"] == "apache-2.0"  # declared by the first stage, inherited by the later ones
    assert "base_model" not in meta  # the parent is a local folder that was never pushed
    assert [s["steps"] for s in meta["hfrecipes"]["lineage"]] == [STEPS] * 3


def test_lineage_table_equals_the_records_and_totals_add_up(carded):
    folder, rec, chain = carded
    rows = markdown_table((folder / "README.md").read_text(), "| stage | data |")
    assert len(rows) == len(chain) + 1
    sums = dict.fromkeys(("tokens", "steps", "wall", "hours", "flops", "dollars"), 0)
    for row, r in zip(rows[:-1], chain, strict=True):
        c, tokens = r["compute"], r["data"]["tokens_seen"]
        assert row[0] == r["stage"]
        assert row[3:] == [
            fmt.si(tokens),
            str(r["metrics"]["steps"]),
            fmt.duration(c["wall_seconds"]),
            fmt.num(c["device_hours"]),
            fmt.si(c["flops_6nd"]),
            fmt.money(c["dollars"]),
        ]
        values = (tokens, r["metrics"]["steps"], c["wall_seconds"], c["device_hours"], c["flops_6nd"], c["dollars"])
        for key, value in zip(sums, values, strict=True):
            sums[key] += value
    assert rows[-1][0] == "total"
    assert rows[-1][3:] == [
        fmt.si(sums["tokens"]),
        str(sums["steps"]),
        fmt.duration(sums["wall"]),
        fmt.num(sums["hours"]),
        fmt.si(sums["flops"]),
        fmt.money(sums["dollars"]),
    ]


def test_recipe_prices_reach_the_record(lineage):
    c = lineage[1].record["compute"]
    assert (c["cost_device"], c["price_per_hour"], c["price_source"], c["power_watts"]) == ("h100", 2.0, "recipe", 700)
    assert c["dollars"] == pytest.approx(c["device_hours"] * 2.0)
    assert c["energy_kwh"] == pytest.approx(c["device_hours"] * 0.7 * 1.1)
    if c["co2_source"] == "codecarbon":  # measured where codecarbon is installed, else the recipe's grid intensity
        assert c["co2_kg"] > 0
    else:
        assert c["co2_kg"] == pytest.approx(c["energy_kwh"] * 0.1)
    # without a price in the recipe: the cost table's row for the device the stage ran on
    first = lineage[0].record["compute"]
    assert first["device"]["kind"] == device_kind()
    key = costs.device_key(first["device"])
    row = costs.DEVICES.get(key)
    expected = (key, row.price_per_hour, f"default for {key}") if row else (None, None, "unknown device")
    assert (first["cost_device"], first["price_per_hour"], first["price_source"]) == expected


def test_cutoff_moves_with_newer_data_and_not_with_older(lineage):
    first, newer, older = (r.record["data"] for r in lineage)
    assert first["model_cutoff"]["source"] == "data" and first["model_cutoff"]["date"] <= "2024-06-30"
    assert newer["knowledge_cutoff"]["date"] == newer["model_cutoff"]["date"] == "2025-03-01"
    assert "'published'" in newer["knowledge_cutoff"]["detail"]
    assert older["knowledge_cutoff"]["date"] == "2021-01-01"
    assert older["model_cutoff"]["date"] == "2025-03-01"  # knows what its parent knew
    text = (lineage[-1].output_dir / "README.md").read_text()
    assert "**2025-03-01**" in text
    cutoffs = [row[2] for row in markdown_table(text, "| stage | data |")[:-1]]
    assert cutoffs == [
        first["knowledge_cutoff"]["date"],
        "2025-03-01 (moved)",
        "2025-03-01 (inherited; its data ends 2021-01-01)",
    ]
    assert f"Moved from {first['knowledge_cutoff']['date']} (set by the pretrain stage) to 2025-03-01" in text


def test_card_sections_and_plots(lineage):
    folder = lineage[-1].output_dir
    text = (folder / "README.md").read_text()
    for heading in ("## Knowledge cutoff", "## Lineage and training cost", "## Serving cost", "## Evaluation results"):
        assert heading in text
    assert "## Usage" in text and "from vllm import LLM" in text and "AutoModelForCausalLM" in text
    assert "## Recipe" in text and "dataset_date_column: published" in text
    assert "![loss](loss.png)" in text
    assert (folder / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    serve = markdown_table(text, "| | |")
    params = lineage[-1].record["model"]["params_total"]
    assert serve[0][1] == fmt.si(2 * params)


def test_unknown_cutoff_says_why():
    import datasets

    ds = datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}])
    cut = data.knowledge_cutoff([ds], "date", None)
    assert cut["date"] is None and cut["source"] == "unknown"
    assert "no dated column 'date'" in cut["detail"] and "knowledge_cutoff" in cut["detail"]
    declared = data.knowledge_cutoff([ds], "date", "2023-12-31")
    assert (declared["date"], declared["source"]) == ("2023-12-31", "declared")
    rec = _synthetic(cut)
    text = str(card.render(rec))
    assert "**unknown**" in text and cut["detail"] in text


def _synthetic(cutoff=None, **over):
    rec = record.new_record("sft", {"path": None, "values": {}}, None)
    rec.update(
        status="complete",
        model={"model_type": "llama", "params_total": 1000, "source": "HuggingFaceTB/SmolLM2-135M", "adapter": None},
        data={"datasets": [{"name": "trl-lib/Capybara"}], "tokens_seen": 10, "model_cutoff": cutoff},
        compute=record.compute_summary(1000, 10, 0.0, 36.0, {"kind": "cpu", "name": "x86_64", "count": 1}),
        metrics={"steps": 1},
    )
    rec.update(over)
    return rec


def test_base_model_and_relation():
    from huggingface_hub import ModelCard

    rec = _synthetic()
    meta = ModelCard(str(card.render(rec))).data.to_dict()
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert meta["base_model_relation"] == "finetune"
    assert meta["datasets"] == ["trl-lib/Capybara"]
    child = _synthetic(parent=copy.deepcopy(rec))
    child["parent"]["hub"] = {"repo_id": "me/sft"}
    child["model"] = {**child["model"], "adapter": {"r": 8}}
    meta = ModelCard(str(card.render(child))).data.to_dict()
    assert (meta["base_model"], meta["base_model_relation"], meta["library_name"]) == ("me/sft", "adapter", "peft")
    text = str(card.render(child))
    assert "Started from **HuggingFaceTB/SmolLM2-135M**" in text and "AutoPeftModelForCausalLM" in text


def test_measured_serving_cost_replaces_the_estimate():
    rec = _synthetic(inference={"tokens_per_second": 1000.0, "device": {"kind": "cuda", "name": "NVIDIA L4"}})
    text = str(card.render(rec))
    per_million = 0.80 / (1000.0 * 3600) * 1e6
    row = next(r for r in markdown_table(text, "| | |") if r[0].startswith("dollars per 1M output"))
    assert row[1] == fmt.money(per_million)
    assert "tokens/s per device (measured)" in text


def test_trainer_never_writes_its_own_card(tmp_path):
    class Args:
        output_dir = str(tmp_path)

    class Fake(card.OwnsCard):
        args = Args()

        def is_world_process_zero(self):
            return True

    Fake().create_model_card(model_name="x")  # no record yet: nothing written
    assert not (tmp_path / "README.md").exists()
    record.write_record(tmp_path, _synthetic())
    Fake().create_model_card()
    assert "hfrecipes" in (tmp_path / "README.md").read_text()
    assert re.search(r"^library_name: transformers$", (tmp_path / "README.md").read_text(), re.M)


def test_card_says_which_hfrecipes_and_links_no_missing_page():
    text = str(card.render(_synthetic()))
    version = record.versions().get("hfrecipes")
    assert "pypi.org" not in text
    assert f"trained with hfrecipes{f' {version}' if version else ''}." in text


@pytest.mark.parametrize("counted", [0.0, 3.6e12])
def test_trainers_own_flops_only_where_it_counted(counted):
    """GRPO's trainer counts no FLOPs (`total_flos` stays 0): the card says nothing of a count it did not make."""
    rec = _synthetic()
    rec["compute"]["flops_trainer"] = counted
    text = " ".join(str(card.render(rec)).split())
    assert ("the trainer's own count for this stage (embeddings left out) was 3.6 T FLOPs" in text) == bool(counted)
    assert "was 0 FLOPs" not in text


def test_a_stage_stopped_before_its_first_log_counts_the_tokens_it_read(tiny_pretrained, tmp_path):
    """Tokens come from the trainer's running count, not its last step log: a stage that stopped before its first
    log read tokens all the same (TRL states its count only in the closing summary), and its 6·N·D is not 0."""
    out = hfrecipes.sft(
        "tiny/sft_lora",
        model_name_or_path=str(tiny_pretrained.output_dir),
        output_dir=str(tmp_path / "sft"),
        max_steps=2,
        logging_steps=50,
        max_train_samples=32,
        max_eval_samples=16,
        save_strategy="no",
        gold_dataset_name=None,
    )
    logs = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert not [log for log in logs if "loss" in log]  # no step was logged
    closing = next(log for log in logs if "train_runtime" in log)
    tokens = out.record["data"]["tokens_seen"]
    assert tokens == closing["num_tokens"] > 0
    params = out.record["model"]["params_total"]
    assert out.record["compute"]["flops_6nd"] == 6 * params * tokens > 0
    row = markdown_table((tmp_path / "sft" / "README.md").read_text(), "| stage | data |")[-2]
    assert row[3] == fmt.si(tokens) and row[7] == fmt.si(6 * params * tokens)


@pytest.mark.parametrize("head", ["reward", None])  # None: an older record, whose architecture names the head
def test_a_reward_models_card_takes_its_pipeline_tag_and_auto_class_from_the_head(head):
    from huggingface_hub import ModelCard

    rec = _synthetic(stage="reward")
    rec["model"] |= {"architecture": "LlamaForSequenceClassification", "head": head}
    text = str(card.render(rec))
    assert ModelCard(text).data.to_dict()["pipeline_tag"] == "text-classification"
    assert "AutoModelForSequenceClassification.from_pretrained(" in text and "from vllm import LLM" not in text


def test_gold_check_is_a_typed_block_the_card_and_its_plot_read(tmp_path):
    history = [
        {"step": 0, "gold": 0.2, "proxy": 0.1},
        {"step": 5, "gold": 0.6, "proxy": 0.4, "by_group": {"add": 0.7}},
        {"step": 10, "gold": 0.3, "proxy": 0.9},
    ]
    gold = {
        "metric": "accuracy",
        "dataset": "tiny:prompts",
        "split": "validation",
        "examples": 16,
        "every": 5,
        "history": history,
        "best": {"step": 5, "gold": 0.6},
        "hacking": {"step": 10, "gold": 0.3, "best_gold": 0.6, "proxy": 0.9, "proxy_at_best": 0.4},
        "stopped": "reward_hacking",
        "kept_step": 5,
    }
    rec = _synthetic(metrics={"steps": 10, "gold": gold})
    parsed = record.Record.parse(rec).metrics
    assert parsed.gold.best == {"step": 5, "gold": 0.6} and "gold" not in parsed.extra
    card.write_card(tmp_path, rec)
    text = " ".join((tmp_path / "README.md").read_text().split())
    assert "Reward hacking flagged at step 10: gold accuracy fell to 30.0% from its best 60.0%" in text
    assert "Best gold accuracy 60.0% at step 5 (add 70.0%)" in text
    assert "The saved weights are those of step 5 (the best gold check)." in text
    assert (tmp_path / "gold.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "](gold.png)" in text
    with pytest.raises(UsageError, match=r"metrics.gold.kept_step: expected a number"):
        record.Record.parse(_synthetic(metrics={"gold": {**gold, "kept_step": "best"}}))


def test_card_shows_the_serving_cost_generation_recorded_not_a_recomputation():
    """Where the inference block holds `costs.serving`'s answer as generation priced it, the card states that answer;
    without it (an older record) the card prices the recorded rates through the same function."""
    device = {"kind": "cuda", "name": "NVIDIA L4"}
    measured = {"prefill_tokens_per_second": 9000.0, "decode_tokens_per_second": 1000.0, "device": device}
    rec = _synthetic(inference=measured)
    priced = costs.serving(1000, device, prefill_tokens_per_second=9000.0, decode_tokens_per_second=1000.0)
    row = next(r for r in markdown_table(str(card.render(rec)), "| | |") if r[0].startswith("dollars per 1M output"))
    assert row[1] == fmt.money(priced["dollars_per_million_output_tokens"])
    recorded = {**priced, "dollars_per_million_output_tokens": 12.34, "price_per_hour": 44.4}
    rec = _synthetic(inference={**measured, "serving": recorded})
    row = next(r for r in markdown_table(str(card.render(rec)), "| | |") if r[0].startswith("dollars per 1M output"))
    assert row[1] == "$12.3"


def test_every_summed_field_of_the_compute_block_is_in_the_lineage_totals():
    """The schema says which compute fields add up over a lineage; the totals follow it, so a new cost field needs
    no edit to the summing code."""
    from hfrecipes.report.lineage import COMPUTE_NAMES, lineage_numbers

    child = _synthetic(parent=_synthetic())
    numbers = lineage_numbers(record.Record.parse(child))
    compute = child["compute"]
    assert set(COMPUTE_NAMES) == set(record.summed_fields(record.ComputeBlock)) >= {"dollars", "co2_kg"}
    for key, name in COMPUTE_NAMES.items():
        assert numbers.total[name] == pytest.approx(2 * compute[key]), key


@pytest.mark.parametrize(
    "x, text",
    [(999.96, "1 k"), (999.4, "999"), (1.2345e12, "1.23 T"), (999_960.0, "1 M"), (0.00123, "0.00123"), (0, "0")],
)
def test_si_rounds_before_it_picks_the_prefix(x, text):
    assert fmt.si(x) == text
