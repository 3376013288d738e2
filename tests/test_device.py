"""Device defaults are resolved in one place for every stage, the record says how a stage trained (precision,
kernels) and how fast once warm (steady state beside the wall-clock average), and the compile and Liger switches do
what they say on the device at hand.

pytest tests/test_device.py
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from hfrecipes import modeling, throughput
from hfrecipes.errors import UsageError
from hfrecipes.stages import STAGES, get_stage

# (device facts, recipe values) -> resolved (use_cpu, bf16, fp16, tf32)
DEVICES = {
    "cpu": dict(accelerator=False, bf16=False, tf32=False),
    "h100": dict(accelerator=True, bf16=True, tf32=True),
    "v100": dict(accelerator=True, bf16=False, tf32=False),
}
RESOLUTION = [
    ("cpu", {}, (True, False, False, None)),
    ("cpu", {"bf16": True}, (True, False, False, None)),  # check_device refuses it before this runs
    ("h100", {}, (False, True, False, True)),
    ("h100", {"bf16": False}, (False, False, False, True)),
    ("h100", {"fp16": True}, (False, False, True, True)),
    ("h100", {"tf32": False}, (False, True, False, False)),
    ("v100", {}, (False, False, False, None)),
]


def _device(monkeypatch, kind):
    facts = DEVICES[kind]
    monkeypatch.setattr(modeling, "has_accelerator", lambda: facts["accelerator"])
    monkeypatch.setattr(modeling, "bf16_supported", lambda: facts["bf16"])
    monkeypatch.setattr(modeling, "tf32_supported", lambda: facts["tf32"])


@pytest.mark.parametrize("kind,values,expected", RESOLUTION)
def test_device_defaults_resolve_for_the_device_and_keep_what_the_recipe_set(monkeypatch, kind, values, expected):
    _device(monkeypatch, kind)
    args = SimpleNamespace(**{"use_cpu": False, "bf16": None, "fp16": False, "tf32": None, **values})
    modeling.resolve_device_defaults(args)
    assert (args.use_cpu, args.bf16, args.fp16, args.tf32) == expected


# Keys a stage's config cannot be built without (the parse refuses it), with any value
REQUIRED = {"distill": {"teacher_model_name_or_path": "teacher"}}


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_config_resolves_its_device_defaults_in_the_one_place(monkeypatch, stage, tmp_path):
    """Pretraining included: its config once skipped the resolution and trained a GPU run in fp32. The config is
    built on the device at hand; the resolver is the one under test above, watched here."""
    calls = []
    real = modeling.resolve_device_defaults
    monkeypatch.setattr(modeling, "resolve_device_defaults", lambda args: calls.append(type(args)) or real(args))
    config_cls = get_stage(stage).DATACLASSES[1]
    args = config_cls(output_dir=str(tmp_path), **REQUIRED.get(stage, {}))
    assert calls == [config_cls]
    assert args.bf16 == (modeling.has_accelerator() and modeling.bf16_supported())
    assert bool(args.tf32) == modeling.tf32_supported()
    assert args.use_cpu == (not modeling.has_accelerator())
    assert str(getattr(args.optim, "value", args.optim)) == "adamw_torch_fused"
    assert args.logging_nan_inf_filter is False  # a per-step device sync, and it hides a non-finite loss


def test_precision_names_what_the_stage_trained_in():
    def args(**kw):
        return SimpleNamespace(**{"bf16": False, "fp16": False, "tf32": None, **kw})

    assert modeling.precision(args(bf16=True)).startswith("bf16 mixed")
    assert modeling.precision(args(fp16=True)).startswith("fp16 mixed")
    assert modeling.precision(args(tf32=True)) == "fp32 with TF32 matmuls"
    assert modeling.precision(args()) == "fp32"


def test_liger_and_flash_attention_are_refused_where_they_cannot_run(monkeypatch):
    import importlib.util

    if not modeling.has_triton_device():
        with pytest.raises(UsageError, match="use_liger_kernel: true needs .* GPU"):
            modeling.check_device({"use_liger_kernel": True})
    elif importlib.util.find_spec("liger_kernel") is None:
        with pytest.raises(UsageError, match="pip install liger-kernel"):
            modeling.check_device({"use_liger_kernel": True})
    else:
        modeling.check_device({"use_liger_kernel": True})
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(UsageError, match="attn_implementation: flash_attention_2 needs the flash-attn package"):
            modeling.check_device({"attn_implementation": "flash_attention_2"})
    modeling.check_device({"attn_implementation": "sdpa"})
    # the refusal does not depend on the machine: a GPU with Triton but without the package is refused too
    monkeypatch.setattr(modeling, "has_triton_device", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "liger_kernel" else real_find_spec(n))
    with pytest.raises(UsageError, match="pip install liger-kernel"):
        modeling.check_device({"use_liger_kernel": True})


def test_a_refused_liger_run_writes_nothing(tmp_path):
    import hfrecipes

    if modeling.has_triton_device():
        pytest.skip("this machine can run Liger's kernels: nothing to refuse")
    out = tmp_path / "pt"
    with pytest.raises(UsageError, match="use_liger_kernel"):
        hfrecipes.pretrain("tiny/pretrain", max_steps=2, output_dir=str(out), use_liger_kernel=True)
    assert not out.exists()


# --------------------------------------------------------------------------------------------- steady state

STEP = 0.5


def _stamps(steps, slow=(), first=1):
    """End-of-step times: every step takes STEP seconds, the first one 20 (compilation), those in `slow` 10."""
    t, out = 0.0, []
    for s in range(first, first + steps):
        t += 20.0 if s == first else (10.0 if s in slow else STEP)
        out.append((s, t))
    return out


def test_steady_state_leaves_out_warm_up_evaluations_and_saves():
    got = throughput.steady(_stamps(40, slow={20, 31}), excluded={20, 31}, tokens_per_step=1000)
    assert got["warmup_steps"] == throughput.warmup_steps(40) == 3
    assert got["steps"] == 40 - 3 - 2
    assert got["steps_per_second"] == pytest.approx(1 / STEP)
    assert got["tokens_per_second"] == pytest.approx(1000 / STEP)
    # the wall-clock average over the same stamps is far lower: the first step's compilation and the slow steps
    wall = 40 * 1000 / _stamps(40, slow={20, 31})[-1][1]
    assert wall < 0.5 * got["tokens_per_second"]


def test_steady_state_of_a_resumed_run_counts_from_its_first_timed_step():
    got = throughput.steady(_stamps(20, first=101), excluded=set(), tokens_per_step=None)
    assert got["steps"] == 20 - got["warmup_steps"]
    assert got["steps_per_second"] == pytest.approx(1 / STEP)
    assert got["tokens_per_second"] is None


@pytest.mark.parametrize("steps", [0, 1, 5])
def test_too_short_a_run_says_so_instead_of_guessing(steps):
    got = throughput.steady(_stamps(steps) if steps else [], excluded=set(), tokens_per_step=10)
    assert set(got) == {"note"}


def test_record_and_card_give_steady_state_beside_the_wall_clock_rate(tiny_pretrained):
    rec = json.loads((tiny_pretrained.output_dir / "record.json").read_text())
    compute, steps = rec["compute"], rec["metrics"]["steps"]
    steady = compute["steady"]
    assert steady["steps"] >= steps - throughput.warmup_steps(steps) - 2  # two saves at most in this run
    assert steady["tokens_per_second"] > compute["tokens_per_second"]  # the first step holds the warm-up
    assert steady["mfu"] / compute["mfu"] == pytest.approx(steady["tokens_per_second"] / compute["tokens_per_second"])
    card = (tiny_pretrained.output_dir / "README.md").read_text()
    assert "tokens/s in steady state" in card and "averaged over the whole wall time" in card
    import torch

    expected = "bf16 mixed" if torch.cuda.is_available() and modeling.bf16_supported() else "fp32"
    assert compute["precision"].startswith(expected)
    assert compute["kernels"]["optimizer"] == "adamw_torch_fused"
    assert compute["kernels"]["attention"] == "sdpa"
    assert f"It trained in {compute['precision']}" in card


@pytest.mark.slow
def test_torch_compile_trains_saves_plain_weights_and_records_it(tmp_path):
    """torch.compile (inductor: C++ on a CPU, Triton on a GPU) on a one-layer model, to keep compilation short."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import hfrecipes

    out = tmp_path / "compiled"
    result = hfrecipes.pretrain(
        "tiny/pretrain",
        max_steps=12,
        block_size=64,
        per_device_train_batch_size=8,
        model_init_overrides={"num_hidden_layers": 1},
        output_dir=str(out),
        logging_steps=2,
        save_strategy="no",
        dataset_test_split="",
        torch_compile=True,
    )
    rec = result.record
    losses = [
        json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line
    ]
    assert losses[-1] < losses[0] - 0.3
    assert rec["compute"]["kernels"]["torch_compile"] is True
    assert rec["compute"]["steady"]["tokens_per_second"] > rec["compute"]["tokens_per_second"]
    keys = set(load_file(out / "model.safetensors"))
    assert not any("_orig_mod" in k for k in keys)  # the compiled wrapper's prefix never reaches the file
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
