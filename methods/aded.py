"""ADED — adaptive draft-verification with a tri-gram matrix and MCTS (Liu et al. 2024,
arXiv 2407.12021; liuxukun2000/ADED, renamed Adaptix; its Rust ``DraftRetriever``).

Each step:

1. the tri-gram matrix is reinforced with the context's last ``reinforce_window`` tokens (every
   tri-gram there gains ``reinforce_step``, capped at ``reinforce_cap``) — the adaptive part;
2. an MCTS over token pairs, rooted at the context's last two tokens, finds the most visited
   continuations (:func:`~decodebench.methods.aded_search.mcts_paths`);
3. the paths are pruned to ``max_draft_tokens`` distinct tokens and merged into a draft tree,
   verified in one tree-masked forward.

The matrix starts from the training pipeline's corpus (:mod:`decodebench.training.corpus`): the
target's own greedy answers to prompts it wrote itself from its chat template (offline, checked
against every evaluation set, never a benchmark question). It is a cached step shared with
``decodebench-train``: ``<cache>/corpora/<model>/<key>/``. The reinforced matrix is learned state (``state: per_task`` by default: the
reference reinforces one matrix for its whole run).

Followed from the reference: tri-gram frequencies normalised per pair then pruned to the top 12;
reinforcement of the last 16 tokens by 0.04 per step, capped at 3.0; the MCTS (150 iterations,
paths of the root pair + 3 tokens, PUCT with c1 = 1.814 and c2 = 8, expansion of every successor
at a leaf continuing from the last child, rollouts sampled in proportion to the weights,
back-propagation of visits and scores); the 24 most visited nodes, each extended by its most
likely successor; ``cut_to_choices`` to 64 tokens; a breadth-first tree of at most 64 nodes.

Differs, and why:

* Corpus: the reference counts tri-grams of ShareGPT / UltraChat conversations (not on disk
  here); DecodeBench uses the target's own answers to self-written prompts (the training corpus).
* Rollout score: the reference adds ``matrix[pair][pair[1]]`` (the weight of the pair's own last
  token, almost always 0, so every rollout scores 1); we add the weight of the token the rollout
  actually took — the score the paper describes (path likelihood), so visits favour likely paths.
* Deterministic: the MCTS's random generator is seeded per prompt, and successor order is by
  weight (the reference iterates Rust hash maps, whose order is random).
"""

from __future__ import annotations

import logging
import random
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from decodebench.config import ConfigValueError, check, default_cache_dir
from decodebench.engine.backbone import Backbone
from decodebench.engine.drafting import Proposal
from decodebench.methods.aded_search import MctsConfig, TrigramMatrix, cut_to_choices, mcts_paths, paths_to_tree
from decodebench.methods.state_policy import StatefulDrafter, check_state_policy, model_key

log = logging.getLogger("decodebench")


