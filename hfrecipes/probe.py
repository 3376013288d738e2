"""The knowledge probe: which dated facts a causal LM knows, on either side of its knowledge cutoff.

Each fact is a row `{"prompt", "answer", "choices", "date"}` (the bundled `tiny:facts`, or any dataset with those
columns). A fact is known when the model's log-likelihood of `prompt + " " + answer` is above that of every other
choice (a tie is not known); facts dated on or before the cutoff are counted apart from those after it, beside the
chance level of guessing. Deliberate simplification: the continuation's summed log-probability, not normalised by
its length, as lm-evaluation-harness' `acc`.

Facts are also counted by the month they are dated (`by_month`), so a card can draw what a model knows against
time with its cutoff marked. The pretrain stage runs the probe at its end when the recipe sets
`knowledge_probe: tiny:facts`; any model folder takes it on your own dated facts:

    from hfrecipes import probe
    probe.evaluate("runs/tiny/pretrain", "my_facts.jsonl")  # cutoff: the folder's recorded one
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from hfrecipes import data
from hfrecipes import record as records
from hfrecipes.errors import UsageError

COLUMNS = ("prompt", "answer", "choices", "date")
SPLIT = "test"  # the split a probe dataset is read from (`tiny:facts` has only this one)

logger = logging.getLogger(__name__)


def load_facts(name: str, seed: int = 0) -> list[dict[str, Any]]:
    """The probe rows of dataset `name` (a `tiny:` name, a local file or a Hub id), checked: every row has the four
    columns, a readable date, and an answer among at least two choices. Runs before any model loads."""
    args = data.ScriptArguments(
        dataset_name=name, dataset_train_split=SPLIT, dataset_test_split=None, tiny_seed=seed, dataset_date_column=None
    )
    ds = data.load_split(args, SPLIT)
    if ds is None:
        raise UsageError(f"knowledge_probe '{name}' has no split '{SPLIT}'; a probe dataset is read from that split.")
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise UsageError(
            f"knowledge_probe '{name}' lacks column(s) {missing}; a probe row is {{prompt, answer, choices, date}}, "
            f"it has {ds.column_names}."
        )
    rows = ds.to_list()
    if not rows:
        raise UsageError(f"knowledge_probe '{name}' is empty; a probe needs at least one fact.")
    for i, row in enumerate(rows):
        choices = row["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or row["answer"] not in choices:
            raise UsageError(
                f"knowledge_probe '{name}' row {i}: 'answer' {row['answer']!r} must be one of at least two "
                f"'choices', got {choices!r}."
            )
        if data.as_date(row["date"]) is None:
            raise UsageError(f"knowledge_probe '{name}' row {i}: 'date' {row['date']!r} is not a date YYYY-MM-DD.")
    return rows


def tally(rows: list[dict[str, Any]], scores: list[list[float]], cutoff: str) -> dict[str, Any]:
    """Known facts before (dated on or before `cutoff`) and after it, from each row's choice scores, and by the
    month of the fact (`by_month`: "YYYY-MM" -> known, total, accuracy, oldest first); chance is the mean of
    1/len(choices); `top_choice`: the choice that scores highest in the most rows (the first of a tie), and in how
    many. Pure arithmetic: no model."""
    limit = dt.date.fromisoformat(cutoff)
    sides = {"before": [0, 0], "after": [0, 0]}
    months: dict[str, list[int]] = {}
    for row, row_scores in zip(rows, scores, strict=True):
        truth = row_scores[row["choices"].index(row["answer"])]
        known = all(truth > s for j, s in enumerate(row_scores) if row["choices"][j] != row["answer"])
        day = data.as_date(row["date"])
        for count in (sides["before" if day <= limit else "after"], months.setdefault(f"{day:%Y-%m}", [0, 0])):
            count[0] += known
            count[1] += 1
    out = {key: _known(k, n) for key, (k, n) in sides.items()}
    # A model that learnt only how common each answer is ranks the choices the same for every fact: its favourite
    # then tops (nearly) every row, and it "knows" just the facts whose answer that is.
    firsts = (max(range(len(sc)), key=sc.__getitem__) for sc in scores)
    tops = Counter(row["choices"][i] for row, i in zip(rows, firsts, strict=True))
    favourite, count = tops.most_common(1)[0]
    return {
        "cutoff": cutoff,
        **out,
        "chance": sum(1 / len(r["choices"]) for r in rows) / len(rows),
        "top_choice": {"choice": favourite, "rows": count, "total": len(rows)},
        "by_month": {month: _known(*months[month]) for month in sorted(months)},
    }


def _known(known: int, total: int) -> dict[str, Any]:
    return {"known": known, "total": total, "accuracy": known / total if total else None}


def _encode(tok, text: str) -> list[int]:
    ids = tok(text)["input_ids"]
    if tok.eos_token_id is not None and ids == tok(text, add_special_tokens=False)["input_ids"]:
        ids = [tok.eos_token_id] + ids  # the tokenizer marks no start: a packed pretraining document follows an EOS
    return ids


def _divergence(context: list[int], seq: list[int]) -> int:
    """Where `seq` leaves `context`: a choice's tokens start there (BPE may merge across the join)."""
    n = min(len(context), len(seq))
    return next((i for i in range(n) if context[i] != seq[i]), n)


