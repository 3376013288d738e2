"""GGUF files as starting points. `hfrecipes convert FILE.gguf OUT/` dequantizes a GGUF once into a normal model
folder (safetensors, tokenizer, chat template, generation config) whose record says where it came from (file,
quantization type, sha256) and what the base model's own pretraining cost: the published figures of `bases.yaml`
(or a `--base` file), each marked with its source and as an estimate. A stage given a `.gguf` path converts it into
a cache folder the first time and starts from that folder after (`resolve_gguf`), so a LoRA adapter names a base
that transformers, PEFT and vLLM can load, and the base's pretraining is the first row of every card's lineage.

    hfrecipes convert SmolLM2-135M-Instruct.Q4_1.gguf runs/smollm2-135m
    hfrecipes sft --config tiny/sft --model_name_or_path SmolLM2-135M-Instruct.Q4_1.gguf --use_peft true
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hfrecipes import costs, record
from hfrecipes.errors import UsageError
from hfrecipes.gguf_export import sha256
from hfrecipes.modeling import check_gguf
from hfrecipes.recipe import check_apart

logger = logging.getLogger(__name__)

CACHE_ENV = "HFRECIPES_CACHE"


def cache_root() -> Path:
    """Where a stage keeps the folders it converts GGUF files into: $HFRECIPES_CACHE, else ~/.cache/hfrecipes."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hfrecipes").expanduser()


# ------------------------------------------------------------------------------------------- the base model's past


@dataclass(frozen=True)
class BaseFacts:
    """Published figures of a base model's own pretraining; every figure comes with where it was read."""

    name: str
    hub_id: str | None = None
    pretraining_tokens: float | None = None
    pretraining_tokens_source: str | None = None
    knowledge_cutoff: str | None = None  # YYYY-MM-DD, YYYY-MM or YYYY; None where the makers did not publish one
    knowledge_cutoff_source: str | None = None
    released: str | None = None  # an upper bound on the cutoff where none is published
    match: dict[str, str] = field(default_factory=dict)  # GGUF metadata values that identify the model
    origin: str = ""  # the file these facts were read from


def bases_file() -> Path:
    """The bundled table of published base-model figures (`hfrecipes/bases.yaml`)."""
    return Path(__file__).resolve().parent / "bases.yaml"


def read_bases(path: str | Path | None = None) -> list[BaseFacts]:
    """Base-model facts from a YAML file: a list of mappings with BaseFacts' keys (unknown keys are refused)."""
    path = Path(path).expanduser() if path else bases_file()
    if not path.is_file():
        raise UsageError(f"--base '{path}' does not exist. Check the path.")
    try:
        rows = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UsageError(f"{path} is not valid YAML ({e}).") from None
    rows = rows.get("bases", rows) if isinstance(rows, dict) else rows
    if not isinstance(rows, list):
        rows = [rows]
    known = set(BaseFacts.__dataclass_fields__) - {"origin"}
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "name" not in row:
            raise UsageError(f"{path}: entry {i} needs a 'name' (and the base model's published figures).")
        unknown = sorted(set(row) - known)
        if unknown:
            raise UsageError(f"{path}: entry '{row['name']}' has unknown key(s) {unknown}; known: {sorted(known)}.")
        tokens = row.get("pretraining_tokens")
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, (int, float)) or tokens <= 0):
            raise UsageError(
                f"{path}: entry '{row['name']}' pretraining_tokens is {tokens!r}; write a positive number, e.g. "
                "2.0e+12."
            )
        row = {k: str(v) if k in ("knowledge_cutoff", "released") and v is not None else v for k, v in row.items()}
        out.append(BaseFacts(**row, origin=str(path)))
    return out


def find_base(meta: dict[str, Any], bases: list[BaseFacts]) -> BaseFacts | None:
    """The entry whose `match` values all equal the GGUF's metadata (compared without case)."""
    for b in bases:
        if b.match and all(str(meta.get(k, "")).lower() == str(v).lower() for k, v in b.match.items()):
            return b
    return None


