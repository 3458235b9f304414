"""Medusa-1 and Hydra: draft heads on the target's last hidden state, candidates in Medusa's sparse
tree, verified in one tree-masked target forward (greedy longest path; lossless).

The feature both read is the target's final hidden state (after the norm) of the node whose
logits produced the last emitted token: the prefill's last prompt row, then after every step the
last accepted node of the verified block (or its root). Head ``i`` drafts depth ``i + 1``:

* Medusa: the template's node ``(r_1, .., r_d)`` gets the ``r_d``-th likeliest token of head
  ``d - 1`` — one head forward per step, the same candidates under every parent;
* Hydra: the ``r_d``-th likeliest token of head ``d - 1`` given the tokens on the node's path
  (one head forward per depth, batched over the nodes that get children).

Heads are trained by ``decodebench-train drafter=medusa`` / ``drafter=hydra``. Drafts are
deterministic, so sampling verification stays lossless. Medusa's typical acceptance (a LOSSY
verifier for sampling, :mod:`decodebench.methods.medusa_typical`) is the separate method
``medusa_typical`` (``lossless: false``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from decodebench.config import check
from decodebench.engine.backbone import Backbone, ForwardOutput
from decodebench.engine.backends import follow_backend
from decodebench.engine.drafting import Drafter, Proposal, StepOutcome
from decodebench.engine.sampling import SamplingParams
from decodebench.engine.verify import VerifyResult
from decodebench.methods.draft_heads import checkpoint_dir, model_key, require_checkpoint
from decodebench.methods.head_tree import MEDUSA_TREE, template_parents, truncate_tree
from decodebench.methods.medusa_heads import HydraHeads, MedusaHeads
from decodebench.methods.medusa_typical import verify_typical

log = logging.getLogger("decodebench")


class MedusaDrafter(Drafter):
    @dataclass
    class Params:
        tree_nodes: int = 63  # draft nodes of Medusa's mc_sim_7b_63 tree used (paper: all 63)
        checkpoint: str | None = None  # null = <cache>/drafters/<model>/<medusa | hydra>
        max_verify_cost: float | None = None  # cpu preset: size the tree from the latency curve

        def __post_init__(self) -> None:
            check(
                1 <= self.tree_nodes <= len(MEDUSA_TREE),
                "method.params.tree_nodes",
                self.tree_nodes,
                f"1 .. {len(MEDUSA_TREE)}",
            )
            check(
                self.max_verify_cost is None or self.max_verify_cost >= 1.0,
                "method.params.max_verify_cost",
                self.max_verify_cost,
                ">= 1.0 or null",
            )

    method_name = "medusa"
    heads_class = MedusaHeads

    def __init__(self, params):
        self.params = params
        self.heads = None

    def setup(self, backbone: Backbone, cache_dir: str | None = None) -> None:
        from decodebench.methods.published import load_heads

        self.backbone = backbone
        network = self.heads_class.network
        directory = (
            Path(self.params.checkpoint).expanduser()
            if self.params.checkpoint
            else require_checkpoint(
                checkpoint_dir(cache_dir, model_key(backbone), network), self.method_name, network, model_key(backbone)
            )
        )
        self.heads = load_heads(self.heads_class, backbone, directory)
        kernels = follow_backend(backbone, self.heads)
        nodes = self.budget_from_curve(backbone, cache_dir, self.params.max_verify_cost, self.params.tree_nodes + 1) - 1
        depth = self.heads.params.num_heads
        vocab = self.heads.vocab.size if self.heads.vocab is not None else backbone.config.vocab_size
        self.paths = truncate_tree([p for p in MEDUSA_TREE if len(p) <= depth and max(p) < vocab], nodes)
        self.parents = template_parents(self.paths)
        self.widest = max(p[-1] for p in self.paths) + 1
        log.info(
            "%s: heads %s (%d draft nodes per step; their linears: %s)",
            self.method_name,
            directory,
            len(self.paths),
            kernels,
        )

    def begin(self, prompt_ids: list[int]) -> None:
        self.feature: torch.Tensor | None = None

    def prefilled(self, output: ForwardOutput) -> None:
        self.feature = output.last_hidden[-1]

    def feedback(self, outcome: StepOutcome) -> None:
        accepted = outcome.result.accepted_nodes
        self.feature = outcome.target.last_hidden[accepted[-1] if accepted else 0]

    @torch.inference_mode()
    def propose(self, context: list[int], max_tokens: int) -> Proposal:
        if max_tokens <= 0:
            return Proposal()
        paths = self.paths if len(self.paths) <= max_tokens else truncate_tree(self.paths, max_tokens)
        parents = self.parents if paths is self.paths else template_parents(paths)
        tokens = self.draft(context, paths, parents)
        return Proposal(tokens=tokens, parents=parents)

    def draft(self, context: list[int], paths, parents) -> list[int]:
        """Medusa: every head once on the feature; node (r_1..r_d) = head d-1's r_d-th token."""
        ranked = self.heads.to_target(self.heads(self.feature[None])[:, 0].topk(self.widest, dim=-1).indices).tolist()
        return [ranked[len(path) - 1][path[-1]] for path in paths]


