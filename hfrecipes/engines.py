"""The distributed engine a stage runs under (DDP, FSDP2, DeepSpeed ZeRO), read from what `accelerate launch` set, and
the checks that refuse a launch this machine or this recipe cannot run, before any model loads.

`accelerate launch --config_file recipes/accelerate/<ddp|fsdp2|zero2|zero3>.yaml` tells each process its engine
through environment variables (ACCELERATE_USE_DEEPSPEED, ACCELERATE_USE_FSDP, ...). One upstream gap is fenced here:
accelerate turns FSDP on only for GPU-type distributed modes, so on a CPU-only machine an FSDP config runs as plain
DDP, although torch's FSDP2 (`fully_shard`) shards on CPU with gloo. `fsdp_on_cpu()` lets accelerate's own FSDP2
path run there; delete it when accelerate accepts MULTI_CPU for FSDP.

    hfrecipes launch fsdp2 --num_processes 2 --mixed_precision no -- sft --config tiny/sft
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Any

from hfrecipes.errors import UsageError

SHARDED = ("zero3", "fsdp1", "fsdp2")  # engines that split the weights themselves across processes


def requested() -> str:
    """The engine `accelerate launch` asked this process for: zero<N>, fsdp<N>, ddp or single."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return f"zero{env.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '2')}"
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return f"fsdp{env.get('FSDP_VERSION', '1')}"
    return "ddp" if world > 1 else "single"


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def local_capacity() -> tuple[int, str]:
    """How many training processes one machine can run: one per GPU, else one per CPU core this process may use."""
    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return n, f"{n} GPU{'s' if n != 1 else ''}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores, f"no GPU and {cores} CPU core{'s' if cores != 1 else ''}"


def check_processes(local: int, where: str) -> None:
    capacity, what = local_capacity()
    if local > capacity:
        raise UsageError(
            f"{where}: {local} processes on this machine, which has {what}. Pass --num_processes {capacity} (or "
            "fewer; with --num_machines M it counts the processes of all M machines)."
        )


def deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def deepspeed_missing(where: str) -> UsageError:
    return UsageError(
        f"{where} runs DeepSpeed, which is not installed here. Install it with `pip install 'hfrecipes[deepspeed]'` "
        "(or `bash scripts/setup.sh`, which does), or launch with ddp or fsdp2."
    )


def check_environment() -> None:
    """The engine this process was launched with, against this machine: before the recipe is parsed (the training
    arguments already import DeepSpeed). Every process raises the same error."""
    engine = requested()
    if engine.startswith("zero") and not deepspeed_installed():
        raise deepspeed_missing(f"this launch (a ZeRO-{engine[4:]} accelerate config)")
    if engine == "fsdp1" and not _has_gpu():
        raise UsageError(
            "this launch asks for FSDP v1 (fsdp_version: 1), which runs on GPUs only; this machine has none. Launch "
            "with recipes/accelerate/fsdp2.yaml (FSDP v2 shards on CPU too), or with ddp."
        )
    if engine != "single":
        local = os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))
        check_processes(int(local), "accelerate launch")


def check_options(model_args, stage: str) -> None:
    """The stage and the recipe's model switches against the engine, before any model loads."""
    engine = requested()
    if stage == "ppo" and engine.startswith("fsdp"):
        raise UsageError(
            f"ppo under {engine} is not supported: hfrecipes' PPO under FSDP saves a policy whose tied input and "
            "output embeddings have come apart. Launch PPO with zero3 (which shards the weights too), zero2 or ddp."
        )
    sharded = engine in SHARDED
    if sharded and getattr(model_args, "load_in_8bit", False):
        raise UsageError(
            f"load_in_8bit: true under {engine}: 8-bit weights cannot be sharded across processes. Use load_in_4bit "
            "with bnb_4bit_quant_storage, or launch with ddp or zero2."
        )
    storage = getattr(model_args, "bnb_4bit_quant_storage", None)
    if sharded and getattr(model_args, "load_in_4bit", False) and storage in (None, "uint8"):
        raise UsageError(
            f"load_in_4bit: true under {engine}: the engine shards weights by their storage dtype, and QLoRA packs "
            "4-bit weights in uint8 bytes it cannot split. Set bnb_4bit_quant_storage to the dtype the run trains "
            "in (bfloat16 on a GPU), or launch with ddp or zero2."
        )


@functools.cache
def fsdp_on_cpu() -> None:
    """Let accelerate run its FSDP2 path on a CPU-only machine (gloo), where it would silently run DDP instead.

    `AcceleratorState` picks FSDP only when the distributed type is a GPU kind (MULTI_GPU, MULTI_XPU, ...); on CPU it
    stays MULTI_CPU and `prepare` wraps the model in DDP. After the state is built, this sets the FSDP type and
    plugin the state would have set on a GPU machine, in the process state too (accelerate does the same there).
    The rest (`fully_shard` per decoder layer, the full state dict at save) is accelerate's and torch's own code.
    FSDP v1 needs a GPU: `check_environment` refuses it on CPU."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or os.environ.get("FSDP_VERSION") != "2":
        return
    import torch

    if torch.cuda.is_available():
        return
    from accelerate import state as accelerate_state
    from accelerate.utils import DistributedType

    init = accelerate_state.AcceleratorState.__init__

    @functools.wraps(init)
    def __init__(self, *args, fsdp_plugin=None, **kwargs: Any):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # every later `AcceleratorState()` copies the process state over its own, as on a GPU machine
            accelerate_state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    accelerate_state.AcceleratorState.__init__ = __init__


@contextlib.contextmanager
def every_process_loads():
    """Load a model that no engine will prepare (a frozen reference, a reward model) in full on every process.

    Under FSDP with `fsdp_cpu_ram_efficient_loading: true`, transformers reads the weights on the first process of
    each machine only and leaves the others' uninitialised, counting on `accelerator.prepare` to broadcast them; a
    model that is never prepared would keep garbage on those processes."""
    key = "FSDP_CPU_RAM_EFFICIENT_LOADING"
    saved = os.environ.pop(key, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[key] = saved


def finish() -> None:
    """End a launched run's process group once every process is done. Left to interpreter exit, gloo's threads are torn
    down while a peer may still be closing its connections; across machines that aborts a process that had finished
    its work ('terminate called without an active exception', exit -6) and `accelerate launch` reports a failure."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