# ------------------------------------------------------------------------------------------------- GGUF metadata


def gguf_metadata(file: Path) -> dict[str, Any]:
    """The GGUF's general.* keys, architecture, context length, quantization type and tensor types; no weights read."""
    from collections import Counter

    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(str(file))
    meta: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("general.") or key.endswith((".context_length", ".block_count")):
            try:
                meta[key] = f.contents()
            except (ValueError, IndexError, UnicodeDecodeError):
                continue
    meta["has_chat_template"] = "tokenizer.chat_template" in reader.fields
    arch = meta.get("general.architecture")
    meta["context_length"] = meta.pop(f"{arch}.context_length", None)
    file_type = meta.get("general.file_type")
    try:
        meta["quantization"] = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        meta["quantization"] = None
    meta["tensor_types"] = dict(Counter(t.tensor_type.name for t in reader.tensors))
    return meta


def check_convertible(file: Path, field: str = "model_name_or_path") -> dict[str, Any]:
    """A GGUF that transformers can dequantize: readable to its last tensor, of an architecture transformers maps.
    Returns its metadata. Nothing is loaded or written."""
    if not file.is_file():
        raise UsageError(f"{field} '{file}' does not exist. Check the path.")
    check_gguf(file, field)
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    meta = gguf_metadata(file)
    arch = meta.get("general.architecture")
    readable = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # mapping keys, not models
    if arch not in readable:
        raise UsageError(
            f"{field}: {file} holds a '{arch}' model, an architecture transformers cannot dequantize from GGUF "
            f"(it reads {', '.join(readable)}). Start from that model's safetensors "
            "checkpoint instead."
        )
    return meta


# ------------------------------------------------------------------------------------------------------- convert


