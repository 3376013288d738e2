"""Push round trips through a loopback Hub with the real huggingface_hub client; the token never leaks.

pytest tests/test_hub.py -q

huggingface_hub reads HF_ENDPOINT when it is imported, so every push runs in a subprocess whose environment points
at the loopback server.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

from hfrecipes import hub, record
from hfrecipes.errors import UsageError
from hfrecipes.report import card
from tests.hub_server import HubServer

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_FakeTokenForLoopbackTests0123456789"


@pytest.fixture
def server():
    with HubServer() as s:
        yield s


@pytest.fixture
def stage_dir(tmp_path):
    """A finished stage folder: record, card, a binary 'weights' file with every byte value, a checkpoint."""
    folder = tmp_path / "stage"
    rec = record.new_record("sft", {"path": None, "values": {"learning_rate": 1e-3}}, None)
    rec.update(
        status="complete",
        model={"model_type": "llama", "params_total": 1000, "source": "random init from 'tiny'", "adapter": None},
        data={"datasets": [{"name": "tiny:sft"}], "tokens_seen": 100},
        compute=record.compute_summary(1000, 100, 0.0, 2.0, {"kind": "cpu", "name": "x86_64", "count": 1}),
        metrics={"steps": 3},
    )
    record.write_record(folder, rec)
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 3.0 - i}) + "\n" for i in range(3)))
    card.write_card(folder, rec)
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 4096 + os.urandom(1000))
    (folder / "sub").mkdir()
    (folder / "sub" / "notes.txt").write_text("nested file\n")
    (folder / "checkpoint-3").mkdir()
    (folder / "checkpoint-3" / "optimizer.pt").write_bytes(b"not for the Hub")
    (folder / "training_args.bin").write_bytes(b"pickle")
    return folder


def _env(server, tmp_path, token=TOKEN):
    env = {k: v for k, v in subprocess_env().items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(
        HF_ENDPOINT=server.url,
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_VERBOSITY="debug",  # the captured log is as talkative as it gets
        NO_PROXY="127.0.0.1,localhost",
    )
    if token:
        env["HF_TOKEN"] = token
    return env


def _run(env, *args, code=None):
    command = [sys.executable, "-m", "hfrecipes", *args] if code is None else [sys.executable, "-c", code]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _assert_no_token(*folders, repo=None):
    """The token is in no file of the folders (each file read whole, at any depth) nor of the Hub's copy."""
    for folder in folders:
        found = [name for name, data in _files(folder).items() if TOKEN.encode() in data]
        assert not found, f"the token is in {found} of {folder}"
    if repo is not None:
        assert not [name for name, data in repo.files.items() if TOKEN.encode() in data]


def test_push_round_trip_is_byte_identical_and_a_second_push_is_a_no_op(server, stage_dir, tmp_path):
    env = _env(server, tmp_path)
    first = _run(env, "push", str(stage_dir), "--repo-id", "me/tiny-sft", "--private")
    assert first.returncode == 0, first.stderr
    assert "new commit" in first.stdout
    repo = server.repos["me/tiny-sft"]
    assert repo.private and len(repo.commits) == 1
    local = _files(stage_dir)
    expected = {k: v for k, v in local.items() if not k.startswith("checkpoint-") and k != "training_args.bin"}
    assert repo.files == expected  # byte-identical, checkpoints and pickles left home
    assert "sub/notes.txt" in repo.files and record.MARKER not in repo.files
    assert json.loads(repo.files["record.json"])["hub"] == {"repo_id": "me/tiny-sft"}
    assert 'from_pretrained("me/tiny-sft")' in repo.files["README.md"].decode()

    second = _run(env, "push", str(stage_dir), "--repo-id", "me/tiny-sft")
    assert second.returncode == 0, second.stderr
    assert "unchanged, no new commit" in second.stdout
    assert len(repo.commits) == 1 and _files(stage_dir) == local
    assert [r for r in server.requests if r.endswith("/commit/main")] == ["POST /api/models/me/tiny-sft/commit/main"]

    # The files come back through the client's download path too; a missing one is EntryNotFound.
    local_weights = str(stage_dir / "model.safetensors")
    code = (
        "from huggingface_hub import hf_hub_download\n"
        "from huggingface_hub.errors import EntryNotFoundError\n"
        "p = hf_hub_download('me/tiny-sft', 'model.safetensors')\n"
        f"print(open(p, 'rb').read() == open({local_weights!r}, 'rb').read())\n"
        "try:\n    hf_hub_download('me/tiny-sft', 'nope.txt')\nexcept EntryNotFoundError:\n    print('missing')\n"
    )
    back = _run(env, code=code)
    assert back.stdout.split() == ["True", "missing"], back.stderr

    # The token was used (every write carried it) and appears nowhere: not in files, logs or the Hub's copy.
    assert f"Bearer {TOKEN}" in server.auth_headers
    for proc in (first, second, back):
        assert TOKEN not in proc.stdout + proc.stderr
    _assert_no_token(stage_dir, tmp_path / "hf_home", repo=repo)


