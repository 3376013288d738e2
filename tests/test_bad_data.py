"""Bad data and bad model paths stop a stage before any model loads, with one message naming what is wrong.

Every row runs the real stage entry point; loading a model or tokenizer is made to fail the test, and the output
folder must not appear.
"""

from __future__ import annotations

import json

import pytest

import hfrecipes
from hfrecipes import modeling
from hfrecipes.errors import UsageError

CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
PAIR = {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}


def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


# (id, stage, file name, file content or None, recipe overrides, words the message must contain)
BAD = [
    (
        "sft-missing-column",
        "sft",
        "d.jsonl",
        _jsonl([{"question": "Hi", "reply": "Hello."}]),
        {},
        ["messages", "prompt+completion", "['question', 'reply']", "dataset_columns"],
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
]


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
    if content is not None:
        data_file.write_text(content)
    model_dir = tmp_path / "model"  # a folder that exists, so only the data (or the named field) is wrong
    model_dir.mkdir()
    out = tmp_path / "out"
    kwargs = {"model_name_or_path": str(model_dir), "dataset_name": str(data_file), "output_dir": str(out)}
    kwargs.update(overrides)
    with pytest.raises(UsageError) as e:
        getattr(hfrecipes, stage)(f"tiny/{stage}", **kwargs)
    for word in words:
        assert word in str(e.value), f"{word!r} not in: {e.value}"
    assert not out.exists(), "a refused run must not create its output folder"


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
