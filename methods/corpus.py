"""Retrieval corpora for the datastore methods (REST, SAM-Decoding's static automaton).

A corpus is a list of token sequences in the target's tokenizer. It comes from one of three sources
(``method.params.corpus``):

* ``training`` (default, offline) — the training pipeline's corpus (:mod:`decodebench.training.corpus`,
  the one corpus builder): the target's greedy answers to ``corpus_prompts`` prompts it wrote itself
  (never an evaluation set), built once per (model, settings) under ``<cache>/corpora/`` and shared
  with ``decodebench-train``'s drafters and ADED; each sequence is prompt + answer;
* ``jsonl`` — a local JSON Lines file, one sequence per line: ``{"text": ...}`` (tokenized as is),
  ``{"messages": [...]}`` (chat template) or ``{"token_ids": [...]}`` (tokenizer-less tiny models);
* ``datasets`` — a Hugging Face ``datasets`` corpus (``corpus_path`` = dataset name, with
  ``corpus_split`` and the text ``corpus_field``), first ``corpus_limit`` rows.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from decodebench.config import ConfigValueError, check, default_cache_dir
from decodebench.engine.backbone import Backbone
from decodebench.methods.state_policy import model_key

log = logging.getLogger("decodebench")

CORPUS_SOURCES = ("training", "jsonl", "datasets")


@dataclass
class CorpusSpec:
    """Where a datastore's corpus comes from (the ``corpus*`` params of REST and SAM-Decoding)."""

    source: str = "training"
    path: str | None = None  # jsonl: the file; datasets: the dataset name
    # training: the training pipeline's corpus settings (decodebench-train's defaults, so the cached
    # corpus is shared): self-written prompts and tokens per answer
    prompts: int = 96
    max_new_tokens: int = 96
    split: str = "train"  # datasets
    field: str = "text"  # datasets: the text column
    limit: int = 2000  # datasets / jsonl: at most this many rows

    def __post_init__(self) -> None:
        check(self.source in CORPUS_SOURCES, "method.params.corpus", self.source, " | ".join(CORPUS_SOURCES))
        check(
            self.source == "training" or bool(self.path),
            "method.params.corpus_path",
            self.path,
            f"a JSONL file or dataset name when corpus={self.source}",
        )
        check(self.prompts >= 1, "method.params.corpus_prompts", self.prompts, ">= 1")
        check(self.max_new_tokens >= 1, "method.params.corpus_max_new_tokens", self.max_new_tokens, ">= 1")
        check(self.limit >= 1, "method.params.corpus_limit", self.limit, ">= 1")
        if self.source == "jsonl":
            check(Path(self.path).is_file(), "method.params.corpus_path", self.path, "an existing JSONL file")


@dataclass
class Corpus:
    sequences: list[list[int]]
    source: str  # a short description for logs and records
    load_s: float  # seconds to read it (or to build it, when this run built it)
    build_s: float = 0.0  # seconds the training pipeline took to build it (also when read from its cache)

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


def encode_row(row: dict[str, Any], tokenizer: Any) -> list[int]:
    """A JSONL row's token ids (``messages`` through the chat template, ``text`` as is)."""
    if "token_ids" in row:
        return [int(t) for t in row["token_ids"]]
    if tokenizer is None:
        raise ValueError("this corpus holds text but the model has no tokenizer (give token_ids rows)")
    from decodebench.tasks.prompts import encode_prompt

    if "messages" in row:
        return encode_prompt(tokenizer, row["messages"], True)
    return list(tokenizer.encode(row["text"], add_special_tokens=False))


def load_corpus(
    spec: CorpusSpec, backbone: Backbone, tokenizer: Any, cache_dir: str | None, eos_token_ids: tuple[int, ...] = ()
) -> Corpus:
    """The corpus of ``spec`` in the target's tokens (``training``: built once, cached per model)."""
    import time

    start = time.perf_counter()
    if spec.source == "jsonl":
        rows = [json.loads(line) for line in Path(spec.path).read_text().splitlines() if line.strip()]
        sequences = [encode_row(row, tokenizer) for row in rows[: spec.limit]]
        return Corpus(sequences, f"jsonl:{spec.path}", time.perf_counter() - start)
    if spec.source == "datasets":
        import datasets

        rows = datasets.load_dataset(spec.path, split=f"{spec.split}[:{spec.limit}]")
        sequences = [encode_row({"text": row[spec.field]}, tokenizer) for row in rows]
        return Corpus(sequences, f"datasets:{spec.path}:{spec.split}", time.perf_counter() - start)
    return _training(spec, backbone, tokenizer, cache_dir, eos_token_ids)


def _training(
    spec: CorpusSpec, backbone: Backbone, tokenizer: Any, cache_dir: str | None, eos_token_ids: tuple[int, ...]
) -> Corpus:
    """The training pipeline's corpus with ``spec``'s prompt count and answer length (prompt + answer
    per sequence), from its cache or built now (:func:`decodebench.training.corpus.build_corpus`)."""
    import time

    from decodebench.training.config import CorpusConfig
    from decodebench.training.corpus import build_corpus

    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigValueError(
            "method.params.corpus=training builds the corpus from prompts the target writes after its chat "
            "template's user prefix, but this model has no tokenizer with a chat template: set "
            "method.params.corpus=jsonl (token_ids rows work without a tokenizer) or datasets"
        )
    # the training pipeline's name for the model: the catalogue name (= the prepared checkpoint's folder)
    name = getattr(backbone, "model_name", None) or Path(str(getattr(backbone.config, "_name_or_path", ""))).name
    start = time.perf_counter()
    corpus = build_corpus(
        backbone,
        tokenizer,
        name or model_key(backbone),
        True,
        CorpusConfig(prompts=spec.prompts, answer_tokens=spec.max_new_tokens),
        sorted(eos_token_ids),
        seed=0,
        data_dir=os.environ.get("DECODEBENCH_DATA"),
        cache_dir=cache_dir or default_cache_dir(),
        progress=False,
    )
    sequences = [s.ids.tolist() for s in corpus.sequences]
    description = f"training:{corpus.info['key']} ({len(sequences)} self-written prompts + answers)"
    return Corpus(sequences, description, time.perf_counter() - start, float(corpus.info.get("generation_s", 0.0)))


def eos_ids(tokenizer: Any) -> tuple[int, ...]:
    """The tokenizer's EOS id as a tuple (empty without a tokenizer)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return () if eos is None else (int(eos),)
