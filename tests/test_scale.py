"""Scale-out on one CPU: the accelerate configs load in accelerate and `hfrecipes launch` builds and checks the launch;
every stage runs under DDP, DeepSpeed ZeRO-2 and ZeRO-3 with two gloo processes, FSDP2 shards for real, SFT keeps its
best gold check's weights under each, a ZeRO-3 PPO run killed with SIGKILL resumes from its DeepSpeed checkpoint, and
two "machines" (two launchers on one box) train as one.

Each engine's stages run in one `accelerate launch` (tests/engine_driver.py), once per module, and are compared with
the same stages in one process with the same global batch."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import needs_deepspeed, needs_processes, subprocess_env
from test_gold import rescored_gold

import hfrecipes
from hfrecipes import cli
from hfrecipes.recipe import recipes_root
from hfrecipes.tiny import corpus

CONFIGS = ["ddp", "fsdp2", "zero2", "zero3"]
ACCELERATE = recipes_root() / "accelerate"


@pytest.mark.parametrize("name", CONFIGS)
def test_accelerate_configs_load_in_accelerate(name, capsys):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ACCELERATE / f"{name}.yaml"))
    expected = {"ddp": "MULTI_GPU", "fsdp2": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}[name]
    assert config.distributed_type.value == expected
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2
    if name.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
    assert cli.main(["accelerate-config", name]) == 0
    assert Path(capsys.readouterr().out.strip()) == ACCELERATE / f"{name}.yaml"


def test_launch_builds_the_accelerate_command(monkeypatch):
    seen = {}

    def fake_run(cmd):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    argv = ["launch", "zero3", "--num_processes", "2", "--", "dpo", "--config", "tiny/dpo", "--max_steps", "2"]
    assert cli.main(argv) == 0
    cmd = seen["cmd"]
    assert cmd[1:5] == ["-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / "zero3.yaml")]
    assert cmd[5:] == ["--num_processes", "2", "-m", "hfrecipes", "dpo", "--config", "tiny/dpo", "--max_steps", "2"]
    assert cli.main(["launch", "ddp", "--num_processes", "1", "--", "sft", "--config", "tiny/sft"]) == 0
    assert seen["cmd"][-5:] == ["-m", "hfrecipes", "sft", "--config", "tiny/sft"]


def test_launch_refuses_what_this_machine_cannot_run(monkeypatch, capsys):
    """Checked before any process starts, exit 2: more processes than the machine has GPUs (here: CPU cores), and a
    ZeRO config where DeepSpeed is not installed."""
    from hfrecipes import engines

    monkeypatch.setattr(subprocess, "run", lambda cmd: pytest.fail("launched"))
    monkeypatch.setattr(engines, "local_capacity", lambda: (2, "no GPU and 2 CPU cores"))
    assert cli.main(["launch", "ddp", "--", "sft", "--config", "tiny/sft"]) == 2  # ddp.yaml asks for 8
    err = capsys.readouterr().err
    assert "8 processes" in err and "--num_processes 2" in err
    # two machines of 4 processes each would still be 4 here
    assert cli.main(["launch", "zero3", "--num_processes", "8", "--num_machines", "2", "--", "sft"]) == 2
    assert "4 processes" in capsys.readouterr().err
    monkeypatch.setattr(engines, "deepspeed_installed", lambda: False)
    assert cli.main(["launch", "zero2", "--num_processes", "2", "--", "sft", "--config", "tiny/sft"]) == 2
    err = capsys.readouterr().err
    assert "DeepSpeed" in err and "hfrecipes[deepspeed]" in err


@pytest.mark.parametrize(
    "env, overrides, words",
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, {}, ["DeepSpeed", "install"]),
        ({"WORLD_SIZE": "6", "LOCAL_WORLD_SIZE": "6"}, {}, ["6 processes", "--num_processes"]),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
            {"load_in_4bit": True, "use_peft": True},
            ["load_in_4bit", "bnb_4bit_quant_storage", "zero2"],
        ),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, {"load_in_8bit": True}, ["load_in_8bit", "fsdp2"]),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, {"stage": "ppo"}, ["ppo under fsdp2", "zero3"]),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, {}, ["FSDP v1", "fsdp2.yaml"]),
    ],
    ids=[
        "zero3-without-deepspeed", "more-processes-than-cores", "qlora-under-zero3", "8bit-under-fsdp2",
        "ppo-under-fsdp2", "fsdp1-on-cpu",
    ],
)  # fmt: skip
def test_a_launched_stage_refuses_before_any_model_loads(env, overrides, words, monkeypatch, tmp_path):
    """What `accelerate launch` itself lets through (it does not know the recipe or this machine's cores) stops in
    every process with one message, before the recipe's model is loaded."""
    from hfrecipes import engines, modeling
    from hfrecipes.errors import UsageError

    overrides = dict(overrides)
    stage = overrides.pop("stage", "sft")
    monkeypatch.setattr(engines, "_has_gpu", lambda: False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(engines, "local_capacity", lambda: (2, "no GPU and 2 CPU cores"))
    if "load_in_4bit" not in overrides and "load_in_8bit" not in overrides:
        monkeypatch.setattr(engines, "deepspeed_installed", lambda: False)
    monkeypatch.setattr(modeling, "load_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(UsageError) as e:
        engines.check_environment()
        engines.check_options(hfrecipes.parse_stage_args(stage, f"tiny/{stage}", **overrides)[0][2], stage)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- every stage under every engine

ENGINES = ["ddp", "zero2", "zero3", "fsdp2"]
GLOBAL_BATCH = 8
# The tiny recipes' gold check is off here but in SFT (below): these runs compare the engines' training. The
# pretrain's knowledge probe stays on: it runs a forward with no backward after training, which a sharded save must
# survive.
NO_GOLD = dict(gold_dataset_name=None, gold_patience=None, gold_keep_best=False)
# SFT checks gold at every step and keeps the best check's weights (gold_keep_best): its gold set's references are the
# greedy replies of the one-process model after step 1 (`_step1_gold`), so step 1 is the best of the checks at steps
# 0, 1 and 2, and every engine must save step 1's weights although it trained step 2.
GOLD_PROMPTS = 16
GOLD_OPTIONS = dict(
    gold_answer_column="solution", gold_group_column=None, gold_every=1, gold_max_new_tokens=8, gold_patience=None,
    gold_keep_best=True,
)  # fmt: skip
# fp32 throughout, as the launches' `--mixed_precision no` says: on a GPU the stages would default to bf16 and TF32,
# whose rounding the equality bounds below are not set for.
COMMON = dict(
    max_steps=2, logging_steps=1, save_strategy="no", dataset_test_split="", max_train_samples=64, seed=3,
    bf16=False, tf32=False,
)  # fmt: skip
# No LoRA dropout (TRL's default is 0.05): each rank draws its own masks, so two processes would train on other
# gradients than one process does.
LORA = dict(use_peft=True, lora_r=8, lora_dropout=0.0)
# Continued pretraining starts every engine from the same weights (a random init drawn under ZeRO-3's partitioned
# zero.Init differs from one process's draw, so from scratch the runs would not be comparable step by step).
STAGES = {
    "pretrain": dict(recipe="tiny/pretrain", train_tokenizer=False, max_train_samples=256),
    "sft": dict(recipe="tiny/sft", max_length=64, **NO_GOLD),
    "reward": dict(recipe="tiny/reward", max_length=64),
    "dpo": dict(recipe="tiny/dpo", max_length=64, loss_type=["sigmoid"], loss_weights=[1.0]),
    "kto": dict(recipe="tiny/kto", max_length=64, loss_type="apo_zero_unpaired"),
    "grpo": dict(recipe="tiny/grpo", num_generations=4, max_completion_length=8, eval_before=False, **NO_GOLD),
    # RLOO keeps its recipe's KL penalty: the frozen reference copy of the parent runs under every engine
    "rloo": dict(recipe="tiny/rloo", num_generations=4, max_completion_length=8, eval_before=False, **NO_GOLD),
    "ppo": dict(
        recipe="tiny/ppo", num_mini_batches=2, num_ppo_epochs=1, max_new_tokens=8, max_train_samples=None,
        heldout_max_prompts=4, dataset_test_split="test", **NO_GOLD,
    ),
    # the student is the pretrained model, the teacher the SFT model; the held-out agreement runs (under ZeRO-3 every
    # process gathers the frozen teacher and the student to reply)
    "distill": dict(
        recipe="tiny/distill", max_completion_length=8, dataset_test_split="test", max_eval_samples=4,
        eval_max_new_tokens=4, **NO_GOLD,
    ),
    "sft_lora": dict(recipe="tiny/sft", max_length=64, **LORA, learning_rate=1e-3, **NO_GOLD),
    "ppo_lora": dict(
        recipe="tiny/ppo", num_mini_batches=2, num_ppo_epochs=1, max_new_tokens=8, max_train_samples=None,
        **LORA, learning_rate=1e-3, **NO_GOLD,
    ),
}  # fmt: skip
LORA_ENGINES = ("ddp", "zero3")  # LoRA runs under ZeRO-3, and under DDP as the reference for its sampled replies
# DPO runs sigmoid alone: the tiny recipe's added SFT term is a mean over each rank's tokens, so with two ranks it is
# a mean of two means, not the one-process mean. KTO runs its unpaired APO loss: the kto loss estimates its KL term
# from each row's prompt with its neighbour's reply inside a device's batch, so two ranks of 4 rows pair other rows
# than one process of 8. GRPO, RLOO and PPO sample their replies with each rank's own RNG, so they are compared with
# the DDP run (same ranks, same RNG streams), not with one process.
SAME_AS_ONE_PROCESS = ["pretrain", "sft", "reward", "dpo", "kto", "sft_lora"]
SAMPLED = ["grpo", "rloo", "ppo", "ppo_lora", "distill"]
LOSS_TOL = 1e-4  # relative, per step
WEIGHT_TOL = 1e-5  # absolute, per tensor element
# Adam moves an element by about lr x g / (|g| + eps): by nearly the full learning rate wherever |g| is well above
# eps, however small g is, so where gradients are near zero (a fresh LoRA B matrix; GRPO's advantages, small
# differences of rewards) an element whose gradient's sign is decided by rounding (another reduction order) lands
# 2 x lr away in another engine, far outside WEIGHT_TOL. These stages are compared by what training changed instead:
# the engines' changes agree to within AGREE of the change itself (a few dozen such elements stay under it), and an
# engine that never updated the weights stays at the start, a whole change away from the reference.
SIGN_NOISY = ("sft_lora", "ppo_lora", "grpo", "rloo", "distill")
AGREE = 0.01  # the distance between two engines' changes, as a share of the reference's change (Frobenius norms)


def _parent(stage: str, parents: dict[str, str]) -> str:
    """The folder a stage starts from: pretraining continues, and SFT and distillation (the student) start from the
    pretrained model, the rest from the SFT model."""
    return parents["pretrained"] if stage in ("pretrain", "sft", "distill") else parents["sft"]


def _plan(root: Path, parents: dict[str, str], processes: int, engine: str) -> list:
    plan = []
    for name, extra in STAGES.items():
        if name.endswith("_lora") and engine not in LORA_ENGINES or name == "ppo" and engine == "fsdp2":
            continue  # PPO under FSDP is refused (tests above)
        stage = name.split("_")[0]
        kw = {**COMMON, **extra, "output_dir": str(root / name)}
        kw["per_device_train_batch_size"] = (4 if stage == "ppo" else GLOBAL_BATCH) // processes
        kw["model_name_or_path"] = _parent(stage, parents)
        if stage == "pretrain":
            kw["tokenizer_name_or_path"] = parents["pretrained"]
        if stage in ("ppo", "grpo", "rloo"):  # the reward stage's model scores the replies (beside the answer check)
            kw["reward_model_path"] = str(root / "reward")
        if stage == "distill":
            kw["teacher_model_name_or_path"] = parents["sft"]
        if name == "sft" and parents.get("gold"):
            kw.update(GOLD_OPTIONS, gold_dataset_name=parents["gold"])
        # None leaves the recipe's value, but for a gold key, where it turns the recipe's check off
        plan.append((stage, {k: v for k, v in kw.items() if v is not None or k.startswith("gold_")}))
    return plan


def _launch_cmd(config: str, *flags: str) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / f"{config}.yaml")]
    return cmd + ["--mixed_precision", "no", *flags]


ENV = subprocess_env()
DRIVER = Path(__file__).with_name("engine_driver.py")


def _stderr_tail(r) -> str:
    return "\n".join(line for line in r.stderr.splitlines() if "Warning" not in line)[-6000:]


def _step1_gold(root: Path, parents: dict[str, str]) -> tuple[str, str]:
    """The one-process SFT of the plan stopped after its first step (the learning rate is still warming up, as at
    step 1 of the two-step runs), and a gold file whose references are its greedy replies to the first gold prompts."""
    from transformers import AutoModelForCausalLM

    from hfrecipes import evaluation, gold, modeling

    sft = next(kw for stage, kw in _plan(root, parents, 1, "ddp") if kw["output_dir"].endswith("/sft"))
    step1 = hfrecipes.sft(**{**sft, "max_steps": 1})
    (script_args, args, _), _ = hfrecipes.parse_stage_args(
        "sft", "tiny/sft", output_dir=str(root / "unused"), gold_samples=GOLD_PROMPTS, gold_group_column=None
    )
    prompts = gold.load(script_args, args, "sft").prompts
    model = AutoModelForCausalLM.from_pretrained(step1.output_dir)
    tokenizer = modeling.load_tokenizer(str(step1.output_dir))
    replies = evaluation.greedy_replies(model, tokenizer, prompts, GOLD_OPTIONS["gold_max_new_tokens"])
    path = root / "gold.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": p, "solution": r}) + "\n" for p, r in zip(prompts, replies, strict=True))
    )
    return str(step1.output_dir), str(path)


