"""Chat templates for assistant-only loss: the template training data is tokenized with, whose `{% generation %}`
markers put each assistant reply and its end-of-turn token, and nothing else, in the loss.

TRL masks the loss from those markers, and patches only exact copies of the templates it ships. `training_template`
takes, in order: the model's own template when it has the markers ("own"); a template derived here for the ChatML
family (SmolLM2, Qwen2.5 and their variants: "chatml") or the Llama 3 family (3.0, 3.1, 3.2: "llama3"); TRL's patch
("trl"). A derived template is built from the pieces the model's own template renders on probe conversations (its
default system block, the text around a given system message, its generation prompt); it comes before TRL's patch
because it marks the reply and its end-of-turn token exactly (TRL's Qwen2.5 patch also marks the newlines around
them), and TRL's stays the fallback for what a derived one does not render (tool calls). A derived template is
used only if it renders exactly the text the model's own renders, on fixed probes and on the conversations given
(the first rows of the data); anything else is refused with the fix. TRL's patches are taken as TRL ships them:
some render earlier turns differently on purpose (Qwen3's keep an empty think block in every reply, so that a
conversation's tokens stay a prefix of the next turn's).

Deliberate simplifications: a derived template knows text messages only (role and content: no tools, tool calls or
reasoning fields), and the renders are compared on the conversations given, not on every row. Llama 3.2 writes
today's date into its system block; a derived template holds the date it was derived on.

    OMP_NUM_THREADS=1 .venv/bin/pytest -q tests/test_chat_templates.py
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from dataclasses import dataclass

from hfrecipes.errors import UsageError

Conversation = list[dict]


@dataclass(frozen=True)
class Family:
    """How a family writes a turn: `before_role + role + after_role + content + end + sep`."""

    before_role: str
    after_role: str
    end: str  # the end-of-turn token, trained on after each assistant reply
    sep: str
    trim: bool  # the family's templates strip each message's content

    def turn(self, role: str, content: str) -> str:
        content = content.strip() if self.trim else content
        return self.before_role + role + self.after_role + content + self.end + self.sep


FAMILIES = {
    "chatml": Family("<|im_start|>", "\n", "<|im_end|>", "\n", trim=False),
    "llama3": Family("<|start_header_id|>", "<|end_header_id|>\n\n", "<|eot_id|>", "", trim=True),
}

# Contents without surrounding whitespace, so a family that trims renders them as they are.
_SYSTEM, _USER = "hfrecipes probe: system message", "hfrecipes probe: user message"


def _conv(*turns: tuple[str, str]) -> Conversation:
    return [{"role": role, "content": content} for role, content in turns]


# Each rendered with add_generation_prompt off and on: both templates must give the same text.
PROBES: tuple[Conversation, ...] = (
    _conv(("user", "Hi.")),
    _conv(("system", "Be brief."), ("user", "What is 2 plus 2?"), ("assistant", "4.")),
    _conv(("user", "One?"), ("assistant", "One."), ("user", "Two?"), ("assistant", "Two,\nthen three.")),
    _conv(("system", "Be kind."), ("user", "Hello"), ("assistant", "Hello!"), ("user", "Bye")),
    _conv(("user", "  padded \n"), ("assistant", "\n spaced reply  "), ("user", "\tagain")),
)

_DERIVED = string.Template("""\
{#- $family chat template with generation markers around each assistant reply and its end-of-turn token, derived by
    hfrecipes (hfrecipes/chat_templates.py) from the model's own template, whose text it renders exactly. #}
{%- if messages[0]['role'] == 'system' %}
    {{- $system_before + $system_content + $system_after }}
    {%- set messages = messages[1:] %}
{%- else %}
    {{- $default_system }}
{%- endif %}
{%- for message in messages %}
    {{- $before_role + message['role'] + $after_role }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}
        {{- $content + $end }}
        {%- endgeneration %}
    {%- else %}
        {{- $content + $end }}
    {%- endif %}
    {{- $sep }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- $generation_prompt }}
{%- endif %}
""")


def training_template(tokenizer, conversations: Sequence[Conversation] = (), name: str = "") -> tuple[str, str]:
    """The template to tokenize training data with for assistant-only loss, and its source ("own", "trl", or the
    family it was derived for). Raises UsageError when no marked template renders like the model's own."""
    from trl.chat_template_utils import has_generation_markers

    own = tokenizer.chat_template
    own = own.get("default") if isinstance(own, dict) else own
    if own and has_generation_markers(own):
        return own, "own"
    family = next((f for f, fam in FAMILIES.items() if own and fam.before_role in own and fam.end in own), None)
    candidates = [(family, derive(tokenizer, own, family))] if family else []
    candidates.append(("trl", _trl_patch(tokenizer)))
    why = "it is neither ChatML nor Llama 3 (the families hfrecipes marks), and TRL cannot patch it"
    if family:
        why = f"it has {family}'s tokens but not its turns, and TRL cannot patch it"
    for source, marked in candidates:
        if marked is None:
            continue
        if source == "trl":
            return marked, source
        where = _first_difference(tokenizer, own, marked, conversations)
        if where is None:
            return marked, source
        why = f"the marked template ({source}) renders {where} differently from the model's own"
    raise UsageError(
        f"assistant_only_loss needs a chat template with `{{% generation %}}` markers, and the chat template of "
        f"'{name}' cannot be marked: {why}. Set assistant_only_loss: false (loss on the whole conversation), or "
        "chat_template_path to a template with {% generation %} markers."
    )


