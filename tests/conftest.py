"""Shared fixtures: offline, one thread (stable timings on a shared 2-core machine), one tiny pretrained model and
one tiny SFT model on top of it, built once per session and reused by every later-stage test."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

# The longest files run first, so the two workers finish together instead of one waiting on a long file picked
# last (pytest-xdist's `--dist loadfile` hands out files in collection order).
LONGEST_FIRST = (
    "test_ladder.py", "test_real_rl.py", "test_real_model.py", "test_scale.py", "test_distill_lifecycle.py",
    "test_reward.py", "test_ppo.py",
)  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)


from hfrecipes.vllm_support import vllm_available  # noqa: E402  (after the offline switches above)

# Tests of the real vLLM engine skip where it is not installed, unless CI requires it (`.ci/run` sets this)
REQUIRE_VLLM = os.environ.get("HFRECIPES_REQUIRE_VLLM") == "1"
needs_vllm = pytest.mark.skipif(not vllm_available() and not REQUIRE_VLLM, reason="vLLM is not installed")

from hfrecipes import llama_cpp  # noqa: E402

# Tests that run a GGUF file in llama.cpp (node-llama-cpp) skip where it is not installed, unless the environment
# promises it: set-up installed it (its stamp beside the packages), or HFRECIPES_REQUIRE_LLAMA_CPP=1.
LLAMA_CPP_STAMP = Path(sys.prefix) / "node" / ".hfrecipes-installed"
REQUIRE_LLAMA_CPP = os.environ.get("HFRECIPES_REQUIRE_LLAMA_CPP") == "1" or LLAMA_CPP_STAMP.is_file()
needs_llama_cpp = pytest.mark.skipif(
    not llama_cpp.available() and not REQUIRE_LLAMA_CPP, reason="llama.cpp (node-llama-cpp) is not installed"
)


REPO = Path(__file__).resolve().parents[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a process a test starts: this one's, with the repository first on PYTHONPATH (the caller's
    path stays: a machine may hold the stack's packages there) and one torch thread."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def needs_processes(n: int):
    """Skip a test that launches `n` training processes on one machine where hfrecipes would refuse them: one process
    a GPU where there is a GPU (NCCL), else one a CPU core (gloo processes need no device)."""
    from hfrecipes.engines import local_capacity

    capacity, what = local_capacity()
    return pytest.mark.skipif(capacity < n, reason=f"{n} training processes need {n} devices; this machine has {what}")


def _setup_promises(extra: str) -> bool:
    """Whether `scripts/setup.sh` built the running environment with `extra` (its stamp lists the extras)."""
    stamp = Path(sys.prefix) / ".hfrecipes-installed"
    return stamp.is_file() and extra in stamp.read_text().split()[0].split(",")


# DeepSpeed tests skip where it is not installed, unless the environment promises it: set-up installs it (and says so
# in its stamp), or HFRECIPES_REQUIRE_DEEPSPEED=1.
REQUIRE_DEEPSPEED = os.environ.get("HFRECIPES_REQUIRE_DEEPSPEED") == "1" or _setup_promises("deepspeed")
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None and not REQUIRE_DEEPSPEED, reason="DeepSpeed is not installed"
)

# Two real processes: gloo on a CPU-only machine (`--multi_gpu` with the stages' use_cpu; `--cpu` silently runs one),
# NCCL with a GPU each on a GPU machine (`needs_processes(2)`).
TWO_PROCESSES = [
    sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
    "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
]  # fmt: skip


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory):
    """A folder every test worker sees (the session's base folder above each worker's own). Read from pytest-xdist's
    environment rather than its `worker_id` fixture, so the suite also runs with xdist off (`-p no:xdist`)."""
    root = tmp_path_factory.getbasetemp()
    shared = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "shared"
    shared.mkdir(exist_ok=True)
    return shared


def built_once(folder: Path, build):
    """The finished stage folder `build(folder)` writes, built by whichever worker comes first (under a lock) and
    read by the other: the fixtures below are read-only parents."""
    from filelock import FileLock

    from hfrecipes.record import is_complete, read_record
    from hfrecipes.runner import StageResult

    with FileLock(str(folder) + ".lock"):
        if not is_complete(folder):
            return build(folder)
    return StageResult(folder, read_record(folder))


@pytest.fixture(scope="session")
def tiny_pretrained(shared_dir):
    """The tiny model pretrained for 80 steps (~20 s): the parent of later-stage tests."""
    import hfrecipes

    return built_once(
        shared_dir / "pretrain",
        lambda out: hfrecipes.pretrain(
            "tiny/pretrain", max_steps=80, output_dir=str(out), logging_steps=10, save_steps=40
        ),
    )


@pytest.fixture(scope="session")
def tiny_sft(tiny_pretrained, shared_dir):
    """Full SFT of the tiny pretrained model on the addition conversations: the parent of reward and DPO tests."""
    import hfrecipes

    return built_once(
        shared_dir / "sft",
        lambda out: hfrecipes.sft(
            "tiny/sft",
            model_name_or_path=str(tiny_pretrained.output_dir),
            output_dir=str(out),
            max_steps=SFT_STEPS,
            logging_steps=10,
            save_strategy="no",
        ),
    )


SFT_STEPS = 120
TAUGHT = 32  # validation problems the `tiny_taught` model was taught
# No warm-up and no gold check: 100 steps of the tiny SFT recipe on those problems alone
TAUGHT_SFT = dict(
    dataset_train_split="validation", max_train_samples=TAUGHT, max_steps=100, warmup_steps=0, logging_steps=10,
    save_strategy="no", gold_dataset_name=None, gold_patience=None, gold_keep_best=False,
)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_taught(tiny_sft, shared_dir):
    """The tiny SFT model taught the clean replies of the first `TAUGHT` validation problems: the tiny fixtures are
    too short to learn addition, and a test that needs a model which answers some problems right (a gold check that
    gaming a reward can lower, an RL stage that sharpens what it half knows) starts here."""
    import hfrecipes

    parent = {"model_name_or_path": str(tiny_sft.output_dir)}
    return built_once(shared_dir / "taught", lambda out: hfrecipes.sft(output_dir=str(out), **parent, **TAUGHT_SFT))


@pytest.fixture(scope="session")
def tiny_sft_lora(tiny_pretrained, tmp_path_factory):
    """A short LoRA SFT run on the tiny pretrained model, with its trainer kept for inspection: (result, trainer).
    Built in each worker that asks for it (the trainer lives in this process)."""
    import hfrecipes

    with pytest.MonkeyPatch.context() as mp:
        trainers = capture_trainers(mp)
        result = hfrecipes.sft(
            "tiny/sft_lora",
            model_name_or_path=str(tiny_pretrained.output_dir),
            output_dir=str(tmp_path_factory.mktemp("sft") / "lora"),
            max_steps=20,
            logging_steps=5,
            max_train_samples=640,
            save_strategy="no",
        )
    return result, trainers[0]


def capture_trainers(mp: pytest.MonkeyPatch) -> list:
    """Keep every trainer a stage builds, for inspection: `Trainer.train` is wrapped, not replaced."""
    from transformers import Trainer

    trainers = []
    original = Trainer.train

    def train(self, *args, **kwargs):
        trainers.append(self)
        return original(self, *args, **kwargs)

    mp.setattr(Trainer, "train", train)
    return trainers


@pytest.fixture
def captured_trainers(monkeypatch):
    return capture_trainers(monkeypatch)


def lm_head_kind(model) -> str:
    """Which LM head a model (or the base of a PEFT model) scores tokens with: "logits" (hfrecipes.stages.common)
    or "trl" (TRL's fused head). Both wrappers copy the model's own forward's name, so the code is compared. Under
    mixed precision accelerate wraps the forward of the model it prepares in its autocast, keeping the one it
    wrapped as `_original_forward`: that one holds the head."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = getattr(model, "_original_forward", model.forward)
    return "logits" if forward.__code__.co_filename.endswith("stages/common.py") else "trl"


def device_kind() -> str:
    """The kind of device a stage trains on here, as records name it: "cuda", "mps" or "cpu"."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def stage_precision(args):
    """A context in which a forward pass computes in the precision a stage's training arguments trained and
    evaluated in: the trainer's bf16 or fp16 autocast on its device, else (or without arguments) nothing: fp32."""
    import contextlib

    import torch

    if args is not None and (args.bf16 or args.fp16):
        return torch.autocast(args.device.type, dtype=torch.bfloat16 if args.bf16 else torch.float16)
    return contextlib.nullcontext()


def stage_base_unchanged(model, parent_weights: Path) -> int:
    """Assert every base weight of a trained PEFT model (adapters and new heads aside) equals the parent folder's
    safetensors file bit for bit; returns how many tensors were compared."""
    import torch
    from safetensors.torch import load_file

    parent = load_file(parent_weights)
    compared = 0
    for name, value in model.state_dict().items():
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        if "lora_" not in name and key in parent:
            assert torch.equal(parent[key], value.cpu()), f"base weight {key} changed under LoRA"
            compared += 1
    assert compared >= len(parent) - 1, (compared, len(parent))  # every tensor (a tied lm_head is stored once)
    return compared


def fewer_layers(source: Path, out: Path, keep: list[int]) -> Path:
    """A smaller model sharing `source`'s tokenizer: a copy of it with only the decoder layers `keep` (embeddings,
    final norm and head as they are), the usual start of a distillation student. No record: it trained nothing."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source)
    model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in keep)
    model.config.num_hidden_layers = len(keep)
    model.save_pretrained(out)  # reloaded, each layer is numbered by its new place
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def markdown_table(text: str, header: str) -> list[list[str]]:
    """Rows of the markdown table whose header starts with `header`, as lists of cells (bold marks stripped)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip().strip("*") for c in line.strip("|").split("|")])
    return rows


