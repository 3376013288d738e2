"""vLLM in one place: whether it is installed, its defaults on a CPU-only machine, the engine built for a model
folder, and what TRL's colocated engine needs to train under the vLLM version hfrecipes installs. Everything here
that names a vLLM or TRL internal (and the version it holds for) is fenced off in this file; generation through the
engine (`inference`), export's check (`exporting`) and the server (`serving`) call it.

    hfrecipes grpo --config tiny/grpo --use_vllm true --vllm_mode colocate
    hfrecipes generate runs/tiny/export --prompts prompts.jsonl --engine vllm

Named `vllm_support`, not `vllm`: a module `hfrecipes/vllm.py` would be `vllm` itself to a script run from inside
the package folder and to any reader of `from hfrecipes import vllm`, while this file imports the real one.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def cpu_vllm_defaults() -> None:
    """On a CPU-only machine, unless set: vLLM runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) with a 1 GiB KV
    cache (`VLLM_CPU_KVCACHE_SPACE`, GiB). Without it vLLM's CPU worker sizes the cache as a share of all memory
    (`gpu_memory_utilization`) minus what the process already holds, which fails in a process that trains."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def check_use_vllm(use_vllm: bool) -> None:
    """A stage whose recipe sets `use_vllm: true` (TRL generating through vLLM) stops before any model loads where
    vLLM is not installed, and takes `cpu_vllm_defaults` where it is."""
    from hfrecipes.errors import UsageError

    if not use_vllm:
        return
    if not vllm_available():
        raise UsageError(
            "use_vllm: true needs vLLM: pip install 'hfrecipes[vllm]' on a GPU machine or 'hfrecipes[vllm-cpu]' "
            "on a CPU-only x86 Linux one; or set use_vllm: false (transformers generation)."
        )
    cpu_vllm_defaults()


def vllm_engine(model_dir: str | Path, seed: int = 0, max_model_len: int | None = None):
    """A vLLM engine for a model folder, and its SamplingParams class (`cpu_vllm_defaults` on a CPU)."""
    cpu_vllm_defaults()
    from vllm import LLM, SamplingParams

    # vLLM's "auto" casts float32 checkpoints down to 16 bits; serve the dtype the folder was exported in, so its
    # tokens are the ones transformers gives.
    config = json.loads((Path(model_dir) / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype") or "auto"
    kwargs = {"max_model_len": max_model_len} if max_model_len else {}
    llm = LLM(model=str(model_dir), dtype=dtype, seed=seed, trust_remote_code=False, enforce_eager=True, **kwargs)
    return llm, SamplingParams


def fit_colocate_weight_sync(generation) -> bool:
    """Make TRL's colocated vLLM engine (GRPO's and RLOO's `use_vllm`, `vllm_mode: colocate`) take each step's
    weights under vLLM 0.32, the vllm-cpu extra's version; returns whether TRL's sync was replaced.

    TRL 1.16 (tested with vLLM up to 0.31) pushes the policy tensor by tensor through the engine model's
    `load_weights`, but vLLM 0.32 repacks weights after loading (its CPU linear layers then have no `weight_loader`),
    so the first sync fails. vLLM 0.32's in-place `reload_weights` takes the same checkpoint-format tensors. The
    tensors are streamed, not collected: under LoRA they are the merged weights only until TRL's iterator unmerges.
    """
    import types

    if generation is None or generation.mode != "colocate" or generation.enable_sleep_mode:
        return False
    import vllm
    from packaging.version import Version

    if Version(vllm.__version__).release < (0, 32):
        return False
    generation.sync_weights = types.MethodType(colocate_reload_weights, generation)
    return True


def colocate_reload_weights(generation) -> None:
    """The weight sync `fit_colocate_weight_sync` gives TRL's `VLLMGeneration`: the policy's tensors streamed
    through the colocated engine's in-place `reload_weights`, then the prefix cache dropped.

    A tied output embedding (`tie_word_embeddings`) is not in the stream: it shares the input embedding's tensor.
    On a CPU, though, vLLM projects the logits through a GEMM it prepared from a packed copy of that tensor (oneDNN's
    float32 kernels, the AMX bfloat16 ones), and `reload_weights` prepares again only the layers it loads, so the
    engine would keep the old head. Its preparation is rerun from the shared tensor (off a CPU it does nothing)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    runner = generation.llm.llm_engine.model_executor.driver_worker.model_runner
    weights = generation._iter_named_params()
    names = set()

    def streamed():
        for name, tensor in weights:
            names.add(name)
            yield name, tensor

    runner.reload_weights(weights_iterator=streamed())
    for _ in weights:  # TRL's iterator unmerges LoRA adapters when it is exhausted
        pass
    head = getattr(runner.get_model(), "lm_head", None)
    method = getattr(head, "quant_method", None)
    if "lm_head.weight" not in names and isinstance(method, UnquantizedEmbeddingMethod):
        method.process_weights_after_loading(head)
    generation.llm.reset_prefix_cache()


def lm_eval_vllm():
    """lm-evaluation-harness' vLLM backend class (`hfrecipes eval --engine vllm`). lm-eval reads vLLM's version from
    the `vllm` distribution at import, and the CPU build installs as `vllm-cpu`: the lookup answers with that one's
    version for the import, and the module keeps it."""
    import importlib.metadata as metadata

    from vllm.platforms import current_platform

    current_platform.device_type  # noqa: B018 (vLLM picks its platform from its own version lookup: before the patch)
    real = metadata.version

    def version(name: str) -> str:
        if name == "vllm":
            try:
                return real("vllm")
            except metadata.PackageNotFoundError:
                return real("vllm-cpu")
        return real(name)

    metadata.version = version
    try:
        from lm_eval.models.vllm_causallms import VLLM
    finally:
        metadata.version = real
    return VLLM