@pytest.fixture(scope="module")
def runs(tiny_pretrained, tiny_sft, tmp_path_factory):
    """Every engine's stages, launched once each on demand, and the same stages in one process."""
    root = tmp_path_factory.mktemp("engines")
    parents = {"pretrained": str(tiny_pretrained.output_dir), "sft": str(tiny_sft.output_dir)}
    parents["step1"], parents["gold"] = _step1_gold(root / "step1", parents)
    done: dict[str, Path] = {}

    def get(engine: str) -> Path:
        if engine not in done:
            out = root / engine
            plan = _plan(out, parents, 1 if engine == "one" else 2, "ddp" if engine == "one" else engine)
            if engine == "one":  # the reference of the stages that sample nothing
                plan = [(stage, kw) for stage, kw in plan if Path(kw["output_dir"]).name in SAME_AS_ONE_PROCESS]
                for stage, kw in plan:
                    getattr(hfrecipes, stage)(**kw)
            else:
                plan_file = root / f"{engine}.json"
                plan_file.write_text(json.dumps(plan))
                cmd = _launch_cmd(engine, "--num_processes", "2", "--main_process_port", "0")
                r = subprocess.run([*cmd, str(DRIVER), str(plan_file)], env=ENV, capture_output=True, text=True)
                assert r.returncode == 0, _stderr_tail(r)
            done[engine] = out
        return done[engine]

    get.parents = parents
    return get


