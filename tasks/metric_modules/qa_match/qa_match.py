"""QA answer matching (SQuAD normalisation): exact match, token F1 and containment of an accepted
answer in the output, each the best over the accepted answers. An ``evaluate`` metric module."""

import datasets
import evaluate

from decodebench.tasks.quality import qa_scores


class QaMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Exact match, token F1 and answer containment against accepted answers.",
            citation="Rajpurkar et al., SQuAD, 2016 (answer normalisation).",
            inputs_description="predictions: model outputs; references: lists of accepted answers.",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references):
        scores = [qa_scores(p, r) for p, r in zip(predictions, references)]
        return {name: sum(s[name] for s in scores) / len(scores) for name in scores[0]}