def heldout_accuracy(folder, max_new_tokens: int, n: int | None = None, args=None) -> dict:
    """Greedy answer accuracy of a model folder on the tiny task's held-out prompts (the first `n`), by kind of
    problem; with a stage's training arguments, on its device and in its precision, as the stage measured."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfrecipes.data import tiny_rows
    from hfrecipes.evaluation import heldout_accuracy as accuracy

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    rows = tiny_rows("prompts", "test")[:n]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    if args is not None:
        model.to(args.device)
    with stage_precision(args):
        return accuracy(
            model,
            tok,
            [r["prompt"] for r in rows],
            [r["solution"] for r in rows],
            max_new_tokens=max_new_tokens,
            groups=[r["kind"] for r in rows],
        )


def dpo_margins(policy, tok, rows: list[dict], beta: float, reference=None):
    """DPO's implicit reward margin of each preference row (conversational `prompt`, `chosen`, `rejected`): the
    chosen reply's reward (`reply_rewards`) - the rejected one's."""
    return reply_rewards(policy, tok, rows, "chosen", beta, reference) - reply_rewards(
        policy, tok, rows, "rejected", beta, reference
    )


def reply_rewards(policy, tok, rows: list[dict], key: str, beta: float, reference=None):
    """The implicit reward DPO and KTO give the reply in column `key` of each row (conversational `prompt` and
    reply): beta x the policy's log-probability ratio to the reference on it, in fp32. The reference is the
    adapter-disabled policy when none is given (LoRA)."""
    import contextlib

    import torch

    def reply_logps(model):
        ids, scored = [], []
        for r in rows:
            prompt = tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
            start = len(tok(prompt, add_special_tokens=False)["input_ids"])
            full = tok(tok.apply_chat_template(r["prompt"] + r[key], tokenize=False), add_special_tokens=False)
            ids.append(full["input_ids"])
            scored.append((start, len(ids[-1])))
        width = max(map(len, ids))
        device = next(model.parameters()).device
        batch = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
        with torch.no_grad():
            logits = model(input_ids=batch, attention_mask=mask).logits.float()
        token = logits[:, :-1].log_softmax(-1).gather(-1, batch[:, 1:, None])[..., 0]
        return torch.stack([token[i, s - 1 : e - 1].sum() for i, (s, e) in enumerate(scored)]).cpu()

    mine = reply_logps(policy)
    with policy.disable_adapter() if reference is None else contextlib.nullcontext():
        return beta * (mine - reply_logps(reference if reference is not None else policy))


def default_lm_head() -> str:
    """The LM head sft, dpo and grpo score tokens with unless a recipe says otherwise: TRL's fused head where its
    Triton kernel runs (a CUDA or XPU GPU with triton), the logits head elsewhere."""
    from hfrecipes import modeling

    return "trl" if modeling.has_triton_device() else "logits"


# ------------------------------------------------------------------------------------------ the real model tier

# SmolLM2-135M-Instruct as the GGUF `scripts/setup.sh` fetches. Its tests are marked `realmodel`
# (`pytest -m realmodel` runs them alone); they skip where set-up did not fetch the file, unless CI requires them.
SMOLLM2_GGUF = Path(__file__).resolve().parents[1] / ".venv" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIRE_REAL_MODEL = os.environ.get("HFRECIPES_REQUIRE_REAL_MODEL") == "1"


@pytest.fixture(scope="session")
def smollm2_cache(shared_dir):
    """A conversion cache shared by the test workers: the GGUF is dequantized once per session, under a lock, and
    every stage given the `.gguf` path starts from that folder (`hfrecipes.converting.resolve_gguf`)."""
    if not SMOLLM2_GGUF.is_file():
        if REQUIRE_REAL_MODEL:
            pytest.fail(f"{SMOLLM2_GGUF} is missing: scripts/setup.sh fetches it")
        pytest.skip("the SmolLM2 GGUF is not fetched (scripts/setup.sh)")
    cache = shared_dir / "hfrecipes-cache"
    cache.mkdir(exist_ok=True)
    return cache


@pytest.fixture(scope="session")
def smollm2(smollm2_cache):
    """The converted SmolLM2-135M-Instruct folder (safetensors, tokenizer, base record); sets HFRECIPES_CACHE for
    the session so a stage given the GGUF path finds the same conversion."""
    from hfrecipes import converting
    from hfrecipes.modeling import ModelConfig

    os.environ[converting.CACHE_ENV] = str(smollm2_cache)
    return converting.resolve_gguf(ModelConfig(model_name_or_path=str(SMOLLM2_GGUF)))
