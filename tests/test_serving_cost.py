"""Serving priced per input and per output token, the KV cache, and the lifetime cost: formulas by hand, a real
tiny `generate` run's measured prefill and decode rates, the planner and the card.

pytest tests/test_serving_cost.py -q
"""

from __future__ import annotations

import json
import math

import pytest

import hfrecipes
from hfrecipes import cli, costs, record
from hfrecipes.errors import UsageError
from hfrecipes.report import card
from hfrecipes.report import format as fmt
from hfrecipes.tiny import TINY_LLAMA

# config.json dicts, and their KV cache per token by hand: 2 (K and V) x layers x KV heads x head dim x bytes
KV_CONFIGS = [
    # the tiny Llama (GQA: 2 KV heads for 6 query heads, head_dim given), float32, tied embeddings
    ("tiny", {**TINY_LLAMA, "dtype": "float32"}, 2 * 4 * 2 * 32 * 4),
    # Llama 3 8B's shape (GQA: 8 KV heads of 32, head dim 4096 / 32), bfloat16
    (
        "llama3-8b",
        {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
         "torch_dtype": "bfloat16"},
        2 * 32 * 8 * 128 * 2,
    ),
    # Gemma 2B's shape (MQA: one KV head; head_dim 256 given, not hidden / heads = 256 by chance: 2048 / 8)
    (
        "gemma-2b",
        {"num_hidden_layers": 18, "num_attention_heads": 8, "num_key_value_heads": 1, "hidden_size": 2048,
         "head_dim": 256, "torch_dtype": "bfloat16"},
        2 * 18 * 1 * 256 * 2,
    ),
    # GPT-2's names and no KV-head count: every head has its own K and V; no dtype: transformers' float32
    ("gpt2", {"n_layer": 12, "n_head": 12, "n_embd": 768}, 2 * 12 * 12 * 64 * 4),
    # Falcon 7B: multi-query attention, one KV head
    (
        "falcon-7b",
        {"num_hidden_layers": 32, "num_attention_heads": 71, "hidden_size": 4544, "multi_query": True,
         "torch_dtype": "bfloat16"},
        2 * 32 * 1 * 64 * 2,
    ),
    # a multimodal wrapper: the language model's shape lives in text_config
    (
        "text_config",
        {"text_config": {"num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
                         "hidden_size": 2048, "head_dim": 128, "dtype": "bfloat16"}},
        2 * 28 * 8 * 128 * 2,
    ),
]  # fmt: skip


@pytest.mark.parametrize("name,config,expected", KV_CONFIGS, ids=[c[0] for c in KV_CONFIGS])
def test_kv_bytes_per_token_by_hand(name, config, expected):
    weights = 1e9
    kv = costs.kv_cache(config, weights, "h100", context=4096)
    assert kv["bytes_per_token"] == expected
    assert kv["bytes_per_sequence"] == expected * 4096
    assert kv["concurrent_sequences"] == math.floor((0.92 * 80e9 - weights) / (4096 * expected))
    assert (kv["device"], kv["device_source"]) == ("h100", "the serving device")


def test_kv_context_defaults_to_4096_capped_at_the_model_and_a_cpu_falls_back_to_the_reference_device():
    tiny = costs.kv_cache({**TINY_LLAMA, "dtype": "float32"}, 8e6, {"kind": "cpu", "name": "x86_64"})
    assert tiny["context"] == 512  # max_position_embeddings
    assert tiny["device"] == costs.REFERENCE_DEVICE and "reference" in tiny["device_source"]
    long = costs.kv_cache({**TINY_LLAMA, "max_position_embeddings": 32768}, 8e6, "a100")
    assert (long["context"], long["device"], long["device_memory_bytes"]) == (4096, "a100", 80e9)
    too_big = costs.kv_cache({**TINY_LLAMA, "dtype": "bfloat16"}, 200e9, "h100")
    assert too_big["concurrent_sequences"] == 0  # the weights alone do not fit
    assert costs.kv_cache({"model_type": "mystery"}, 1e9, "h100") is None


