"""Write a stage's model as one GGUF file for llama.cpp and Ollama, with the `gguf` package's `GGUFWriter`, and read it
back with transformers' own GGUF loader to measure what the file changed (and run it in llama.cpp itself where
node-llama-cpp is installed: `hfrecipes.llama_cpp`). `hfrecipes.exporting.export` calls these for `--format gguf`;
this module owns the GGUF side only: what can be mapped, the file, the Modelfile, the check.

    hfrecipes export runs/tiny/sft runs/tiny/gguf --format gguf --quant q8_0

The layout follows llama.cpp's own converter (`convert_hf_to_gguf.py`): llama.* / qwen2.* hyperparameters, tensor
names from gguf's `TensorNameMap`, q and k rows of Llama-style attention permuted for llama.cpp's RoPE (its
`LlamaModel.permute`; transformers' GGUF loader undoes it), 1-D tensors (norms, biases) in F32, a matrix whose rows do
not split into 32-value blocks in F16, tied embeddings stored once as `token_embd`. Deliberate limits: byte-level BPE
tokenizers only (tokenizer.ggml.model "gpt2"), no RoPE scaling, no Llama attention or MLP biases; each is refused
by name before any weights load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
from pathlib import Path
from typing import Any

from hfrecipes.errors import UsageError

logger = logging.getLogger(__name__)

FORMATS = ("safetensors", "gguf")
# --quant: name -> (GGML tensor type of the matrices, llama.cpp file type). q4_0 keeps the embedding (the output
# layer too, when tied) at Q8_0, as llama.cpp's own quantizer keeps the output layer above 4 bits.
QUANTS = {"f16": ("F16", "MOSTLY_F16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0")}
# transformers model_type -> GGUF architecture (llama.cpp writes Mistral as llama)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
PERMUTED = ("llama",)  # architectures whose q/k rows llama.cpp permutes for its RoPE (Qwen2 runs NeoX-style RoPE)
MODELFILE = "Modelfile"
# Training-only markers of a chat template (TRL's assistant-only loss); llama.cpp's template engine cannot parse them
GENERATION_MARKERS = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")


# ------------------------------------------------------------------------------------------------- what maps


def check_exportable(stage_dir: Path, quant: str) -> dict[str, Any]:
    """What the writer needs from the stage folder, checked before any weights load: a supported quant type, an
    architecture and tokenizer the GGUF layout can carry. Returns {"architecture", "pre_tokenizer"}."""
    if quant not in QUANTS:
        raise UsageError(f"--quant '{quant}' is not a GGUF type export writes; choose one of {', '.join(QUANTS)}.")
    config_file = _config_file(stage_dir)
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{config_file} could not be read ({e}); GGUF export reads the model's config.") from None
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UsageError(
            f"{config_file} model_type '{model_type}': GGUF export maps {', '.join(ARCHITECTURES)} models to "
            "llama.cpp's tensor layout. Export this model with --format safetensors instead."
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in (None, "default"):
        raise UsageError(
            f"{config_file} rope_parameters.rope_type '{rope_type}': GGUF export writes unscaled RoPE only, and "
            "transformers' GGUF loader could not check a scaled one. Export with --format safetensors instead."
        )
    for key in ("attention_bias", "mlp_bias"):
        if ARCHITECTURES[model_type] == "llama" and config.get(key):
            raise UsageError(
                f"{config_file} {key} is true: llama.cpp's llama layout as transformers reads it back has no such "
                "biases. Export with --format safetensors instead."
            )
    if config.get("hidden_act", "silu") != "silu":
        raise UsageError(f"{config_file} hidden_act '{config['hidden_act']}': GGUF's llama and qwen2 use silu.")
    return {"architecture": ARCHITECTURES[model_type], "pre_tokenizer": pre_tokenizer(stage_dir)}


def _config_file(stage_dir: Path) -> Path:
    """config.json of the stage folder, or of the base model an adapter names."""
    adapter = stage_dir / "adapter_config.json"
    if adapter.is_file():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path") or ""
        if Path(base).expanduser().is_dir():
            return Path(base).expanduser() / "config.json"
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(base, "config.json"))
        except Exception as e:  # offline, unknown repo, no such file: all mean the base is not at hand
            raise UsageError(
                f"the adapter's base model '{base}' (adapter_config.json base_model_name_or_path) could not be "
                f"read ({type(e).__name__}). Point it at the base model folder."
            ) from None
    return stage_dir / "config.json"


# llama.cpp's names for the pre-tokenizers of tokenizer.json it recognises (tokenizer.ggml.pre)
_SPLITS = {"qwen2": "qwen2", "llama3": "llama-bpe"}


def pre_tokenizer(stage_dir: Path) -> str:
    """llama.cpp's name for the stage tokenizer's pre-tokenizer (tokenizer.ggml.pre); a byte-level BPE tokenizer
    llama.cpp would split differently is refused, as llama.cpp's own converter refuses it."""
    path = stage_dir / "tokenizer.json"
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} could not be read ({e}); GGUF export needs the fast tokenizer's file.") from None
    model, decoder = tj.get("model") or {}, tj.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise UsageError(
            f"{path} model.type '{model.get('type')}' (decoder '{decoder.get('type')}'): GGUF export writes "
            "byte-level BPE tokenizers (tokenizer.ggml.model 'gpt2') only. Export with --format safetensors instead."
        )
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's split: SmolLM's (and the tiny tokenizer's)
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        regex = (steps[0].get("pattern") or {}).get("Regex")
        for name, llama_cpp_name in _SPLITS.items():
            if regex == GGUF_PRE_TOKENIZER_SPLITS[name]:
                return llama_cpp_name
    raise UsageError(
        f"{path} pre_tokenizer ({' + '.join(map(str, kinds))}) is not one llama.cpp knows by name (GPT-2's, SmolLM's, "
        "Qwen2's, Llama 3's), so llama.cpp would split text differently. Export with --format safetensors instead."
    )


# ---------------------------------------------------------------------------------------------------- the file


def sha256(file: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def permute(w, n_head: int):
    """llama.cpp's `LlamaModel.permute`: q/k rows from Hugging Face's half-split RoPE layout to GGML's interleaved
    one, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    model, tok, stage_dir: Path, file: Path, quant: str, facts: dict[str, Any], name: str, eot: int
) -> dict[str, Any]:
    """Write `model` (merged, fp32) and `tok` to `file`; `eot` is the chat's end-of-turn token id. Returns what the
    file holds, for the record."""
    import gguf

    cfg = model.config
    arch = facts["architecture"]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(file), arch)
    w.add_name(name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float((cfg.rope_parameters or {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    matrix_type, file_type = QUANTS[quant]
    w.add_file_type(gguf.LlamaFileType[file_type])
    if quant != "f16":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(w, tok, stage_dir, cfg.vocab_size, facts["pre_tokenizer"], eot)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    types: dict[str, int] = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp reads token_embd as the output layer when `output` is absent
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UsageError(f"{hf_name}: a weight the GGUF {arch} layout has no name for; nothing was written.")
        data = tensor.detach().float().cpu().numpy()
        if arch in PERMUTED and new.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if ".attn_q." in new else cfg.num_key_value_heads
            data = permute(data, heads)
        qtype = _tensor_type(new, data, matrix_type)
        stored = gguf.quants.quantize(data, qtype)
        w.add_tensor(new, stored, raw_dtype=qtype)  # the byte rows of a quantized tensor give its shape
        types[qtype.name] = types.get(qtype.name, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"architecture": arch, "pre_tokenizer": facts["pre_tokenizer"], "tensor_types": types}


def _tensor_type(name: str, data, matrix_type: str):
    """F32 for 1-D tensors; the quant's type for matrices whose rows split into its blocks, else F16; q4_0's
    embedding (and output layer) at Q8_0."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if data.ndim == 1:
        return GGMLQuantizationType.F32
    qtype = GGMLQuantizationType[matrix_type]
    if qtype == GGMLQuantizationType.Q4_0 and (name.startswith("output.") or name.startswith("token_embd.")):
        qtype = GGMLQuantizationType.Q8_0
    block = GGML_QUANT_SIZES[qtype][0]
    return qtype if data.shape[-1] % block == 0 else GGMLQuantizationType.F16


def _add_tokenizer(w, tok, stage_dir: Path, vocab_size: int, pre: str, eot: int) -> None:
    """Vocabulary, token types, merges, special ids, add-BOS and the chat template, as llama.cpp's converter writes
    them for a byte-level BPE. EOS is the end-of-turn token, so llama.cpp and Ollama stop at the end of a reply."""
    import gguf

    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):  # a model's vocabulary may be padded beyond the tokenizer's
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(gguf.SpecialVocab(stage_dir, load_merges=True, special_token_types=()).merges)
    w.add_eos_token_id(eot)
    w.add_eot_token_id(eot)
    if tok.bos_token_id is not None:
        w.add_bos_token_id(tok.bos_token_id)
    if tok.unk_token_id is not None:
        w.add_unk_token_id(tok.unk_token_id)
    w.add_pad_token_id(tok.pad_token_id if tok.pad_token_id is not None else eot)
    ids = tok("a")["input_ids"]
    w.add_add_bos_token(tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id])
    w.add_add_eos_token(tok.eos_token_id is not None and ids[-1:] == [tok.eos_token_id] and len(ids) > 1)
    if tok.chat_template:
        w.add_chat_template(GENERATION_MARKERS.sub("", tok.chat_template))


