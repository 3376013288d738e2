"""`evaluate` metric: the share of replies whose final answer equals the reference (hfrecipes.rewards.answers_match).

Shipped with the package because Hub-hosted metrics cannot load offline:
    evaluate.load(hfrecipes.evaluation.metric_path("answer_accuracy")).compute(predictions=[...], references=[...])
"""

import datasets
import evaluate

from hfrecipes.rewards import answers_match

_DESCRIPTION = (
    "Exact answer accuracy: numeric equality where the reference is a number (tolerant of '1,000', "
    "'1000.0', '\\boxed{1000}', GSM8K's '#### 1000'), exact text match otherwise."
)


class AnswerAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description="predictions: generated replies (str); references: gold answers (str)",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        hits = [answers_match(p, r) for p, r in zip(predictions, references, strict=True)]
        return {"accuracy": sum(hits) / len(hits) if hits else 0.0, "correct": sum(hits), "total": len(hits)}
