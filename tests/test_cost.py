"""The cost planner and stage costs: hand-computed FLOPs, dollars and break-even; published training compute.

pytest tests/test_cost.py -q
"""

import json
import sys
import types

import pytest

import hfrecipes
from hfrecipes import cli
from hfrecipes.costs import device_key, measured_emissions, plan, stage_costs, training_flops
from hfrecipes.errors import UsageError

# Published training compute of well-known models whose figures are 6·N·D counts (attention left out).
PUBLISHED = [
    # Brown et al. 2020, "Language Models are Few-Shot Learners", Table D.1: 3.64e3 PF-days = 3.14e23 FLOPs.
    ("GPT-3 175B", 175e9, 300e9, 3.14e23),
    # Same table: GPT-3 13B, 268 PF-days = 2.31e22 FLOPs.
    ("GPT-3 13B", 13e9, 300e9, 2.31e22),
    # Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", Table 3: Chinchilla, 70B
    # parameters, 1.4T tokens, 5.76e23 FLOPs (the Gopher budget).
    ("Chinchilla 70B", 70e9, 1.4e12, 5.76e23),
    # Llama Team 2024, "The Llama 3 Herd of Models", section 1 and 3.3.1: 405B parameters, 15.6T tokens,
    # 3.8e25 FLOPs.
    ("Llama 3.1 405B", 405e9, 15.6e12, 3.8e25),
]


@pytest.mark.parametrize("name,params,tokens,published", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_published_training_compute_within_5_percent(name, params, tokens, published):
    flops = plan(params, tokens)["training"]["flops"]
    assert abs(flops - published) / published < 0.05, f"{name}: {flops:.3g} vs published {published:.3g}"


HAND = [
    # params, tokens, device, price/h, mfu, serve_mfu, daily tokens
    (7e9, 2e12, "h100", 3.00, 0.4, 0.2, 1e9),
    (1.5e9, 3e11, "a100", 1.80, 0.5, 0.1, 5e8),
    (1.2e8, 1e10, "l4", 0.80, 0.3, 0.3, 1e7),
]
PEAK = {"h100": 989e12, "a100": 312e12, "l4": 121e12}
BANDWIDTH = {"h100": 3.35e12, "a100": 2.039e12, "l4": 300e9}  # bytes/s, the vendors' data sheets


@pytest.mark.parametrize("params,tokens,device,price,mfu,serve_mfu,daily", HAND)
def test_plan_matches_hand_computation(params, tokens, device, price, mfu, serve_mfu, daily):
    p = plan(params, tokens, device, mfu=mfu, serve_mfu=serve_mfu, daily_tokens=daily, num_devices=8)
    flops = 6 * params * tokens
    hours = flops / (PEAK[device] * mfu) / 3600
    dollars = hours * price
    prefill = PEAK[device] * serve_mfu / (2 * params)  # compute-bound
    decode = min(32 * BANDWIDTH[device] / (2 * params), prefill)  # 32 sequences a step read the BF16 weights once
    per_million_in = price / (prefill * 3600) * 1e6
    per_million_out = price / (decode * 3600) * 1e6
    even = dollars / per_million_out * 1e6
    assert p["training"]["flops"] == pytest.approx(flops)
    assert p["training"]["device_hours"] == pytest.approx(hours)
    assert p["training"]["wall_hours"] == pytest.approx(hours / 8)
    assert p["training"]["dollars"] == pytest.approx(dollars)
    assert p["serving"]["flops_per_token"] == pytest.approx(2 * params)
    assert p["serving"]["dollars_per_million_input_tokens"] == pytest.approx(per_million_in)
    assert p["serving"]["dollars_per_million_output_tokens"] == pytest.approx(per_million_out)
    assert p["serving"]["dollars_per_million_tokens"] == p["serving"]["dollars_per_million_output_tokens"]
    assert p["break_even"]["tokens"] == pytest.approx(even)
    assert p["break_even"]["days"] == pytest.approx(even / daily)
    # Same device for both: training costs as much as prefilling 3·D tokens, scaled by the two utilisations,
    # whatever the price; generated tokens are dearer, so fewer of them reach it.
    assert dollars / per_million_in * 1e6 == pytest.approx(3 * tokens * serve_mfu / mfu)
    assert even <= 3 * tokens * serve_mfu / mfu * (1 + 1e-9)


def test_attention_term_energy_and_co2():
    p = plan(
        1e9, 1e10, "h100", n_layers=24, seq_len=2048, d_model=2048, power_watts=500, pue=1.5, grid_gco2_per_kwh=200
    )
    assert p["training"]["flops"] == pytest.approx(6 * 1e9 * 1e10 + 6 * 24 * 2048 * 2048 * 1e10)
    assert training_flops(1e9, 1e10) == p["training"]["flops_6nd"] == 6e19
    kwh = p["training"]["device_hours"] * 0.5 * 1.5
    assert p["training"]["energy_kwh"] == pytest.approx(kwh)
    assert p["training"]["co2_kg"] == pytest.approx(kwh * 0.2)


def test_measured_serving_throughput_overrides_the_estimate():
    p = plan(7e9, 2e12, "h100", serve_tokens_per_second=2500, daily_tokens=1e8)
    assert p["serving"]["tokens_per_second_source"] == "measured"
    assert p["serving"]["dollars_per_million_tokens"] == pytest.approx(3.0 / (2500 * 3600) * 1e6)


def test_cli_cost_json_and_text(capsys):
    args = [
        "cost",
        "--params",
        "7e9",
        "--tokens",
        "2e12",
        "--device",
        "H100",
        "--price",
        "2.5",
        "--daily-tokens",
        "1e9",
    ]
    assert cli.main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    hours = 6 * 7e9 * 2e12 / (989e12 * 0.4) / 3600
    assert out["training"]["dollars"] == pytest.approx(hours * 2.5)
    decode = 32 * 3.35e12 / (2 * 7e9)  # memory-bound: 32 sequences a step over the H100's bandwidth
    assert out["break_even"]["days"] == pytest.approx(hours * 2.5 / (2.5 / (decode * 3600)) / 1e9)
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "8.4e+22" in text and "break-even" in text and f"${hours * 2.5:,.0f}" in text
    assert hfrecipes.cost(7e9, 2e12, "h100", price_per_hour=2.5)["training"]["dollars"] == out["training"]["dollars"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["cost", "--params", "7e9", "--tokens", "2e12", "--device", "h900"], "not in the cost table"),
        (
            ["cost", "--params", "-1", "--tokens", "2e12"],
            "--params has value -1.0, expected a number above 0 (0, inf]",
        ),
        (["cost", "--params", "7e9", "--tokens", "2e12", "--bogus", "1"], "unknown argument"),
    ],
)
def test_cli_cost_bad_input(args, message, capsys):
    assert cli.main(args) == cli.EXIT_USAGE
    assert message in capsys.readouterr().err


