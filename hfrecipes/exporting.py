"""Export a stage folder to a folder vLLM serves as is: adapters merged, one dtype, safetensors, tokenizer, chat
template, a generation config whose EOS/pad agree with the chat template, the stage record and card; then verify
that it loads with transformers and, when vLLM is installed, gives the same greedy tokens in the vLLM engine. With
`--format gguf`, the folder holds one GGUF file for llama.cpp and Ollama and its Modelfile instead, checked by reading
it back (`hfrecipes.gguf_export`).

    hfrecipes export runs/tiny/sft runs/tiny/export
    hfrecipes export runs/tiny/sft runs/tiny/export --dtype bfloat16 --force
    hfrecipes export runs/tiny/sft runs/tiny/gguf --format gguf --quant q8_0
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hfrecipes import gguf_export, record
from hfrecipes.errors import UsageError
from hfrecipes.inference import greedy_transformers, greedy_vllm, kv_cache_of, until_eos
from hfrecipes.modeling import check_stage_dir, is_adapter, load_merged
from hfrecipes.recipe import check_apart
from hfrecipes.stagerun import StageRun
from hfrecipes.vllm_support import vllm_available

logger = logging.getLogger(__name__)

EXPORT = "export"
DTYPES = ("auto", "float32", "bfloat16", "float16")
# A fixed prompt set for the transformers-vs-vLLM check: chat prompts and raw text, short and long.
VERIFY_PROMPTS = [
    [{"role": "user", "content": f"What is {a} plus {b}?"}] for a, b in [(3, 4), (12, 30), (47, 38), (99, 99), (5, 60)]
] + ["One sunny day, Mia went to the", "We count: 3, 4, 5,", "The sum of 20 and 22 is", "Tom saw a small"]


def generation_settings(tok, model) -> dict[str, Any]:
    """EOS = the tokenizer's EOS plus the chat template's end-of-turn token; pad = the tokenizer's pad."""
    eos = []
    for t in (tok.eos_token, "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        tid = tok.convert_tokens_to_ids(t) if t else None
        if t and tid is not None and tid != tok.unk_token_id and t in tok.get_vocab() and tid not in eos:
            if t == tok.eos_token or t in (tok.chat_template or ""):
                eos.append(tid)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    return {
        "eos_token_id": eos if len(eos) > 1 else eos[0],
        "pad_token_id": pad,
        "bos_token_id": tok.bos_token_id if tok.bos_token_id is not None else model.config.bos_token_id,
    }


def end_of_turn(settings: dict[str, Any]) -> int:
    """The token a chat reply ends with: the last of `generation_settings`' EOS ids (the tokenizer's own EOS comes
    first, the chat template's end-of-turn token after it)."""
    eos = settings["eos_token_id"]
    return eos[-1] if isinstance(eos, list) else eos


def verify(out_dir: Path, use_vllm: bool | None = None, max_new_tokens: int = 16) -> dict[str, Any]:
    """Reload with transformers; with vLLM installed (or `use_vllm=True`), compare greedy tokens prompt by prompt."""
    hf = greedy_transformers(out_dir, VERIFY_PROMPTS, max_new_tokens)
    result: dict[str, Any] = {"transformers_loads": True, "prompts": len(VERIFY_PROMPTS)}
    if use_vllm is None:
        use_vllm = vllm_available()
    if not use_vllm:
        result["vllm"] = "not installed" if not vllm_available() else "skipped"
        return result
    gen_cfg = json.loads((out_dir / "generation_config.json").read_text())
    eos = gen_cfg["eos_token_id"]
    eos = set(eos if isinstance(eos, list) else [eos])
    vl = greedy_vllm(out_dir, VERIFY_PROMPTS, max_new_tokens)
    same = [until_eos(a, eos) == until_eos(b, eos) for a, b in zip(hf, vl, strict=True)]
    matched = sum(same)
    result["vllm"] = {"greedy_matches": matched, "of": len(hf)}
    if matched != len(hf):
        first = same.index(False)
        result["vllm"]["first_mismatch"] = {
            "prompt": str(VERIFY_PROMPTS[first]),
            "transformers": hf[first],
            "vllm": vl[first],
        }
    return result


def export(
    stage_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "auto",
    force: bool = False,
    verify_load: bool = True,
    use_vllm: bool | None = None,
    trust_remote_code: bool = False,
    format: str = "safetensors",
    quant: str | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Merge, cast, write, verify. Returns (out_dir, record). Nothing is written until all checks pass, and the
    folder appears whole: it is built in a temporary sibling and renamed into place. `format="gguf"` writes one GGUF
    file of type `quant` (f16, q8_0, q4_0; default q8_0) and its Ollama Modelfile instead of a safetensors folder."""
    from transformers import GenerationConfig

    stage_dir, out_dir = Path(stage_dir), Path(out_dir)
    check_format(format, quant, dtype)
    gguf = format == "gguf"
    if gguf and out_dir.suffix == ".gguf":
        raise UsageError(
            f"export folder '{out_dir}' is named like a file: OUT is the folder that will hold the .gguf file, its "
            "Modelfile, record and card. Name a folder, e.g. runs/tiny/gguf."
        )
    quant = (quant or "q8_0") if gguf else None
    check_stage_dir(stage_dir)
    check_apart(out_dir, {"stage folder": stage_dir}, "export", "export folder")
    record.check_new_folder(out_dir, force, "export folder")
    facts = gguf_export.check_exportable(stage_dir, quant) if gguf else None
    parent = record.read_record(stage_dir)
    name = model_name(out_dir, parent)

    with record.staged_folder(out_dir) as tmp:
        run = StageRun(EXPORT, tmp, (parent or {}).get("recipe") or {}, parent_dir=stage_dir, check_output=False)
        with run.measured():
            # GGUF quantizes from fp32, as llama.cpp's converter does: no rounding to a half type first
            model, tok = load_merged(stage_dir, "float32" if gguf else dtype, trust_remote_code)
            settings = generation_settings(tok, model)
            if gguf:
                file, eot = tmp / f"{name}-{quant}.gguf", end_of_turn(settings)
                written = gguf_export.write_gguf(model, tok, stage_dir, file, quant, facts, name, eot)
                (tmp / gguf_export.MODELFILE).write_text(gguf_export.modelfile(tok, file.name, eot))
            else:
                model.config.eos_token_id = settings["eos_token_id"]
                model.config.pad_token_id = settings["pad_token_id"]
                model.generation_config = GenerationConfig(**settings, do_sample=False)
                model.save_pretrained(tmp, safe_serialization=True)
                tok.save_pretrained(tmp)
        rec = run.record
        run.describe_model(model, str(stage_dir), dtype=dtype if dtype != "auto" and not gguf else None)
        rec["model"]["merged_adapter"] = is_adapter(stage_dir)
        rec["data"] = {"knowledge_cutoff": None, "model_cutoff": (parent or {}).get("data", {}).get("model_cutoff")}
        # export trains nothing: no FLOPs of 6·N·D and no training throughput, only the wall time of merging and
        # writing; the card's lineage lists the stages that trained the weights
        rec["compute"] = record.compute_summary(
            rec["model"]["params_total"], 0, 0.0, run.wall_seconds, record.device_info(1)
        )
        # the parent's evaluation results carry over (same weights); its training counters do not
        training_only = ("steps", "train_loss", "first_logged_loss", "last_logged_loss")
        rec["metrics"] = {k: v for k, v in ((parent or {}).get("metrics") or {}).items() if k not in training_only}
        rec["export"] = {"dtype": dtype, "generation": settings, "model_name": name, "format": format}
        if gguf:
            rec["export"]["dtype"] = None
            rec["export"]["gguf"] = {"file": file.name, "quant": quant, "bytes": file.stat().st_size}
            rec["export"]["gguf"] |= {"sha256": gguf_export.sha256(file), **written}
            if verify_load:
                check = gguf_export.verify_gguf(tmp, file.name, model, tok, quant, VERIFY_PROMPTS, eot)
                rec["export"]["verify"] = check
                if check["within_tolerance"] is False or check["tokenizer_ids_match"] != check["prompts"]:
                    logger.warning("the GGUF read back differs from the source beyond its tolerance: %s", check)
        else:
            rec["export"]["kv_cache"] = kv_cache_of(tmp, rec["compute"]["device"])
            if verify_load:
                rec["export"]["verify"] = verify(tmp, use_vllm)
                vl = rec["export"]["verify"].get("vllm")
                if isinstance(vl, dict) and vl["greedy_matches"] != vl["of"]:
                    logger.warning(
                        "vLLM greedy tokens differ from transformers on %d of %d prompts",
                        vl["of"] - vl["greedy_matches"],
                        vl["of"],
                    )
        run.complete()
        run.close(name=out_dir)
    return out_dir, rec


def check_format(format: str, quant: str | None, dtype: str) -> None:
    """The export's format flags fit together: a known format and dtype, a quant type only for GGUF."""
    if format not in gguf_export.FORMATS:
        raise UsageError(f"--format '{format}' is not one of {', '.join(gguf_export.FORMATS)}.")
    if dtype not in DTYPES:
        raise UsageError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}.")
    if format == "gguf" and dtype != "auto":
        raise UsageError(f"--dtype {dtype} applies to --format safetensors; a GGUF export's type is --quant.")
    if format != "gguf" and quant is not None:
        raise UsageError(f"--quant {quant} applies to --format gguf; a safetensors export's type is --dtype.")


def model_name(out_dir: Path, parent: dict[str, Any] | None) -> str:
    """What the card (and a GGUF file) calls the exported model: the folder's name, unless that only says "export" or
    "gguf" (as a lifecycle's `<run>/export` does); then the run's name and the stage that trained the weights, e.g.
    `tiny-grpo`."""
    if out_dir.name not in (EXPORT, "gguf") or not parent:
        return out_dir.name
    return f"{out_dir.resolve().parent.name}-{parent['stage']}"