def _losses(folder: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(folder.glob("adapter_model.safetensors")) or sorted(folder.glob("model*.safetensors"))
    assert files, f"{folder}: no safetensors weights"
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def _change(folder: Path, start: str) -> dict:
    """What training changed in a stage's weights: each tensor less the parent's at `start`; for a LoRA adapter,
    each adapted layer's B @ A x alpha / r (zero at the start: B starts at zero)."""
    weights = _weights(folder)
    config = folder / "adapter_config.json"
    if config.is_file():
        cfg = json.loads(config.read_text())
        scale = cfg["lora_alpha"] / cfg["r"]
        return {
            k: scale * weights[k.replace("lora_A", "lora_B")].float() @ weights[k].float()
            for k in weights
            if "lora_A" in k
        }
    parent = _weights(Path(start))
    return {k: weights[k].float() - parent[k].float() for k in weights if k in parent}


def _norm(tensors) -> float:
    return sum(float(t.square().sum()) for t in tensors) ** 0.5


def _changes_agree(folder: Path, reference: Path, start: str) -> tuple[float, float]:
    """How far the reference's weights moved from the start, and how far the folder's change is from the
    reference's (Frobenius norms over every tensor)."""
    mine, theirs = _change(folder, start), _change(reference, start)
    assert mine.keys() == theirs.keys() and mine, f"{folder} and {reference} changed different tensors"
    return _norm(theirs.values()), _norm(mine[k] - theirs[k] for k in mine)


def _same_weights(a: Path, b: Path) -> float:
    """Largest element difference; the two folders must hold the same tensor names (the tiny model ties its input
    and output embeddings: a folder holds them once, whatever engine gathered its weights) and shapes."""
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys(), f"{a} and {b} hold different tensors: {sorted(set(wa) ^ set(wb))[:5]}"
    assert all(wa[k].shape == wb[k].shape for k in wa), "a tensor was saved as a partition"
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


# Every launch below runs two processes on this machine (gloo processes on a CPU, a GPU each on a GPU machine).
two_processes = needs_processes(2)
ENGINE_PARAMS = [pytest.param(e, marks=needs_deepspeed) if e.startswith("zero") else e for e in ENGINES]


@pytest.mark.slow
@two_processes
@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_every_stage_under_two_processes(engine, runs):
    """pretrain, sft, reward, dpo, kto, grpo, rloo, ppo and distill (and LoRA sft and ppo under ZeRO-3) in one
    `accelerate launch` of two gloo processes: each stage's per-step losses and final weights equal one process's with
    the same global batch (the sampling stages: the DDP run's), every folder holds whole safetensors weights that
    transformers loads, and the record and card say how the stage ran."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out, one, ddp = runs(engine), runs("one"), runs("ddp")
    start = {name: _parent(name.split("_")[0], runs.parents) for name in STAGES}
    report = {}
    for name in (n for n in STAGES if (out / n).is_dir()):
        folder = out / name
        rec = json.loads((folder / "record.json").read_text())
        dist = rec["compute"]["distributed"]
        assert (dist["engine"], dist["world_size"], dist["machines"]) == (engine, 2, 1), dist
        assert rec["compute"]["device"]["count"] == 2
        assert f"({dist['label']}, 2 processes on 1 machine)" in (folder / "README.md").read_text()
        ranks = [json.loads((out / f"{name}.rank{i}.json").read_text()) for i in (0, 1)]
        if engine in ("ddp", "zero2"):  # every process holds the whole model, and the same one
            assert ranks[0]["sha256"] == ranks[1]["sha256"], f"{name}: the two ranks' weights differ"
        else:  # sharded: each process holds about half of every weight
            for r in ranks:
                assert r["local"] < 0.6 * r["whole"], (name, r)
        if name == "rloo":  # its KL reference is the parent on every process: no penalty before the first update
            logged = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
            kl = [r["kl"] for r in logged if "kl" in r]
            assert kl and abs(kl[0]) < 1e-6, (engine, kl)
        if name in SAME_AS_ONE_PROCESS:
            reference = one / name
        elif engine != "ddp":
            reference = ddp / name
        else:
            reference = None
        if reference is not None:
            a, b = _losses(folder), _losses(reference)
            assert sorted(a) == sorted(b) == [1, 2], (name, a, b)
            loss_gap = max(abs(a[s] - b[s]) / max(1.0, abs(b[s])) for s in a)
            assert loss_gap < LOSS_TOL, (name, a, b)
            weight_gap = _same_weights(folder, reference)
            if name in SIGN_NOISY:
                moved, apart = _changes_agree(folder, reference, start[name])
                assert apart < AGREE * moved, (name, moved, apart)
                report[name] = f"loss {loss_gap:.1e}, weights moved {moved:.1e}, changes apart {apart:.1e}"
            else:
                assert weight_gap < WEIGHT_TOL, (name, weight_gap)
                report[name] = f"loss {loss_gap:.1e}, weights {weight_gap:.1e}"
        if name in SIGN_NOISY:  # trained beyond rounding: the largest change exceeds the engines' exact tolerance
            moved = max(float(t.abs().max()) for t in _change(folder, start[name]).values())
            assert moved > WEIGHT_TOL, (name, moved)
        if name.endswith("_lora"):
            assert (folder / "adapter_config.json").is_file() and not list(folder.glob("model*.safetensors"))
        else:
            auto = AutoModelForSequenceClassification if name == "reward" else AutoModelForCausalLM
            model = auto.from_pretrained(folder)
            assert sum(p.numel() for p in model.parameters()) == rec["model"]["params_total"]
    if (out / "ppo").is_dir():
        ppo = json.loads((out / "ppo" / "record.json").read_text())
        # 2 replies a micro-batch x 2 minibatches x 2 processes: one process's rollout of 4 x 2
        assert ppo["metrics"]["rollout_batch_size"] == 8
    pre = json.loads((out / "pretrain" / "record.json").read_text())
    assert pre["data"]["tokens_seen"] == 2 * GLOBAL_BATCH * 128  # steps x global batch x block_size
    probed = pre["data"]["knowledge_cutoff"]["knowledge_probe"]
    assert (probed["before"]["total"], probed["after"]["total"]) == (corpus.N_FACTS_BEFORE, corpus.N_FACTS_AFTER)
    alone = json.loads((one / "pretrain" / "record.json").read_text())["data"]["knowledge_cutoff"]["knowledge_probe"]
    assert probed == alone, "the probe of the same weights differs from one process's"
    print(f"{engine}: max gap to the reference per stage: {report}")


@pytest.mark.slow
@two_processes
@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_sft_keeps_its_best_gold_checkpoint_under_every_engine(engine, runs):
    """gold_keep_best under two processes: SFT's gold check at steps 0, 1 and 2 finds step 1 best, and the folder
    holds step 1's weights (the one-process model stopped after step 1, to the engines' tolerance; scored again, the
    recorded best gold) though the run trained step 2, with no checkpoint left behind; ZeRO-3 and FSDP2 save and load
    that checkpoint with no process holding the whole model."""
    folder = runs(engine) / "sft"
    rec = json.loads((folder / "record.json").read_text())
    g = rec["metrics"]["gold"]
    golds = {h["step"]: h["gold"] for h in g["history"]}
    assert sorted(golds) == [0, 1, 2] and golds[1] == 1.0 > golds[2], golds  # step 2 changed some replies
    assert g["best"] == {"step": 1, "gold": 1.0} and g["kept_step"] == 1 and rec["metrics"]["steps"] == 2
    assert sorted(_losses(folder)) == [1, 2]
    assert _same_weights(folder, Path(runs.parents["step1"])) < WEIGHT_TOL
    assert rescored_gold(folder, gold_dataset_name=runs.parents["gold"], **GOLD_OPTIONS) == 1.0
    assert not list(folder.glob("checkpoint-*")), "the checkpoint kept for the gold check was left behind"
    assert "The saved weights are those of step 1 (the best gold check)" in (folder / "README.md").read_text()


@pytest.mark.slow
@two_processes
@needs_deepspeed
def test_lora_under_zero3_exports_and_loads(runs, tmp_path):
    """A LoRA adapter trained under ZeRO-3 names its base, merges in `hfrecipes export` and loads as a plain
    model whose weights moved from the base."""
    from transformers import AutoModelForCausalLM

    out = runs("zero3")
    exported, rec = hfrecipes.export(out / "sft_lora", tmp_path / "export", use_vllm=False)
    assert rec["export"]["verify"]["transformers_loads"]
    merged = AutoModelForCausalLM.from_pretrained(exported)
    base = AutoModelForCausalLM.from_pretrained(runs.parents["pretrained"])
    moved = max(float((a - b).abs().max()) for a, b in zip(merged.parameters(), base.parameters(), strict=True))
    assert moved > 1e-6, "the merged adapter left the base unchanged"  # two small steps, far above fp32 rounding
    ppo = json.loads((out / "ppo_lora" / "record.json").read_text())
    assert ppo["model"]["adapter"] and ppo["compute"]["distributed"]["engine"] == "zero3"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@two_processes
@needs_deepspeed
def test_two_machines_on_one_box_train_as_one(runs, tmp_path):
    """The README's multi-node command with two machines of one process each, both on this box: two `accelerate
    launch` processes (`--num_machines 2 --machine_rank 0|1 --main_process_ip 127.0.0.1`), each with its own output
    folder as on two machines. They train as the single-machine two-process ZeRO-3 run does, and the record says
    two machines. Each machine keeps its own copy of the best gold check's checkpoint (save_on_each_node), which it
    loads back at the end."""
    single = runs("zero3") / "sft"
    sft = next(kw for stage, kw in _plan(tmp_path, runs.parents, 2, "zero3") if kw["output_dir"].endswith("/sft"))
    sft["save_on_each_node"] = True
    port = _free_port()
    procs = []
    for machine in (0, 1):
        plan = tmp_path / f"machine{machine}.json"
        plan.write_text(json.dumps([["sft", {**sft, "output_dir": str(tmp_path / f"machine{machine}" / "sft")}]]))
        flags = ["--num_machines", "2", "--num_processes", "2", "--machine_rank", str(machine)]
        flags += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
        cmd = [*_launch_cmd("zero3", *flags), str(DRIVER), str(plan)]
        procs.append(subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=400)[1] for p in procs]
    for p, err in zip(procs, errors, strict=True):
        assert p.returncode == 0, "\n".join(line for line in err.splitlines() if "Warning" not in line)[-4000:]
    folder = tmp_path / "machine0" / "sft"
    rec = json.loads((folder / "record.json").read_text())
    dist = rec["compute"]["distributed"]
    assert (dist["engine"], dist["world_size"], dist["machines"], dist["processes_per_machine"]) == ("zero3", 2, 2, 1)
    assert rec["compute"]["device"]["count"] == 2
    assert "(DeepSpeed ZeRO-3, 2 processes on 2 machines)" in (folder / "README.md").read_text()
    assert not (tmp_path / "machine1" / "sft" / "record.json").exists(), "only the main process writes the stage"
    a, b = _losses(folder), _losses(single)
    assert sorted(a) == sorted(b) == [1, 2] and max(abs(a[s] - b[s]) for s in a) < 1e-6, (a, b)
    assert _same_weights(folder, single) < WEIGHT_TOL


@pytest.mark.slow
@two_processes
@needs_deepspeed
def test_zero3_killed_with_sigkill_resumes_from_its_deepspeed_checkpoint(runs, tmp_path):
    """PPO (hfrecipes' own loop) under ZeRO-3 on two processes, every process killed with SIGKILL once checkpoint-1
    is complete, then the same launch again: it resumes from that checkpoint's DeepSpeed state (each process's
    partition of weights and optimizer state, with the RNG states, so it samples the same replies) and logs the
    losses of the uninterrupted run of the `runs` fixture, step for step. The second process saves its RNG state
    late, so a checkpoint the main process completed before every process had saved its state would be caught."""
    from hfrecipes import record

    uninterrupted = runs("zero3") / "ppo"
    ppo = next(kw for stage, kw in _plan(tmp_path, runs.parents, 2, "zero3") if kw["output_dir"].endswith("/ppo"))
    out = tmp_path / "killed"
    ppo = {**ppo, "reward_model_path": str(uninterrupted.parent / "reward"), "output_dir": str(out)}
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps([["ppo", {**ppo, "save_strategy": "steps", "save_steps": 1}]]))

    def launch():
        cmd = _launch_cmd("zero3", "--num_processes", "2", "--main_process_port", str(_free_port()))
        # the second process saves its RNG state late: the kill below, as soon as the main process has written the
        # trainer state, must still find both processes' states in the checkpoint
        env = {**ENV, "SLOW_RNG_SAVE": "2"}
        return subprocess.Popen([*cmd, str(DRIVER), str(plan)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip

    proc = launch()
    done = out / "checkpoint-1" / "trainer_state.json"  # written last: the checkpoint is complete
    deadline = time.monotonic() + 300
    while not done.is_file():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # the launcher and both training processes (torch's elastic agent starts each in a session of its own)
    import psutil

    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / record.RECORD).exists(), "the run finished before it was killed"
    rng = sorted(p.name for p in (out / "checkpoint-1").glob("rng_state_*.pth"))
    assert rng == ["rng_state_0.pth", "rng_state_1.pth"], f"trainer state written before every RNG state: {rng}"
    # DeepSpeed numbers its state by optimizer steps: a PPO step is epochs x minibatches of them
    assert len(list((out / "checkpoint-1").glob("global_step*/*optim_states.pt"))) == 2, "no DeepSpeed partitions"
    assert record.check_output_dir(out, "ppo").endswith("checkpoint-1")
    proc = launch()
    err = proc.communicate(timeout=400)[1]
    assert proc.returncode == 0, "\n".join(line for line in err.splitlines() if "Warning" not in line)[-4000:]
    assert record.is_complete(out)
    a, b = _losses(out), _losses(uninterrupted)
    assert sorted(a) == sorted(b) == [1, 2]
    gap = max(abs(a[s] - b[s]) / max(1.0, abs(b[s])) for s in a)
    assert gap < LOSS_TOL, (a, b)
    assert _same_weights(out, uninterrupted) < WEIGHT_TOL
