"""Sentence-level BLEU and chrF with sacrebleu (default tokenisation, one reference), averaged over
the predictions. Sentence-level because DecodeBench scores each record on its own; corpus BLEU
over a whole set differs. An ``evaluate`` metric module."""

import datasets
import evaluate
import sacrebleu


class TranslationQuality(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Mean sentence BLEU and chrF (sacrebleu).",
            citation="Post, A Call for Clarity in Reporting BLEU Scores, 2018.",
            inputs_description="predictions: translations; references: one reference translation each.",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        pairs = list(zip(predictions, references))
        return {
            "bleu": sum(sacrebleu.sentence_bleu(p, [r]).score for p, r in pairs) / len(pairs),
            "chrf": sum(sacrebleu.sentence_chrf(p, [r]).score for p, r in pairs) / len(pairs),
        }
