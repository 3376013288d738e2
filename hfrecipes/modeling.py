"""Models and tokenizers: from a config (random weights), from a checkpoint or a GGUF file, and the embedded tiny
tokenizer; LoRA and QLoRA wiring from the recipe's switches (`use_peft`, `lora_*`, `load_in_4bit`).

Safe by default: `trust_remote_code` only when the recipe sets it, and weights from safetensors only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import trl

from hfrecipes.errors import UsageError


@dataclass
class ModelConfig(trl.ModelConfig):
    """TRL's model options (LoRA, QLoRA, dtype, attention) plus hfrecipes' safety switches."""

    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code from the checkpoint's repository. Off unless you trust it."}
    )
    allow_pickle_weights: bool = field(
        default=False,
        metadata={"help": "Allow pickled `.bin` weights (can run arbitrary code). Off: safetensors only."},
    )
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "A GGUF file inside model_name_or_path (a folder or Hub repo), loaded dequantized. A "
            "model_name_or_path that is itself a `.gguf` file sets this for you."
        },
    )


def _has_cuda_or_xpu() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def has_accelerator() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return _has_cuda_or_xpu() or (mps is not None and mps.is_available())


def inference_device() -> str:
    """Where a model loaded for generation runs: the device kind the stage record names (cuda, mps or cpu)."""
    from hfrecipes.record import device_info

    return device_info(1)["kind"]


def has_triton_device() -> bool:
    """A CUDA or XPU GPU with Triton installed: where TRL's fused LM head runs as a compiled kernel."""
    import importlib.util

    return _has_cuda_or_xpu() and importlib.util.find_spec("triton") is not None


def tf32_supported() -> bool:
    """TF32 tensor-core matmuls: CUDA GPUs of compute capability 8.0 (Ampere) and newer."""
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8)


def bf16_supported() -> bool:
    """bf16 mixed precision: a CUDA GPU that has it (Ampere and newer), or an XPU."""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    return bool(hasattr(torch, "xpu") and torch.xpu.is_available())


def resolve_device_defaults(args) -> None:
    """The one place a stage config's device defaults are resolved, for every stage (pretraining included); call at
    the top of the config's `__post_init__`, before `TrainingArguments.__post_init__` acts on them. A value the
    recipe set is kept (an impossible one is refused by `check_device` before this runs).

    - No accelerator: train on the CPU in fp32. `use_cpu=True`, so `accelerate launch --multi_gpu` gives gloo DDP
      instead of one process per rank training alone; bf16/fp16 off (TRL configs default bf16 on, which a CPU-only
      machine refuses); TF32 untouched (it does not exist there).
    - A GPU with bf16 (`bf16: null`): bf16 mixed precision, fp32 master weights and optimizer state.
    - Ampere and newer (`tf32: null`): TF32 for the matmuls left in fp32 (the optimizer step, fp32 layers), which
      costs fp32 matmuls 8x on those chips for a mantissa bf16 training does not miss.
    - The optimizer: transformers' fused AdamW (`adamw_torch_fused`, its default from torch 2.8) is kept; one
      kernel per parameter group instead of one launch per tensor, which matters on a GPU.
    - Attention is the model's (`attn_implementation`, ModelConfig): SDPA unless the recipe asks for another;
      `check_device` refuses flash-attention where it is not installed.
    """
    if not has_accelerator():
        args.use_cpu = True
        args.bf16 = False
        args.fp16 = False
        return
    if args.bf16 is None:
        args.bf16 = not args.fp16 and bf16_supported()
    if getattr(args, "tf32", None) is None and tf32_supported():
        args.tf32 = True


def precision(args) -> str:
    """The precision a stage trains in, as the record states it."""
    if args.bf16:
        return "bf16 mixed precision (fp32 master weights)"
    if args.fp16:
        return "fp16 mixed precision (fp32 master weights)"
    return "fp32 with TF32 matmuls" if args.tf32 else "fp32"


