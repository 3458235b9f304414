"""REST: Retrieval-Based Speculative Decoding (He et al. 2024; FasterDecoding/REST, its
``DraftRetriever`` suffix array and ``rest/model/utils.py``).

A datastore — a suffix array (:mod:`decodebench.methods.suffix_array`) over a corpus
(:mod:`decodebench.methods.corpus`) — answers "what followed this context's suffix in the corpus?".
Each step:

1. retrieval — the longest suffix of the context, from ``max_token_span`` down to
   ``min_token_span`` tokens, that occurs in the corpus; its first ``max_matches`` occurrences (in
   suffix-array order) give continuations of at most ``continuation_length`` tokens;
2. trie — every prefix of every continuation is counted; the ``num_draft`` most frequent prefixes
   (a prefix is at least as frequent as its extensions, so they form a trie) are the draft tree;
3. the decode loop verifies the tree in one tree-masked forward.

The datastore is built once per run in ``setup`` (the corpus is cached on disk); its size (tokens),
the suffix array's build time and the corpus's build time are logged and recorded in every
record's ``method_stats``.

Followed from the reference: spans 16 → 2, at most 5000 matches, 10-token continuations, top-64
prefixes by count, continuations never crossing a corpus entry, the datastore static while decoding.

Differs, and why:

* Ties in prefix count are broken deterministically (shorter first, then first seen), so the draft
  is exactly ``num_draft`` nodes; the reference keeps a heap whose order among equal counts is
  arbitrary and then trims paths approximately (``cut_to_choices``).
* No match at any span drafts nothing (a plain AR step); the reference verifies a dummy token.
* The offline default corpus is the training pipeline's (``training/corpus.py``: the target's own
  answers to prompts it wrote itself, shared with the trained drafters), not ShareGPT / The Stack,
  which this machine cannot reach; ``corpus=jsonl`` / ``corpus=datasets`` take any other corpus.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from decodebench.config import check
from decodebench.engine.drafting import Drafter, Proposal
from decodebench.methods.corpus import CorpusSpec, eos_ids, load_corpus
from decodebench.methods.suffix_array import SuffixArray

log = logging.getLogger("decodebench")


def retrieval_tree(continuations: list[list[int]], num_draft: int) -> tuple[list[int], list[int]]:
    """The ``num_draft`` most frequent prefixes of ``continuations`` as a draft tree
    ``(tokens, parents)``, parents listed first (``-1`` = child of the last emitted token)."""
    counts: dict[tuple[int, ...], int] = {}
    for continuation in continuations:
        for end in range(1, len(continuation) + 1):
            prefix = tuple(continuation[:end])
            counts[prefix] = counts.get(prefix, 0) + 1
    first_seen = {prefix: i for i, prefix in enumerate(counts)}
    chosen = sorted(counts, key=lambda p: (-counts[p], len(p), first_seen[p]))[:num_draft]
    chosen.sort(key=lambda p: (len(p), first_seen[p]))  # parents first
    index = {prefix: i for i, prefix in enumerate(chosen)}
    return [p[-1] for p in chosen], [index[p[:-1]] if len(p) > 1 else -1 for p in chosen]


class RestDrafter(Drafter):
    """Drafts the trie of corpus continuations of the context's longest matching suffix."""

    @dataclass
    class Params:
        num_draft: int = 64  # draft tree nodes (reference --num-draft 64)
        max_token_span: int = 16  # longest suffix tried first (reference --max-token-span 16)
        min_token_span: int = 2  # shortest suffix tried (reference: spans 16 .. 2)
        max_matches: int = 5000  # occurrences read per retrieval (DraftRetriever k)
        continuation_length: int = 10  # tokens after each occurrence (DraftRetriever "long")
        corpus: str = "training"  # training | jsonl | datasets (methods/corpus.py)
        corpus_path: str | None = None  # jsonl: file; datasets: dataset name
        corpus_prompts: int = 96  # training: self-written prompts (decodebench-train corpus.prompts=96 corpus.answer_tokens=96 builds the same)
        corpus_max_new_tokens: int = 96  # training: tokens per answer
        corpus_split: str = "train"  # datasets
        corpus_field: str = "text"  # datasets
        corpus_limit: int = 2000  # jsonl / datasets rows
        # cpu preset: num_draft from the stored latency curve of the backend in use (the largest tree
        # whose verify costs <= this x a 1-token step, engine/budget.py node_budget)
        max_verify_cost: float | None = None

        def __post_init__(self) -> None:
            check(self.num_draft >= 1, "method.params.num_draft", self.num_draft, ">= 1")
            check(self.min_token_span >= 1, "method.params.min_token_span", self.min_token_span, ">= 1")
            check(
                self.max_token_span >= self.min_token_span,
                "method.params.max_token_span",
                self.max_token_span,
                f">= min_token_span ({self.min_token_span})",
            )
            check(self.max_matches >= 1, "method.params.max_matches", self.max_matches, ">= 1")
            check(self.continuation_length >= 1, "method.params.continuation_length", self.continuation_length, ">= 1")
            check(
                self.max_verify_cost is None or self.max_verify_cost >= 1.0,
                "method.params.max_verify_cost",
                self.max_verify_cost,
                ">= 1.0 or null",
            )
            self.corpus_spec()  # validates the corpus keys

        def corpus_spec(self) -> CorpusSpec:
            return CorpusSpec(
                self.corpus,
                self.corpus_path,
                self.corpus_prompts,
                self.corpus_max_new_tokens,
                self.corpus_split,
                self.corpus_field,
                self.corpus_limit,
            )

    def __init__(self, params: RestDrafter.Params):
        self.params = params
        self.num_draft = params.num_draft
        self.datastore: SuffixArray | None = None
        self.datastore_stats: dict[str, float] = {}

    def setup(self, backbone, cache_dir: str | None = None) -> None:
        """Build the datastore (once per run) and size the tree from the latency curve (cpu preset)."""
        self.num_draft = (
            self.budget_from_curve(backbone, cache_dir, self.params.max_verify_cost, self.params.num_draft + 1) - 1
        )
        corpus = load_corpus(self.params.corpus_spec(), backbone, self.tokenizer, cache_dir, eos_ids(self.tokenizer))
        start = time.perf_counter()
        self.datastore = SuffixArray(corpus.sequences)
        build_s = time.perf_counter() - start
        self.datastore_stats = {
            "datastore_tokens": float(corpus.tokens),
            "datastore_sequences": float(len(corpus.sequences)),
            "datastore_build_s": build_s,
            "corpus_load_s": corpus.load_s,
            "corpus_build_s": corpus.build_s,
        }
        log.info(
            "rest: datastore over %s: %d tokens in %d sequences, suffix array built in %.2f s (corpus %.1f s)",
            corpus.source,
            corpus.tokens,
            len(corpus.sequences),
            build_s,
            corpus.load_s,
        )

    def retrieve(self, context: list[int]) -> list[list[int]]:
        """Continuations of the longest suffix of ``context`` found in the datastore (spans long → short)."""
        p = self.params
        for span in range(min(p.max_token_span, len(context)), p.min_token_span - 1, -1):
            starts = self.datastore.find(context[-span:])
            if len(starts):
                return [
                    c
                    for c in (
                        self.datastore.continuation(int(s) + span, p.continuation_length)
                        for s in starts[: p.max_matches]
                    )
                    if c
                ]
        return []

    def propose(self, context: list[int], max_tokens: int) -> Proposal:
        budget = min(self.num_draft, max_tokens)
        if budget <= 0:
            return Proposal()
        continuations = self.retrieve(context)
        if not continuations:
            return Proposal()
        tokens, parents = retrieval_tree(continuations, budget)
        return Proposal(tokens=tokens, parents=parents)

    def request_stats(self) -> dict[str, float]:
        return {**super().request_stats(), **self.datastore_stats}
