"""Clover (Xiao et al. 2024, arXiv 2405.00263; XiaoBin1992/clover): regressive heads with an
attention decoder over the sequence and an augmenting block (:mod:`.clover_net`), drafting a token
tree verified in one tree-masked target forward (greedy longest path: lossless).

Per step the drafter first runs the augmenting block over the features of the tokens committed by
the last verification (the prefill's prompt rows, then the root and the accepted nodes of each
verified block; its own KV cache is cut back with the target's), then drafts the tree depth by
depth as Clover does on Medusa's sparse tree: the template's node ``(r_1, .., r_d)`` gets the
``r_d``-th likeliest token of head ``d - 1`` given its parent's state, and the attention decoder
carries that token into its children's state (one decoder + head call per depth, batched over the
nodes that get children). Drafts are deterministic, so sampling verification stays lossless.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from decodebench.engine.backbone import Backbone, ForwardOutput
from decodebench.engine.backends import follow_backend
from decodebench.engine.drafting import Drafter, Proposal, StepOutcome
from decodebench.methods.clover_net import CloverNet
from decodebench.methods.draft_heads import checkpoint_dir, model_key, require_checkpoint
from decodebench.methods.head_tree import MEDUSA_TREE, template_parents, truncate_tree
from decodebench.methods.medusa import MedusaDrafter

log = logging.getLogger("decodebench")


class CloverDrafter(Drafter):
    # Medusa's settings: the sparse tree (Clover evaluates on Medusa's mc_sim_7b_63), the checkpoint
    # (null = <cache>/drafters/<model>/clover), the cpu preset's curve-sized tree
    Params = MedusaDrafter.Params

    def __init__(self, params):
        self.params = params
        self.net: CloverNet | None = None

    def setup(self, backbone: Backbone, cache_dir: str | None = None) -> None:
        self.backbone = backbone
        directory = (
            Path(self.params.checkpoint).expanduser()
            if self.params.checkpoint
            else require_checkpoint(
                checkpoint_dir(cache_dir, model_key(backbone), "clover"), "clover", "clover", model_key(backbone)
            )
        )
        self.net = CloverNet.load(backbone, directory)
        kernels = follow_backend(backbone, self.net)
        nodes = self.budget_from_curve(backbone, cache_dir, self.params.max_verify_cost, self.params.tree_nodes + 1) - 1
        vocab = self.net.vocab.size if self.net.vocab is not None else backbone.config.vocab_size
        depth = self.net.params.num_heads
        self.paths = truncate_tree([p for p in MEDUSA_TREE if len(p) <= depth and max(p) < vocab], nodes)
        self.parents = template_parents(self.paths)
        self.widest = max(p[-1] for p in self.paths) + 1
        self.cache = self.net.new_cache(backbone)
        log.info("clover: network %s (%d draft nodes per step; its linears: %s)", directory, len(self.paths), kernels)

    # -- the sequence knowledge: augmented states of every committed position ------------------------
    def begin(self, prompt_ids: list[int]) -> None:
        self.cache.reset()
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.state: torch.Tensor | None = None

    def _commit(self, features: torch.Tensor) -> None:
        """Run the augmenting block over newly committed positions' features; extend the attention
        decoder's keys / values and set the root state ``s_0`` (the last committed position's)."""
        start = self.cache.length
        positions = torch.arange(start, start + features.shape[0], device=features.device)
        states = self.net.augmented(features, positions, self.cache)
        keys, values = self.net.decoder.keys_values(states)
        self.keys = keys if self.keys is None else torch.cat([self.keys, keys], dim=1)
        self.values = values if self.values is None else torch.cat([self.values, values], dim=1)
        self.state = states[-1]

    @torch.inference_mode()
    def prefilled(self, output: ForwardOutput) -> None:
        self._commit(output.last_hidden)

    @torch.inference_mode()
    def feedback(self, outcome: StepOutcome) -> None:
        self._commit(outcome.target.last_hidden[[0, *outcome.result.accepted_nodes]])

    # -- drafting -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, context: list[int], max_tokens: int) -> Proposal:
        if max_tokens <= 0:
            return Proposal()
        paths = self.paths if len(self.paths) <= max_tokens else truncate_tree(self.paths, max_tokens)
        parents = self.parents if paths is self.paths else template_parents(paths)
        return Proposal(tokens=self.draft(context[-1], paths, parents), parents=parents)

    def draft(self, last_token: int, paths, parents) -> list[int]:
        """Depth by depth: each expanded node (-1 = the root, whose token is the last emitted one)
        feeds its token into the attention decoder from its parent's state; head ``d - 1`` ranks its
        children."""
        net, device = self.net, self.backbone.device
        tokens = [0] * len(paths)
        has_children = set(parents)
        decoded: dict[int, torch.Tensor] = {}  # node (-1 = root) -> the state after feeding its token
        ranked: dict[int, list[int]] = {}
        for depth in range(1, max(len(p) for p in paths) + 1):
            expand = (
                [-1] if depth == 1 else [n for n, p in enumerate(paths) if len(p) == depth - 1 and n in has_children]
            )
            parent_states = torch.stack([self.state if n < 0 else decoded[parents[n]] for n in expand])
            node_tokens = torch.tensor([last_token if n < 0 else tokens[n] for n in expand], device=device)
            new_states = net.decoder(parent_states, net._target["embed"](node_tokens), self.keys, self.values)
            logits = net.head_logits(depth - 1, new_states)
            rows = net.to_target(logits.topk(self.widest, dim=-1).indices).tolist()
            for n, state, row in zip(expand, new_states, rows):
                decoded[n] = state
                ranked[n] = row
            for n, path in enumerate(paths):
                if len(path) == depth:
                    tokens[n] = ranked[parents[n]][path[-1]]
        return tokens