def check_device(values: dict[str, Any]) -> None:
    """A recipe that asks for hardware or kernels this machine lacks stops here, before anything loads. Unset
    precision falls back to fp32 on a CPU-only machine (`resolve_device_defaults`); an explicit `bf16: true` or
    `fp16: true` there is refused rather than silently dropped."""
    import importlib.util

    import torch

    if values.get("use_liger_kernel") and not has_triton_device():
        raise UsageError(
            "use_liger_kernel: true needs Liger's Triton kernels on a CUDA (or XPU) GPU with triton installed, and "
            "this machine has none. Remove use_liger_kernel, or run on such a GPU."
        )
    if values.get("use_liger_kernel") and importlib.util.find_spec("liger_kernel") is None:
        raise UsageError("use_liger_kernel: true needs the liger-kernel package: pip install liger-kernel.")
    attn = str(values.get("attn_implementation") or "")
    if attn.startswith("flash_attention") and importlib.util.find_spec("flash_attn") is None:
        raise UsageError(
            f"attn_implementation: {attn} needs the flash-attn package, which is not installed. Install it "
            "(pip install flash-attn) or remove attn_implementation (SDPA is the default)."
        )
    if values.get("use_cpu"):
        return
    for key in ("bf16", "fp16", "tf32"):
        if values.get(key) and not has_accelerator():
            raise UsageError(
                f"{key}: true needs a GPU, and this machine has none (torch sees no CUDA, XPU or MPS device). "
                f"Remove {key} (CPU training runs in fp32) or run on a machine with a GPU."
            )
    if values.get("bf16") and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise UsageError("bf16: true, but this GPU does not support bf16. Set fp16: true instead, or remove bf16.")
    if values.get("tf32") and torch.cuda.is_available() and not tf32_supported():
        raise UsageError("tf32: true needs an Ampere or newer GPU (compute capability 8.0+). Remove tf32.")


def check_vocab(tokenizer, vocab_size: int | None, name: str) -> None:
    """A tokenizer whose ids go past the model's embedding table would index out of range at the first batch."""
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise UsageError(
            f"the tokenizer of '{name}' has {len(tokenizer)} tokens but the model's vocabulary (vocab_size) has "
            f"{vocab_size}: they do not belong together. Use the tokenizer saved with the model."
        )


def load_tokenizer(
    name_or_path: str, trust_remote_code: bool = False, revision: str | None = None, gguf_file: str | None = None
):
    from transformers import AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, revision=revision, **extra
        )
    except Exception as e:  # tokenizers raises a bare Exception on a tokenizer.json it cannot read
        raise UsageError(
            f"tokenizer '{name_or_path}' could not be loaded ({type(e).__name__}: {' '.join(str(e).split())}): its "
            "files are damaged, or were written by another version of the library. Save or download it again."
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def train_tiny_tokenizer(texts, vocab_size: int, model_max_length: int):
    from hfrecipes.tiny.tokenizer import train_tokenizer

    return train_tokenizer(texts, vocab_size=vocab_size, model_max_length=model_max_length)


# Sizes of a model config that are counts of at least one (0 builds a model with no layers, heads or width).
CONFIG_COUNTS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


def check_init_overrides(default, config, overrides: dict[str, Any]) -> None:
    """model_init_overrides names fields of the config and gives its sizes as counts. A config keeps a key it does
    not know as a plain attribute, which the model ignores: a key `default` (the config without overrides) lacks and
    `config` kept is unknown; one the config consumed (`rope_theta` into `rope_parameters`) is not."""
    unknown = sorted(k for k in overrides if not hasattr(default, k) and hasattr(config, k))
    if unknown:
        raise UsageError(
            f"model_init_overrides {unknown}: not a field of {type(config).__name__}, which would keep and ignore it. "
            "Check the spelling against the model's config.json."
        )
    for key in CONFIG_COUNTS:
        value = overrides.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"model_init_overrides: '{key}' has value {value!r}, expected a whole number >= 1.")


def checked_init_config(source: str, overrides: dict[str, Any] | None, trust_remote_code: bool = False):
    """The config `model_init_config` names with `model_init_overrides` applied, the overrides checked; no tokenizer
    needed, so a stage checks it before any data or tokenizer work (`runner.run_stage`)."""
    from transformers import AutoConfig

    overrides = dict(overrides or {})
    if source == "tiny":
        from hfrecipes.tiny import tiny_config

        default, config = tiny_config(), tiny_config(**overrides)
    else:
        try:
            default = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **overrides)
        except (OSError, ValueError) as e:
            raise UsageError(f"model_init_config '{source}' could not be loaded: {e}") from None
    check_init_overrides(default, config, overrides)
    return config


