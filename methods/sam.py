"""SAM-Decoding (Hu et al. 2024, "SAM Decoding: Speculative Decoding via Suffix Automaton";
hyx1999/SAM-Decoding ``samd/draft.py``, ``samd/sam/``).

Two suffix automata (:mod:`decodebench.methods.suffix_automaton`) find the longest suffix of the
context that occurred before:

* a dynamic one over the request's text (prompt + output so far), extended with every step's
  accepted tokens;
* a static one over a corpus (:mod:`decodebench.methods.corpus`; default: the training pipeline's
  corpus, the target's own answers to prompts it wrote itself), built once per run; only its
  matching cursor moves.

Each step both are looked up with the last emitted token. The static match length is discounted by
``len_bias``; the longer match wins (the dynamic one on ties). If it is at least ``len_threshold``
tokens, the draft is a chain: the ``n_predicts - 1`` tokens that followed the match's first
occurrence (for the dynamic automaton, the match is first shortened along suffix links until that
many tokens follow it). Otherwise the auxiliary drafter — Token Recycling
(:mod:`decodebench.methods.token_recycling`), the paper's training-free choice — drafts its tree.
Token Recycling's adjacency matrix learns from every verified block, whichever drafter proposed it.

The reference's retrieval-only variant (``samd_sam_only``, the paper's plain "SAM-Decoding" row; preset
``sam_only``) drafts without an auxiliary drafter (``auxiliary: none``) and sizes every draft by its
match: ``min(n_predicts, 1 + int(alpha × match length))`` tokens counting the start token (``alpha``
4, ``n_predicts`` 60, ``len_bias`` 0); its corpus automaton drafts a tree instead of a chain
(``static_tree``): best-first by the product of the continuations' frequencies (each state's
occurrence count over its parent's), at most ``tree_topk`` (8) nodes per depth.

Followed from the reference: the automata and their update rules (request automaton rebuilt per
request; the static cursor reset per request and moved over prompt and accepted tokens), the
first-occurrence continuation, ``to_anc`` for the dynamic automaton only, ``n_predicts`` 40,
``len_threshold`` 5, ``len_bias`` 5 (scripts/inference_samd.sh), Token Recycling's 80-node tree.

Differs, and why:

* EAGLE / EAGLE-2 as auxiliary drafters are not offered: no EAGLE checkpoint exists for the models
  here (the paper's headline SAM[EAGLE-2] needs one).
* Corpus entries are separated by a token no text contains (the reference inserts EOS), so a draft
  never runs from one entry into the next; drafts shorter than ``n_predicts - 1`` are not padded.
* Token Recycling learns from decode steps only, not from the prefill's logits (as this project's
  ``token_recycling`` and the Token Recycling reference).
"""

from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from decodebench.config import check
from decodebench.engine.drafting import Drafter, Proposal, StepOutcome
from decodebench.methods.corpus import CorpusSpec, eos_ids, load_corpus
from decodebench.methods.suffix_automaton import SuffixAutomaton
from decodebench.methods.token_recycling import PAPER_TREE, TokenRecyclingDrafter

log = logging.getLogger("decodebench")

SEPARATOR = -1  # between corpus entries in the static automaton
AUXILIARIES = ("token_recycling", "none")


