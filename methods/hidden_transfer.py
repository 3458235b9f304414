"""Hidden Transfer (Wu et al. 2024, arXiv 2404.12022): drafts come out of the verify forward itself.

Each step's target forward (:meth:`HiddenTransferDrafter.verify_forward`) runs the block — the last
emitted token and the draft tree — through the target's layers ``0 .. l-1`` (the transfer layer
``l`` comes from the trained network, :mod:`.hidden_transfer_net`), maps every block node's
layer-``l`` input to ``k`` pseudo hidden states of the tokens after it, and runs real and pseudo
states together through layers ``l .. L-1`` (pseudo states see their node's ancestors, the node and
their own earlier pseudo states; real tokens never see pseudo ones, so their logits and K/V are
exactly the plain tree forward's). The loop verifies the real rows (greedy longest path or
speculative sampling: lossless) and keeps only the accepted nodes' K/V; the pseudo rows of the
last accepted node predict the ``k`` tokens after the bonus token, and the next step's tree is
Medusa's sparse template over them (node ``(r_1, .., r_d)`` = the ``r_d``-th likeliest token of
offset ``d``). The first step after the prefill has no pseudo states yet and drafts nothing.

The pseudo states cost target compute: ``q · k`` extra tokens in the upper layers of a ``q``-token
block; that is the method's draft cost (inside ``verify_s``; ``draft_s`` is only the tree's top-k).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from decodebench.config import check
from decodebench.engine.backbone import Backbone, BlockLayout, ForwardOutput, ForwardPlan
from decodebench.engine.backends import follow_backend
from decodebench.engine.drafting import Drafter, Proposal, RowForward, StepOutcome
from decodebench.engine.kv_cache import KVCache
from decodebench.engine.tree import tree_depths
from decodebench.methods.draft_heads import checkpoint_dir, model_key, require_checkpoint
from decodebench.methods.head_tree import MEDUSA_TREE, template_parents, truncate_tree
from decodebench.methods.hidden_transfer_net import HiddenTransferNet, pseudo_layout

log = logging.getLogger("decodebench")


class HiddenTransferDrafter(Drafter):
    # Its drafts come out of its own verify forward: verify_forward for one sequence,
    # verify_forward_rows for a batch (every row's real and pseudo rows in one padded forward).

    @dataclass
    class Params:
        tree_nodes: int = 63  # draft nodes of Medusa's sparse tree (depth <= the network's num_future)
        checkpoint: str | None = None  # null = <cache>/drafters/<model>/hidden_transfer

        def __post_init__(self) -> None:
            check(
                1 <= self.tree_nodes <= len(MEDUSA_TREE),
                "method.params.tree_nodes",
                self.tree_nodes,
                f"1 .. {len(MEDUSA_TREE)}",
            )

    def __init__(self, params):
        self.params = params
        self.net: HiddenTransferNet | None = None

    def setup(self, backbone: Backbone, cache_dir: str | None = None) -> None:
        self.backbone = backbone
        network = HiddenTransferNet.network
        directory = (
            Path(self.params.checkpoint).expanduser()
            if self.params.checkpoint
            else require_checkpoint(
                checkpoint_dir(cache_dir, model_key(backbone), network), network, network, model_key(backbone)
            )
        )
        self.net = HiddenTransferNet.load(backbone, directory)
        kernels = follow_backend(backbone, self.net)
        self.future = self.net.params.num_future
        self.paths = truncate_tree([p for p in MEDUSA_TREE if len(p) <= self.future], self.params.tree_nodes)
        self.parents = template_parents(self.paths)
        self.widest = max(p[-1] for p in self.paths) + 1
        log.info(
            "hidden_transfer: transfer at layer %d of %d, %d pseudo states per node, %d draft nodes (%s; its linears: %s)",
            self.net.layer,
            backbone.num_layers,
            self.future,
            len(self.paths),
            directory,
            kernels,
        )

    def begin(self, prompt_ids: list[int]) -> None:
        self.ranked: list[list[int]] | None = None  # per offset d: the tokens by rank, from the last step

    def verify_forward(self, block_tokens: list[int], block_parents: list[int], cache: KVCache) -> ForwardOutput:
        # grown here, outside inference mode: the loop's cache is sized for the real tokens only, and
        # buffers reallocated in inference mode could not be compacted by the loop afterwards
        cache.ensure_capacity(max(cache.lengths) + len(block_tokens) * (1 + self.future))
        return self._fused_forward(block_tokens, block_parents, cache)

    @torch.inference_mode()
    def _fused_forward(self, block_tokens: list[int], block_parents: list[int], cache: KVCache) -> ForwardOutput:
        backbone, layer, q = self.backbone, self.net.layer, len(block_tokens)
        base = cache.length
        lower = backbone.forward(
            block_tokens,
            cache,
            layout=BlockLayout(parents=block_parents),
            plan=ForwardPlan(layers=range(layer)),
            logits_rows=slice(0, 0),
            output_hidden_states=True,
        )
        hidden = lower.hidden_states[-1]  # (q, hidden): the input of layer l
        upper = backbone.forward(
            [*block_tokens, *[0] * (q * self.future)],  # pseudo rows carry states, not tokens
            cache,
            layout=self._upper_layout(block_parents, base),
            plan=ForwardPlan(layers=range(layer, backbone.num_layers)),
            input_hidden=torch.cat([hidden, self.net.pseudo_states(hidden)]),
        )
        return ForwardOutput(logits=upper.logits, last_hidden=upper.last_hidden)

    def _upper_layout(self, block_parents: list[int], base: int) -> BlockLayout:
        """The upper layers' block: the real nodes, then ``k`` pseudo states per node, at ``base``."""
        mask, offsets = pseudo_layout(block_parents, tree_depths(block_parents), self.future)
        return BlockLayout(mask=mask, offsets=offsets, start=base)

    def verify_forward_rows(
        self,
        drafters: Sequence[Drafter],
        block_tokens: Sequence[list[int]],
        block_parents: Sequence[list[int]],
        cache: KVCache,
    ) -> RowForward:
        # as verify_forward: grown before inference mode; the lower layers take width, the upper
        # width * (1 + k) more slots per row
        width = max(len(tokens) for tokens in block_tokens)
        cache.ensure_capacity(max(cache.lengths) + width * (2 + self.future))
        return self._fused_forward_rows(block_tokens, block_parents, cache)

    @torch.inference_mode()
    def _fused_forward_rows(
        self, block_tokens: Sequence[list[int]], block_parents: Sequence[list[int]], cache: KVCache
    ) -> RowForward:
        """:meth:`_fused_forward` for every row of a batch at once: one padded forward of the lower
        layers, then one of the upper layers over each row's real nodes and their pseudo states."""
        backbone, layer, device = self.backbone, self.net.layer, self.backbone.device
        sizes = [len(tokens) for tokens in block_tokens]
        width = max(sizes)
        bases = [cache.row_length(row) for row in range(len(sizes))]
        lower = backbone.forward_batch(
            torch.tensor([[*tokens, *[0] * (width - len(tokens))] for tokens in block_tokens], device=device),
            cache,
            sizes=sizes,
            layouts=[BlockLayout(parents=parents) for parents in block_parents],
            plan=ForwardPlan(layers=range(layer)),
            logits_rows=slice(0, 0),
            output_hidden_states=True,
        )
        hidden = lower.hidden_states[-1]  # (batch, width, hidden): the input of layer l
        upper_sizes = [size * (1 + self.future) for size in sizes]
        states = hidden.new_zeros(len(sizes), max(upper_sizes), hidden.shape[-1])
        for row, size in enumerate(sizes):
            states[row, :size] = hidden[row, :size]
            states[row, size : upper_sizes[row]] = self.net.pseudo_states(hidden[row, :size])
        upper = backbone.forward_batch(
            torch.zeros(states.shape[:2], dtype=torch.long, device=device),  # pseudo rows carry states, not tokens
            cache,
            sizes=upper_sizes,
            layouts=[self._upper_layout(parents, base) for parents, base in zip(block_parents, bases)],
            plan=ForwardPlan(layers=range(layer, backbone.num_layers)),
            input_hidden=states,
        )
        return RowForward(ForwardOutput(logits=upper.logits, last_hidden=upper.last_hidden), upper_sizes)

    def feedback(self, outcome: StepOutcome) -> None:
        accepted = outcome.result.accepted_nodes
        last = accepted[-1] if accepted else 0
        q = len(outcome.block_tokens)
        pseudo = outcome.target.logits[q + last * self.future : q + (last + 1) * self.future]
        self.ranked = pseudo.topk(self.widest, dim=-1).indices.tolist()

    def propose(self, context: list[int], max_tokens: int) -> Proposal:
        if max_tokens <= 0 or self.ranked is None:
            return Proposal()
        paths = self.paths if len(self.paths) <= max_tokens else truncate_tree(self.paths, max_tokens)
        parents = self.parents if paths is self.paths else template_parents(paths)
        return Proposal(tokens=[self.ranked[len(p) - 1][p[-1]] for p in paths], parents=parents)