def config_from(source: str, overrides: dict[str, Any] | None, tokenizer, trust_remote_code: bool = False):
    """A model config to initialise randomly: `tiny` (embedded) or a config folder/Hub id, with overrides.

    The vocabulary and special-token ids follow the tokenizer, so a freshly trained tokenizer always fits.
    """

    config = checked_init_config(source, overrides, trust_remote_code)
    config.vocab_size = len(tokenizer)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


def init_model(config, seed: int, attn_implementation: str | None = None):
    """Random weights from `config`, deterministic for `seed`; attention as the recipe asks (None: transformers'
    choice, SDPA where the architecture has it)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


def converted_from(folder: str | Path) -> str:
    """' (converted from FILE.gguf)' for a folder `hfrecipes convert` wrote, so a message names the file the user
    gave; '' for any other folder (a damaged record there is left to the stage's own checks)."""
    from hfrecipes.record import BASE, load_record

    try:
        rec = load_record(Path(folder).expanduser())
    except UsageError:
        return ""
    gguf = rec.gguf if rec is not None and rec.stage == BASE else None
    return f" (converted from {gguf.file})" if gguf is not None and gguf.file else ""


def check_model_path(name_or_path: str, field: str = "model_name_or_path") -> None:
    """A local path that is not there, or whose files are damaged, fails here, before anything loads (Hub ids pass
    through)."""
    p = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or p.suffix in (".gguf", ".safetensors")
    if looks_local and not p.exists():
        raise UsageError(f"{field} '{name_or_path}' does not exist. Check the path.")
    if p.exists():
        check_model_files(p, field)


# The JSON files of a checkpoint folder that transformers, tokenizers and PEFT read; each holds one JSON object.
MODEL_JSON_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "chat_template.json",
    "adapter_config.json",
    "model.safetensors.index.json",
    "adapter_model.safetensors.index.json",
)
DAMAGED = "the checkpoint is damaged or was cut short while being written or downloaded; save or download it again"


def check_model_files(path: str | Path, field: str = "model_name_or_path") -> None:
    """A local checkpoint whose files a load would fail on, found from what is cheap to read: every JSON file parses
    to an object; every safetensors header parses and its tensors fit in the file (a file cut short does not); the
    shards an index names are there; a GGUF's header and tensor table fit in the file. No weights are read. An
    adapter's local base model is checked the same way. A folder or file that is not there is left to the caller."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            check_gguf(path, field)
        elif path.suffix == ".safetensors":
            _check_safetensors(path, field)
        return
    if not path.is_dir():
        return
    loaded = {}
    for name in MODEL_JSON_FILES:
        if (path / name).is_file():
            loaded[name] = _json_object(path / name, field)
    for index_name in ("model.safetensors.index.json", "adapter_model.safetensors.index.json"):
        weight_map = loaded.get(index_name, {}).get("weight_map")
        missing = sorted({s for s in (weight_map or {}).values() if not (path / s).is_file()})
        if missing:
            raise UsageError(
                f"{field}: {path / index_name} names shard(s) {', '.join(missing[:3])} that the folder does not "
                f"hold; {DAMAGED}."
            )
    for weights in sorted(path.glob("*.safetensors")):
        _check_safetensors(weights, field)
    base = loaded.get("adapter_config.json", {}).get("base_model_name_or_path")
    if isinstance(base, str) and Path(base).expanduser().is_dir() and Path(base).expanduser() != path:
        check_model_files(base, f"{field}'s base model (adapter_config.json base_model_name_or_path)")


def _json_object(file: Path, field: str) -> dict:
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{field}: {file} is not UTF-8 text, so not JSON; {DAMAGED}.") from None
    if not text.strip():
        raise UsageError(f"{field}: {file} is empty; {DAMAGED}.")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{field}: {file} is not valid JSON ({e}); {DAMAGED}.") from None
    if not isinstance(value, dict):
        raise UsageError(f"{field}: {file} holds a JSON {type(value).__name__}, expected an object; {DAMAGED}.")
    return value


def _check_safetensors(file: Path, field: str) -> None:
    """safetensors checks its header against the file's length when it opens one: a file cut short, or with
    garbage where the header should be, fails here without a tensor being read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="numpy"):
            pass
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{field}: {file} is not a readable safetensors file ({e}); {DAMAGED}.") from None


