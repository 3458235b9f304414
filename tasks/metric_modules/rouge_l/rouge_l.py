"""ROUGE-L F-measure with rouge-score (Porter stemming), averaged over the predictions.
An ``evaluate`` metric module."""

import datasets
import evaluate
from rouge_score import rouge_scorer


class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Mean ROUGE-L F1 (rouge-score, use_stemmer=True).",
            citation="Lin, ROUGE: A Package for Automatic Evaluation of Summaries, 2004.",
            inputs_description="predictions: summaries; references: one reference summary each.",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
        return {"rougeL": sum(scores) / len(scores)}
