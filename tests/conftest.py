"""Shared fixtures: offline, one thread (stable timings on a shared 2-core machine), one tiny pretrained model and
one tiny SFT model on top of it, built once per session and reused by every later-stage test."""

from __future__ import annotations

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
    "test_ladder.py", "test_real_rl.py", "test_real_model.py", "test_scale.py", "test_reward.py", "test_ppo.py",
)  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)


from hfrecipes.inference import vllm_available  # noqa: E402  (after the offline switches above)

# Tests of the real vLLM engine skip where it is not installed, unless CI requires it (`.ci/run` sets this)
REQUIRE_VLLM = os.environ.get("HFRECIPES_REQUIRE_VLLM") == "1"
needs_vllm = pytest.mark.skipif(not vllm_available() and not REQUIRE_VLLM, reason="vLLM is not installed")


# Two real gloo processes on CPU: `--multi_gpu` (with the stages' use_cpu), not `--cpu`, which silently runs one.
TWO_CPU_PROCESSES = [
    sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
    "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
]  # fmt: skip


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory, worker_id):
    """A folder both test workers see (the session's base folder above each worker's own)."""
    root = tmp_path_factory.getbasetemp()
    shared = (root.parent if worker_id != "master" else root) / "shared"
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
    or "trl" (TRL's fused head). Both wrappers copy the model's own forward's name, so the code is compared."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits" if model.forward.__code__.co_filename.endswith("stages/common.py") else "trl"


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