@pytest.mark.parametrize("kv_heads", [1, 2, 6])
def test_kv_formula_equals_the_cache_transformers_builds(kv_heads):
    import torch
    from transformers import AutoModelForCausalLM

    from hfrecipes.inference import cache_bytes
    from hfrecipes.tiny import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config(num_key_value_heads=kv_heads)).eval()
    with torch.no_grad():
        cache = model(torch.zeros(3, 10, dtype=torch.long), use_cache=True).past_key_values
    config = {**TINY_LLAMA, "num_key_value_heads": kv_heads, "dtype": "float32"}
    assert cache_bytes(cache) == 3 * 10 * costs.kv_cache(config, 1.0, "h100")["bytes_per_token"]


def test_h100_estimate_prices_output_above_input_by_hand():
    params = 8e9
    s = costs.serving(params, "h100")
    prefill = 989e12 * 0.4 / (2 * params)  # compute-bound at the training MFU
    decode = 32 * 3.35e12 / (2 * params)  # memory-bound: 32 sequences a step read the BF16 weights once
    assert s["prefill_tokens_per_second"] == pytest.approx(prefill)
    assert s["decode_tokens_per_second"] == pytest.approx(decode)
    assert s["dollars_per_million_input_tokens"] == pytest.approx(3.0 / (prefill * 3600) * 1e6)
    assert s["dollars_per_million_output_tokens"] == pytest.approx(3.0 / (decode * 3600) * 1e6)
    assert s["output_input_price_ratio"] == pytest.approx(prefill / decode) and s["output_input_price_ratio"] > 1
    # With the KV cache known, the batch is what fits beside the weights, and every step reads its cache too.
    kv = 2 * 32 * 8 * 128 * 2
    batch = math.floor((0.92 * 80e9 - 2 * params) / (4096 * kv))
    with_kv = costs.serving(params, "h100", kv_bytes_per_token=kv, context=4096)
    assert with_kv["decode_batch"] == batch
    memory = batch * 3.35e12 / (2 * params + batch * 4096 * kv)
    assert with_kv["decode_tokens_per_second"] == pytest.approx(memory)
    assert with_kv["output_input_price_ratio"] == pytest.approx(prefill / memory) and prefill / memory > 1
    assert "memory-bound" in with_kv["decode_source"] and "compute-bound" in with_kv["prefill_source"]


def test_lifetime_by_hand():
    life = costs.lifetime(1000.0, 1.0, 4.0, 100e6, 50e6)
    daily = 100 * 1.0 + 50 * 4.0
    assert life["daily_dollars"] == pytest.approx(daily)
    assert life["overtakes_days"] == pytest.approx(1000 / daily)
    assert costs.overtake_day(life["overtakes_days"]) == 4  # 3.33 days of traffic: serving passes it on day 4
    assert life["serving_share"] == pytest.approx(365 * daily / (1000 + 365 * daily))
    assert costs.lifetime(1000.0, None, 4.0, 0.0, 50e6)["daily_dollars"] == pytest.approx(200)  # no input traffic
    assert costs.lifetime(1000.0, None, 4.0, 1e6, 50e6)["serving_share"] is None  # an input price is missing


def test_plan_break_even_day_and_year_share_by_hand():
    p = costs.plan(7e9, 2e12, "h100", daily_input_tokens=1e9, daily_output_tokens=2e8)
    dollars = 6 * 7e9 * 2e12 / (989e12 * 0.4) / 3600 * 3.0
    per_in = 3.0 / (989e12 * 0.4 / 14e9 * 3600) * 1e6
    per_out = 3.0 / (32 * 3.35e12 / 14e9 * 3600) * 1e6
    daily = 1e9 / 1e6 * per_in + 2e8 / 1e6 * per_out
    life = p["lifetime"]
    assert life["daily_dollars"] == pytest.approx(daily)
    assert life["overtakes_days"] == pytest.approx(dollars / daily)
    assert life["serving_share"] == pytest.approx(365 * daily / (dollars + 365 * daily))
    assert p["break_even"]["days"] == pytest.approx(dollars / per_out * 1e6 / 2e8)  # output tokens alone
    assert costs.plan(7e9, 2e12, "h100")["lifetime"] is None  # no traffic stated
    same = costs.plan(7e9, 2e12, "h100", daily_tokens=2e8, daily_input_tokens=1e9)
    assert same["lifetime"] == life  # --daily-tokens means output tokens


