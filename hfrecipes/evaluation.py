"""Held-out evaluation through the `evaluate` library: greedy replies to held-out prompts, scored by a metric.

The default metric, `answer_accuracy`, ships with the package (Hub-hosted metrics cannot load offline); a recipe
can name any other `evaluate` metric (a path or a Hub id) with `eval_metric`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hfrecipes.errors import UsageError

METRICS_DIR = Path(__file__).resolve().parent / "metrics"


def load_metric(name: str = "answer_accuracy"):
    """A bundled metric by name, else whatever `evaluate.load` finds (a local script or folder, a Hub id)."""
    import evaluate

    bundled = METRICS_DIR / name
    try:
        return evaluate.load(str(bundled) if bundled.is_dir() else name)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as e:
        raise UsageError(
            f"eval_metric '{name}' could not be loaded ({e}); bundled: "
            f"{', '.join(p.name for p in METRICS_DIR.iterdir() if p.is_dir())}."
        ) from None


def greedy_replies(model, tok, prompts: list, max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy replies, chat template applied to conversational prompts."""
    from hfrecipes.inference import generate_ids, prompt_ids

    ids = prompt_ids(tok, prompts)
    outs = generate_ids(model, tok, ids, max_new_tokens, batch_size=batch_size, desc="held-out evaluation")
    return [tok.decode(o[0], skip_special_tokens=True) for o in outs]


def heldout_accuracy(
    model,
    tok,
    prompts: list,
    references: list,
    metric: str = "answer_accuracy",
    max_new_tokens: int = 32,
    batch_size: int = 64,
    groups: list | None = None,
) -> dict[str, Any]:
    """pass@1 (greedy) on held-out prompts: the metric's result plus a few examples for the record. `groups` (one
    label per prompt, e.g. the tiny task's `kind`) adds `by_group`: the metric on each group's rows alone."""
    replies = greedy_replies(model, tok, prompts, max_new_tokens, batch_size)
    scorer = load_metric(metric)
    result = scorer.compute(predictions=replies, references=[str(r) for r in references])
    examples = [
        {"prompt": str(p), "reply": r, "reference": str(ref)}
        for p, r, ref in zip(prompts, replies, references, strict=True)
    ]
    out = {**result, "metric": metric, "examples": examples[:5]}
    if groups is not None:
        if len(groups) != len(replies):
            raise ValueError(f"{len(groups)} group labels for {len(replies)} prompts")
        out["by_group"] = {}
        for label in sorted({str(g) for g in groups}):
            idx = [i for i, g in enumerate(groups) if str(g) == label]
            part = scorer.compute(predictions=[replies[i] for i in idx], references=[str(references[i]) for i in idx])
            out["by_group"][label] = part
    return out
