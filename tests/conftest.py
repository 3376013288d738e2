"""Shared fixtures: offline, one thread (stable timings on a shared 2-core machine), one tiny pretrained model and
one tiny SFT model on top of it, built once per session and reused by every later-stage test."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


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
def tiny_pretrained(tmp_path_factory):
    """The tiny model pretrained for 80 steps (~20 s): the parent of later-stage tests."""
    import hfrecipes

    out = tmp_path_factory.mktemp("stages") / "pretrain"
    return hfrecipes.pretrain("tiny/pretrain", max_steps=80, output_dir=str(out), logging_steps=10, save_steps=40)


@pytest.fixture(scope="session")
def tiny_sft(tiny_pretrained, tmp_path_factory):
    """Full SFT of the tiny pretrained model on the addition conversations: the parent of reward and DPO tests."""
    import hfrecipes

    out = tmp_path_factory.mktemp("stages") / "sft"
    return hfrecipes.sft(
        "tiny/sft",
        model_name_or_path=str(tiny_pretrained.output_dir),
        output_dir=str(out),
        max_steps=SFT_STEPS,
        logging_steps=10,
        save_strategy="no",
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
