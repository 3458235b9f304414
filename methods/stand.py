"""STAND: model-free speculative sampling for test-time scaling ("Accelerated Test-Time Scaling
with Model-Free Speculative Sampling"; no public code — DecodeBench's own implementation of the
paper's description).

Test-time scaling samples several reasoning traces for the same problem; they repeat each other's
phrases. STAND drafts from an n-gram memory built from the traces already sampled (and the current
one), without a draft model:

* **memory of distributions, not ids**: after every verification the target's next-token
  distribution at each accepted position (the request's temperature / top-k / top-p; under greedy
  the plain softmax, which only ranks) is stored, cut to its ``top_k`` most likely tokens, under the
  last 1..``max_ngram`` tokens of the context there; repeated n-grams average their distributions;
* **probabilistic drafts**: a node's children are drawn from the stored distribution ``q`` of the
  longest n-gram that ends at the node (``max_ngram`` → 1), WITHOUT replacement by the Gumbel-top-k
  trick (as methods/rsd.py), ``branching[d]`` children at depth ``d`` (fewer when ``q`` holds fewer
  tokens; none where no n-gram matches); each child records the distribution it was drawn from;
* **lossless**: the engine's tree verifier accepts a child with ``min(1, p/q_i)`` and resamples from
  the residual after every rejected sibling (recursive rejection sampling), so the output follows
  the target's distribution exactly; under greedy decoding the children are the memory's top tokens
  and the longest path of target argmaxes is accepted (= AR).

Which children a node gets depends on the memory and on the node's own token (its n-gram), never on
the values its siblings drew, so the tree shape introduces no bias.

The memory belongs to one problem: it is kept while consecutive requests carry the same prompt (the
samples of that problem) and cleared when the prompt changes (``scope: problem``); ``scope: request``
clears it at every request (the current trace only).

Differs, and why:

* The paper's exact n-gram orders, top-k and tree sizes are not in our notes; the defaults here
  (n ≤ 3, top-10 distributions, branching 3-2-2-1 like RSD-C) are DecodeBench's, stated in the YAML.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from decodebench.config import check
from decodebench.engine.backbone import Backbone
from decodebench.engine.drafting import Drafter, Proposal, StepOutcome
from decodebench.engine.sampling import logits_to_probs
from decodebench.methods.rsd import gumbel_top_k, without

SCOPES = ("problem", "request")


class NgramMemory:
    """Averaged top-k next-token distributions keyed by the preceding 1..``max_ngram`` tokens."""

    def __init__(self, max_ngram: int, top_k: int):
        self.max_ngram, self.top_k = max_ngram, top_k
        self.sums: dict[tuple[int, ...], dict[int, float]] = {}
        self.counts: dict[tuple[int, ...], int] = {}

    def clear(self) -> None:
        self.sums.clear()
        self.counts.clear()

    def __len__(self) -> int:
        return len(self.sums)

    def add(self, context: list[int], probs: torch.Tensor) -> None:
        """Store ``probs`` (``(vocab,)``, the distribution after ``context``) under its n-grams."""
        values, tokens = probs.float().topk(min(self.top_k, probs.shape[-1]))
        top = [(int(t), float(v)) for t, v in zip(tokens, values) if v > 0]
        for n in range(1, min(self.max_ngram, len(context)) + 1):
            key = tuple(context[-n:])
            row = self.sums.setdefault(key, {})
            for token, value in top:
                row[token] = row.get(token, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1

    def lookup(self, context: list[int], vocab: int) -> torch.Tensor | None:
        """The stored distribution of the longest n-gram ending ``context`` (renormalised over its
        tokens), or None when no n-gram matches."""
        for n in range(min(self.max_ngram, len(context)), 0, -1):
            row = self.sums.get(tuple(context[-n:]))
            if row:
                q = torch.zeros(vocab, dtype=torch.float32)
                q[list(row)] = torch.tensor(list(row.values()), dtype=torch.float32)
                return q / q.sum()
        return None


class StandDrafter(Drafter):
    """STAND: a Gumbel-top-k tree drawn from an n-gram memory of the target's distributions."""

    @dataclass
    class Params:
        max_ngram: int = 3  # longest context n-gram a distribution is stored and looked up under
        top_k: int = 10  # tokens kept per stored distribution
        branching: list[int] = field(default_factory=lambda: [3, 2, 2, 1])  # children per node per depth
        scope: str = "problem"  # problem: keep the memory across samples of one prompt | request

        def __post_init__(self) -> None:
            self.branching = list(self.branching)
            check(self.max_ngram >= 1, "method.params.max_ngram", self.max_ngram, ">= 1")
            check(self.top_k >= 1, "method.params.top_k", self.top_k, ">= 1")
            check(
                len(self.branching) >= 1 and all(isinstance(b, int) and b >= 1 for b in self.branching),
                "method.params.branching",
                self.branching,
                "a non-empty list of integers >= 1",
            )
            check(self.scope in SCOPES, "method.params.scope", self.scope, " | ".join(SCOPES))

    def __init__(self, params: StandDrafter.Params):
        self.params = params
        self.memory = NgramMemory(params.max_ngram, params.top_k)
        self.prompt: list[int] = []
        self.tail: list[int] = []
        self.vocab = 0
        self.counts = {"drafting_steps": 0, "samples_of_problem": 0}

    def setup(self, backbone: Backbone, cache_dir: str | None = None) -> None:
        self.vocab = backbone.lm_head.out_features

    def reset_state(self) -> None:
        self.memory.clear()
        self.prompt = []

    def begin(self, prompt_ids: list[int]) -> None:
        same_problem = self.params.scope == "problem" and self.prompt == list(prompt_ids)
        if not same_problem:
            self.memory.clear()
            self.counts["samples_of_problem"] = 0
        self.prompt = list(prompt_ids)
        self.counts["samples_of_problem"] += 1
        self.counts["drafting_steps"] = 0

    def propose(self, context: list[int], max_tokens: int) -> Proposal:
        self.tail = context[-self.params.max_ngram :]  # the n-gram keys of this step's feedback start here
        levels = self.params.branching[: max(0, max_tokens)]
        tokens: list[int] = []
        parents: list[int] = []
        rows: list[torch.Tensor] = []
        frontier: list[tuple[int, list[int]]] = [(-1, context)]  # (node, its context)
        for branches in levels:
            next_frontier = []
            for node, node_context in frontier:
                q = self.memory.lookup(node_context, self.vocab)
                if q is None:
                    continue
                for token, row in self._children(q, branches):
                    tokens.append(token)
                    parents.append(node)
                    rows.append(row)
                    next_frontier.append((len(tokens) - 1, [*node_context[-self.params.max_ngram :], token]))
            frontier = next_frontier
        if not tokens:
            return Proposal()
        self.counts["drafting_steps"] += 1
        probs = None if self.sampling.greedy else torch.stack(rows)
        return Proposal(tokens=tokens, parents=parents, probs=probs)

    def _children(self, q: torch.Tensor, k: int) -> list[tuple[int, torch.Tensor]]:
        """``k`` children drawn from ``q`` without replacement, each with its draw distribution
        (greedy: ``q``'s top tokens)."""
        if self.sampling.greedy:
            k = min(k, int((q > 0).sum()))
            return [(int(t), q) for t in q.topk(k).indices]
        support = q.nonzero().squeeze(-1)  # ≤ top_k × (stored distributions): Gumbel noise only there
        chosen = support[gumbel_top_k(q[support], k, self.generator)].tolist()
        return [(token, without(q, chosen[:i])) for i, token in enumerate(chosen)]

    def prefilled(self, output) -> None:
        """Store the target's distribution after the prompt (the first token's)."""
        self._store(self.prompt, output.logits[-1])

    def feedback(self, outcome: StepOutcome) -> None:
        """Store the target's distribution at the root and at every accepted node."""
        context = self.tail
        for row in [0, *outcome.result.accepted_nodes]:  # block rows: the root, then the accepted path
            if row > 0:
                context = [*context, outcome.block_tokens[row]]
            self._store(context, outcome.target.logits[row])

    def _store(self, context: list[int], logits: torch.Tensor) -> None:
        probs = (
            logits_to_probs(logits, self.sampling) if not self.sampling.greedy else torch.softmax(logits.float(), -1)
        )
        self.memory.add(context[-self.params.max_ngram :], probs.cpu())

    def request_stats(self) -> dict[str, float]:
        return {**{k: float(v) for k, v in self.counts.items()}, "memory_ngrams": float(len(self.memory))}

    @property
    def tree_size(self) -> int:
        return sum(math.prod(self.params.branching[: d + 1]) for d in range(len(self.params.branching)))