class MedusaTypicalDrafter(MedusaDrafter):
    """Medusa-1 with typical acceptance under sampling (lossy; greedy decoding stays exact)."""

    @dataclass
    class Params(MedusaDrafter.Params):
        posterior_threshold: float = 0.09  # ε, the bar's cap (reference default 0.09)
        posterior_alpha: float = 0.3  # α, scales exp(-entropy) (reference default sqrt(ε) = 0.3)

        def __post_init__(self) -> None:
            super().__post_init__()
            check(
                0 < self.posterior_threshold < 1,
                "method.params.posterior_threshold",
                self.posterior_threshold,
                "(0, 1)",
            )
            check(0 < self.posterior_alpha <= 1, "method.params.posterior_alpha", self.posterior_alpha, "(0, 1]")

    method_name = "medusa_typical"

    def verify(
        self,
        block_tokens: list[int],
        block_parents: list[int],
        logits: torch.Tensor,
        params: SamplingParams,
        generator: torch.Generator | None,
    ) -> VerifyResult | None:
        if params.greedy:
            return None
        return verify_typical(
            block_tokens,
            block_parents,
            logits,
            params,
            generator,
            self.params.posterior_threshold,
            self.params.posterior_alpha,
        )


class HydraDrafter(MedusaDrafter):
    # Params: Medusa's (Hydra evaluates on Medusa's trees; its checkpoint is <cache>/drafters/<model>/hydra)
    method_name = "hydra"
    heads_class = HydraHeads

    def draft(self, context: list[int], paths, parents) -> list[int]:
        """Hydra: depth by depth, head d-1 on the feature and each parent's path tokens."""
        device = self.backbone.device
        tokens = [0] * len(paths)
        has_children = set(parents)
        ranked: dict[int, list[int]] = {}  # parent node (-1 = root) -> its children's tokens by rank
        for depth in range(1, max(len(p) for p in paths) + 1):
            expand = (
                [-1] if depth == 1 else [n for n, p in enumerate(paths) if len(p) == depth - 1 and n in has_children]
            )
            path_tokens = [[context[-1]] + ([] if n < 0 else self._path_tokens(n, tokens, parents)) for n in expand]
            logits = self.heads.head_logits(
                depth - 1, self.feature[None].expand(len(expand), -1), torch.tensor(path_tokens, device=device)
            )
            rows = self.heads.to_target(logits.topk(self.widest, dim=-1).indices).tolist()
            ranked.update(zip(expand, rows))
            for n, path in enumerate(paths):
                if len(path) == depth:
                    tokens[n] = ranked[parents[n]][path[-1]]
        return tokens

    @staticmethod
    def _path_tokens(node: int, tokens: list[int], parents: list[int]) -> list[int]:
        path = []
        while node >= 0:
            path.append(tokens[node])
            node = parents[node]
        return path[::-1]