def check_gguf(file: Path, field: str = "model_name_or_path") -> None:
    """A GGUF file whose header, metadata or tensor table is broken, or whose tensors end past the end of the file
    (a download cut short), fails here. The tables are walked without decoding them (gguf's own reader turns every
    vocabulary string into an object, seconds for a large vocabulary), and no tensor data is read."""
    import mmap
    import struct

    try:
        from gguf import GGML_QUANT_SIZES
    except ImportError:
        raise UsageError(
            f"{field}: '{file}' is a GGUF file, and reading one needs the gguf package: pip install gguf."
        ) from None

    def damaged(why: str) -> UsageError:
        return UsageError(
            f"{field}: {file} is not a readable GGUF file ({why}); it is damaged or was cut short. Download it again."
        )

    size = file.stat().st_size
    if size < 24:
        raise damaged(f"{size} bytes, shorter than a GGUF header")
    with file.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF":
            raise damaged("it does not start with the GGUF magic bytes")
        if struct.unpack_from(">I", m, 4)[0] in (2, 3):  # a big-endian GGUF: left to the gguf package to read
            return
        try:
            data_start, tensors = _gguf_tables(m)
        except (struct.error, ValueError) as e:
            raise damaged(f"its header is cut short or garbled: {e}") from None
    for name, shape, kind, offset in tensors:
        if kind not in GGML_QUANT_SIZES:
            raise damaged(f"tensor '{name}' has unknown type {kind}")
        block, block_bytes = GGML_QUANT_SIZES[kind]
        count = 1
        for d in shape:
            count *= d
        end = data_start + offset + count // block * block_bytes
        if end > size:
            raise damaged(f"tensor '{name}' ends at byte {end}, past the end of the file at {size}")


