"""Export to GGUF (`hfrecipes export --format gguf`), proven by reading the file back with transformers' own GGUF
loader: the tiny Llama in f16 and q8_0 (logits within the quant's tolerance, greedy replies, tokenizer ids and chat
template as the source's), a LoRA stage merged first, and the Qwen2 and Mistral layouts; and by running it in llama.cpp
itself (node-llama-cpp), with each family's pre-tokenizer. Bad input to the GGUF export is in tests/test_bad_input.py;
the real SmolLM2 round trip in tests/test_real_model.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import needs_llama_cpp

import hfrecipes
from hfrecipes import gguf_export, llama_cpp, record

PROMPTS = 8  # held-out prompts of the tiny task the read-back model answers


def heldout_prompts(n: int = PROMPTS) -> list:
    from hfrecipes.data import tiny_rows

    return [r["prompt"] for r in tiny_rows("prompts", "test")[:n]] + ["One sunny day, Mia went to the"]


def gguf_file(folder: Path) -> Path:
    (file,) = folder.glob("*.gguf")
    return file


def compare(source: Path | tuple, out: Path, prompts: list, max_new_tokens: int = 12) -> dict:
    """A source (a model folder, or a model and its tokenizer) and the GGUF read back by transformers, side by side on
    `prompts`: the largest |logit difference| (and relative to the source logits' spread), greedy replies equal, and
    token ids equal."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfrecipes.inference import prompt_ids

    file = gguf_file(out).name
    if isinstance(source, Path):
        source = (
            AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32),
            AutoTokenizer.from_pretrained(source),
        )
    model, tok = source[0].eval(), source[1]
    back_tok = AutoTokenizer.from_pretrained(out, gguf_file=file)
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file=file, dtype=torch.float32).eval()
    ids, back_ids = prompt_ids(tok, prompts), prompt_ids(back_tok, prompts)
    worst, spread, greedy = 0.0, 0.0, 0
    with torch.no_grad():
        for x in ids:
            t = torch.tensor([x])
            a, b = model(t).logits[0], back(t).logits[0]
            worst, spread = max(worst, (a - b).abs().max().item()), max(spread, a.std().item())
            kw = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tok.pad_token_id}
            greedy += model.generate(t, **kw)[0].tolist() == back.generate(t, **kw)[0].tolist()
    same_ids = sum(a == b for a, b in zip(ids, back_ids, strict=True))
    return {"max_abs": worst, "relative": worst / spread, "greedy": greedy, "ids": same_ids, "back_tok": back_tok}


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_round_trip_of_the_tiny_model(tiny_pretrained, tmp_path, quant):
    import gguf

    src = tiny_pretrained.output_dir
    out = hfrecipes.export(src, tmp_path / "gguf", format="gguf", quant=quant).output_dir
    file = gguf_file(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([file.name, "Modelfile", "README.md", "record.json"])
    assert file.name == f"{tmp_path.name}-pretrain-{quant}.gguf"  # a folder named "gguf": the run's name and stage

    reader = gguf.GGUFReader(str(file))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    config = json.loads((src / "config.json").read_text())
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == config["num_hidden_layers"]
    assert meta["llama.attention.head_count_kv"] == config["num_key_value_heads"]
    assert meta["llama.rope.dimension_count"] == config["head_dim"]
    assert meta["llama.context_length"] == config["max_position_embeddings"]
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == 2  # <|im_end|>: the chat's end of turn
    assert "{% generation %}" not in meta["tokenizer.chat_template"]
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in types, "tied embeddings are stored once, as token_embd"
    matrix = {"f16": "F16", "q8_0": "Q8_0"}[quant]
    assert types["token_embd.weight"] == types["blk.0.attn_q.weight"] == types["blk.3.ffn_down.weight"] == matrix
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"

    got = compare(src, out, heldout_prompts())
    assert got["ids"] == PROMPTS + 1, "the tokenizer read back splits a prompt differently"
    assert got["relative"] <= gguf_export.TOLERANCE[quant], got
    if quant == "f16":
        assert got["greedy"] == PROMPTS + 1, got
    messages = [{"role": "user", "content": "What is 3 plus 4?"}]
    from transformers import AutoTokenizer

    want = AutoTokenizer.from_pretrained(src).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert got["back_tok"].apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == want

    rec = record.read_record(out)
    block = rec["export"]["gguf"]
    assert rec["export"]["format"] == "gguf" and block["quant"] == quant and block["file"] == file.name
    assert block["bytes"] == file.stat().st_size and block["sha256"] == gguf_export.sha256(file)
    check = rec["export"]["verify"]
    assert check["within_tolerance"] and check["tokenizer_ids_match"] == check["prompts"], check
    card = (out / "README.md").read_text()
    assert file.name in card and block["sha256"] in card and "ollama create" in card and "llama-cli" in card
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{file.name}\n") and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>{{ .Role }}" in modelfile


def test_q8_0_is_about_half_of_f16(tiny_pretrained, tmp_path):
    sizes = {}
    for quant in ("f16", "q8_0"):
        out = hfrecipes.export(
            tiny_pretrained.output_dir, tmp_path / quant, format="gguf", quant=quant, verify_load=False
        )
        sizes[quant] = out.record["export"]["gguf"]["bytes"]
    # Q8_0 stores 34 bytes per 32 weights, F16 64; the F32 norms and the header are the same in both
    assert 0.5 < sizes["q8_0"] / sizes["f16"] < 0.6, sizes


def test_a_lora_stage_is_merged_before_writing(tiny_sft_lora, tmp_path):
    """The GGUF of a LoRA stage holds base + adapter: read back, it gives the merged model's logits, not the base's."""
    from hfrecipes.modeling import load_merged

    stage = tiny_sft_lora[0].output_dir
    out = hfrecipes.export(stage, tmp_path / "gguf", format="gguf", quant="f16", verify_load=False).output_dir
    merged = compare(load_merged(stage, "float32"), out, heldout_prompts(4))
    assert merged["relative"] <= gguf_export.TOLERANCE["f16"], merged
    base = compare(Path(json.loads((stage / "adapter_config.json").read_text())["base_model_name_or_path"]), out,
                   heldout_prompts(4))  # fmt: skip
    assert base["max_abs"] > 10 * merged["max_abs"], "the adapter made no difference the file shows"
    assert record.read_record(out)["model"]["merged_adapter"] is True


def _random_model(tok, model_type: str, folder: Path) -> Path:
    """A small random model of another architecture with the tiny tokenizer, biases (where it has them) non-zero so
    a misplaced bias shows in the logits."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tok), num_key_value_heads=2, max_position_embeddings=256, **dims,
        tie_word_embeddings=model_type == "qwen2", bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _family_gguf(tiny_pretrained, tmp_path: Path, model_type: str, split: str) -> tuple[Path, Path]:
    """A random `model_type` model whose tokenizer splits text with its family's regex (Qwen2's or Llama 3's) before
    byte-level BPE, and its f16 GGUF export: (source folder, export folder)."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoTokenizer
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    tok = AutoTokenizer.from_pretrained(tiny_pretrained.output_dir)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS[split]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    src = _random_model(tok, model_type, tmp_path / model_type)
    out = hfrecipes.export(src, tmp_path / "gguf", format="gguf", quant="f16", verify_load=False).output_dir
    return src, out


@pytest.mark.parametrize(
    "model_type, arch, bias, split, pre",
    [("qwen2", "qwen2", True, "qwen2", "qwen2"), ("mistral", "llama", False, "llama3", "llama-bpe")],
)
def test_qwen2_and_mistral_layouts_read_back(tiny_pretrained, tmp_path, model_type, arch, bias, split, pre):
    """Each with a pre-tokenizer of its family (Qwen2's or Llama 3's split regex before byte-level BPE), which the file
    names as llama.cpp does and transformers' reader splits the same way again."""
    import gguf

    src, out = _family_gguf(tiny_pretrained, tmp_path, model_type, split)
    reader = gguf.GGUFReader(str(gguf_file(out)))
    names = {t.name for t in reader.tensors}
    assert reader.fields["general.architecture"].contents() == arch
    assert reader.fields["tokenizer.ggml.pre"].contents() == pre
    assert ("blk.1.attn_k.bias" in names) is bias and ("output.weight" in names) is (model_type == "mistral")
    prompts = heldout_prompts(4) + ["Tom's 12 dogs ran  home.\n\nThey're 345 today!"]
    got = compare(src, out, prompts)
    assert got["ids"] == len(prompts), "the read-back tokenizer splits a prompt differently"
    assert got["relative"] <= gguf_export.TOLERANCE["f16"] and got["greedy"] == len(prompts), got


# ------------------------------------------------------------------------------------------- llama.cpp itself


# The largest |difference| between llama.cpp's top logits and the fp32 source's on the same tokens (the tiny model's
# logits spread about 2): llama.cpp also rounds the activations to the weights' type before a matrix product
LLAMA_CPP_LOGITS = {"f16": 0.02, "q8_0": 0.15}


@needs_llama_cpp
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_llama_cpp_runs_the_export_as_transformers_runs_the_source(tiny_pretrained, tmp_path, quant):
    """The export's own check runs the file in llama.cpp (node-llama-cpp's prebuilt CPU binaries): its tokenizer gives
    transformers' ids on the prompts and on text with digits, spaces, newlines and apostrophes, it reads <|im_end|> as
    the end of turn, its Jinja engine renders the chat template as transformers does, and its greedy replies are the
    fp32 source's: all of them in f16; in q8_0, whose 8-bit activations can turn a near-tie, all but two."""
    from hfrecipes.exporting import VERIFY_PROMPTS

    out = hfrecipes.export(tiny_pretrained.output_dir, tmp_path / "gguf", format="gguf", quant=quant)
    lc = out.record["export"]["verify"]["llama_cpp"]
    assert isinstance(lc, dict) and "error" not in lc, lc
    assert lc["backend"] == "cpu" and lc["runtime"].startswith("node-llama-cpp ") and lc["llama_cpp"]
    assert lc["tokenizer_texts"] == len(VERIFY_PROMPTS) + len(llama_cpp.TOKENIZER_TEXTS)
    assert lc["tokenizer_ids_match"] == lc["tokenizer_texts"], lc
    assert lc["end_of_turn"] == {"eos": 2, "eot": 2, "expected": 2}, "llama.cpp must stop at <|im_end|>"
    assert lc["chat_template_renders_same"] == lc["chats"] == 6, lc
    assert lc["prompts"] == len(VERIFY_PROMPTS) and lc["top_logits_max_abs_diff"] < LLAMA_CPP_LOGITS[quant], lc
    # where llama.cpp picks another token than the source, the source had the two within that difference: a near-tie
    # its rounding turned, not a weight it misread
    assert lc["top1_max_source_margin"] <= LLAMA_CPP_LOGITS[quant], lc
    if quant == "f16":
        assert lc["greedy_matches"] == lc["prompts"] and lc["top1_agreement"] == 1.0, lc
    else:
        assert lc["greedy_matches"] >= lc["prompts"] - 2 and lc["top1_agreement"] >= 0.97, lc
    assert "Run in llama.cpp itself" in (out.output_dir / "README.md").read_text()


@needs_llama_cpp
@pytest.mark.parametrize("model_type, split", [("qwen2", "qwen2"), ("mistral", "llama3")])
def test_llama_cpp_splits_text_as_each_familys_tokenizer(tiny_pretrained, tmp_path, model_type, split):
    """llama.cpp's tokenizer, told the pre-tokenizer by the name the file carries (qwen2, llama-bpe), gives
    transformers' ids: a wrong name splits digits, spaces or apostrophes differently."""
    from transformers import AutoTokenizer

    src, out = _family_gguf(tiny_pretrained, tmp_path, model_type, split)
    tok = AutoTokenizer.from_pretrained(src)
    chats = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in heldout_prompts(4)[:-1]]
    texts = llama_cpp.TOKENIZER_TEXTS + chats + ["x  =  1234567\n\n\n  y's 'quoted'  \t\n end"]
    got = llama_cpp.run(gguf_file(out), [], 0, texts)
    want = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert got["tokenized"] == want
    assert got["tokens"]["eos"] == got["tokens"]["eot"] == tok.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_record_and_card_say_when_llama_cpp_did_not_run(tiny_pretrained, tmp_path, monkeypatch):
    """Without node-llama-cpp the record says "not installed"; with one that cannot load (here a stand-in that fails as
    a missing prebuilt binary does) the export still completes, and the record and card carry node's error."""
    broken = tmp_path / "node_modules"
    package = broken / "node-llama-cpp"
    package.mkdir(parents=True)
    (package / "package.json").write_text('{"name": "node-llama-cpp", "version": "0.0.0", "main": "index.mjs"}')
    (package / "index.mjs").write_text('export async function getLlama() { throw new Error("NoBinaryFoundError"); }\n')
    for modules, want in ((tmp_path / "none", "not installed"), (broken, "NoBinaryFoundError")):
        monkeypatch.setenv(llama_cpp.NODE_MODULES_ENV, str(modules))
        out = hfrecipes.export(tiny_pretrained.output_dir, tmp_path / modules.name / "gguf", format="gguf")
        got = out.record["export"]["verify"]["llama_cpp"]
        assert (got == want) if want == "not installed" else (want in got["error"]), got
        assert want in (out.output_dir / "README.md").read_text()