def derive(tokenizer, template: str, family: str) -> str | None:
    """A marked template of `family` built from the pieces `template` renders; None where its renders do not have
    the family's shape. Unchecked: `training_template` compares its renders with the original's."""
    fam = FAMILIES[family]
    user = _conv(("user", _USER))
    alone = _render(tokenizer, template, user, False)
    with_system = _render(tokenizer, template, _conv(("system", _SYSTEM), ("user", _USER)), False)
    prompted = _render(tokenizer, template, user, True)
    turn = fam.turn("user", _USER)
    if None in (alone, with_system, prompted) or not (alone.endswith(turn) and with_system.endswith(turn)):
        return None
    system_block = with_system[: -len(turn)]
    if system_block.count(_SYSTEM) != 1 or not prompted.startswith(alone):
        return None
    system_before, system_after = system_block.split(_SYSTEM)

    def content(var: str) -> str:
        return f"({var} | trim)" if fam.trim else var

    def literal(text: str) -> str:  # a Jinja string literal: JSON's escapes are Python's, which Jinja reads
        return json.dumps(text, ensure_ascii=False)

    return _DERIVED.substitute(
        family=family,
        system_before=literal(system_before),
        system_content=content("messages[0]['content']"),
        system_after=literal(system_after),
        default_system=literal(alone[: -len(turn)]),
        before_role=literal(fam.before_role),
        after_role=literal(fam.after_role),
        content=content("message['content']"),
        end=literal(fam.end),
        sep=literal(fam.sep),
        generation_prompt=literal(prompted[len(alone) :]),
    )


def _trl_patch(tokenizer) -> str | None:
    from trl.chat_template_utils import get_training_chat_template

    try:
        return get_training_chat_template(tokenizer)
    except Exception:  # ValueError for a template it does not ship; its tool-call probes raise in some templates
        return None


def _render(tokenizer, template: str, conversation: Conversation, generation_prompt: bool) -> str | None:
    """The text `template` renders, or None where it raises (its own `raise_exception`, a key it reads)."""
    try:
        return tokenizer.apply_chat_template(
            conversation, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception:
        return None


def _first_difference(tokenizer, own: str, marked: str, conversations: Sequence[Conversation]) -> str | None:
    """Where the two templates render differently (a template refusing a conversation counts as its render), or None
    where they agree on every probe and every conversation given, with the generation prompt off and on."""
    checks = [(f"probe conversation {i}", c) for i, c in enumerate(PROBES)]
    checks += [(f"conversation {i} of the data", c) for i, c in enumerate(conversations)]
    for where, conversation in checks:
        for prompt in (False, True):
            if _render(tokenizer, own, conversation, prompt) != _render(tokenizer, marked, conversation, prompt):
                return where + (" (with the generation prompt)" if prompt else "")
    return None
