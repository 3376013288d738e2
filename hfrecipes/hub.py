"""Push a finished stage folder to the Hugging Face Hub with huggingface_hub, never leaking the token.

hfrecipes push runs/tiny/pretrain --repo-id me/tiny-pretrain --private

In a recipe, `push_to_hub: true` (with `hub_model_id` and `hub_private_repo`) pushes the stage folder once the
stage has written its model, record and card. `runner.run_stage` takes that switch away from the Trainer before the
stage builds it (the Trainer would create the repo when it is built and push README files of its own), so no
stage needs code for it. The token comes from `HF_TOKEN` or `hf auth login`, never from a recipe or a flag: a
token there would be saved with the run. A re-push of an unchanged folder creates no commit (huggingface_hub
compares each file's git hash with the one the Hub reports and drops unchanged files).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hfrecipes import record
from hfrecipes.errors import UsageError
from hfrecipes.report import card

logger = logging.getLogger(__name__)

# Not part of the model: checkpoints, the run marker, half-written temporary files, pickled training arguments
# (record.json holds the resolved recipe) and trainer logs.
IGNORE_PATTERNS = [
    "checkpoint-*",
    "checkpoint-*/**",
    record.MARKER,
    "*.tmp",
    "training_args.bin",
    "runs/**",
    "merged/**",  # the merged copy a LoRA stage keeps for the stages after it (modeling.py)
]


def take_over_push(*dataclasses) -> dict[str, Any] | None:
    """If a parsed config asks to push, turn the Trainer's own push off and return what to push where."""
    for args in dataclasses:
        if getattr(args, "push_to_hub", False):
            args.push_to_hub = False
            return {
                "repo_id": getattr(args, "hub_model_id", None) or Path(args.output_dir).resolve().name,
                "private": getattr(args, "hub_private_repo", None),
            }
    return None


def scrub(text: str, token: str | None) -> str:
    """`text` with every occurrence of the token replaced by `***`."""
    if token:
        text = text.replace(token, "***")
    return text


def push(
    folder: str | Path, repo_id: str, private: bool | None = None, commit_message: str | None = None
) -> dict[str, Any]:
    """Upload a finished stage folder to a model repo (created if missing); returns repo_id, url, commit, changed."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UsageError(f"repo id '{repo_id}' is not one the Hub takes: {' '.join(str(e).split())}") from None
    folder = Path(folder)
    rec = record.read_record(folder)
    if rec is None or rec.get("status") != "complete":
        raise UsageError(f"'{folder}' is not a finished stage folder (no complete record.json); nothing was pushed.")
    token = get_token()
    if not token:
        raise UsageError(
            "no Hugging Face token: set the HF_TOKEN environment variable or run `hf auth login`, then push again."
        )
    api = HfApi()  # the client reads the same token itself; it is never passed around here
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if (rec.get("hub") or {}).get("repo_id") != repo_id:
            # The card's usage snippets and the next stage's base_model name the repo, not a local path.
            rec["hub"] = {"repo_id": repo_id}
            record.write_record(folder, rec)
            card.write_card(folder, rec, plots=False)
        before = api.repo_info(repo_id).sha
        info = api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            ignore_patterns=list(IGNORE_PATTERNS),
            commit_message=commit_message or f"hfrecipes: {rec['stage']} stage (run {rec.get('run_id')})",
        )
    except UsageError:
        raise
    except Exception as e:  # huggingface_hub's HTTP and validation errors; the message must not carry the token
        raise UsageError(
            f"push of '{folder}' to '{repo_id}' failed: {scrub(f'{type(e).__name__}: {e}', token)}"
        ) from None
    changed = info.oid != before
    logger.info("pushed %s to %s (%s)", folder, repo_id, "new commit" if changed else "unchanged, no commit")
    return {"repo_id": repo_id, "url": info.commit_url, "commit": info.oid, "changed": changed}
