"""GSM8K exact match with lm-evaluation-harness's strict (``#### N``) and flexible (last number)
answer extraction. An ``evaluate`` metric module, loaded by local path (offline-safe)."""

import datasets
import evaluate

from decodebench.tasks.quality import GSM8K_FLEXIBLE_PATTERN, GSM8K_STRICT_PATTERN, gsm8k_scores


class Gsm8kExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="GSM8K exact match, strict and flexible extraction (lm-evaluation-harness).",
            citation="Cobbe et al., Training Verifiers to Solve Math Word Problems, 2021.",
            inputs_description="predictions: model outputs; references: solutions ending in '#### N' "
            "or the bare answer N. Keyword arguments: strict_pattern, flexible_pattern.",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(
        self, predictions, references, strict_pattern=GSM8K_STRICT_PATTERN, flexible_pattern=GSM8K_FLEXIBLE_PATTERN
    ):
        scores = [gsm8k_scores(p, r, strict_pattern, flexible_pattern) for p, r in zip(predictions, references)]
        return {name: sum(s[name] for s in scores) / len(scores) for name in scores[0]}