def test_changed_file_makes_one_new_commit_with_only_that_file(server, stage_dir, tmp_path):
    env = _env(server, tmp_path)
    assert _run(env, "push", str(stage_dir), "--repo-id", "me/x").returncode == 0
    (stage_dir / "sub" / "notes.txt").write_text("changed\n")
    again = _run(env, "push", str(stage_dir), "--repo-id", "me/x")
    assert again.returncode == 0, again.stderr
    commits = server.repos["me/x"].commits
    assert len(commits) == 2 and commits[-1]["files"] == ["sub/notes.txt"]
    _assert_no_token(stage_dir, tmp_path / "hf_home", repo=server.repos["me/x"])


def test_errors_never_show_the_token(server, stage_dir, tmp_path):
    # The fake server echoes the Authorization header in its error message for this repo name.
    refused = _run(_env(server, tmp_path), "push", str(stage_dir), "--repo-id", "me/refuse")
    assert refused.returncode == 2
    assert "refused for Bearer ***" in refused.stderr and TOKEN not in refused.stdout + refused.stderr
    traceback = _run(_env(server, tmp_path), "--debug", "push", str(stage_dir), "--repo-id", "me/refuse")
    assert "Traceback" in traceback.stderr and TOKEN not in traceback.stdout + traceback.stderr
    missing = _run(_env(server, tmp_path, token=None), "push", str(stage_dir), "--repo-id", "me/x")
    assert missing.returncode == 2 and "HF_TOKEN" in missing.stderr and "me/x" not in server.repos
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    assert (
        "not a finished stage folder"
        in _run(_env(server, tmp_path), "push", str(unfinished), "--repo-id", "a/b").stderr
    )
    _assert_no_token(stage_dir, unfinished, tmp_path / "hf_home")  # a failed push writes it nowhere either


def test_token_is_refused_in_recipes(tmp_path):
    from hfrecipes.api import parse_stage_args

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"dataset_name: tiny:corpus\nhub_token: {TOKEN}\n")
    for kwargs in ({}, {"cli_args": ["--hub_token", TOKEN]}):
        with pytest.raises(UsageError) as e:
            parse_stage_args("pretrain", recipe if not kwargs else "tiny/pretrain", **kwargs)
        assert "hub_token" in str(e.value) and "HF_TOKEN" in str(e.value) and TOKEN not in str(e.value)


def test_take_over_push_turns_the_trainers_push_off():
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir="runs/x", push_to_hub=True, hub_model_id="me/x", hub_private_repo=True)
    assert hub.take_over_push(object(), args) == {"repo_id": "me/x", "private": True}
    assert args.push_to_hub is False
    assert hub.take_over_push(TrainingArguments(output_dir="runs/y")) is None


@pytest.mark.slow
def test_push_to_hub_in_a_recipe_pushes_the_finished_stage(server, tmp_path):
    out = tmp_path / "run"
    flags = ["--max_steps", "2", "--max_train_samples", "200", "--block_size", "32", "--save_strategy", "no"]
    flags += ["--output_dir", str(out), "--push_to_hub", "true", "--hub_model_id", "me/pretrained"]
    proc = _run(_env(server, tmp_path), "pretrain", "--config", "tiny/pretrain", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    repo = server.repos["me/pretrained"]
    assert len(repo.commits) == 1 and repo.files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert "library_name: transformers" in repo.files["README.md"].decode()
    assert TOKEN not in proc.stdout + proc.stderr
    _assert_no_token(out, tmp_path / "hf_home", repo=repo)  # the stage folder it wrote and pushed, at any depth
