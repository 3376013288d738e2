"""Bad data and bad model paths stop a stage before any model loads, with one message naming what is wrong.

Every row runs the real stage entry point; loading a model or tokenizer is made to fail the test, the message is one
line, the bad file is left as it was, and the output folder must not appear. (Bad recipes, flags and what only the
command line or a whole model folder shows: tests/test_bad_input.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import hfrecipes
from hfrecipes import modeling
from hfrecipes.errors import UsageError

CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
PAIR = {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}
JUDGED = {"prompt": "Hi", "completion": "Hello."}


def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def _conversations(*bad, good: int = 2):
    """JSON lines: `good` well-formed conversations, then each conversation in `bad`."""
    return _jsonl([{"messages": CONVERSATION}] * good + [{"messages": m} for m in bad])


ASSISTANT = {"role": "assistant", "content": "Hello."}
NAN, INF = float("nan"), float("inf")


# (id, stage, file name, file content or None, recipe overrides, words the message must contain)
BAD = [
    (
        "sft-missing-column",
        "sft",
        "d.jsonl",
        _jsonl([{"question": "Hi", "reply": "Hello."}]),
        {},
        ["d.jsonl", "messages", "prompt+completion", "['question', 'reply']", "dataset_columns"],
    ),
    ("sft-empty-file", "sft", "d.jsonl", "", {}, ["empty"]),
    ("sft-empty-csv", "sft", "d.csv", "prompt,completion\n", {}, ["empty", "at least one example"]),
    (
        "sft-wrong-type",
        "sft",
        "d.jsonl",
        _jsonl([{"messages": "Hi there"}]),
        {},
        ["column 'messages'", "row 0", "str", "expected list"],
    ),
    (
        "sft-mapping-to-missing",
        "sft",
        "d.jsonl",
        _jsonl([{"conv": CONVERSATION}]),
        {"dataset_columns": {"messages": "conversation"}},
        ["conversation", "['conv']"],
    ),
    (
        "sft-assistant-loss-on-plain-text",
        "sft",
        "d.jsonl",
        _jsonl([{"prompt": "Hi", "completion": "Hello."}]),
        {},
        ["assistant_only_loss", "conversational", "assistant_only_loss: false"],
    ),
    (
        "reward-missing-rejected",
        "reward",
        "d.jsonl",
        _jsonl([{"prompt": "Hi", "chosen": "Hello."}]),
        {},
        ["rejected", "reward", "['prompt', 'chosen']"],
    ),
    (
        "dpo-wrong-type",
        "dpo",
        "d.jsonl",
        _jsonl([{**PAIR, "chosen": 3}]),
        {},
        ["column 'chosen'", "int", "expected str or list"],
    ),
    ("dpo-empty-file", "dpo", "d.jsonl", "", {}, ["empty"]),
    ("dpo-missing-file", "dpo", "nothere.jsonl", None, {}, ["nothere.jsonl", "does not exist"]),
    (
        "gguf-missing",
        "sft",
        "d.jsonl",
        _jsonl([{"messages": CONVERSATION}]),
        {"model_name_or_path": "/nonexistent/folder/model-Q8_0.gguf"},
        ["model-Q8_0.gguf", "does not exist"],
    ),
    (
        "gguf-file-missing-in-folder",
        "dpo",
        "d.jsonl",
        _jsonl([PAIR]),
        {"gguf_file": "model-Q4_K_M.gguf"},
        ["gguf_file", "model-Q4_K_M.gguf", "does not exist"],
    ),
    (
        "model-folder-missing",
        "reward",
        "d.jsonl",
        _jsonl([PAIR]),
        {"model_name_or_path": "./runs/none/sft"},
        ["./runs/none/sft", "does not exist"],
    ),
    (
        "qlora-without-peft",
        "sft",
        "d.jsonl",
        _jsonl([{"messages": CONVERSATION}]),
        {"load_in_4bit": True},
        ["load_in_4bit", "use_peft: true"],
    ),
    (
        "dpo-unknown-loss",
        "dpo",
        "d.jsonl",
        _jsonl([PAIR]),
        {"loss_type": ["sigmoid", "sigmod"]},
        ["loss_type", "sigmod", "'ipo'"],
    ),
    # unpaired judgments (kto): a boolean label in every row, both kinds present
    (
        "kto-one-label-kind",
        "kto",
        "d.jsonl",
        _jsonl([{**JUDGED, "label": False}] * 4),
        {},
        ["d.jsonl", "'label'", "false (undesirable) in all 4 rows", "both desirable (label true)", "other kind"],
    ),
    (
        "kto-label-not-boolean",
        "kto",
        "d.jsonl",
        _jsonl([{**JUDGED, "label": "yes"}, {**JUDGED, "label": "no"}]),
        {},
        ["d.jsonl", "'label'", "str values", "'yes'", "expected booleans", "true/false"],
    ),
    (
        "kto-label-empty",
        "kto",
        "d.jsonl",
        _jsonl([{**JUDGED, "label": True}, {**JUDGED, "label": None}]),
        {},
        ["'label' row 1 is empty", "desirable"],
    ),
    (
        "kto-missing-label",
        "kto",
        "d.jsonl",
        _jsonl([PAIR]),
        {},
        ["label", "kto", "prompt+completion+label", "dataset_columns"],
    ),
    # local files cut short or damaged: the file, the line and the fix
    (
        "sft-jsonl-cut-short",
        "sft",
        "d.jsonl",
        _conversations() + '{"messages": [{"role": "user", "content": "Wh',
        {},
        ["d.jsonl", "line 3", "not valid JSON", "Unterminated string", "cut short"],
    ),
    (
        "sft-jsonl-line-cut-midway",
        "sft",
        "d.jsonl",
        '{"messages": [{"role": "us\n' + _conversations(),
        {},
        ["d.jsonl", "line 1", "not valid JSON", "Fix or remove that line"],
    ),
    (
        "sft-json-unterminated",
        "sft",
        "d.json",
        json.dumps([{"messages": CONVERSATION}] * 3, indent=2)[:-30],
        {},
        ["d.json", "line 34", "not valid JSON", "cut short"],
    ),
    (
        "sft-jsonl-line-not-an-object",
        "sft",
        "d.jsonl",
        _conversations() + "[1, 2]\n",
        {},
        ["d.jsonl", "line 3", "JSON list", "not an object"],
    ),
    (
        "sft-jsonl-not-utf8",
        "sft",
        "d.jsonl",
        _conversations().encode() + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n',
        {},
        ["d.jsonl", "line 3", "not UTF-8", "Save the file as UTF-8"],
    ),
    (
        "sft-csv-cut-in-a-quote",
        "sft",
        "d.csv",
        'prompt,completion\n"Hi","Hello."\n"Hi","Hel',
        {},
        ["d.csv", "line 3", "a quoted field never closes", "cut short"],
    ),
    (
        "sft-csv-ragged-line",
        "sft",
        "d.csv",
        "prompt,completion\nHi,Hello.\nHi,Hello,again\n",
        {},
        ["d.csv", "line 3", "3 fields", "header 2"],
    ),
    (
        "dpo-csv-empty-cell",
        "dpo",
        "d.csv",
        "prompt,chosen,rejected\nHi,Hello.,Go away.\nHi,Hello.,\n",
        {},
        ["column 'rejected'", "row 1", "empty cell"],
    ),
    ("sft-parquet-cut-short", "sft", "d.parquet", b"PAR1" + bytes(40), {}, ["d.parquet", "not a readable Parquet"]),
    (
        "pretrain-text-not-utf8",
        "pretrain",
        "d.txt",
        b"Once upon a time.\n" * 3 + b"caf\xe9\n",
        {},
        ["d.txt", "line 4", "not UTF-8"],
    ),
    # conversations: every message a role and a text content, checked over the whole column
    (
        "sft-message-without-content",
        "sft",
        "d.jsonl",
        _conversations([{"role": "user"}, ASSISTANT]),
        {},
        ["column 'messages'", "row 2", "message 0", "has no 'content'"],
    ),
    (
        "sft-message-content-null",
        "sft",
        "d.jsonl",
        _conversations([{"role": "user", "content": None}, ASSISTANT]),
        {},
        ["row 2", "message 0", "has no 'content'"],
    ),
    (
        "sft-message-content-int",
        "sft",
        "d.jsonl",
        _conversations([{"role": "user", "content": 3}, ASSISTANT]),
        {},
        ["row 2", "an int as 'content'", "expected a string"],
    ),
    (
        "sft-message-content-parts",
        "sft",
        "d.jsonl",
        _conversations([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}, ASSISTANT]),
        {},
        ["row 2", "list as 'content'", "join the text parts"],
    ),
    (
        "sft-message-without-role",
        "sft",
        "d.jsonl",
        _conversations([{"content": "Hi"}, ASSISTANT]),
        {},
        ["row 2", "message 0", "has no 'role'"],
    ),
    (
        "sft-sharegpt-messages",
        "sft",
        "d.jsonl",
        _conversations([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}], good=0),
        {},
        ["row 0", "has no 'role'", "ShareGPT", "human -> user"],
    ),
    (
        "sft-message-not-a-dict",
        "sft",
        "d.jsonl",
        _conversations(["Hi", ASSISTANT]),
        {},
        ["row 2", "message 0", "is a str", "not a message"],
    ),
    (
        "sft-empty-conversation",
        "sft",
        "d.jsonl",
        _conversations([]),
        {},
        ["row 2", "empty conversation"],
    ),
    (
        "sft-bad-message-after-the-first-hundred-rows",
        "sft",
        "d.jsonl",
        _conversations([CONVERSATION[0], {"role": "assistant", "content": None}], good=150),
        {},
        ["row 150", "message 1", "has no 'content'"],
    ),
    (
        "dpo-chosen-message-without-content",
        "dpo",
        "d.jsonl",
        _jsonl([{"prompt": [CONVERSATION[0]], "chosen": [{"role": "assistant"}], "rejected": [ASSISTANT]}]),
        {},
        ["column 'chosen'", "row 0", "has no 'content'"],
    ),
    # non-finite hyperparameters as Python overrides (recipes and flags: tests/test_bad_input.py)
    (
        "sft-nan-learning-rate",
        "sft",
        "d.jsonl",
        _conversations(),
        {"learning_rate": NAN},
        ["overrides", "'learning_rate'", "nan", "finite"],
    ),
    ("sft-nan-string-learning-rate", "sft", "d.jsonl", _conversations(), {"learning_rate": "nan"}, ["learning_rate"]),
    (
        "sft-inf-max-grad-norm",
        "sft",
        "d.jsonl",
        _conversations(),
        {"max_grad_norm": INF},
        ["'max_grad_norm'", "inf", "0 turns gradient clipping off"],
    ),
    ("dpo-inf-beta", "dpo", "d.jsonl", _jsonl([PAIR]), {"beta": INF}, ["'beta'", "inf", "finite"]),
    ("reward-nan-weight-decay", "reward", "d.jsonl", _jsonl([PAIR]), {"weight_decay": NAN}, ["'weight_decay'"]),
    (
        "grpo-nan-reward-weight",
        "grpo",
        "d.jsonl",
        _jsonl([{"prompt": "Hi", "solution": "1"}]),
        {"reward_weights": [NAN]},
        ["'reward_weights[0]'", "nan"],
    ),
    (
        "pretrain-nan-in-model-init-overrides",
        "pretrain",
        "d.jsonl",
        _jsonl([{"text": "Once upon a time."}]),
        {"model_name_or_path": None, "train_tokenizer": True, "model_init_overrides": {"rms_norm_eps": NAN}},
        ["'model_init_overrides.rms_norm_eps'", "nan"],
    ),
    # numbers outside their physical range, values TRL checks only once training runs, paths that must exist
    (
        "pretrain-init-override-misspelt",
        "pretrain",
        "d.jsonl",
        _jsonl([{"text": "Once upon a time."}]),
        {
            "model_name_or_path": None,
            "train_tokenizer": True,
            "model_init_overrides": {"num_hiden_layers": 2},
        },
        ["model_init_overrides ['num_hiden_layers']", "LlamaConfig"],
    ),
    (
        "pretrain-init-override-no-layers",
        "pretrain",
        "d.jsonl",
        _jsonl([{"text": "Once upon a time."}]),
        {
            "model_name_or_path": None,
            "train_tokenizer": True,
            "model_init_overrides": {"num_hidden_layers": 0},
        },
        ["'num_hidden_layers'", ">= 1"],
    ),
    ("ppo-gamma-above-one", "ppo", "d.jsonl", _jsonl([{"prompt": "Hi"}]), {"gamma": 1.5}, ["'gamma'", "[0, 1]"]),
    ("sft-pue-below-one", "sft", "d.jsonl", _conversations(), {"pue": 0.9}, ["overrides", "'pue'", "[1, inf]"]),
    ("dpo-negative-price", "dpo", "d.jsonl", _jsonl([PAIR]), {"device_price_per_hour": -1.0}, ["[0, inf]"]),
    (
        "grpo-unknown-loss",
        "grpo",
        "d.jsonl",
        _jsonl([{"prompt": "Hi", "solution": "1"}]),
        {"loss_type": "gspo"},
        ["loss_type", "'gspo'", "'dr_grpo'"],
    ),
    (
        "sft-resume-checkpoint-missing",
        "sft",
        "d.jsonl",
        _conversations(),
        {"resume_from_checkpoint": "/nonexistent/run/checkpoint-3"},
        ["resume_from_checkpoint", "checkpoint-3", "does not exist"],
    ),
    (
        "pretrain-knowledge-probe-missing",
        "pretrain",
        "d.jsonl",
        _jsonl([{"text": "Once upon a time."}]),
        {"model_name_or_path": None, "train_tokenizer": True, "knowledge_probe": "./facts.jsonl"},
        ["knowledge_probe", "./facts.jsonl", "does not exist"],
    ),
]


def test_init_override_the_config_takes_under_another_name_is_kept():
    """`rope_theta` is no attribute of a transformers 5 config, which files it in rope_parameters: not unknown."""

    class Tokenizer:
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

        def __len__(self):
            return 300

    config = modeling.config_from("tiny", {"rope_theta": 5e5, "num_hidden_layers": 1}, Tokenizer())
    assert config.rope_parameters["rope_theta"] == 5e5 and config.num_hidden_layers == 1


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the bad input was reported")

    monkeypatch.setattr(modeling, "load_pretrained", refuse)
    monkeypatch.setattr(modeling, "load_stage_tokenizer", refuse)


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_one_clear_error_before_any_model(case, tmp_path, no_model_loads):
    _, stage, file_name, content, overrides, words = case
    data_file = tmp_path / file_name
    if isinstance(content, bytes):
        data_file.write_bytes(content)
    elif content is not None:
        data_file.write_text(content)
    model_dir = tmp_path / "model"  # a folder that exists, so only the data (or the named field) is wrong
    model_dir.mkdir()
    out = tmp_path / "out"
    kwargs = {"model_name_or_path": str(model_dir), "dataset_name": str(data_file), "output_dir": str(out)}
    kwargs.update(overrides)
    _refused(stage, kwargs, words, data_file)


def _refused(stage: str, kwargs: dict, words: list[str], bad_file) -> None:
    """The stage refuses with one message on one line holding every word; the bad file is as it was (a data file
    that does not exist stays absent) and no output folder appears."""
    before = bad_file.read_bytes() if bad_file.is_file() else None
    with pytest.raises(UsageError) as e:
        getattr(hfrecipes, stage)(f"tiny/{stage}", **kwargs)
    message = str(e.value)
    assert "\n" not in message.strip(), f"more than one line: {message}"
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    assert (bad_file.read_bytes() if bad_file.is_file() else None) == before, "the bad file was changed"
    assert not Path(kwargs["output_dir"]).exists(), "a refused run must not create its output folder"


def test_conversational_data_without_chat_template(tiny_pretrained, tmp_path):
    """A tokenizer with no chat template meets conversations: the message says to set chat_template_path."""
    import shutil

    model = tmp_path / "no-template"
    shutil.copytree(tiny_pretrained.output_dir, model)
    (model / "chat_template.jinja").unlink()
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="chat_template_path"):
        hfrecipes.sft("tiny/sft", model_name_or_path=str(model), output_dir=str(tmp_path / "out"), max_steps=1)


def _safetensors(cut: int | None = None) -> bytes:
    """A small safetensors file, cut to its first `cut` bytes when given."""
    import numpy as np
    from safetensors.numpy import save

    data = save({"w": np.zeros((16, 16), dtype=np.float32)})
    return data if cut is None else data[:cut]


def _gguf(cut: int = 0) -> bytes:
    """A GGUF v3 file with one 64-float tensor and no metadata, less its last `cut` bytes (a download cut short)."""
    import struct

    header = b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + struct.pack("<Q", 1) + b"w" + struct.pack("<IQIQ", 1, 64, 0, 0)
    data = header + bytes(-len(header) % 32) + bytes(4 * 64)
    return data[: len(data) - cut]


# (id, stage, damaged file in the model folder, its content, recipe overrides, words the message must contain).
# Overrides may name "{folder}" (the damaged folder), "{file}" (the damaged file) or "{empty}" (an empty folder);
# model_name_or_path is the damaged folder unless a row sets it.
DAMAGED_MODELS = [
    (
        "safetensors-cut-short",
        "sft",
        "model.safetensors",
        _safetensors(cut=200),
        {},
        ["model_name_or_path", "model.safetensors", "not a readable safetensors file", "download it again"],
    ),
    (
        "safetensors-garbage",
        "dpo",
        "model.safetensors",
        b"\x00garbage" * 20,
        {},
        ["model.safetensors", "not a readable safetensors file"],
    ),
    ("safetensors-empty", "reward", "model.safetensors", b"", {}, ["model.safetensors", "not a readable"]),
    ("config-empty", "sft", "config.json", "", {}, ["config.json", "is empty", "damaged"]),
    ("config-not-json", "reward", "config.json", "model_type: llama\n", {}, ["config.json", "not valid JSON"]),
    ("config-cut-short", "grpo", "config.json", '{"model_type": "llama", "hidden_', {}, ["not valid JSON"]),
    ("config-a-list", "dpo", "config.json", "[1, 2]", {}, ["config.json", "JSON list", "expected an object"]),
    (
        "tokenizer-json-cut-short",
        "sft",
        "tokenizer.json",
        '{"model": {"vocab": {"a": 0,',
        {},
        ["tokenizer.json", "not valid JSON"],
    ),
    ("tokenizer-config-empty", "dpo", "tokenizer_config.json", "  \n", {}, ["tokenizer_config.json", "is empty"]),
    (
        "generation-config-cut-short",
        "sft",
        "generation_config.json",
        "{",
        {},
        ["generation_config.json", "not valid JSON"],
    ),
    ("adapter-config-cut-short", "dpo", "adapter_config.json", '{"base_model_', {}, ["adapter_config.json"]),
    (
        "shard-index-names-a-missing-shard",
        "sft",
        "model.safetensors.index.json",
        json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}}),
        {},
        ["model-00001-of-00002.safetensors", "does not hold"],
    ),
    (
        "gguf-cut-short",
        "sft",
        "model.gguf",
        _gguf(cut=100),
        {"model_name_or_path": "{file}"},
        ["model.gguf", "not a readable GGUF file", "past the end of the file"],
    ),
    (
        "gguf-garbage",
        "dpo",
        "model.gguf",
        b"\x00garbage" * 20,
        {"model_name_or_path": "{file}"},
        ["model.gguf", "not a readable GGUF file", "GGUF magic"],
    ),
    (
        "gguf-header-cut-short",
        "reward",
        "model.gguf",
        _gguf()[:30],
        {"model_name_or_path": "{file}"},
        ["model.gguf", "not a readable GGUF file"],
    ),
    (
        "gguf-file-in-folder-cut-short",
        "sft",
        "model.gguf",
        _gguf(cut=1),
        {"gguf_file": "model.gguf"},
        ["gguf_file", "model.gguf", "not a readable GGUF file"],
    ),
    (
        "grpo-reward-model-cut-short",
        "grpo",
        "model.safetensors",
        _safetensors(cut=100),
        {"model_name_or_path": "{empty}", "reward_model_path": "{folder}"},
        ["reward_model_path", "model.safetensors", "not a readable safetensors file"],
    ),
    (
        "ppo-reward-model-config-empty",
        "ppo",
        "config.json",
        "",
        {"model_name_or_path": "{empty}", "reward_model_path": "{folder}"},
        ["reward_model_path", "config.json", "is empty"],
    ),
    (
        "ppo-value-model-tokenizer-cut-short",
        "ppo",
        "tokenizer.json",
        '{"version": "1.0", "truncation": nu',
        {"model_name_or_path": "{empty}", "reward_model_path": None, "value_model_path": "{folder}"},
        ["value_model_path", "tokenizer.json", "not valid JSON"],
    ),
]


@pytest.mark.parametrize("case", DAMAGED_MODELS, ids=[c[0] for c in DAMAGED_MODELS])
def test_damaged_model_file_is_one_clear_error_before_any_model(case, tmp_path, no_model_loads):
    """A checkpoint file cut short or garbled is found from headers alone, before data, tokenizer or weights load."""
    _, stage, file_name, content, overrides, words = case
    folder, empty, out = tmp_path / "damaged", tmp_path / "empty", tmp_path / "out"
    folder.mkdir()
    empty.mkdir()
    damaged = folder / file_name
    if isinstance(content, bytes):
        damaged.write_bytes(content)
    else:
        damaged.write_text(content)
    places = {"folder": folder, "file": damaged, "empty": empty}
    kwargs = {"model_name_or_path": str(folder), "output_dir": str(out)}
    kwargs.update({k: v.format(**places) if isinstance(v, str) else v for k, v in overrides.items()})
    _refused(stage, kwargs, words, damaged)
