"""Retrieval corpora for the datastore methods (REST, SAM-Decoding's static automaton).

A corpus is a list of token sequences in the target's tokenizer. It comes from one of three sources
(``method.params.corpus``):

* ``generated`` (default, offline) — the target's own greedy answers to a small hand-written prompt
  set (``conf/corpus/<corpus_prompts>.yaml``; none of it from an evaluation task), generated once
  with the ONE decode loop and cached under ``<cache>/corpus/``;
* ``jsonl`` — a local JSON Lines file, one sequence per line: ``{"text": ...}`` (tokenized as is),
  ``{"messages": [...]}`` (chat template) or ``{"token_ids": [...]}``;
* ``datasets`` — a Hugging Face ``datasets`` corpus (``corpus_path`` = dataset name, with
  ``corpus_split`` and the text ``corpus_field``), first ``corpus_limit`` rows.

``generated`` rows of the prompt file may also be ``token_ids`` (tokenizer-less tiny test models).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from decodebench.config import check, default_cache_dir
from decodebench.engine.backbone import Backbone
from decodebench.engine.decode_loop import DecodeSettings, generate_batch
from decodebench.engine.drafting import Drafter
from decodebench.methods.state_policy import model_key

log = logging.getLogger("decodebench")

CORPUS_SOURCES = ("generated", "jsonl", "datasets")
GENERATION_BATCH = 16  # prompts decoded together when generating a corpus


@dataclass
class CorpusSpec:
    """Where a datastore's corpus comes from (the ``corpus*`` params of REST and SAM-Decoding)."""

    source: str = "generated"
    path: str | None = None  # jsonl: the file; datasets: the dataset name
    prompts: str = "self_prompts"  # generated: conf/corpus/<prompts>.yaml, or a path to a .yaml / .jsonl
    max_new_tokens: int = 256  # generated: tokens per answer
    split: str = "train"  # datasets
    field: str = "text"  # datasets: the text column
    limit: int = 2000  # datasets / jsonl: at most this many rows

    def __post_init__(self) -> None:
        check(self.source in CORPUS_SOURCES, "method.params.corpus", self.source, " | ".join(CORPUS_SOURCES))
        check(
            self.source == "generated" or bool(self.path),
            "method.params.corpus_path",
            self.path,
            f"a JSONL file or dataset name when corpus={self.source}",
        )
        check(self.max_new_tokens >= 1, "method.params.corpus_max_new_tokens", self.max_new_tokens, ">= 1")
        check(self.limit >= 1, "method.params.corpus_limit", self.limit, ">= 1")
        if self.source == "jsonl":
            check(Path(self.path).is_file(), "method.params.corpus_path", self.path, "an existing JSONL file")
        if self.source == "generated":
            check(
                prompt_set_exists(self.prompts),
                "method.params.corpus_prompts",
                self.prompts,
                "a prompt set in conf/corpus/ (self_prompts) or an existing .yaml / .jsonl file",
            )


@dataclass
class Corpus:
    sequences: list[list[int]]
    source: str  # a short description for logs and records
    load_s: float  # seconds to read / generate it (0 when read from the cache)

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


def prompt_set_exists(name: str) -> bool:
    if name.endswith((".jsonl", ".yaml", ".yml")):
        return Path(name).is_file()
    return (resources.files("decodebench.conf") / "corpus" / f"{name}.yaml").is_file()


def prompt_rows(name: str) -> list[dict[str, Any]]:
    """Rows of a prompt set: ``conf/corpus/<name>.yaml`` (key ``prompts``), or a .yaml / .jsonl path.
    A row is ``{"text": ...}``, ``{"messages": [...]}`` or ``{"token_ids": [...]}``; a bare string is text."""
    if name.endswith(".jsonl"):
        rows = [json.loads(line) for line in Path(name).read_text().splitlines() if line.strip()]
    else:
        text = (
            Path(name).read_text()
            if name.endswith((".yaml", ".yml"))
            else (resources.files("decodebench.conf") / "corpus" / f"{name}.yaml").read_text()
        )
        rows = yaml.safe_load(text)["prompts"]
    return [row if isinstance(row, dict) else {"text": row} for row in rows]