def test_plan_refuses_what_the_cli_refuses_when_called_from_python():
    with pytest.raises(UsageError, match="must be positive"):
        plan(-1, 2e12)
    with pytest.raises(UsageError, match=r"daily_input_tokens \(--daily-input-tokens\) must be zero or more"):
        plan(7e9, 2e12, daily_input_tokens=-5)
    with pytest.raises(UsageError, match=r"kv_bytes_per_token \(--kv-bytes-per-token\) must be positive"):
        plan(7e9, 2e12, kv_bytes_per_token=0)


@pytest.mark.parametrize(
    "name,key",
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA A10G", "a10"),
        ("Tesla T4", "t4"),
        ("Tesla V100-SXM2-16GB", "v100"),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_device_names_map_to_the_table(name, key):
    assert device_key({"kind": "cuda", "name": name}) == key
    assert device_key({"kind": "cpu", "name": "x86_64"}) == "cpu"


def test_stage_costs_unknown_device_and_recipe_price():
    gpu = {"kind": "cuda", "name": "NVIDIA GeForce RTX 4090", "count": 2}
    unknown = stage_costs(1e15, 3600.0, gpu)
    assert unknown["dollars"] is None and unknown["price_source"] == "unknown device" and unknown["co2_kg"] is None

    class Recipe:
        device_price_per_hour, device_power_watts, pue, grid_gco2_per_kwh, cost_device = 0.5, 450.0, None, None, None

    priced = stage_costs(1e15, 3600.0, gpu, Recipe())
    assert priced["dollars"] == pytest.approx(2 * 0.5)  # two devices for one hour
    assert priced["energy_kwh"] == pytest.approx(2 * 0.45 * 1.2)
    assert priced["co2_kg"] == pytest.approx(2 * 0.45 * 1.2 * 475 / 1000)


def test_codecarbon_measures_for_real_and_offline(monkeypatch, tmp_path):
    """The real offline tracker around a block of work: a positive figure, read without the network (every socket
    refused), nothing written into the stage folder, and the record's CO2 source says it was measured."""
    pytest.importorskip("codecarbon")
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("codecarbon's offline tracker reached for the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with measured_emissions(str(tmp_path)) as co2:
        sum(i * i for i in range(2_000_000))
    assert co2.failure is None and isinstance(co2.kg, float) and 0 < co2.kg < 1e-3, co2
    assert list(tmp_path.iterdir()) == []
    costs = stage_costs(1e12, 10.0, {"kind": "cpu", "name": "x", "count": 1}, measured_co2_kg=co2.kg)
    assert (costs["co2_kg"], costs["co2_source"]) == (co2.kg, "codecarbon")


def _tracker(start=None, stop=0.042):
    """A stand-in for codecarbon's `OfflineEmissionsTracker`: `start` an exception it raises, `stop` what it returns
    (or an exception it raises)."""

    class Tracker:
        def __init__(self, output_dir, output_methods, log_level):
            assert output_methods == []  # no emissions file

        def start(self):
            if start is not None:
                raise start

        def stop(self):
            if isinstance(stop, Exception):
                raise stop
            return stop

    return types.SimpleNamespace(OfflineEmissionsTracker=Tracker)


def test_codecarbon_measurement_is_used_and_its_absence_is_an_estimate(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "codecarbon", _tracker())
    with measured_emissions(str(tmp_path)) as co2:
        pass
    assert (co2.kg, co2.failure) == (0.042, None)
    monkeypatch.setitem(sys.modules, "codecarbon", None)  # not installed: the estimate, with nothing to explain
    with measured_emissions(str(tmp_path)) as co2:
        pass
    assert (co2.kg, co2.failure) == (None, None)
    costs = stage_costs(1e12, 3600.0, {"kind": "cpu", "name": "x", "count": 1}, measured_co2_kg=None)
    assert costs["co2_source"] == "estimate: energy x grid intensity" and costs["co2_kg"] > 0


@pytest.mark.parametrize(
    "tracker,reason",
    [
        (_tracker(start=PermissionError("/sys/class/powercap: denied")), "could not start: PermissionError"),
        (_tracker(stop=RuntimeError("no samples")), "could not measure: RuntimeError: no samples"),
        (_tracker(stop=None), "measured no figure (it gave None)"),
        (_tracker(stop=float("nan")), "measured no figure (it gave nan)"),
    ],
    ids=["start", "stop", "none", "nan"],
)
def test_a_failed_measurement_is_a_warning_and_an_estimate_that_says_why(
    tracker, reason, monkeypatch, tmp_path, caplog
):
    """Training goes on; the warning and the record's CO2 source both say the figure is an estimate because the
    measurement failed, and why."""
    from hfrecipes import record
    from hfrecipes.stagerun import StageRun

    monkeypatch.setitem(sys.modules, "codecarbon", tracker)
    run = StageRun("sft", tmp_path / "out", {})
    ran = False
    with caplog.at_level("WARNING", logger="hfrecipes.costs"), run.measured():
        ran = True
    assert ran and run.co2_kg is None and reason in run.co2_failure, run.co2_failure
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "hfrecipes.costs"]
    assert reason in warning and "estimated" in warning
    device = {"kind": "cpu", "name": "x", "count": 1}
    costs = record.compute_summary(
        10**6, 10**6, 0.0, 3600.0, device, measured_co2_kg=run.co2_kg, co2_failure=run.co2_failure
    )
    assert costs["co2_kg"] == pytest.approx(costs["energy_kwh"] * 475 / 1000)
    assert costs["co2_source"].startswith("estimate: energy x grid intensity, as the measurement failed (")
    assert reason in costs["co2_source"]


def test_serving_without_a_parameter_count_or_device_is_unknown_not_an_error():
    from hfrecipes.costs import serving

    assert serving(0, "h100")["tokens_per_second"] is None
    assert serving(1e9, {"kind": "cuda", "name": "RTX 4090"})["dollars_per_million_tokens"] is None


def test_the_cost_module_and_the_api_function_are_apart():
    import types

    import hfrecipes.costs as module

    assert isinstance(module, types.ModuleType) and callable(module.plan)
    assert callable(hfrecipes.cost) and not isinstance(hfrecipes.cost, types.ModuleType)
    assert hfrecipes.cost(1e9, 1e9) == module.plan(1e9, 1e9) and module.plan(1e9, 1e9)["training"]["flops"] == 6e18