class SamDecodingDrafter(Drafter):
    """Suffix-automaton retrieval (request + corpus), Token Recycling when no match is long enough."""

    @dataclass
    class Params:
        n_predicts: int = 40  # chain draft = n_predicts - 1 tokens after the start token (reference 40)
        len_threshold: int = 5  # retrieval drafts when the (biased) match is >= this (reference 5)
        len_bias: int = 5  # subtracted from the static (corpus) match length (reference 5)
        use_static: bool = True  # the corpus automaton (False: request text only)
        corpus: str = "training"  # training | jsonl | datasets (methods/corpus.py)
        corpus_path: str | None = None
        corpus_prompts: int = 96  # training: self-written prompts (decodebench-train corpus.prompts=96 corpus.answer_tokens=96 builds the same)
        corpus_max_new_tokens: int = 96  # training: tokens per answer
        corpus_split: str = "train"
        corpus_field: str = "text"
        corpus_limit: int = 2000
        # draft length from the match (reference samd_sam_only): min(n_predicts, 1 + int(alpha * match))
        # tokens with the start token; None = always n_predicts (samd, with an auxiliary drafter)
        alpha: float | None = None
        static_tree: bool = False  # the corpus match drafts a frequency-ranked tree (samd_sam_only)
        tree_topk: int = 8  # the static tree's nodes per depth (reference K 8)
        auxiliary: str = "token_recycling"  # token_recycling | none (retrieval only: no draft below len_threshold)
        # the auxiliary Token Recycling drafter (methods/token_recycling.py)
        candidates: int = 8
        tree: list[list[int]] = field(default_factory=lambda: [list(p) for p in PAPER_TREE])
        state: str = "per_task"  # Token Recycling's matrix: per_prompt | per_task | persistent
        # cpu preset: the chain (n_predicts) and the auxiliary tree sized from the stored latency curve
        # of the backend in use (engine/budget.py node_budget): the largest block whose verify costs
        # <= max_verify_cost (chain) / aux_max_verify_cost (Token Recycling's tree) x a 1-token step
        max_verify_cost: float | None = None
        aux_max_verify_cost: float | None = None

        def __post_init__(self) -> None:
            check(self.n_predicts >= 2, "method.params.n_predicts", self.n_predicts, ">= 2")
            check(self.len_threshold >= 1, "method.params.len_threshold", self.len_threshold, ">= 1")
            check(self.len_bias >= 0, "method.params.len_bias", self.len_bias, ">= 0")
            check(self.alpha is None or self.alpha > 0, "method.params.alpha", self.alpha, "> 0 or null")
            check(self.tree_topk >= 1, "method.params.tree_topk", self.tree_topk, ">= 1")
            check(self.auxiliary in AUXILIARIES, "method.params.auxiliary", self.auxiliary, " | ".join(AUXILIARIES))
            check(
                self.max_verify_cost is None or self.max_verify_cost >= 1.0,
                "method.params.max_verify_cost",
                self.max_verify_cost,
                ">= 1.0 or null",
            )
            self.corpus_spec()
            self.recycling_params()

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

        def recycling_params(self) -> TokenRecyclingDrafter.Params:
            return TokenRecyclingDrafter.Params(
                candidates=self.candidates, tree=self.tree, state=self.state, max_verify_cost=self.aux_max_verify_cost
            )

    def __init__(self, params: SamDecodingDrafter.Params):
        self.params = params
        self.n_predicts = params.n_predicts
        self.recycling = TokenRecyclingDrafter(params.recycling_params())
        self.static = SuffixAutomaton()
        self.dynamic = SuffixAutomaton()
        self.static_stats: dict[str, float] = {}
        self.counts = {"retrieval_steps": 0, "aux_steps": 0}

    # -- set-up and state ----------------------------------------------------------------------
    def setup(self, backbone, cache_dir: str | None = None) -> None:
        """Size the chain from the latency curve (cpu preset), set up Token Recycling, build the
        static automaton over the corpus (once per run)."""
        self.n_predicts = self.budget_from_curve(
            backbone, cache_dir, self.params.max_verify_cost, self.params.n_predicts
        )
        self.recycling.setup(backbone, cache_dir)
        self.static = SuffixAutomaton()
        if not self.params.use_static:
            return
        corpus = load_corpus(self.params.corpus_spec(), backbone, self.tokenizer, cache_dir, eos_ids(self.tokenizer))
        start = time.perf_counter()
        for sequence in corpus.sequences:
            self.static.extend(sequence)
            self.static.add(SEPARATOR)
        if self.params.static_tree:
            self.static.count_occurrences()
        build_s = time.perf_counter() - start
        self.static_stats = {
            "datastore_tokens": float(corpus.tokens),
            "datastore_build_s": build_s,
            "corpus_load_s": corpus.load_s,
            "corpus_build_s": corpus.build_s,
        }
        log.info(
            "sam: static automaton over %s: %d tokens, %d states, built in %.2f s (corpus %.1f s)",
            corpus.source,
            corpus.tokens,
            self.static.states,
            build_s,
            corpus.load_s,
        )

    def reset_state(self) -> None:
        self.recycling.reset_state()

    def finish(self) -> None:
        self.recycling.finish()

    def start_request(self, prompt_ids: list[int], sampling: Any, generator: Any) -> None:
        super().start_request(prompt_ids, sampling, generator)
        self.recycling.start_request(prompt_ids, sampling, generator)

    def begin(self, prompt_ids: list[int]) -> None:
        """A fresh request automaton; the static cursor restarts. Both read the prompt up to its last
        token, which (as every step's last emitted token) is the lookup's start token."""
        self.dynamic = SuffixAutomaton()
        self.static.reset_cursor()
        self.fed = 0  # context tokens already read by both automata
        self.counts = {"retrieval_steps": 0, "aux_steps": 0}

    def _read(self, context: list[int]) -> None:
        """Feed the automata the context except its last token (the next lookup's start token)."""
        new = context[self.fed : len(context) - 1]
        for token in new:
            self.dynamic.transfer((token,))  # the reference moves the cursor, then extends
            self.dynamic.add(token)
        if self.params.use_static:
            self.static.transfer(new)
        self.fed = len(context) - 1

    # -- drafting --------------------------------------------------------------------------------
    def retrieve(self, context: list[int]) -> Proposal | None:
        """The draft from the better automaton match (a chain, or the corpus tree with
        ``static_tree``), or None when neither reaches ``len_threshold``."""
        self._read(context)
        start = context[-1]
        dyn_state, dyn_len = self.dynamic.lookup(start)
        static_state, static_len = self.static.lookup(start) if self.params.use_static else (0, 0)
        static_len -= self.params.len_bias
        if max(dyn_len, static_len) < self.params.len_threshold:
            return None
        n = self.draft_size(max(dyn_len, static_len))
        if dyn_len >= static_len:
            return Proposal(tokens=self.dynamic.continuation(self.dynamic.shorter_with_room(dyn_state, n), n - 1))
        if self.params.static_tree:
            return self.static_tree(static_state, n - 1)
        draft = self.static.continuation(static_state, n - 1)
        return Proposal(tokens=draft[: draft.index(SEPARATOR)] if SEPARATOR in draft else draft)

    def draft_size(self, match: int) -> int:
        """Tokens of a retrieval draft counting the start token: ``n_predicts``, or with ``alpha`` the
        reference's ``min(n_predicts, 1 + int(alpha * match))``."""
        if self.params.alpha is None:
            return self.n_predicts
        return min(self.n_predicts, 1 + int(self.params.alpha * match))

    def static_tree(self, state: int, size: int) -> Proposal:
        """Best-first tree of up to ``size`` drafts below the corpus match (reference
        ``StaticSAM.gen_draft``): pop the likeliest frontier node (product of the continuation
        frequencies on its path), keep it unless its depth already has ``tree_topk`` nodes, push its
        ``tree_topk`` most frequent continuations (never the entry separator)."""
        k = self.params.tree_topk
        # (-probability, push order, token, automaton state, parent draft, depth); the root is the start token
        frontier: list[tuple[float, int, int, int, int, int]] = [(-1.0, 0, -1, state, -1, 0)]
        tokens: list[int] = []
        parents: list[int] = []
        per_depth: dict[int, int] = {}
        pushed = 1
        while frontier and len(tokens) < size:
            neg_prob, _, node_token, node_state, parent, depth = heapq.heappop(frontier)
            if depth and per_depth.get(depth, 0) >= k:
                continue
            index = parent
            if depth:  # depth 0 is the start token: the verify block's root
                per_depth[depth] = per_depth.get(depth, 0) + 1
                index = len(tokens)
                tokens.append(node_token)
                parents.append(parent)
            for token, nxt, prob in self.static.likeliest_next(node_state, k):
                if token != SEPARATOR:
                    heapq.heappush(frontier, (neg_prob * prob, pushed, token, nxt, index, depth + 1))
                    pushed += 1
        return Proposal(tokens=tokens, parents=parents)

    def propose(self, context: list[int], max_tokens: int) -> Proposal:
        if max_tokens <= 0:
            return Proposal()
        proposal = self.retrieve(context)
        if proposal is not None and proposal.tokens:
            self.counts["retrieval_steps"] += 1
            return first_drafts(proposal, max_tokens)
        if self.params.auxiliary == "none":
            return Proposal()
        self.counts["aux_steps"] += 1
        return self.recycling.propose(context, max_tokens)

    def feedback(self, outcome: StepOutcome) -> None:
        self.recycling.feedback(outcome)

    def request_stats(self) -> dict[str, float]:
        return {**super().request_stats(), **self.static_stats, **{k: float(v) for k, v in self.counts.items()}}


def first_drafts(proposal: Proposal, n: int) -> Proposal:
    """The first ``n`` drafts of a chain or of a tree whose parents precede their children."""
    parents = None if proposal.parents is None else proposal.parents[:n]
    return Proposal(tokens=proposal.tokens[:n], parents=parents)