def encode_row(row: dict[str, Any], tokenizer: Any, chat: bool) -> list[int]:
    """A row's token ids; ``chat`` applies the chat template (with the generation prompt) to text."""
    if "token_ids" in row:
        return [int(t) for t in row["token_ids"]]
    if tokenizer is None:
        raise ValueError("this corpus holds text but the model has no tokenizer (give token_ids rows)")
    from decodebench.tasks.prompts import encode_prompt

    if "messages" in row:
        return encode_prompt(tokenizer, row["messages"], True)
    if chat:
        return encode_prompt(tokenizer, [{"role": "user", "content": row["text"]}], True)
    return list(tokenizer.encode(row["text"], add_special_tokens=False))


def load_corpus(
    spec: CorpusSpec, backbone: Backbone, tokenizer: Any, cache_dir: str | None, eos_token_ids: tuple[int, ...] = ()
) -> Corpus:
    """The corpus of ``spec`` in the target's tokens; ``generated`` corpora are cached per model."""
    import time

    start = time.perf_counter()
    if spec.source == "jsonl":
        rows = [json.loads(line) for line in Path(spec.path).read_text().splitlines() if line.strip()]
        sequences = [encode_row(row, tokenizer, False) for row in rows[: spec.limit]]
        return Corpus(sequences, f"jsonl:{spec.path}", time.perf_counter() - start)
    if spec.source == "datasets":
        import datasets

        rows = datasets.load_dataset(spec.path, split=f"{spec.split}[:{spec.limit}]")
        sequences = [encode_row({"text": row[spec.field]}, tokenizer, False) for row in rows]
        return Corpus(sequences, f"datasets:{spec.path}:{spec.split}", time.perf_counter() - start)
    return _generated(spec, backbone, tokenizer, cache_dir, eos_token_ids)


def _generated(
    spec: CorpusSpec, backbone: Backbone, tokenizer: Any, cache_dir: str | None, eos_token_ids: tuple[int, ...]
) -> Corpus:
    """The target's greedy answers to the prompt set (prompt + answer per sequence; batched AR with
    left padding, so an answer may differ from an unbatched one in the last float bits), cached."""
    import time

    prompts = [encode_row(row, tokenizer, True) for row in prompt_rows(spec.prompts)]
    digest = hashlib.sha256(json.dumps([asdict(spec), prompts, sorted(eos_token_ids)]).encode()).hexdigest()[:12]
    path = Path(cache_dir or default_cache_dir()).expanduser() / "corpus" / f"{model_key(backbone)}-{digest}.pt"
    description = f"generated:{spec.prompts} ({len(prompts)} prompts)"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        return Corpus([t.tolist() for t in saved["sequences"]], description, 0.0)
    start = time.perf_counter()
    pad_token_id = getattr(tokenizer, "pad_token_id", None) or 0
    log.info(
        "corpus: generating the target's answers to %d prompts (%s, once; cached in %s)",
        len(prompts),
        spec.prompts,
        path,
    )
    settings = DecodeSettings(max_new_tokens=spec.max_new_tokens, eos_token_ids=eos_token_ids)
    capacity = max(len(p) for p in prompts) + spec.max_new_tokens + 64
    sequences = []
    for first in range(0, len(prompts), GENERATION_BATCH):  # batched AR: the corpus is built once, fast
        chunk = prompts[first : first + GENERATION_BATCH]
        cache = backbone.new_cache(capacity, batch_size=len(chunk))
        outputs = generate_batch(backbone, Drafter(), chunk, settings, cache, pad_token_id=pad_token_id).outputs
        sequences += [[*p, *out.new_ids] for p, out in zip(chunk, outputs)]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"sequences": [torch.tensor(s, dtype=torch.long) for s in sequences]}, partial)
    os.replace(partial, path)
    return Corpus(sequences, description, time.perf_counter() - start)


def eos_ids(tokenizer: Any) -> tuple[int, ...]:
    """The tokenizer's EOS id as a tuple (empty without a tokenizer)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return () if eos is None else (int(eos),)
