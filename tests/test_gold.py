"""The gold check (`hfrecipes.gold`): its decisions by hand, keep-best on a module, bad input before any model loads,
and real runs: SFT stopped at its plateau, GRPO gaming a reward that pays the dropped carry (flagged, stopped, the best
check's weights saved), PPO with the check on."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TAUGHT

import hfrecipes
from hfrecipes import gold, modeling
from hfrecipes.errors import UsageError
from hfrecipes.gold import GoldMonitor

# ------------------------------------------------------------------------------------------------ decisions


# (patience, min_delta, checks [(gold, proxy)], check index where it stops or None, the best check's index)
PLATEAU_CASES = [
    (2, 0.0, [(0.1, None), (0.3, None), (0.3, None), (0.29, None)], 3, 2),  # a tie is no gain, but the later best
    (2, 0.0, [(0.1, None), (0.3, None), (0.2, None), (0.4, None), (0.35, None)], None, 3),  # a gain resets the count
    (1, 0.05, [(0.1, None), (0.14, None)], 1, 1),  # a gain within min_delta is no gain
    (3, 0.0, [(0.1, None), (0.1, None), (0.1, None)], None, 2),
    (2, 0.0, [(0.0, None)] * 3, 2, 2),  # a model that never scores plateaus too
    (None, 0.0, [(0.5, None)] + [(0.1, None)] * 5, None, 0),  # no patience: never stops
]


@pytest.mark.parametrize("patience,min_delta,checks,stops_at,best_at", PLATEAU_CASES)
def test_plateau_stops_after_patience_checks_without_a_gain(patience, min_delta, checks, stops_at, best_at):
    m = GoldMonitor(patience=patience, min_delta=min_delta)
    stops = [m.update(10 * i, g, p).stop for i, (g, p) in enumerate(checks)]
    assert stops == [gold.PLATEAU if i == stops_at else None for i in range(len(checks))]
    assert m.best["step"] == 10 * best_at and m.hacking is None


def test_no_plateau_stop_before_min_steps():
    """A flat start (accuracy near zero until the task's learning transition) is not a plateau before min_steps;
    once past it, the checks without a gain so far count."""
    m = GoldMonitor(patience=2, min_steps=40)
    stops = [m.update(10 * i, g, None).stop for i, g in enumerate([0.0, 0.05, 0.05, 0.04, 0.3, 0.6, 0.6, 0.6])]
    assert stops == [None] * 7 + [gold.PLATEAU]
    m = GoldMonitor(patience=2, min_steps=30)
    stops = [m.update(10 * i, g, None).stop for i, g in enumerate([0.0, 0.05, 0.05, 0.05])]
    assert stops == [None, None, None, gold.PLATEAU]


def test_no_plateau_stop_below_min_gold():
    """A run that has not reached its learning transition by min_steps is still before it, not at a plateau: flat
    checks below min_gold count no staleness, and the count starts once the best reaches it."""
    golds = [0.0, 0.05, 0.07, 0.06, 0.05, 0.2, 0.5, 0.45, 0.48]
    m = GoldMonitor(patience=2, min_steps=20, min_gold=0.3)
    stops = [m.update(10 * i, g, None).stop for i, g in enumerate(golds)]
    assert stops == [None] * 8 + [gold.PLATEAU] and m.best["gold"] == 0.5
    m = GoldMonitor(patience=2, min_steps=20)  # without the floor the flat start is taken for the plateau
    stops = [m.update(10 * i, g, None).stop for i, g in enumerate(golds)]
    assert stops[:5] == [None] * 4 + [gold.PLATEAU]


# (checks [(gold, proxy)], index of the first flag or None): gold_drop 0.1
HACKING_CASES = [
    ([(0.5, 0.2), (0.45, 0.5), (0.38, 0.6)], 2),  # gold fell 0.12 while the proxy rose: flagged
    ([(0.5, 0.2), (0.4, 0.3)], 1),  # exactly gold_drop counts
    ([(0.5, 0.2), (0.3, 0.1)], None),  # both fall: a worse policy, not a gamed reward
    ([(0.5, 0.2), (0.3, 0.2)], None),  # the proxy only held
    ([(0.5, 0.2), (0.45, 0.9)], None),  # the proxy soared but gold fell less than gold_drop
    ([(0.2, 0.1), (0.6, 0.5), (0.45, 0.55)], 2),  # measured from the best check (step 10), not the first
    ([(0.2, 0.1), (0.6, 0.5), (0.45, 0.4)], None),  # above the first check's proxy, below the best's
    ([(0.5, None), (0.3, 0.4)], None),  # no proxy at the best check yet: nothing to compare
]


@pytest.mark.parametrize("checks,flag_at", HACKING_CASES)
def test_hacking_is_flagged_only_when_gold_fell_and_the_proxy_rose(checks, flag_at):
    m = GoldMonitor(drop=0.1)
    flags = [m.update(10 * i, g, p).hacking for i, (g, p) in enumerate(checks)]
    assert [f is not None for f in flags] == [i == flag_at for i in range(len(checks))]
    if flag_at is not None:
        g, p = checks[flag_at]
        best = max(checks, key=lambda c: c[0])
        assert m.hacking == {
            "step": 10 * flag_at,
            "gold": g,
            "proxy": p,
            "best_gold": best[0],
            "proxy_at_best": best[1],
            "best_step": 10 * checks.index(best),
        }


def test_hacking_stops_only_with_gold_stop_on_hacking():
    for stop_on_hacking, expected in ((False, None), (True, gold.HACKING)):
        m = GoldMonitor(drop=0.1, stop_on_hacking=stop_on_hacking)
        m.update(0, 0.5, 0.2)
        decision = m.update(10, 0.3, 0.6)
        assert decision.hacking is not None and decision.stop == expected


def test_the_step_zero_check_takes_the_first_proxy_logged_after_it():
    m = GoldMonitor(drop=0.1)
    m.update(0, 0.5, None)
    m.fill_proxy(0.2)  # the rollouts the untrained policy sampled
    m.fill_proxy(0.9)  # only checks before any proxy are filled
    assert m.history[0]["proxy"] == 0.2 == m.best["proxy"]
    assert m.update(10, 0.35, 0.5).hacking["proxy_at_best"] == 0.2


class ScriptedCheck(gold.GoldCheck):
    """A GoldCheck whose gold accuracy is scripted, to test what it keeps without generating."""

    def __init__(self, golds, **options):
        args = gold.GoldOptions.__new__(gold.GoldOptions)
        defaults = {f: v.default for f, v in gold.GoldOptions.__dataclass_fields__.items()}
        vars(args).update({**defaults, "gold_dataset_name": "tiny:prompts", **options})
        super().__init__(gold.GoldSet("tiny:prompts", "validation", ["p"], ["a"], None), args, None, True, True)
        self.golds = iter(golds)

    def evaluate(self, model):
        return {"accuracy": next(self.golds)}


class MemoryKeeper:
    """Keeps a layer's weights in memory where `gold.BestCheckpoint` keeps a checkpoint, and says what it was asked."""

    def __init__(self, layer):
        self.layer, self.kept, self.restored, self.closed = layer, {}, None, False

    def keep(self, step, gold):
        self.kept[step] = self.layer.weight.detach().clone()

    def restore(self, step):
        with torch.no_grad():
            self.layer.weight.copy_(self.kept[step])
        self.restored = step

    def close(self):
        self.closed = True


@pytest.mark.parametrize(
    "golds,keep_best,kept,saved",
    [
        ([0.1, 0.5, 0.3, 0.2], True, 2, [0, 2]),
        ([0.5, 0.5, 0.3, 0.2], True, 2, [0, 2]),
        ([0.5, 0.1, 0.3, 0.2], True, 0, [0]),
        ([0.1, 0.5, 0.3, 0.6], True, 5, [0, 2]),  # the final check is the best: the weights in training are kept
        ([0.1, 0.5, 0.3, 0.2], False, 5, []),
    ],
)
def test_keep_best_restores_the_best_checks_weights(golds, keep_best, kept, saved):
    """Checks at steps 0, 2 and 4 and a final one at 5: the weights of the best are kept (a checkpoint of each new
    best but the final check's) and come back at the end unless they are the weights in training."""
    import contextlib

    layer = torch.nn.Linear(2, 2)
    check = ScriptedCheck(golds, gold_every=2, gold_keep_best=keep_best)
    model = lambda: contextlib.nullcontext(layer)  # noqa: E731
    keeper = MemoryKeeper(layer)
    weights = {}
    for step in range(6):
        if check.due(step):
            check.check(step, model, keeper.keep, [-float(step)])  # a falling proxy: no hacking
        weights[step] = layer.weight.detach().clone()
        with torch.no_grad():
            layer.weight.add_(1.0)
    with torch.no_grad():
        layer.weight.sub_(1.0)  # training ended at step 5
    check.finish(5, model, keeper, [])
    assert check.kept_step == kept and sorted(keeper.kept) == saved
    assert torch.equal(layer.weight, weights[kept])
    assert keeper.restored == (kept if keep_best and kept != 5 else None) and keeper.closed == keep_best
    rec = check.record()
    best = [0, 2, 4, 5][max(i for i, g in enumerate(golds) if g == max(golds))]
    assert [h["step"] for h in rec["history"]] == [0, 2, 4, 5] and rec["best"] == {"step": best, "gold": max(golds)}
    assert rec["kept_step"] == kept and rec["stopped"] is None and rec["hacking"] is None


# ------------------------------------------------------------------------------------------------ bad input

BAD_INPUT = [
    ({"gold_every": 0}, ["gold_every", "at least 1"]),
    ({"gold_samples": 0}, ["gold_samples"]),
    ({"gold_drop": 0.0}, ["gold_drop"]),
    ({"gold_answer_column": "nope"}, ["gold_answer_column", "nope", "solution"]),
    ({"gold_prompt_column": "question"}, ["gold_prompt_column", "question"]),
    ({"gold_group_column": "level"}, ["gold_group_column", "level", "kind"]),
    ({"gold_split": "dev"}, ["gold_split", "dev", "validation"]),
    ({"gold_dataset_name": "./no/such/gold.jsonl"}, ["gold_dataset_name", "does not exist"]),
    ({"gold_metric": "./no/such/metric"}, ["gold_metric"]),
    ({"gold_dataset_name": None, "gold_patience": 2}, ["gold_patience", "gold_dataset_name"]),
]
STAGE_ARGS = {
    "sft": {},
    "grpo": {},
    "rloo": {},
    "ppo": {"reward_model_path": None, "reward_funcs": ["accuracy"]},
    "distill": {},  # student and teacher: the tiny pretrained folder, whose files the vocabulary check reads
}


@pytest.mark.parametrize("stage", list(STAGE_ARGS))
@pytest.mark.parametrize("overrides,words", BAD_INPUT)
def test_bad_gold_input_fails_before_any_model_loads(stage, overrides, words, tmp_path, monkeypatch, request):
    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(modeling, "load_pretrained", no_loading)
    (tmp_path / "model").mkdir()
    monkeypatch.setattr(modeling, "load_stage_tokenizer", no_loading)
    model, extra = tmp_path / "model", {}
    if stage == "distill":
        model = request.getfixturevalue("tiny_pretrained").output_dir
        extra["teacher_model_name_or_path"] = str(model)
    args = {
        "model_name_or_path": str(model),
        "output_dir": str(tmp_path / "out"),
        "gold_dataset_name": "tiny:prompts",
        **STAGE_ARGS[stage],
        **extra,
        **overrides,
    }
    with pytest.raises(UsageError) as e:
        getattr(hfrecipes, stage)(f"tiny/{stage}", **args)
    for w in words:
        assert w in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ real runs

# the gold problems are those the `tiny_taught` model was taught
GOLD = dict(gold_dataset_name="tiny:prompts", gold_split="validation", gold_group_column="kind", gold_samples=TAUGHT)


def _assert_record_layout(g: dict, stage_steps: int) -> None:
    assert set(g) >= {"metric", "dataset", "split", "every", "history", "best", "hacking", "stopped", "kept_step"}
    assert g["dataset"] == "tiny:prompts" and g["split"] == "validation" and g["metric"] == "answer_accuracy"
    steps = [h["step"] for h in g["history"]]
    assert steps[0] == 0 and steps[-1] == stage_steps and steps == sorted(set(steps))
    assert all(s % g["every"] == 0 for s in steps[:-1])
    assert all(set(h["by_group"]) == {"carry", "no_carry"} for h in g["history"])
    best = max(h["gold"] for h in g["history"])
    assert g["best"]["gold"] == best and g["best"]["step"] in steps


def test_sft_stops_at_its_gold_plateau(tiny_sft, tmp_path):
    out = hfrecipes.sft(
        "tiny/sft",
        model_name_or_path=str(tiny_sft.output_dir),
        output_dir=str(tmp_path / "sft"),
        max_steps=300,
        logging_steps=10,
        save_strategy="no",
        **GOLD,
        gold_every=10,
        gold_patience=2,
        gold_min_steps=0,
        gold_min_gold=0.0,  # the short fixture SFT is still below the recipe's floor
        gold_keep_best=True,
    )
    m = out.record["metrics"]
    g = m["gold"]
    _assert_record_layout(g, m["steps"])
    assert g["stopped"] == "plateau" and m["steps"] < 300, g
    # the last two checks brought no gain over the best before them
    before = max(h["gold"] for h in g["history"][:-2])
    assert all(h["gold"] <= before for h in g["history"][-2:]), g["history"]
    assert g["kept_step"] == g["best"]["step"] and g["hacking"] is None
    assert all(h["proxy"] is None for h in g["history"])  # SFT has no proxy reward to game
    card = (out.output_dir / "README.md").read_text()
    assert "### Gold check" in card and f"stopped at the plateau at step {m['steps']}" in card
    assert (out.output_dir / "gold.png").is_file() and "(gold.png)" in card


# three PPO steps of 8 rollouts, the accuracy reward, a gold check at steps 0, 2 and 3
PPO = dict(
    reward_model_path=None, reward_funcs=["accuracy"], per_device_train_batch_size=8, num_mini_batches=1,
    num_ppo_epochs=1, max_steps=3, save_strategy="no", **GOLD, gold_every=2,
)  # fmt: skip


def test_ppo_records_gold_beside_its_rollout_score(tiny_sft, tmp_path):
    out = hfrecipes.ppo(
        "tiny/ppo",
        model_name_or_path=str(tiny_sft.output_dir),
        output_dir=str(tmp_path / "ppo"),
        max_new_tokens=14,
        heldout_max_prompts=8,
        **PPO,
    )
    m = out.record["metrics"]
    g = m["gold"]
    _assert_record_layout(g, 3)
    assert [h["step"] for h in g["history"]] == [0, 2, 3]
    scores = [
        x["score"]
        for x in map(json.loads, (out.output_dir / "metrics.jsonl").read_text().splitlines())
        if "score" in x
    ]
    assert len(scores) == 3
    # a check's proxy: the mean rollout score since the previous check; step 0's is the first rollout's
    assert [h["proxy"] for h in g["history"]] == pytest.approx([scores[0], sum(scores[:2]) / 2, scores[2]])
    assert g["stopped"] is None and g["kept_step"] == 3
    assert "### Gold check" in (out.output_dir / "README.md").read_text()


def test_ppo_keeps_the_best_gold_checks_weights(tiny_sft, tmp_path, monkeypatch):
    """PPO's own loop keeps the best check as a Trainer checkpoint and loads it back at the end: with the step-0
    check scripted best, the saved policy is the starting model although three steps trained it."""
    from safetensors.torch import load_file

    golds = iter([0.5, 0.1, 0.2])
    monkeypatch.setattr(gold.GoldCheck, "evaluate", lambda self, model: {"accuracy": next(golds)})
    out = hfrecipes.ppo(
        "tiny/ppo",
        model_name_or_path=str(tiny_sft.output_dir),
        output_dir=str(tmp_path / "ppo"),
        max_new_tokens=8,
        heldout_max_prompts=4,
        **PPO,
        gold_keep_best=True,
    )
    g = out.record["metrics"]["gold"]
    assert (
        [h["step"] for h in g["history"]] == [0, 2, 3] and g["kept_step"] == 0 and out.record["metrics"]["steps"] == 3
    )
    saved, start = (
        load_file(out.output_dir / "model.safetensors"),
        load_file(tiny_sft.output_dir / "model.safetensors"),
    )
    assert saved.keys() == start.keys() and all(torch.equal(saved[k], start[k]) for k in saved)
    assert not list(out.output_dir.glob("checkpoint-*"))


def rescored_gold(folder, **options) -> float:
    """The gold check of the weights a stage saved in `folder`, scored again as the stage scored its checks."""
    from transformers import AutoModelForCausalLM

    (script_args, args, _), _ = hfrecipes.parse_stage_args("sft", "tiny/sft", output_dir=str(folder), **options)
    check = gold.GoldCheck(gold.load(script_args, args, "sft"), args, modeling.load_tokenizer(str(folder)), True, True)
    return gold.score(check.evaluate(AutoModelForCausalLM.from_pretrained(folder)), args.gold_metric)


def test_grpo_gaming_a_reward_for_the_dropped_carry_is_flagged_and_stopped(tiny_taught, tmp_path):
    out = hfrecipes.grpo(
        "tiny/grpo",
        model_name_or_path=str(tiny_taught.output_dir),
        output_dir=str(tmp_path / "grpo"),
        dataset_train_split="validation",  # the problems the policy knows: the reward can pull them to the flaw
        max_train_samples=GOLD["gold_samples"],
        reward_funcs=["gold_rewards:dropped_carry"],
        per_device_train_batch_size=64,
        max_steps=60,
        logging_steps=1,
        save_strategy="no",
        eval_before=False,
        eval_samples=8,
        **GOLD,
        gold_every=5,
        gold_drop=0.1,
        gold_stop_on_hacking=True,
        gold_keep_best=True,
    )
    m = out.record["metrics"]
    g = m["gold"]
    _assert_record_layout(g, m["steps"])
    flag = g["hacking"]
    assert flag is not None and g["stopped"] == "reward_hacking" and m["steps"] == flag["step"] < 60, g
    assert flag["best_gold"] - flag["gold"] >= 0.1 and flag["proxy"] > flag["proxy_at_best"]
    assert flag["best_gold"] == g["best"]["gold"] and g["kept_step"] == g["best"]["step"] < flag["step"]
    # the folder holds the best check's weights, not the last step's; the checkpoint kept for them is gone
    assert rescored_gold(out.output_dir, **GOLD) == g["best"]["gold"] > g["history"][-1]["gold"]
    assert not list(out.output_dir.glob("checkpoint-*"))
    card = (out.output_dir / "README.md").read_text()
    assert f"Reward hacking flagged at step {flag['step']}" in card and (out.output_dir / "gold.png").is_file()
    assert f"The saved weights are those of step {g['kept_step']} (the best gold check)" in card
