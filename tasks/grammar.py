"""A small grammar-correction prompt set, hand-made for DecodeBench (``conf/task/grammar.yaml``).

Its outputs copy most of their input (the corrected sentence differs from the erroneous one in a
word or two), the workload input-guided Aggressive Decoding was made for. The sentences and their
corrections are written for this project (not taken from CoNLL-14, BEA-19 or any other GEC set) and
live in the YAML, so the task needs no data file. Quality: the normalised output equals the
hand-written correction (``exact_match``) or contains it (``contains_correction``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from decodebench.tasks.base import Sample, Task


@dataclass
class Correction:
    source: str  # the sentence with errors
    target: str  # its correction


def normalise(text: str) -> str:
    """Lower case, single spaces, no surrounding quotes or whitespace."""
    return re.sub(r"\s+", " ", text).strip().strip("\"'").strip().lower()


class Grammar(Task):
    @dataclass
    class Params:
        instruction: str = "Correct the grammar of this sentence. Reply with the corrected sentence only.\n\n{sentence}"
        sentences: list[Correction] = field(default_factory=list)  # dicts in YAML

    def all_samples(self) -> list[Sample]:
        rows = [row if isinstance(row, Correction) else Correction(**row) for row in self.params.sentences]
        return [self.to_sample({"id": i, **vars(row)}) for i, row in enumerate(rows)]

    def to_sample(self, row: dict[str, Any]) -> Sample:
        return Sample(
            sample_id=str(row["id"]),
            category="grammar",
            group="grammar",
            turns=[self.params.instruction.format(sentence=row["source"])],
            reference=[row["target"]],
        )

    def score(self, sample: Sample, turn: int, output_text: str) -> dict[str, float] | None:
        output, target = normalise(output_text), normalise(sample.reference[turn])
        return {"exact_match": float(output == target), "contains_correction": float(target in output)}
