"""Assistant-only loss on real chat templates: the marked template renders the model's own text, its mask is each
reply and its end-of-turn token, what cannot be marked is refused, and one short SFT run on a ChatML template.

OMP_NUM_THREADS=1 .venv/bin/pytest -q tests/test_chat_templates.py
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import trl
from safetensors.torch import load_file
from trl.chat_template_utils import has_generation_markers

import hfrecipes
from hfrecipes import modeling
from hfrecipes.chat_templates import training_template
from hfrecipes.errors import UsageError
from hfrecipes.tiny import corpus, task
from hfrecipes.tiny.tokenizer import CHAT_TEMPLATE as TINY_TEMPLATE

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
SMOLLM2 = (Path(__file__).parent / "data" / "smollm2_chat_template.jinja").read_text(encoding="utf-8")
FIX = "Set assistant_only_loss: false (loss on the whole conversation), or chat_template_path to a template with"


def upstream(name: str) -> str:
    """TRL's verbatim copy of a model's chat template."""
    return (TRL_TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5-Math's template is Qwen2.5's with another default system prompt: not a copy TRL ships
QWEN_MATH = upstream("qwen2_5").replace(QWEN_SYSTEM, "Please reason step by step, and put your final answer within ")

# template, the source expected, the end-of-turn token trained after each reply, whether the family trims content
FAMILY_TEMPLATES = {
    "smollm2": (SMOLLM2, "chatml", "<|im_end|>", False),
    "qwen2_5": (upstream("qwen2_5"), "chatml", "<|im_end|>", False),
    "qwen2_5_math": (QWEN_MATH, "chatml", "<|im_end|>", False),
    "llama3": (upstream("llama3"), "llama3", "<|eot_id|>", True),
    "llama3_1": (upstream("llama3_1"), "llama3", "<|eot_id|>", True),
    "llama3_2": (upstream("llama3_2"), "llama3", "<|eot_id|>", True),
}
# templates of no family hfrecipes derives, which TRL patches
TRL_PATCHED = {"phi3": upstream("phi3"), "gemma": upstream("gemma")}


def _conv(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


CONVERSATIONS = {
    "one_turn": _conv(("user", "What is 47 plus 38?"), ("assistant", "47 plus 38 is 85.")),
    "system": _conv(("system", "You add numbers."), ("user", "What is 1 plus 2?"), ("assistant", "1 plus 2 is 3.")),
    "multi_turn": _conv(("user", "Hi"), ("assistant", "Hello."), ("user", "And 3 plus 4?"), ("assistant", "7.")),
    "ends_on_user": _conv(("system", "Short."), ("user", "Hi"), ("assistant", "Hi."), ("user", "Bye?")),
    "whitespace_unicode": _conv(
        ("user", " Zürich? "), ("assistant", "\n A city — in Switzerland ✓ \n"), ("user", "ok"), ("assistant", "Ok.")
    ),
}
TOOL_CALL = [
    {"role": "user", "content": "What is 2 times 3?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "multiply", "arguments": {"a": 2, "b": 3}}}],
    },
    {"role": "tool", "content": "6"},
    {"role": "assistant", "content": "6."},
]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """The embedded tiny tokenizer (fast; the special tokens of other families tokenize as bytes)."""
    return modeling.train_tiny_tokenizer([d["text"] for d in corpus.documents(n_docs=400)], 2048, 512)


@pytest.fixture
def tok(tiny_tokenizer):
    yield tiny_tokenizer
    tiny_tokenizer.chat_template = TINY_TEMPLATE


def render(tok, template: str, conversation: list[dict], prompt: bool) -> str:
    try:
        return tok.apply_chat_template(
            conversation, chat_template=template, tokenize=False, add_generation_prompt=prompt
        )
    except Exception as e:  # a template's own raise_exception: the marked one must refuse the same conversations
        return f"raised {type(e).__name__}"


@pytest.mark.parametrize("prompt", [False, True], ids=["no_prompt", "generation_prompt"])
@pytest.mark.parametrize("conversation", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
@pytest.mark.parametrize("name", [*FAMILY_TEMPLATES, *TRL_PATCHED])
def test_marked_template_renders_the_models_own_text(tok, name, conversation, prompt):
    own, source = FAMILY_TEMPLATES[name][:2] if name in FAMILY_TEMPLATES else (TRL_PATCHED[name], "trl")
    tok.chat_template = own
    marked, got_source = training_template(tok, name=name)
    assert got_source == source
    assert marked != own and has_generation_markers(marked)
    assert render(tok, marked, conversation, prompt) == render(tok, own, conversation, prompt)
    assert tok.chat_template == own, "deriving must leave the tokenizer as it was"


@pytest.mark.parametrize("prompt", [False, True], ids=["no_prompt", "generation_prompt"])
@pytest.mark.parametrize("conversation", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
@pytest.mark.parametrize("name", FAMILY_TEMPLATES)
def test_mask_is_each_reply_and_its_end_of_turn(tok, name, conversation, prompt):
    own, _, end, trims = FAMILY_TEMPLATES[name]
    tok.chat_template = own
    marked, _ = training_template(tok, [conversation], name)
    out = tok.apply_chat_template(
        conversation,
        chat_template=marked,
        return_dict=True,
        return_assistant_tokens_mask=True,
        tokenize=True,
        add_generation_prompt=prompt,
    )
    trained = tok.decode([i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m])
    replies = [m["content"].strip() if trims else m["content"] for m in conversation if m["role"] == "assistant"]
    assert trained == "".join(reply + end for reply in replies)
    assert tok.decode(out["input_ids"]) == render(tok, own, conversation, prompt)


def test_the_models_own_markers_are_used_as_they_are(tok):
    assert training_template(tok, list(CONVERSATIONS.values()), "tiny") == (TINY_TEMPLATE, "own")


def test_conversations_a_derived_template_cannot_render_fall_back_to_trl(tok):
    """Qwen2.5 renders tool calls, which a derived template does not: the data's rows decide, and TRL's patch (a
    verbatim copy) renders them; a variant TRL does not ship is refused on the same row."""
    tok.chat_template = upstream("qwen2_5")
    assert training_template(tok, [CONVERSATIONS["system"]], "qwen")[1] == "chatml"
    marked, source = training_template(tok, [CONVERSATIONS["system"], TOOL_CALL], "qwen")
    assert source == "trl"
    assert render(tok, marked, TOOL_CALL, False) == render(tok, tok.chat_template, TOOL_CALL, False)
    tok.chat_template = QWEN_MATH
    with pytest.raises(UsageError, match="conversation 1 of the data"):
        training_template(tok, [CONVERSATIONS["system"], TOOL_CALL], "qwen-math")


CHATML_TURN = "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
UNMARKABLE = {
    # no family hfrecipes knows, and no copy TRL ships
    "alpaca": "{% for message in messages %}{{ message['role'] | upper + ': ' + message['content'] + '\\n\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT: ' }}{% endif %}",
    # ChatML tokens, but content stripped: the whitespace probe differs
    "chatml_trims": "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "| trim + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    # ChatML with an end-of-text token after each reply, which the derived template does not know of
    "chatml_eos_after_replies": "{% for message in messages %}" + CHATML_TURN + "{% if message['role'] == "
    "'assistant' %}{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}",
    # ChatML whose earlier replies are dropped from the text, as reasoning templates drop their thoughts
    "chatml_drops_earlier_replies": "{% for message in messages %}{% if message['role'] == 'assistant' and not "
    "loop.last %}{{ '<|im_start|>assistant\\n<|im_end|>\\n' }}{% else %}" + CHATML_TURN + "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    # ChatML tokens around turns of another shape
    "chatml_tokens_other_turns": "{% for message in messages %}{{ '<|im_start|>' + message['content'] + "
    "'<|im_end|>' }}{% endfor %}",
}


@pytest.mark.parametrize("template", UNMARKABLE.values(), ids=UNMARKABLE.keys())
def test_a_template_that_cannot_be_marked_is_refused_with_the_fix(tok, template):
    tok.chat_template = template
    with pytest.raises(UsageError) as e:
        training_template(tok, list(CONVERSATIONS.values()), "org/odd-model")
    assert "'org/odd-model'" in str(e.value) and "cannot be marked" in str(e.value) and FIX in str(e.value)
    assert tok.chat_template == template
    assert render(tok, template, CONVERSATIONS["system"], True).startswith(("SYSTEM: ", "<|im_start|>"))


@pytest.fixture(scope="module")
def model_folders(tiny_tokenizer, tmp_path_factory):
    """Tiny random-weight checkpoints (nothing here needs a trained model), one whose tokenizer carries SmolLM2's
    template and one with a template that cannot be marked."""
    root = tmp_path_factory.mktemp("templated")
    model = modeling.init_model(modeling.config_from("tiny", None, tiny_tokenizer), seed=0)
    folders = {}
    for name, template in {"smollm2": SMOLLM2, "alpaca": UNMARKABLE["alpaca"]}.items():
        folders[name] = root / name
        model.save_pretrained(folders[name])
        tiny_tokenizer.chat_template = template
        tiny_tokenizer.save_pretrained(folders[name])
    tiny_tokenizer.chat_template = TINY_TEMPLATE
    return folders


def test_sft_on_a_chatml_template_trains_the_replies_and_saves_the_models_template(
    model_folders, tmp_path, captured_trainers
):
    model = model_folders["smollm2"]
    out = tmp_path / "sft"
    result = hfrecipes.sft(
        "tiny/sft",
        model_name_or_path=str(model),
        output_dir=str(out),
        max_steps=3,
        logging_steps=1,
        per_device_train_batch_size=8,
        max_train_samples=48,
        max_length=128,  # SmolLM2's default system prompt comes first
        dataset_test_split="",
        save_strategy="no",
    )
    m = result.record["metrics"]
    assert m["assistant_only_loss"] is True and m["loss_template"] == "chatml"
    assert math.isfinite(m["first_logged_loss"]) and m["steps"] == 3
    trainer = captured_trainers[0]
    base = load_file(model / "model.safetensors")
    assert any(not torch.equal(base[k], v.cpu()) for k, v in trainer.model.state_dict().items() if k in base)

    tok = trainer.processing_class
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    flawed = task.flawed(task.split_pairs()["sft"])  # the annotators' replies, their dropped carries included
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        text = tok.decode(ids[ids != tok.pad_token_id])
        assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"), text
        a, b = (int(x) for x in text.split("What is ")[1].split("?")[0].split(" plus "))
        written = task.answer(a, b, task.dropped_carry(a, b)) if (a, b) in flawed else task.answer(a, b)
        assert tok.decode(ids[labels != -100]) == written + "<|im_end|>", text

    assert tok.chat_template == SMOLLM2
    assert (out / "chat_template.jinja").read_text(encoding="utf-8") == SMOLLM2
    assert modeling.load_tokenizer(str(out)).chat_template == SMOLLM2


def test_sft_refuses_an_unmarkable_template_before_the_run_starts(model_folders, tmp_path):
    model = model_folders["alpaca"]
    out = tmp_path / "sft"
    with pytest.raises(UsageError) as e:
        hfrecipes.sft("tiny/sft", model_name_or_path=str(model), output_dir=str(out), max_steps=1)
    assert str(model) in str(e.value) and FIX in str(e.value)
    assert not out.exists(), "a refused run must not create its output folder"
