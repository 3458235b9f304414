"""Lookahead with a trie cache (PIA; Zhao et al., KDD 2024, "Lookahead: An Inference Acceleration
Framework for Large Language Model with Lossless Generation Accuracy";
alipay/PainlessInferenceAcceleration ``lookahead/``). Not the Jacobi "lookahead decoding" (LADE).

No draft model: drafts are retrieved from a trie of token branches (``lookahead_trie``) fed with
the prompt ("input" counts, per generation) and with generated outputs ("output" counts, kept
across prompts by default). Each step retrieves a multi-branch draft for the last two context
tokens and verifies it in one tree-masked forward:

* ``hier`` — the retrieved branches as one prefix-sharing tree (the paper's hierarchical
  multi-branch draft), at most ``decoding_length`` tokens per forward, root included, and
  ``branch_length`` deep;
* ``par`` — the same branches as independent chains (shared prefixes repeated), same budget.

Followed from the reference: the prompt (minus its first token) is inserted with branches of
``branch_length + 1`` tokens; outputs are streamed in as soon as an anchor's full branch is known
and flushed when the generation ends, after which the prompt's counts are dropped and oversized
tries are squeezed; retrieval in ``mix`` mode with output weight 1e-4 and
``min_output_size = decoding_length // 2``. See ``lookahead_trie`` for the small deviations.

Engine note for ``par``: the decode loop's greedy verifier follows the FIRST child whose token
matches; the reference follows every matching chain and keeps the longest. With repeated prefixes
``par`` can therefore accept fewer tokens here than in the reference (never wrong ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from decodebench.config import check
from decodebench.engine.backbone import Backbone
from decodebench.engine.drafting import Proposal, StepOutcome
from decodebench.methods.lookahead_trie import TRIE_MODES, RetrievalSettings, TrieCache, parallel_branches
from decodebench.methods.state_policy import StatefulDrafter, check_state_policy

DECODING_MODES = ("hier", "par")
QUERY_LENGTH = 2  # the reference retrieves with the last two context tokens (input_ids[0, -2:])
STATE_KEYS = ("anchor", "parent", "token", "input_count", "output_count")


def eos_ids(backbone: Backbone) -> list[int]:
    """EOS ids from the model's generation config and config (streams are cut there)."""
    found: set[int] = set()
    for source in (getattr(backbone.model, "generation_config", None), backbone.config):
        value = getattr(source, "eos_token_id", None)
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None:
                found.add(int(token))
    return sorted(found)


