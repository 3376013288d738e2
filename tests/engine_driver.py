"""Run hfrecipes stages in order inside one launched process, for tests/test_scale.py:

    accelerate launch --config_file recipes/accelerate/zero3.yaml ... tests/engine_driver.py PLAN.json

PLAN.json is a list of [stage, keyword arguments of `hfrecipes.<stage>`]. When a stage saves its final model, every
process writes `<output_dir>.rank<N>.json`: the parameter elements it holds itself (a DTensor's local shard under
FSDP2, a ZeRO-3 partition) beside the whole model's, and a hash of what it holds.

With SLOW_RNG_SAVE=<seconds>, every process but the main one waits that long before it saves its RNG state, so a
checkpoint that the main process called finished before the others had written theirs would show.
"""

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

import transformers  # noqa: E402

import hfrecipes  # noqa: E402
from hfrecipes import engines  # noqa: E402
from hfrecipes.stages import ppo_trainer  # noqa: E402


def held(model) -> dict:
    local = whole = 0
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        mine = p.to_local() if hasattr(p, "to_local") else getattr(p, "ds_tensor", p)
        local += mine.numel()
        whole += getattr(p, "ds_numel", None) or p.numel()
        digest.update(name.encode())
        digest.update(mine.detach().float().cpu().numpy().tobytes())
    return {"local": local, "whole": whole, "sha256": digest.hexdigest()}


def spy(cls) -> None:
    save = cls.save_model

    def save_model(self, output_dir=None, _internal_call=False):
        if not _internal_call:
            rank = self.args.process_index
            out = Path(f"{output_dir or self.args.output_dir}.rank{rank}.json")
            out.parent.mkdir(parents=True, exist_ok=True)  # a second machine's folder: only the main process writes
            with open(out, "w") as f:
                json.dump({**held(self.model), "rank": rank}, f)
        return save(self, output_dir, _internal_call)

    cls.save_model = save_model


def slow_rng_save(seconds: float) -> None:
    save = transformers.Trainer._save_rng_state

    def _save_rng_state(self, output_dir):
        if self.args.process_index != 0:
            time.sleep(seconds)
        save(self, output_dir)

    transformers.Trainer._save_rng_state = _save_rng_state


if os.environ.get("SLOW_RNG_SAVE"):
    slow_rng_save(float(os.environ["SLOW_RNG_SAVE"]))
spy(transformers.Trainer)
spy(ppo_trainer.PPOTrainer)
with open(sys.argv[1]) as f:
    plan = json.load(f)
for stage, kwargs in plan:
    getattr(hfrecipes, stage)(**kwargs)
engines.finish()