class AdedDrafter(StatefulDrafter):
    """Draft trees from an adaptive tri-gram matrix searched with MCTS."""

    state_name = "aded"

    @dataclass
    class Params:
        top_k: int = 12  # successors kept per token pair when the corpus matrix is built
        mcts_iterations: int = 150  # reference: MCTS::run(150)
        path_length: int = 4  # MCTS path: the root pair + 3 tokens
        top_paths: int = 24  # most visited search nodes turned into draft paths
        max_draft_tokens: int = 64  # cut_to_choices budget and tree size cap
        reinforce_window: int = 16  # last tokens whose tri-grams are reinforced each step
        reinforce_step: float = 0.04
        reinforce_cap: float = 3.0
        # the decodebench-train corpus (training/corpus.py): the target's greedy answers to prompts it
        # wrote itself (offline, never an evaluation set); the defaults are decodebench-train's, so the
        # same cached corpus serves both. 0 prompts = start from an empty matrix.
        corpus_prompts: int = 96
        corpus_max_new_tokens: int = 96
        state: str = "per_task"  # the reinforced matrix: per_prompt | per_task | persistent
        seed: int = 0  # MCTS rollouts (per prompt: seed and prompt hashed)
        # cpu preset: max_draft_tokens from the stored latency curve of the backend in use (the largest
        # tree whose verify costs <= this x a 1-token step, engine/budget.py node_budget)
        max_verify_cost: float | None = None

        def __post_init__(self) -> None:
            check(
                self.max_verify_cost is None or self.max_verify_cost >= 1.0,
                "method.params.max_verify_cost",
                self.max_verify_cost,
                ">= 1.0 or null",
            )
            for key in ("top_k", "mcts_iterations", "top_paths", "max_draft_tokens", "corpus_max_new_tokens"):
                check(getattr(self, key) >= 1, f"method.params.{key}", getattr(self, key), ">= 1")
            check(self.path_length >= 2, "method.params.path_length", self.path_length, ">= 2")
            check(self.reinforce_window >= 3, "method.params.reinforce_window", self.reinforce_window, ">= 3")
            check(self.reinforce_step >= 0, "method.params.reinforce_step", self.reinforce_step, ">= 0")
            check(self.reinforce_cap > 0, "method.params.reinforce_cap", self.reinforce_cap, "> 0")
            check(self.corpus_prompts >= 0, "method.params.corpus_prompts", self.corpus_prompts, ">= 0")
            check_state_policy(self.state)

    def __init__(self, params: AdedDrafter.Params):
        super().__init__(params)
        self.corpus_matrix = TrigramMatrix()
        self.matrix = TrigramMatrix()
        self.mcts = MctsConfig(params.mcts_iterations, params.path_length, params.top_paths)
        self.rng = random.Random(params.seed)
        self.max_draft_tokens = params.max_draft_tokens

    # -- learned state (the reinforced matrix) ---------------------------------------------------
    def _clear_state(self) -> None:
        self.matrix = self.corpus_matrix.copy()

    def _state_dict(self) -> dict[str, Any]:
        rows = [(a, b, c, w) for (a, b), row in self.matrix.rows.items() for c, w in row.items()]
        return {
            "keys": torch.tensor([r[:3] for r in rows], dtype=torch.long).reshape(-1, 3),
            "weights": torch.tensor([r[3] for r in rows], dtype=torch.float64),
        }

    def _load_state_dict(self, state: dict[str, Any]) -> bool:
        rows: dict[tuple[int, int], dict[int, float]] = {}
        for (a, b, c), weight in zip(state["keys"].tolist(), state["weights"].tolist()):
            rows.setdefault((a, b), {})[c] = weight
        self.matrix = TrigramMatrix(rows)
        return True

    # -- Drafter API -----------------------------------------------------------------------------
    def setup(self, backbone: Backbone, cache_dir: str | None = None) -> None:
        """Build (or load the cached) corpus matrix, then apply the state policy."""
        sequences = self._corpus(backbone, cache_dir) if self.params.corpus_prompts else []
        self.corpus_matrix = TrigramMatrix.from_sequences(sequences, self.params.top_k)
        self.max_draft_tokens = (
            self.budget_from_curve(backbone, cache_dir, self.params.max_verify_cost, self.params.max_draft_tokens + 1)
            - 1
        )
        log.info("aded: corpus matrix with %d token pairs from %d answers", len(self.corpus_matrix), len(sequences))
        super().setup(backbone, cache_dir)

    def begin(self, prompt_ids: list[int]) -> None:
        super().begin(prompt_ids)
        self.rng = random.Random(zlib.crc32(f"{self.params.seed}/{','.join(map(str, prompt_ids))}".encode()))

    def propose(self, context: list[int], max_tokens: int) -> Proposal:
        p = self.params
        self.matrix.reinforce(context, p.reinforce_window, p.reinforce_step, p.reinforce_cap)
        if max_tokens <= 0 or len(context) < 2:
            return Proposal()
        paths = mcts_paths(self.matrix, (context[-2], context[-1]), self.mcts, self.rng)
        unique = [list(path) for path in dict.fromkeys(tuple(path) for path in paths)]
        budget = self.max_draft_tokens
        tokens, parents = paths_to_tree(cut_to_choices(unique, budget), budget, max_tokens)
        return Proposal(tokens=tokens, parents=parents) if tokens else Proposal()

    # -- the corpus (the training pipeline's, a cached step) ---------------------------------------
    def _corpus(self, backbone: Backbone, cache_dir: str | None) -> list[list[int]]:
        """The answers of the ``decodebench-train`` corpus with these settings (built once, cached in
        ``<cache>/corpora/<model>/``, shared with every drafter trained on it)."""
        import os

        from decodebench.training.config import CorpusConfig
        from decodebench.training.corpus import build_corpus

        tokenizer = self._tokenizer(backbone)
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        configured = getattr(backbone.model.generation_config, "eos_token_id", None)
        eos.update(configured if isinstance(configured, list) else [configured] if configured is not None else [])
        corpus_cfg = CorpusConfig(prompts=self.params.corpus_prompts, answer_tokens=self.params.corpus_max_new_tokens)
        corpus = build_corpus(
            backbone,
            tokenizer,
            backbone.model_name or model_key(backbone),
            True,
            corpus_cfg,
            sorted(eos),
            seed=0,
            data_dir=os.environ.get("DECODEBENCH_DATA"),
            cache_dir=cache_dir or default_cache_dir(),
            progress=False,
        )
        return [s.ids[s.answer_start :].tolist() for s in corpus.sequences]

    def _tokenizer(self, backbone: Backbone) -> Any:
        """The target's tokenizer, read from the checkpoint folder it was loaded from."""
        from transformers import AutoTokenizer

        location = str(getattr(backbone.config, "_name_or_path", "") or "")
        try:
            return AutoTokenizer.from_pretrained(location)
        except (OSError, ValueError) as error:
            raise ConfigValueError(
                f"aded: cannot load the tokenizer of '{location or backbone.config.model_type}' to build the "
                f"corpus ({error}); set method.params.corpus_prompts=0 to start from an empty matrix"
            ) from error