def test_cli_cost_with_input_and_output_traffic(capsys):
    args = [
        "cost",
        "--params",
        "7e9",
        "--tokens",
        "2e12",
        "--daily-input-tokens",
        "1e9",
        "--daily-output-tokens",
        "2e8",
    ]
    assert cli.main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    life = out["lifetime"]
    assert (life["daily_input_tokens"], life["daily_output_tokens"]) == (1e9, 2e8)
    assert out["serving"]["output_input_price_ratio"] > 1
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert f"$ per 1M input      {fmt.money(out['serving']['dollars_per_million_input_tokens'])}" in text
    assert f"$ per 1M output     {fmt.money(out['serving']['dollars_per_million_output_tokens'])}" in text
    assert f"overtakes training   day {costs.overtake_day(life['overtakes_days'])}" in text
    assert f"serving is {fmt.share(life['serving_share'])} of the whole cost" in text
    assert "1e+09 input + 2e+08 output tokens" in text


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--daily-tokens", "1e8", "--daily-output-tokens", "2e8"], "disagree"),
        (["--daily-input-tokens", "-5"], "--daily-input-tokens has value -5.0, expected a number at least 0 [0, inf]"),
        (["--kv-bytes-per-token", "0"], "--kv-bytes-per-token has value 0.0, expected a number above 0 (0, inf]"),
    ],
)
def test_cli_cost_bad_traffic(extra, message, capsys):
    assert cli.main(["cost", "--params", "7e9", "--tokens", "2e12", *extra]) == cli.EXIT_USAGE
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------ a real tiny generate run


