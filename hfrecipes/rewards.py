"""Verifiable rewards for RL stages, chosen by name in a recipe: answer accuracy, format, length; a reward-model
checkpoint; or any `module:function`. Names resolve through one literal dict, `REWARDS`.

Every function follows TRL's reward-function protocol: `f(prompts, completions, **columns) -> list[float | None]`,
where `completions` are strings or chat messages and every dataset column (here `answer`) arrives as a list.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

from hfrecipes.errors import UsageError

THINK_FORMAT = re.compile(r"^\s*<think>.+?</think>\s*\S.*$", re.DOTALL)
BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the content of the last message of a conversational completion."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion:
        return str(completion[-1].get("content", ""))
    return ""


def gold_answer(answer: Any) -> str:
    """The gold answer as text: GSM8K's `...#### 72` form gives `72`."""
    text = str(answer)
    return text.split("####")[-1].strip() if "####" in text else text.strip()


def _to_number(text: str) -> Decimal | None:
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None


def final_answer(text: str) -> str | None:
    """What a reply answers: the last `\\boxed{...}`, else what follows `####`, else the text after `</think>`'s
    last number, else the last number in the text; None when there is no number."""
    boxed = BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    if "####" in text:
        text = text.split("####")[-1]
    elif "</think>" in text:
        text = text.split("</think>")[-1]
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


def answers_match(reply: str, gold: Any) -> bool:
    """Numeric equality where the gold answer is a number ("1,000" == "1000.0" == "\\boxed{1000}"), otherwise an exact
    match of the stripped text. With `math_verify` installed, its verdict on LaTeX answers counts too."""
    gold_text = gold_answer(gold)
    gold_num = _to_number(gold_text)
    if gold_num is None:
        return reply.strip() == gold_text
    got = final_answer(reply)
    if got is not None:
        num = _to_number(got)
        if num is not None and num == gold_num:
            return True
    try:  # optional: symbolic answers (fractions, LaTeX) through math-verify
        from math_verify import parse, verify

        return bool(verify(parse(gold_text), parse(reply)))
    except Exception:  # not installed, or it could not parse either side
        return False


def accuracy(completions: list, answer: list, **kwargs) -> list[float]:
    """1.0 when the reply's final answer equals the gold `answer` column, else 0.0."""
    return [float(answers_match(completion_text(c), a)) for c, a in zip(completions, answer, strict=True)]


def think_format(completions: list, **kwargs) -> list[float]:
    """1.0 when the reply reasons inside `<think>...</think>` and then gives an answer, else 0.0."""
    return [float(bool(THINK_FORMAT.match(completion_text(c)))) for c in completions]


def length_penalty(completions: list, completion_ids: list | None = None, **kwargs) -> list[float]:
    """-(length / longest in the group): shorter replies lose less. Weight it small in the recipe."""
    lengths = (
        [len(ids) for ids in completion_ids] if completion_ids else [len(completion_text(c)) for c in completions]
    )
    longest = max(lengths) if lengths else 1
    return [-(n / longest) if longest else 0.0 for n in lengths]


REWARDS: dict[str, Callable[..., list[float]]] = {
    "accuracy": accuracy,
    "format": think_format,
    "length": length_penalty,
}


def resolve(name: str) -> Callable[..., list[float]]:
    """A reward by name: a key of `REWARDS`, or `package.module:function`."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        raise UsageError(f"reward '{name}' is unknown: use one of {', '.join(REWARDS)}, or 'package.module:function'.")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"reward '{name}': module '{module_name}' cannot be imported ({e}).") from None
    except SyntaxError as e:  # the user's own reward module: name the file and line rather than a traceback
        raise UsageError(f"reward '{name}': {e.filename}, line {e.lineno}: {e.msg}. Fix the module.") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UsageError(f"reward '{name}': module '{module_name}' has no function '{attr}'.")
    return fn


def check_reward_model(path: str, trust_remote_code: bool = False) -> None:
    """A reward model is a sequence classifier with one output (a reward stage's folder); anything else is refused
    before weights load: a causal LM would load under a new, random head and score noise."""
    import json
    from pathlib import Path

    from transformers import AutoConfig

    from hfrecipes.modeling import check_model_path

    check_model_path(path, "reward_model_path")
    adapter = Path(path).expanduser() / "adapter_config.json"
    if adapter.is_file():
        task = json.loads(adapter.read_text()).get("task_type")
        if task != "SEQ_CLS":
            raise UsageError(
                f"reward_model_path '{path}' holds a LoRA adapter for {task}, not a reward model (SEQ_CLS). Point it "
                "at a reward stage's folder (e.g. runs/tiny/reward)."
            )
        return
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UsageError(f"reward_model_path '{path}' could not be loaded: {e}") from None
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        found = ", ".join(architectures) or "a model with no declared architecture"
        raise UsageError(
            f"reward_model_path '{path}' holds {found}, not a sequence classifier (...ForSequenceClassification). "
            "Point it at a reward stage's folder (e.g. runs/tiny/reward)."
        )
    if config.num_labels != 1:
        raise UsageError(
            f"reward_model_path '{path}' is a classifier with {config.num_labels} outputs; a reward model has one. "
            "Point it at a reward stage's folder (e.g. runs/tiny/reward)."
        )


def reward_model_scorer(path: str, tokenizer=None, trust_remote_code: bool = False):
    """A reward function that scores (prompt, completion) with a sequence-classification checkpoint, re-tokenizing
    the text with the reward model's own tokenizer so policy and reward model need not share one."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hfrecipes.modeling import check_model_path

    check_model_path(path, "reward_model_path")
    check_reward_model(path, trust_remote_code)
    from hfrecipes.engines import every_process_loads

    try:
        with every_process_loads():
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, use_safetensors=True, trust_remote_code=trust_remote_code
            ).eval()
    except (OSError, ValueError) as e:
        raise UsageError(f"reward_model_path '{path}' is not a sequence-classification checkpoint: {e}") from None
    rm_tok = tokenizer or AutoTokenizer.from_pretrained(path)
    if rm_tok.pad_token is None:
        rm_tok.pad_token = rm_tok.eos_token

    def reward_model(prompts: list, completions: list, **kwargs) -> list[float]:
        texts = []
        for p, c in zip(prompts, completions, strict=True):
            if isinstance(p, list) and rm_tok.chat_template:
                texts.append(
                    rm_tok.apply_chat_template(p + c if isinstance(c, list) else p, tokenize=False)
                    + ("" if isinstance(c, list) else c)
                )
            else:
                texts.append(completion_text(p) + completion_text(c))
        batch = rm_tok(texts, return_tensors="pt", padding=True, truncation=True, add_special_tokens=False)
        scorer = reward_model.model
        batch = batch.to(scorer.device)
        with torch.no_grad():
            return scorer(**batch).logits[:, 0].float().tolist()

    reward_model.__name__ = "reward_model"
    reward_model.model = model  # a trainer may replace it by the same model placed for its engine
    return reward_model