def convert(
    file: str | Path,
    out_dir: str | Path,
    dtype: str = "float32",
    base: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Dequantize `file` into `out_dir` and write its base record and card. `base`: a YAML file of the base model's
    published figures (default: the bundled bases.yaml, matched on the GGUF's metadata). Float32 by default: the
    GGUF's own precision is already lost to quantization, and fp32 keeps CPU training exact from there."""
    file = Path(file).expanduser()
    out_dir = Path(out_dir).expanduser()
    meta = check_convertible(file, "gguf file")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"--dtype {dtype!r}: choose float32, bfloat16 or float16.")
    check_apart(out_dir, {"gguf file": file, "--base": base}, "convert", "output folder")
    record.check_new_folder(out_dir, force, "output folder")
    bases = read_bases(base)
    # a file given by hand describes this model even where its `match` is absent
    facts = find_base(meta, bases) or (bases[0] if base else None)
    digest = sha256(file)

    from hfrecipes.report import card

    with record.staged_folder(out_dir) as tmp:
        model, tok = _dequantize(file, dtype, meta)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        rec = base_record(model, file, digest, meta, facts, dtype)
        record.write_record(tmp, rec)
        card.write_card(tmp, rec, name=out_dir)
    logger.info("converted %s (%s, sha256 %s) -> %s", file.name, meta.get("quantization"), digest[:12], out_dir)
    return out_dir


def _dequantize(file: Path, dtype: str, meta: dict[str, Any]):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from hfrecipes.exporting import generation_settings
    from hfrecipes.modeling import drop_gguf_quantizer

    try:
        tok = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(file.parent), gguf_file=file.name, dtype=getattr(torch, dtype)
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UsageError(
            f"gguf file {file} could not be dequantized ({type(e).__name__}: {' '.join(str(e).split())[:300]}). "
            "Start from the model's safetensors checkpoint instead."
        ) from None
    drop_gguf_quantizer(model)
    if meta.get("context_length"):
        tok.model_max_length = int(meta["context_length"])  # else saved as 1e30, and truncation never happens
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.generation_config = GenerationConfig(**generation_settings(tok, model))
    return model, tok


def base_record(model, file: Path, digest: str, meta: dict[str, Any], facts: BaseFacts | None, dtype: str):
    """The record of a converted GGUF: its source, and its own pretraining as published, marked as an estimate.

    FLOPs are 6·N·D from the counted parameters and the published tokens; device-hours, dollars and energy price those
    FLOPs on the reference GPU at the default MFU (`costs.REFERENCE_DEVICE`, `costs.DEFAULT_MFU`), since the makers'
    own bill is not published."""
    rec = record.new_record(record.BASE, {"values": {"gguf_file": file.name}}, None)
    rec["model"] = record.model_summary(model, f"{file.name} (GGUF, {meta.get('quantization')})", dtype)
    n = rec["model"]["params_total"]
    tokens = facts.pretraining_tokens if facts else None
    cutoff = None
    if facts and facts.knowledge_cutoff:
        cutoff = {"date": str(facts.knowledge_cutoff), "source": "published", "detail": facts.knowledge_cutoff_source}
    elif facts:
        cutoff = {
            "date": None,
            "source": "not published",
            "detail": f"the makers publish no cutoff; the model was released {facts.released}, so it knows "
            "nothing after that" + (f" ({facts.knowledge_cutoff_source})" if facts.knowledge_cutoff_source else ""),
        }
    name = facts.name if facts else str(meta.get("general.name") or file.stem)
    rec["data"] = {
        "datasets": [{"name": f"{name} pretraining data (not recorded here)", "split": "train", "rows": None}],
        "examples_seen": None,
        "tokens_seen": int(tokens) if tokens else None,
        "epochs": None,
        "knowledge_cutoff": cutoff,
        "model_cutoff": {**cutoff, "stage": record.BASE} if cutoff else None,
    }
    compute = costs.published_training(n, tokens) if tokens else {"estimate": True}
    rec["compute"] = compute
    rec["metrics"] = {"steps": None}
    rec["gguf"] = {
        "file": file.name,
        "sha256": digest,
        "bytes": file.stat().st_size,
        "quantization": meta.get("quantization"),
        "tensor_types": meta.get("tensor_types"),
        "metadata": {k: v for k, v in meta.items() if k.startswith("general.")},
    }
    rec["base"] = {
        "name": name,
        "hub_id": facts.hub_id if facts else None,
        "estimate": True,
        "sources": {
            "params": "counted from the GGUF's tensors",
            "pretraining_tokens": facts.pretraining_tokens_source if tokens else "not known: no base facts matched",
            "knowledge_cutoff": (cutoff or {}).get("detail") or "not known",
            "flops": "6·N·D from the two above" if tokens else "not known",
            "dollars": compute.get("price_source", "not known"),
            "facts_file": facts.origin if facts else None,
        },
    }
    rec["status"] = "complete"
    rec["finished"] = record.now()
    record.Record.parse(rec, "base record (being written)")
    return rec


# --------------------------------------------------------------------------------------------- a stage's GGUF path


def cached_folder(file: Path, digest: str) -> Path:
    return cache_root() / "gguf" / f"{file.stem}-{digest[:16]}"


def resolve_gguf(model_args) -> Path | None:
    """A `.gguf` model_name_or_path (or gguf_file) becomes its converted folder, converted once into the cache:
    model_args then names that folder, and the stage starts from it like from any checkpoint. Returns the folder,
    or None when the model is not a GGUF. Concurrent processes (accelerate ranks, parallel runs) convert once."""
    from filelock import FileLock

    from hfrecipes.modeling import model_source

    source, gguf = model_source(model_args)
    if not gguf:
        return None
    file = Path(gguf).expanduser()
    if not file.is_file():
        raise UsageError(f"gguf_file '{gguf}' does not exist. Check the path, or leave gguf_file unset.")
    digest = sha256(file)
    folder = cached_folder(file, digest)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not record.is_complete(folder):
            logger.info("converting %s once into %s (dequantized; reused by later stages)", file, folder)
            convert(file, folder, force=True)
    model_args.model_name_or_path = str(folder)
    model_args.gguf_file = None
    return folder
