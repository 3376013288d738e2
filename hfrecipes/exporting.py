"""Export a stage folder to a folder vLLM serves as is: adapters merged, one dtype, safetensors, tokenizer, chat
template, a generation config whose EOS/pad agree with the chat template, the stage record and card; then verify
that it loads with transformers and, when vLLM is installed, gives the same greedy tokens in the vLLM engine.

    hfrecipes export runs/tiny/sft runs/tiny/export
    hfrecipes export runs/tiny/sft runs/tiny/export --dtype bfloat16 --force
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from hfrecipes import card, record
from hfrecipes.errors import UsageError
from hfrecipes.inference import until_eos

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
# A fixed prompt set for the transformers-vs-vLLM check: chat prompts and raw text, short and long.
VERIFY_PROMPTS = [
    [{"role": "user", "content": f"What is {a} plus {b}?"}] for a, b in [(3, 4), (12, 30), (47, 38), (99, 99), (5, 60)]
] + ["One sunny day, Mia went to the", "We count: 3, 4, 5,", "The sum of 20 and 22 is", "Tom saw a small"]


def _is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def check_stage_dir(stage_dir: Path) -> None:
    """Everything export needs is there: weights (or an adapter and its base), a tokenizer."""
    if not stage_dir.is_dir():
        raise UsageError(f"stage folder '{stage_dir}' does not exist.")
    if not (stage_dir / "tokenizer_config.json").is_file():
        raise UsageError(
            f"stage folder '{stage_dir}' has no tokenizer (tokenizer_config.json); save the tokenizer "
            "with the model, or copy it from the base model."
        )
    if _is_adapter(stage_dir):
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


def check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"export folder '{out_dir}' is a file. Choose a folder.")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise UsageError(
            f"export folder '{out_dir}' exists and holds files. Choose a new folder, or pass --force to replace it."
        )


def load_merged(stage_dir: Path, dtype: str = "auto", trust_remote_code: bool = False):
    """The model of a stage folder with any LoRA adapter merged into its base, and the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    tok = AutoTokenizer.from_pretrained(stage_dir, trust_remote_code=trust_remote_code)
    if _is_adapter(stage_dir):
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


def prompt_ids(tok, prompts) -> list[list[int]]:
    """Token ids of prompts: chat messages through the chat template, plain strings as they are."""
    out = []
    for p in prompts:
        if isinstance(p, list):
            text = tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        else:
            text = p
        out.append(tok(text, add_special_tokens=False)["input_ids"])
    return out


def greedy_transformers(model_dir: Path, prompts, max_new_tokens: int = 16) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()
    outs = []
    for ids in prompt_ids(tok, prompts):
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
        outs.append(gen[0, len(ids) :].tolist())
    return outs


def greedy_vllm(model_dir: Path, prompts, max_new_tokens: int = 16) -> list[list[int]]:
    from transformers import AutoTokenizer

    from hfrecipes.inference import vllm_engine

    tok = AutoTokenizer.from_pretrained(model_dir)
    llm, SamplingParams = vllm_engine(model_dir)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    results = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids(tok, prompts)], params, use_tqdm=False)
    return [list(r.outputs[0].token_ids) for r in results]


def verify(out_dir: Path, use_vllm: bool | None = None, max_new_tokens: int = 16) -> dict[str, Any]:
    """Reload with transformers; with vLLM installed (or `use_vllm=True`), compare greedy tokens prompt by prompt."""
    from hfrecipes.inference import vllm_available

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
) -> tuple[Path, dict[str, Any]]:
    """Merge, cast, write, verify. Returns (out_dir, record). Nothing is written until all checks pass, and the
    folder appears whole: it is built in a temporary sibling and renamed into place."""
    from transformers import GenerationConfig

    stage_dir, out_dir = Path(stage_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise UsageError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}.")
    check_stage_dir(stage_dir)
    check_out_dir(out_dir, force)
    if out_dir.resolve() == stage_dir.resolve():
        raise UsageError("export folder and stage folder are the same; choose another export folder.")
    parent = record.read_record(stage_dir)

    start = time.perf_counter()
    model, tok = load_merged(stage_dir, dtype, trust_remote_code)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        settings = generation_settings(tok, model)
        model.config.eos_token_id = settings["eos_token_id"]
        model.config.pad_token_id = settings["pad_token_id"]
        model.generation_config = GenerationConfig(**settings, do_sample=False)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        rec = record.new_record("export", parent.get("recipe") if parent else {}, parent)
        rec["model"] = {
            **record.model_summary(model, str(stage_dir), dtype if dtype != "auto" else None),
            "merged_adapter": _is_adapter(stage_dir),
        }
        rec["data"] = {"knowledge_cutoff": None, "model_cutoff": (parent or {}).get("data", {}).get("model_cutoff")}
        # export trains nothing: no FLOPs of 6·N·D, only the wall time of merging and writing
        rec["compute"] = record.compute_summary(
            rec["model"]["params_total"], 0, 0.0, time.perf_counter() - start, record.device_info(1)
        )
        # the parent's evaluation results carry over (same weights); its training counters do not
        training_only = ("steps", "train_loss", "first_logged_loss", "last_logged_loss")
        rec["metrics"] = {k: v for k, v in ((parent or {}).get("metrics") or {}).items() if k not in training_only}
        rec["export"] = {"dtype": dtype, "generation": settings}
        if verify_load:
            rec["export"]["verify"] = verify(tmp, use_vllm)
            vl = rec["export"]["verify"].get("vllm")
            if isinstance(vl, dict) and vl["greedy_matches"] != vl["of"]:
                logger.warning(
                    "vLLM greedy tokens differ from transformers on %d of %d prompts",
                    vl["of"] - vl["greedy_matches"],
                    vl["of"],
                )
        rec["status"] = "complete"
        rec["finished"] = record.now()
        record.write_record(tmp, rec)
        card.write_card(tmp, rec, name=out_dir)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir, rec
