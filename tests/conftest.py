"""Shared fixtures: offline, one thread (stable timings on a shared 2-core machine), one tiny pretrained model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory):
    """The tiny model pretrained for 80 steps (~20 s): the parent of later-stage tests."""
    import hfrecipes

    out = tmp_path_factory.mktemp("stages") / "pretrain"
    return hfrecipes.pretrain("tiny/pretrain", max_steps=80, output_dir=str(out), logging_steps=10, save_steps=40)