# Byte sizes of GGUF's fixed-size metadata value types (gguf.GGUFValueType); 8 is a string, 9 an array.
_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _gguf_tables(m) -> tuple[int, list[tuple[str, list[int], int, int]]]:
    """(byte where tensor data starts, [(name, shape, ggml type, offset)]) of a little-endian GGUF v2/v3 file."""
    import struct

    size = len(m)

    def at(fmt: str, pos: int):
        values = struct.unpack_from("<" + fmt, m, pos)
        return values, pos + struct.calcsize("<" + fmt)

    def skip(kind: int, pos: int) -> int:
        if kind in _GGUF_SCALARS:
            pos += _GGUF_SCALARS[kind]
        elif kind == 8:
            (n,), pos = at("Q", pos)
            pos += n
        elif kind == 9:
            (item, count), pos = at("IQ", pos)
            if item in _GGUF_SCALARS:
                pos += count * _GGUF_SCALARS[item]
            else:
                for _ in range(count):
                    pos = skip(item, pos)
                    if pos > size:
                        break
        else:
            raise ValueError(f"unknown metadata type {kind}")
        if pos > size:
            raise ValueError("the metadata runs past the end of the file")
        return pos

    (version, n_tensors, n_kv), pos = at("IQQ", 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version}, expected 2 or 3")
    alignment = 32
    for _ in range(n_kv):
        (n,), pos = at("Q", pos)
        key = bytes(m[pos : pos + n])
        (kind,), pos = at("I", pos + n)
        if key == b"general.alignment" and kind == 4:
            (alignment,), _ = at("I", pos)
        pos = skip(kind, pos)
    tensors = []
    for _ in range(n_tensors):
        (n,), pos = at("Q", pos)
        name = bytes(m[pos : pos + n]).decode("utf-8", "replace")
        (dims,), pos = at("I", pos + n)
        shape, pos = at(f"{dims}Q", pos)
        (kind, offset), pos = at("IQ", pos)
        tensors.append((name, list(shape), kind, offset))
    if not alignment:
        raise ValueError("general.alignment is 0")
    return -(-pos // alignment) * alignment, tensors


def load_causal_lm(model_args, torch_dtype: str | None = None):
    """A pretrained causal LM from `trl.ModelConfig`: safetensors only, remote code only when asked."""
    return load_pretrained(model_args, dtype=torch_dtype)


# ------------------------------------------------------------------------------------- checkpoints, LoRA, QLoRA


class Head(NamedTuple):
    """A model head: the transformers auto class that loads it and the Hub's pipeline tag for its card."""

    auto_class: str
    pipeline_tag: str


HEADS = {
    "causal_lm": Head("AutoModelForCausalLM", "text-generation"),
    "reward": Head("AutoModelForSequenceClassification", "text-classification"),
}


def head_of(architecture: str) -> str | None:
    """The head a model class is (`LlamaForCausalLM`, `PeftModelForSequenceClassification`): its name ends as its
    auto class does."""
    return next((k for k, h in HEADS.items() if architecture.endswith(h.auto_class.removeprefix("AutoModel"))), None)


def model_source(model_args) -> tuple[str, str | None]:
    """(folder or Hub id, GGUF file or None): a `.gguf` model_name_or_path is split into its folder and file."""
    name = str(model_args.model_name_or_path)
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        return str(path.parent), str(path)
    if model_args.gguf_file and Path(name, model_args.gguf_file).expanduser().is_file():
        return name, str(Path(name, model_args.gguf_file).expanduser())
    return name, model_args.gguf_file


def check_lora_targets(folder: Path, targets: list[str]) -> None:
    """Every LoRA target names a module of the checkpoint, read from its safetensors headers before any weight loads
    (PEFT matches a module whose name is the target or ends in `.<target>`; it fails only once the model is loaded)."""
    modules = set()
    for weights in folder.glob("model*.safetensors"):
        with open(weights, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        modules.update(name.rsplit(".", 1)[0] for name in header if name != "__metadata__")
    missing = [t for t in targets if modules and not any(m == t or m.endswith(f".{t}") for m in modules)]
    if missing:
        leaves = sorted({m.rsplit(".", 1)[-1] for m in modules} - {str(i) for i in range(len(modules))})
        raise UsageError(
            f"lora_target_modules {missing}: no module of '{folder}' has that name; its modules with weights are "
            f"{leaves}. Set lora_target_modules to some of them, or to all-linear."
        )


def check_model_args(model_args, parent_stage: str | None = None, lm_head_adapter: bool = False) -> None:
    """Everything about the model that can be wrong, found before data or weights load: paths, switches.
    `lm_head_adapter`: whether the stage can train a LoRA adapter on the LM head (TRL's trainers refuse one)."""
    if not model_args.model_name_or_path:
        hint = f" (normally the {parent_stage} output, e.g. runs/tiny/{parent_stage})" if parent_stage else ""
        raise UsageError(f"model_name_or_path is required: the checkpoint this stage starts from{hint}.")
    check_model_path(model_args.model_name_or_path)
    source, gguf = model_source(model_args)
    folder = Path(source).expanduser()
    pickled = [p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth")] if folder.is_dir() else []
    if pickled and not gguf and not any(folder.glob("*.safetensors")) and not model_args.allow_pickle_weights:
        raise UsageError(
            f"model_name_or_path '{source}' holds pickled weights only ({', '.join(sorted(pickled))}); loading a "
            "pickle can run arbitrary code. Convert them to safetensors, or set allow_pickle_weights: true if you "
            "trust their source."
        )
    if gguf and Path(source).expanduser().is_dir() and not Path(gguf).expanduser().is_file():
        raise UsageError(f"gguf_file '{gguf}' does not exist. Check the path, or leave gguf_file unset.")
    if gguf and model_args.gguf_file and Path(gguf).expanduser().is_file():  # a .gguf model path was checked above
        check_gguf(Path(gguf).expanduser(), "gguf_file")
    if (model_args.load_in_4bit or model_args.load_in_8bit) and not model_args.use_peft:
        raise UsageError(
            "load_in_4bit/load_in_8bit quantize the frozen base model, so only adapters can train: set use_peft: true "
            "(QLoRA), or drop load_in_4bit for full training."
        )
    targets = model_args.lora_target_modules
    if model_args.use_peft and not lm_head_adapter and isinstance(targets, list) and "lm_head" in targets:
        raise UsageError(
            "lora_target_modules includes lm_head, which TRL's trainers refuse (sft, dpo, grpo and rloo score tokens "
            "with the LM head's base weight; a reward model has no LM head). Remove lm_head from lora_target_modules."
        )
    if model_args.use_peft and isinstance(targets, list) and folder.is_dir() and not gguf:
        check_lora_targets(folder, targets)
    if model_args.load_in_4bit or model_args.load_in_8bit:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise UsageError("load_in_4bit/load_in_8bit need bitsandbytes: pip install 'hfrecipes[qlora]'.")


def peft_config(model_args, task_type: str | None = None):
    """TRL's LoRA config from the recipe switches (None unless use_peft); `task_type` overrides lora_task_type."""
    from trl import get_peft_config

    config = get_peft_config(model_args)
    if config is not None and task_type is not None:
        config.task_type = task_type
    return config


def load_pretrained(model_args, head: str = "causal_lm", dtype: str | None = None, **kwargs):
    """A checkpoint (folder, Hub id or GGUF file) with the head a stage needs, quantized when the recipe asks.

    Safetensors only unless allow_pickle_weights; remote code only when trust_remote_code. A GGUF file is
    dequantized to a dense model, so it trains and saves like any other checkpoint.
    """
    import transformers
    from trl import get_quantization_config

    check_model_args(model_args)
    source, gguf = model_source(model_args)
    if (Path(source).expanduser() / "adapter_config.json").is_file():
        return _load_adapter_parent(model_args, source, head, dtype, **kwargs)
    quantization = get_quantization_config(model_args)
    extra = dict(kwargs)
    if quantization is not None:
        extra["quantization_config"] = quantization
        extra["device_map"] = kbit_device_map()
    if gguf:
        extra["gguf_file"] = gguf
    auto_class = getattr(transformers, HEADS[head].auto_class)
    try:
        model = auto_class.from_pretrained(
            source,
            revision=model_args.model_revision,
            trust_remote_code=model_args.trust_remote_code,
            attn_implementation=model_args.attn_implementation,
            dtype=dtype or model_args.dtype or "auto",
            use_safetensors=None if gguf or model_args.allow_pickle_weights else True,
            **extra,
        )
    except (OSError, ValueError) as e:
        raise UsageError(f"model_name_or_path '{model_args.model_name_or_path}' could not be loaded: {e}") from None
    if gguf:
        drop_gguf_quantizer(model)
    if quantization is not None:
        keep_4bit_trainable(model)
    return model


def keep_4bit_trainable(model) -> None:
    """bitsandbytes, on a CPU with AVX512-BF16, repacks a 4-bit weight for inference the first time the layer runs in
    eval mode without grad (a held-out evaluation, a rollout), and from then on computes it with a kernel that has no
    backward: the adapters get no gradient for the rest of training. A model loaded to train keeps the trainable
    layout on every CPU."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


MERGED = "merged"


def _load_adapter_parent(model_args, source: str, head: str, dtype: str | None, **kwargs):
    """A parent stage that saved a LoRA adapter: its adapter is merged into its base once, into `<parent>/merged`
    (shared by every stage that starts from that parent, and the base its own adapters point to), then loaded like
    any checkpoint, so this stage can add its own LoRA, quantize for QLoRA, or put a reward head on top."""
    import dataclasses
    import shutil
    import tempfile

    from accelerate import PartialState

    from hfrecipes.record import RECORD

    parent = Path(source).expanduser()
    merged_dir = parent / MERGED
    with PartialState().main_process_first():
        if not (merged_dir / "config.json").is_file():
            check_stage_dir(parent)
            merged, tok = load_merged(parent, model_args.dtype or "auto", model_args.trust_remote_code)
            tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{MERGED}.tmp-"))
            try:
                merged.save_pretrained(tmp, safe_serialization=True)
                tok.save_pretrained(tmp)
                if (parent / RECORD).is_file():  # the lineage goes on through the merged copy
                    shutil.copy2(parent / RECORD, tmp / RECORD)
                tmp.rename(merged_dir)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            del merged
    return load_pretrained(
        dataclasses.replace(model_args, model_name_or_path=str(merged_dir), gguf_file=None), head, dtype, **kwargs
    )


def kbit_device_map():
    """A quantized model is placed at load time: on this process's GPU, or on the CPU (bitsandbytes' CPU backend)."""
    import torch
    from accelerate import PartialState

    if torch.cuda.is_available():
        return {"": PartialState().local_process_index}
    return None


def drop_gguf_quantizer(model) -> None:
    """A GGUF checkpoint loads through transformers' GGUF quantizer; once dense, the model is a plain one."""
    model.hf_quantizer = None
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.is_quantized = False


def load_stage_tokenizer(model_args):
    """The tokenizer that belongs to model_name_or_path (or to its GGUF file)."""
    source, gguf = model_source(model_args)
    tok = load_tokenizer(source, model_args.trust_remote_code, model_args.model_revision, gguf_file=gguf)
    config = Path(source).expanduser() / "config.json"
    if not gguf and config.is_file():
        text = json.loads(config.read_text())
        check_vocab(tok, text.get("vocab_size", text.get("text_config", {}).get("vocab_size")), source)
    return tok


def adapter_summary(model, model_args) -> dict[str, Any] | None:
    """What the record says about LoRA/QLoRA: rank, alpha, targets, base precision."""
    if not model_args.use_peft:
        return None
    config = getattr(model, "peft_config", {}).get("default")
    targets = getattr(config, "target_modules", None) if config is not None else model_args.lora_target_modules
    quant = "4-bit " + model_args.bnb_4bit_quant_type if model_args.load_in_4bit else None
    return {
        "type": "qlora" if (model_args.load_in_4bit or model_args.load_in_8bit) else "lora",
        "r": model_args.lora_r,
        "alpha": model_args.lora_alpha,
        "dropout": model_args.lora_dropout,
        "target_modules": sorted(targets) if isinstance(targets, (set, list)) else targets,
        "base_quantization": quant or ("8-bit" if model_args.load_in_8bit else None),
    }


# ------------------------------------------------------------------------------------- stage folders as models


def is_adapter(folder: Path) -> bool:
    """A stage folder that holds a LoRA adapter (and names its base) rather than full weights."""
    return (Path(folder) / "adapter_config.json").is_file()


def check_stage_dir(stage_dir: Path) -> None:
    """Everything export needs is there: weights (or an adapter and its base), a tokenizer."""
    if not stage_dir.is_dir():
        raise UsageError(f"stage folder '{stage_dir}' does not exist.")
    if not (stage_dir / "tokenizer_config.json").is_file():
        raise UsageError(
            f"stage folder '{stage_dir}' has no tokenizer (tokenizer_config.json); save the tokenizer "
            "with the model, or copy it from the base model."
        )
    if is_adapter(stage_dir):
        try:
            cfg = json.loads((stage_dir / "adapter_config.json").read_text())
        except json.JSONDecodeError as e:
            raise UsageError(
                f"{stage_dir}/adapter_config.json is not valid JSON ({e}); the adapter is broken."
            ) from None
        if not list(stage_dir.glob("adapter_model.safetensors")):
            raise UsageError(f"stage folder '{stage_dir}' has adapter_config.json but no adapter_model.safetensors.")
        base = cfg.get("base_model_name_or_path")
        if not base:
            raise UsageError(f"{stage_dir}/adapter_config.json names no base_model_name_or_path; set it to the base.")
        if base.startswith((".", "/", "~")) and not Path(base).expanduser().exists():
            raise UsageError(
                f"the adapter's base model '{base}' (adapter_config.json base_model_name_or_path) does "
                "not exist. Point it at the base model folder."
            )
    elif not (stage_dir / "config.json").is_file() or not list(stage_dir.glob("*.safetensors")):
        raise UsageError(f"stage folder '{stage_dir}' holds no model (config.json and *.safetensors).")
    check_model_files(stage_dir, "stage folder")


def load_merged(stage_dir: Path, dtype: str = "auto", trust_remote_code: bool = False):
    """The model of a stage folder with any LoRA adapter merged into its base, and the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    tok = AutoTokenizer.from_pretrained(stage_dir, trust_remote_code=trust_remote_code)
    if is_adapter(stage_dir):
        from peft import PeftConfig, PeftModel

        try:
            base_name = PeftConfig.from_pretrained(stage_dir).base_model_name_or_path
            base = AutoModelForCausalLM.from_pretrained(
                base_name, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code
            )
            model = PeftModel.from_pretrained(base, stage_dir).merge_and_unload()
        except (ValueError, RuntimeError, KeyError, OSError) as e:
            raise UsageError(f"the adapter in '{stage_dir}' does not fit its base model: {e}") from None
    else:
        model = AutoModelForCausalLM.from_pretrained(
            stage_dir, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    if dtype != "auto":
        model = model.to(getattr(torch, dtype))
    return model.eval(), tok