# -------------------------------------------------------------------------------------------- Ollama Modelfile

_CHATML_TURN = "<|im_start|>{role}\n{content}<|im_end|>\n"
# Ollama gathers every system message (and the Modelfile's SYSTEM) into .System, and recent versions also keep them in
# .Messages: the system turn is written once, from .System, and skipped in the loop
_OLLAMA_CHATML = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    '{{- range .Messages }}{{ if ne .Role "system" }}'
    "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}{{ end }}"
    "<|im_start|>assistant\n"
)


def chatml_system(tok) -> tuple[bool, str | None]:
    """(is the chat template ChatML-style, the system prompt it adds when a conversation has none), found by
    rendering it: a template that renders these conversations as ChatML does is translated for Ollama."""
    if not tok.chat_template:
        return False, None
    user, reply = {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"}
    turns = [user, reply, {"role": "user", "content": "U2"}]

    def render(messages) -> str:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    try:
        plain = render(turns)
        with_system = render([{"role": "system", "content": "S"}, *turns])
    except Exception:  # a template that raises on these plain conversations is not ChatML
        return False, None
    body = "".join(_CHATML_TURN.format(**m) for m in turns) + "<|im_start|>assistant\n"
    if with_system != _CHATML_TURN.format(role="system", content="S") + body or not plain.endswith(body):
        return False, None
    prefix = plain[: -len(body)]
    if not prefix:
        return True, None
    match = re.fullmatch(r"<\|im_start\|>system\n(.*)<\|im_end\|>\n", prefix, re.S)
    return (True, match.group(1)) if match else (False, None)


def modelfile(tok, gguf_name: str, eot: int) -> str:
    """An Ollama Modelfile beside the GGUF: FROM the file, TEMPLATE translated for a ChatML-style chat template (with
    the template's default system prompt as SYSTEM), and the end-of-turn token as a stop."""
    chatml, system = chatml_system(tok)
    lines = [f"FROM ./{gguf_name}"]
    if chatml:
        lines.append(f'TEMPLATE """{_OLLAMA_CHATML}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
    else:
        lines.append(
            "# The chat template is not ChatML-style; Ollama reads tokenizer.chat_template from the file where it "
            "knows the template. Write a TEMPLATE here otherwise."
        )
    lines.append(f'PARAMETER stop "{tok.convert_ids_to_tokens(eot)}"')
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- reading it back

# A GGUF file read back differs from its source by the rounding of its type: the largest |logit difference| tolerated,
# as a share of the source logits' spread (standard deviation), per quant type; docs/export.md gives the measured
# values these bound. q4_0 has none: at 4 bits the error depends on the model too much for one bound (a small model
# can lose most of its greedy replies), so it is measured and recorded only.
TOLERANCE: dict[str, float | None] = {"f16": 0.02, "q8_0": 0.3, "q4_0": None}


def verify_gguf(
    folder: Path, file: str, model, tok, quant: str, prompts, eot: int, max_new_tokens: int = 16
) -> dict[str, Any]:
    """Read the file back with transformers' GGUF loader (model and tokenizer) and compare it with the model it was
    written from: token ids of every prompt, logits at every prompt position (largest |difference|, also relative to
    the source logits' spread), and greedy replies. Runs on the CPU in fp32, so the figures do not depend on a GPU's
    kernels. Where node-llama-cpp is installed, llama.cpp itself runs the file too (`llama_cpp`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfrecipes.inference import prompt_ids, until_eos
    from hfrecipes.modeling import drop_gguf_quantizer

    back_tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    back = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32).eval()
    drop_gguf_quantizer(back)
    source = model.to("cpu", torch.float32).eval()
    ids, back_ids = prompt_ids(tok, prompts), prompt_ids(back_tok, prompts)
    worst, spread, same, first, top1, positions, replies = 0.0, 0.0, 0, None, 0, 0, []
    with torch.no_grad():
        for i, x in enumerate(ids):
            t = torch.tensor([x])
            a, b = source(t).logits[0], back(t).logits[0]
            worst = max(worst, (a - b).abs().max().item())
            spread = max(spread, a.std().item())
            top1 += (a.argmax(-1) == b.argmax(-1)).sum().item()
            positions += len(x)
            kw = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tok.pad_token_id}
            replies.append(source.generate(t, **kw)[0, len(x) :].tolist())
            ga = until_eos(replies[-1], {eot})
            gb = until_eos(back.generate(t, **kw)[0, len(x) :].tolist(), {eot})
            same += ga == gb
            if ga != gb and first is None:
                first = {"prompt": str(prompts[i]), "source": ga, "gguf": gb}
    relative, bound = (worst / spread if spread else None), TOLERANCE[quant]
    result = {
        "reader": "transformers (gguf_file=)",
        "prompts": len(prompts),
        "tokenizer_ids_match": sum(a == b for a, b in zip(ids, back_ids, strict=True)),
        "logits_max_abs_diff": worst,
        "logits_max_abs_diff_relative": relative,
        "top1_agreement": top1 / positions if positions else None,
        "tolerance_relative": bound,
        "within_tolerance": None if bound is None else relative is not None and relative <= bound,
        "greedy_matches": same,
        "greedy_max_new_tokens": max_new_tokens,
    }
    if first:
        result["first_greedy_mismatch"] = first
    result["llama_cpp"] = _run_llama_cpp(folder / file, source, tok, prompts, replies, eot, max_new_tokens)
    return result


def _run_llama_cpp(file: Path, source, tok, prompts, replies, eot: int, max_new_tokens: int) -> dict[str, Any] | str:
    """llama.cpp's own run of the file against the source (`hfrecipes.llama_cpp`), or why it did not run."""
    from hfrecipes import llama_cpp

    if not llama_cpp.available():
        return "not installed"
    eos = source.generation_config.eos_token_id
    stops = {eot, *(eos if isinstance(eos, list) else [] if eos is None else [eos])}
    try:
        check = llama_cpp.compare(file, source, tok, prompts, replies, stops, eot, max_new_tokens)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        logger.warning("llama.cpp could not run the GGUF file: %s", e)
        return {"error": str(e)}
    eot_read = check["end_of_turn"]["eos"] == check["end_of_turn"]["eot"] == eot
    if not eot_read or check["tokenizer_ids_match"] != check["tokenizer_texts"]:
        logger.warning("llama.cpp reads the GGUF's tokenizer differently from the source: %s", check)
    return check
