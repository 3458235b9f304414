"""SuffixDecoding (Oliaro et al. 2024; reference implementation: snowflakedb/ArcticInference
``arctic_inference/suffix_decoding``).

Two suffix trees (:mod:`decodebench.methods.suffix_tree`) answer "what followed this context's
suffix before?":

* a per-request tree over the prompt and the output generated so far;
* a global tree over the outputs of previous requests (and the current one, as it grows).

Each step the last ``max_depth`` tokens of the context are matched in both trees at every suffix
length; a match of ``m`` tokens may draft at most ``max_spec_factor * m + max_spec_offset`` tokens
(capped by ``max_spec_tokens``), and only tokens whose estimated probability
``count(s + t) / count(s)`` (multiplied along the path) is >= ``min_token_prob``. The draft with the
highest score (sum of its token probabilities) wins; the global tree must score strictly higher
than the per-request tree to be used. With ``use_tree`` the draft is a token tree built best-first
by path probability (one tree-masked verify forward); otherwise a chain along the most frequent
children.

Followed from the reference: the tree semantics and sibling order (see ``suffix_tree``), the
match loop, the draft budget formula, the score and the local-over-global tie rule, the prompt
and the growing output in the per-request tree, every output in the global tree. The global tree
is kept across prompts (``state: per_task``), as the reference's cache is across requests.

Differs, and why:

* Our own Python tree, not the reference's C++ one: ``arctic-inference`` ships no wheel with the
  suffix tree for this platform, and its source build needs torch >= 2.10 in an isolated build
  plus a CUDA-oriented toolchain. Tests check the tree against hand-worked examples from the
  reference's rules (and against the reference's own extension when it is importable).
* Equal probabilities in a tree draft pop in the order they were queued (the reference's
  ``std::priority_queue`` breaks such ties by its heap layout).
* No eviction (``max_cached_requests = -1``, the reference simulator's default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from decodebench.config import check
from decodebench.engine.drafting import Proposal, StepOutcome
from decodebench.methods.state_policy import StatefulDrafter, check_state_policy
from decodebench.methods.suffix_tree import Draft, SuffixTree


class SuffixDecodingDrafter(StatefulDrafter):
    """Drafts from a per-request suffix tree and a global one over previous outputs."""

    state_name = "suffix"

    @dataclass
    class Params:
        max_depth: int = 64  # paper: suffix trees (and matched patterns) truncated at 64 tokens
        max_spec_tokens: int = 64  # paper simulator: 0 = max_depth
        max_spec_factor: float = 1.0  # draft <= factor * match length + offset
        max_spec_offset: float = 0.0
        min_token_prob: float = 0.1  # drop candidates whose estimated probability is below this
        use_tree: bool = True  # paper simulator default: tree speculation
        use_prompt_tree: bool = True  # per-request tree over prompt + output ("use_cached_prompt")
        state: str = "per_task"  # the global tree: per_prompt | per_task | persistent
        # cpu preset: max_spec_tokens from the stored latency curve of the backend in use (the largest
        # draft whose verify costs <= this x a 1-token step, engine/budget.py node_budget)
        max_verify_cost: float | None = None
        # SmartSpec (Liu et al. 2024): each step's draft length from the batch size, the moving-average
        # acceptance and the T(B, k) surface, for maximal expected goodput (0 = no speculation);
        # the fixed setting's budget is the cap (engine/smartspec.py)
        smartspec: bool = False

        def __post_init__(self) -> None:
            check(
                self.max_verify_cost is None or self.max_verify_cost >= 1.0,
                "method.params.max_verify_cost",
                self.max_verify_cost,
                ">= 1.0 or null",
            )
            check(self.max_depth >= 2, "method.params.max_depth", self.max_depth, ">= 2")
            check(self.max_spec_tokens >= 1, "method.params.max_spec_tokens", self.max_spec_tokens, ">= 1")
            check(self.max_spec_factor > 0, "method.params.max_spec_factor", self.max_spec_factor, "> 0")
            check(self.max_spec_offset >= 0, "method.params.max_spec_offset", self.max_spec_offset, ">= 0")
            check(0.0 <= self.min_token_prob <= 1.0, "method.params.min_token_prob", self.min_token_prob, "[0, 1]")
            check_state_policy(self.state)

    def __init__(self, params: SuffixDecodingDrafter.Params):
        super().__init__(params)
        self.global_tree = SuffixTree(params.max_depth)
        self.responses: list[list[int]] = []  # the global tree's sequences, for snapshots
        self.local_tree = SuffixTree(params.max_depth)
        self.seen = 0  # context tokens already added to the trees
        self.max_spec_tokens = params.max_spec_tokens

    def setup(self, backbone, cache_dir: str | None = None) -> None:
        """Size the drafts from the latency curve (cpu preset), then apply the state policy."""
        self.max_spec_tokens = (
            self.budget_from_curve(backbone, cache_dir, self.params.max_verify_cost, self.params.max_spec_tokens + 1)
            - 1
        )
        if self.params.smartspec:
            self.enable_smartspec(backbone, cache_dir, self.max_spec_tokens)
        super().setup(backbone, cache_dir)

    # -- learned state (the global tree) ---------------------------------------------------------
    def _clear_state(self) -> None:
        self.global_tree = SuffixTree(self.params.max_depth)
        self.responses = []

    def _state_dict(self) -> dict[str, Any]:
        tokens = [token for response in self.responses for token in response]
        return {
            "max_depth": self.params.max_depth,
            "tokens": torch.tensor(tokens, dtype=torch.long),
            "lengths": torch.tensor([len(r) for r in self.responses], dtype=torch.long),
        }

    def _load_state_dict(self, state: dict[str, Any]) -> bool:
        if int(state["max_depth"]) != self.params.max_depth:
            return False
        tokens, start = state["tokens"].tolist(), 0
        for length in state["lengths"].tolist():
            self._add_response(tokens[start : start + length])
            start += length
        return True

    def _add_response(self, tokens: list[int]) -> None:
        self.responses.append(list(tokens))
        self.global_tree.extend(len(self.responses) - 1, tokens)

    # -- Drafter API -----------------------------------------------------------------------------
    def begin(self, prompt_ids: list[int]) -> None:
        """New request: a fresh per-request tree over the prompt and a new global sequence."""
        super().begin(prompt_ids)
        self.local_tree = SuffixTree(self.params.max_depth)
        self.local_tree.extend(0, prompt_ids)
        self.responses.append([])
        self.seen = len(prompt_ids)

    def propose(self, context: list[int], max_tokens: int) -> Proposal:
        self._observe(context, 0)
        budget = min(self.max_spec_tokens, max_tokens)
        if budget <= 0:
            return Proposal()
        draft = self.speculate(context[-self.params.max_depth :], budget)
        if not draft.tokens:
            return Proposal()
        return Proposal(tokens=draft.tokens, parents=draft.parents if self.params.use_tree else None)

    def feedback(self, outcome: StepOutcome) -> None:
        """Add this step's emitted tokens now, so a generation's last tokens reach the trees too."""
        self._observe(outcome.result.emitted_tokens, outcome.context_length)

    def speculate(self, pattern: list[int], budget: int) -> Draft:
        """The better draft of the two trees (the global one must score strictly higher)."""
        p = self.params
        args = (budget, p.max_spec_factor, p.max_spec_offset, p.min_token_prob, p.use_tree)
        best = Draft()
        if p.use_prompt_tree:  # the request's own sequence ends with the pattern: matches are free
            best = self.local_tree.speculate(pattern, *args, known_ends=self.local_tree.suffix_ends(0))
        response = len(self.responses) - 1
        candidate = self.global_tree.speculate(pattern, *args, known_ends=self.global_tree.suffix_ends(response))
        return candidate if candidate.score > best.score else best

    def _observe(self, tokens: list[int], offset: int) -> None:
        """Add the part of ``tokens`` (the context from position ``offset`` on) not yet in the trees.

        Tokens after a stop may be added too: they are the target's own greedy continuation.
        """
        new = tokens[max(0, self.seen - offset) :]
        if not new:
            return
        self.local_tree.extend(0, new)
        self.responses[-1].extend(new)
        self.global_tree.extend(len(self.responses) - 1, new)
        self.seen = offset + len(tokens)