class LookaheadDrafter(StatefulDrafter):
    """Multi-branch drafts retrieved from a prompt + output trie (PIA Lookahead)."""

    state_name = "lookahead"

    @dataclass
    class Params:
        decoding_length: int = 64  # tokens per verify forward, root included (reference default)
        branch_length: int = 12  # deepest draft path (reference default)
        decoding_mode: str = "hier"  # hier | par
        trie_mode: str = "mix"  # mix | input | output: which counts rank and admit nodes
        output_weight: float = 1e-4  # w in (1 - w) * input + w * output (reference)
        max_nodes: int = 65536  # squeeze a trie above this many nodes (reference)
        max_output_nodes: int = 512  # ... or above this many output nodes (reference)
        squeeze_after: int = 1024  # squeeze once this many tries were updated (reference)
        state: str = "per_task"  # per_prompt | per_task | persistent (reference: kept on the model)
        # cpu preset: decoding_length from the stored latency curve of the backend in use, the largest
        # <= decoding_length whose verify costs <= this x a 1-token step (engine/budget.py node_budget)
        max_verify_cost: float | None = None

        def __post_init__(self) -> None:
            check(
                self.max_verify_cost is None or self.max_verify_cost >= 1.0,
                "method.params.max_verify_cost",
                self.max_verify_cost,
                ">= 1.0 or null",
            )
            check(self.decoding_length >= 2, "method.params.decoding_length", self.decoding_length, ">= 2")
            check(self.branch_length >= 1, "method.params.branch_length", self.branch_length, ">= 1")
            check(
                self.decoding_mode in DECODING_MODES,
                "method.params.decoding_mode",
                self.decoding_mode,
                " | ".join(DECODING_MODES),
            )
            check(self.trie_mode in TRIE_MODES, "method.params.trie_mode", self.trie_mode, " | ".join(TRIE_MODES))
            check(0.0 <= self.output_weight <= 1.0, "method.params.output_weight", self.output_weight, "[0, 1]")
            for key in ("max_nodes", "max_output_nodes", "squeeze_after"):
                check(getattr(self, key) >= 1, f"method.params.{key}", getattr(self, key), ">= 1")
            check_state_policy(self.state)

    def __init__(self, params: LookaheadDrafter.Params):
        super().__init__(params)
        self.eos_ids: list[int] = []
        self.cache = self._new_cache()
        self.streamed = 0  # context positions already streamed into the trie
        self.prompt_length = 0
        self.decoding_length = params.decoding_length

    def _new_cache(self) -> TrieCache:
        p = self.params
        return TrieCache(
            insert_length=p.branch_length + 1,
            eos_ids=self.eos_ids,
            max_nodes=p.max_nodes,
            max_output_nodes=p.max_output_nodes,
            squeeze_after=p.squeeze_after,
        )

    # -- state -----------------------------------------------------------------------------------
    def setup(self, backbone: Backbone, cache_dir: str | None = None) -> None:
        """Read the EOS ids, then apply the state policy."""
        self.eos_ids = eos_ids(backbone)
        self.decoding_length = self.budget_from_curve(
            backbone, cache_dir, self.params.max_verify_cost, self.params.decoding_length
        )
        super().setup(backbone, cache_dir)

    def _clear_state(self) -> None:
        self.cache = self._new_cache()
        self.streamed = self.prompt_length = 0

    def _state_dict(self) -> dict[str, Any]:
        return self.cache.to_tensors()

    def _load_state_dict(self, state: dict[str, Any]) -> bool:
        if not all(isinstance(state.get(key), torch.Tensor) for key in STATE_KEYS):
            return False
        self.cache.load_tensors(state)
        return True

    def _end_generation(self) -> None:
        self.cache.end_generation()

    # -- drafting --------------------------------------------------------------------------------
    def begin(self, prompt_ids: list[int]) -> None:
        """Close the previous generation, then insert the prompt (minus its first token)."""
        super().begin(prompt_ids)
        self.cache.put_prompt(prompt_ids[1:])
        self.prompt_length = self.streamed = len(prompt_ids)

    def propose(self, context: list[int], max_tokens: int) -> Proposal:
        """Retrieve a multi-branch draft for the last two context tokens."""
        self._stream(context[self.streamed :])  # the prefill's token never reaches feedback
        p = self.params
        # the loop allows at most max_tokens drafts (what can still be emitted), in total
        settings = RetrievalSettings(
            max_drafts=min(self.decoding_length - 1, max_tokens),
            branch_length=min(p.branch_length, max_tokens),
            mode=p.trie_mode,
            output_weight=p.output_weight,
            min_output_size=max(self.decoding_length // 2, 1),
        )
        if settings.max_drafts <= 0:
            return Proposal()
        tree = self.cache.retrieve(context[-QUERY_LENGTH:], settings)
        if p.decoding_mode == "par":
            tree = parallel_branches(tree)
        if not tree.tokens:
            return Proposal()
        return Proposal(tokens=tree.tokens, parents=tree.parents)

    def feedback(self, outcome: StepOutcome) -> None:
        """Stream the step's emitted tokens into the output counts."""
        self._stream(outcome.result.emitted_tokens)

    def _stream(self, tokens: list[int]) -> None:
        if tokens:
            self.cache.stream_output(list(tokens))
            self.streamed += len(tokens)