def test_a_template_that_is_not_chatml_leaves_ollama_the_files_own(tiny_pretrained):
    """Only a chat template that renders as ChatML is translated into the Modelfile; another keeps no TEMPLATE (Ollama
    then reads the one in the file), and the stop is still the end-of-turn token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_pretrained.output_dir)
    assert gguf_export.chatml_system(tok) == (True, None)
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert gguf_export.chatml_system(tok) == (False, None)
    text = gguf_export.modelfile(tok, "m.gguf", tok.convert_tokens_to_ids("<|im_end|>"))
    assert not any(line.startswith(("TEMPLATE", "SYSTEM")) for line in text.splitlines()), text
    assert "not ChatML-style" in text
    assert text.startswith("FROM ./m.gguf\n") and text.rstrip().endswith('PARAMETER stop "<|im_end|>"')


def test_serve_refuses_a_gguf_export_naming_llama_cpp(tiny_pretrained, tmp_path, capsys):
    from hfrecipes import cli

    out = hfrecipes.export(tiny_pretrained.output_dir, tmp_path / "gguf", format="gguf", verify_load=False).output_dir
    assert cli.main(["serve", str(out), "--port", "8765"]) == 2
    err = capsys.readouterr().err
    assert err.count("hfrecipes: error:") == 1 and "GGUF file for llama.cpp and Ollama" in err and "safetensors" in err