def choice_scores(model, tok, prompt: str, choices: list[str]) -> list[float]:
    """Summed log-probability of each `" " + choice` after `prompt`, in one right-padded batch."""
    import torch

    context = _encode(tok, prompt)
    seqs = [_encode(tok, f"{prompt} {choice}") for choice in choices]
    starts = [max(1, _divergence(context, s)) for s in seqs]
    width = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    device = next(model.parameters()).device
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    return [
        logprobs[i, start - 1 : len(s) - 1].sum().item() for i, (s, start) in enumerate(zip(seqs, starts, strict=True))
    ]


def probe(folder_or_model, tok, rows: list[dict[str, Any]], cutoff: str) -> dict[str, Any]:
    """Score every fact in `rows` with the causal LM `folder_or_model` (a model, or a folder or Hub id loaded here;
    `tok` None loads the folder's tokenizer): `{"cutoff", "before": {"known", "total", "accuracy"}, "after",
    "chance"}`."""
    if isinstance(folder_or_model, (str, Path)):
        from transformers import AutoModelForCausalLM

        from hfrecipes import modeling

        tok = tok or modeling.load_tokenizer(str(folder_or_model))
        model = AutoModelForCausalLM.from_pretrained(str(folder_or_model))
    else:
        model = folder_or_model
    was_training = model.training
    model.eval()
    try:
        scores = [choice_scores(model, tok, row["prompt"], list(row["choices"])) for row in rows]
    finally:
        model.train(was_training)
    result = tally(rows, scores, cutoff)
    logger.info(
        "knowledge probe: %d/%d facts known before %s, %d/%d after (chance %.2g)",
        result["before"]["known"], result["before"]["total"], cutoff,
        result["after"]["known"], result["after"]["total"], result["chance"],
    )  # fmt: skip
    return result


def evaluate(folder: str | Path, facts: str, cutoff: str | None = None, seed: int = 0) -> dict[str, Any]:
    """The probe as an evaluation any causal LM can take, on the user's own dated facts: `folder` (a model folder
    or Hub id), `facts` (a file of `{prompt, answer, choices, date}` rows, a `tiny:` name or a Hub dataset id) and
    `cutoff` (YYYY-MM-DD; default: the model cutoff the folder's record.json states). Returns `probe`'s counts,
    `by_month` among them, with `dataset`: the shape a pretrain record keeps and the card draws. The cutoff and the
    facts are checked before the model loads."""
    from hfrecipes import modeling

    modeling.check_model_path(str(folder))
    if cutoff is None:
        rec = records.read_record(folder) if Path(folder).is_dir() else None
        cutoff = (((rec or {}).get("data") or {}).get("model_cutoff") or {}).get("date")
        if cutoff is None:
            why = "its record.json states no knowledge cutoff" if rec else "it has no hfrecipes record.json"
            raise UsageError(f"the knowledge probe of '{folder}' needs a cutoff: {why}. Give one as YYYY-MM-DD.")
    day = _last_day(str(cutoff))
    if day is None:
        raise UsageError(f"knowledge probe cutoff {cutoff!r} is not a date YYYY-MM-DD.")
    rows = load_facts(facts, seed)
    return {"dataset": facts, **probe(folder, None, rows, day.isoformat())}


def _last_day(text: str) -> dt.date | None:
    """The last day a cutoff covers: a date is itself; a published "YYYY-MM" or "YYYY" covers its whole month or
    year."""
    parts = text.split("-")
    if len(parts) == 2 and all(p.isdigit() for p in parts) and 1 <= int(parts[1]) <= 12:
        year, month = int(parts[0]), int(parts[1])
        return dt.date(year + month // 12, month % 12 + 1, 1) - dt.timedelta(days=1)
    if len(parts) == 1 and len(text) == 4 and text.isdigit():
        return dt.date(int(text), 12, 31)
    return data.as_date(text)