def _rows(text, first_cell):
    return [
        [c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith(first_cell)
    ]


@pytest.fixture(scope="module")
def served(tiny_pretrained, tmp_path_factory):
    """An export of the tiny pretrained model and one transformers `generate` run over long prompts, recorded."""
    exp = hfrecipes.export(tiny_pretrained.output_dir, tmp_path_factory.mktemp("serve") / "exp", use_vllm=False)
    words = "one sunny day the little cat sat by the river and saw a big dog who ran to the town".split()
    prompts = [" ".join(words[(i + j) % len(words)] for j in range(60)) for i in range(8)]
    rows, stats = hfrecipes.generate(
        exp.output_dir,
        prompts,
        engine="transformers",
        max_new_tokens=16,
        batch_size=4,
        daily_input_tokens=5e6,
        daily_output_tokens=1e6,
    )
    return exp, prompts, stats


def test_generate_measures_prefill_and_decode_apart(served):
    from transformers import AutoTokenizer

    from hfrecipes.inference import prompt_ids

    exp, prompts, stats = served
    ids = prompt_ids(AutoTokenizer.from_pretrained(exp.output_dir), prompts)
    assert stats["input_tokens"] == stats["prefill_tokens"] == sum(map(len, ids))
    assert stats["prefill_seconds"] > 0 and stats["decode_seconds"] > 0
    assert stats["prefill_seconds"] + stats["decode_seconds"] == pytest.approx(stats["wall_seconds"], abs=1e-3)
    assert stats["prefill_tokens_per_second"] * stats["prefill_seconds"] == pytest.approx(stats["input_tokens"], 1e-2)
    assert stats["decode_tokens_per_second"] * stats["decode_seconds"] == pytest.approx(
        stats["generated_tokens"], 1e-2
    )
    # A prompt token shares its forward pass with the whole prompt; a generated token has one of its own.
    ratio = stats["output_input_price_ratio"]
    assert ratio == pytest.approx(stats["prefill_tokens_per_second"] / stats["decode_tokens_per_second"])
    assert ratio > 1
    price = stats["price_per_hour"]
    assert stats["dollars_per_million_input_tokens"] == pytest.approx(
        price / (stats["prefill_tokens_per_second"] * 3600) * 1e6
    )
    assert stats["dollars_per_million_output_tokens"] / stats["dollars_per_million_input_tokens"] == pytest.approx(
        ratio
    )


def _exported_dtype(exp) -> tuple[str, int]:
    config = json.loads((exp.output_dir / "config.json").read_text())
    return config["dtype"], costs.DTYPE_BYTES[config["dtype"]]


def _fit_device(device: dict) -> str:
    """The device the KV-cache fit is stated for: the one that served, where the cost table knows its memory (a GPU
    in the table), else the reference device (a CPU, whose memory is the host's)."""
    key = costs.device_key(device)
    if device["kind"] == "cpu" or key is None or costs.DEVICES[key].memory_bytes is None:
        return costs.REFERENCE_DEVICE
    return key


def test_kv_cache_in_the_export_and_inference_records(served):
    exp, _, stats = served
    weights = sum(f.stat().st_size for f in exp.output_dir.glob("*.safetensors"))
    kv = stats["kv_cache"]
    dtype, size = _exported_dtype(exp)
    assert (kv["dtype"], kv["bytes_per_token"]) == (dtype, 2 * 4 * 2 * 32 * size)  # 4 layers, 2 KV heads, dim 32
    device = _fit_device(stats["device"])
    assert (kv["context"], kv["device"], kv["weight_bytes"]) == (512, device, weights)
    memory = costs.DEVICES[device].memory_bytes
    assert kv["concurrent_sequences"] == math.floor((0.92 * memory - weights) / (512 * kv["bytes_per_token"]))
    rec = record.read_record(exp.output_dir)
    assert rec["export"]["kv_cache"] == kv == rec["inference"]["kv_cache"]
    assert rec["inference"]["traffic"] == {"daily_input_tokens": 5e6, "daily_output_tokens": 1e6}


def test_card_prices_input_and_output_and_states_the_lifetime(served):
    exp, _, stats = served
    text = (exp.output_dir / "README.md").read_text()
    cell = {row[0]: row[1] for row in _rows(text, "| ")}
    assert cell["dollars per 1M input tokens"] == fmt.money(stats["dollars_per_million_input_tokens"])
    assert cell["dollars per 1M output tokens"] == fmt.money(stats["dollars_per_million_output_tokens"])
    assert cell["output / input price"] == f"{stats['output_input_price_ratio']:.3g}x"
    assert "input (prompt, prefill) tokens/s per device (measured)" in cell
    assert cell["output (generated, decode) tokens/s per device (measured)"] == fmt.si(
        stats["decode_tokens_per_second"]
    )
    dtype, size = _exported_dtype(exp)
    formula = f"KV cache per token (2 x 4 layers x 2 KV heads of 6 heads x 32 head dim x {size} bytes ({dtype}))"
    assert cell[formula] == f"{2 * 4 * 2 * 32 * size:,} B"
    fit = next(k for k in cell if k.startswith("sequences of 512 tokens whose KV cache fits"))
    label = costs.DEVICES[_fit_device(stats["device"])].label
    assert cell[fit] == f"{stats['kv_cache']['concurrent_sequences']:,}" and label in fit

    rec = record.read_record(exp.output_dir)
    training = card.lineage_numbers(record.Record.parse(rec)).total["dollars"]
    daily = 5 * stats["dollars_per_million_input_tokens"] + 1 * stats["dollars_per_million_output_tokens"]
    assert "the traffic recorded with this folder's inference run" in text
    assert f"serving costs {fmt.money(daily)} a day" in text
    assert f"on day {max(1, math.ceil(training / daily))}" in text
    assert f"after a year serving is {fmt.share(365 * daily / (training + 365 * daily))}" in text


def test_card_without_a_recorded_traffic_says_it_uses_the_default(served):
    exp, _, _ = served
    rec = record.read_record(exp.output_dir)
    del rec["inference"]["traffic"]
    text = str(card.render(rec))
    assert "hfrecipes' default traffic, `DEFAULT_DAILY_INPUT_TOKENS`" in text
    assert f"at {fmt.si(costs.DEFAULT_DAILY_INPUT_TOKENS)} input and" in text


def test_generate_refuses_a_bad_traffic(tiny_pretrained):
    with pytest.raises(UsageError, match="daily_output_tokens"):
        hfrecipes.generate(tiny_pretrained.output_dir, ["hi"], daily_output_tokens=-1)
