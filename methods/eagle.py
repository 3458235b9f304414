"""EAGLE-1 (static tree) and EAGLE-2 (context-aware dynamic tree) on the engine's one decode loop.

Both draft with the trained :class:`~decodebench.methods.eagle_net.EagleNet` (``decodebench-train
drafter=eagle``) on its own one-layer KV cache:

* the committed pairs ``(f_t, x_{t+1})`` — target features of every committed token (from the
  prefill and each verify forward, :meth:`Drafter.prefilled` / ``feedback``) with the token after
  it — are fed once, as a causal chain; the last one's output is the predicted feature of the last
  emitted token, whose head gives the first draft level;
* each further level forwards the nodes that get children, pairing their parent's predicted
  feature with their own token, tree-masked (each node sees the prefix and its ancestors);
* speculative entries are cropped from the drafter cache before the next step.

EAGLE-1 expands a static template (:data:`~decodebench.methods.head_tree.EAGLE_TREE`, 25 nodes,
depth 5). EAGLE-2 (Li et al. 2024, arXiv 2406.16858, ``topK_genrate`` in SafeAILab/EAGLE ``main``)
grows the tree by draft confidence: the root's ``top_k`` children, then ``depth`` times the
``top_k`` nodes of highest cumulative log-probability each expanded by their ``top_k`` children;
finally the ``total_tokens - 1`` nodes of highest cumulative score over everything drafted are
verified. Drafts are deterministic (top-k), so greedy and sampling verification stay lossless.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from decodebench.config import check
from decodebench.engine.backbone import Backbone, ForwardOutput
from decodebench.engine.backends import follow_backend
from decodebench.engine.drafting import Drafter, Proposal, StepOutcome
from decodebench.methods.draft_heads import (
    DraftVocab,
    check_target_shape,
    checkpoint_dir,
    load_checkpoint,
    model_key,
    require_checkpoint,
)
from decodebench.methods.eagle_net import EagleNet
from decodebench.methods.head_tree import EAGLE_TREE, draft_attention_mask, template_parents, truncate_tree

log = logging.getLogger("decodebench")


def load_eagle(backbone: Backbone, directory, network: type[EagleNet] = EagleNet) -> EagleNet:
    """A ``network`` (:class:`EagleNet` or a subclass) from a checkpoint written by ``decodebench-train``
    (or converted from the published layout, :mod:`decodebench.methods.published`)."""
    from decodebench.registry import DecodeBenchError

    state, config = load_checkpoint(directory)
    check_target_shape(config, backbone, directory)
    if config.get("network", network.network) != network.network:
        raise DecodeBenchError(
            f"checkpoint {directory} holds a {config['network']} drafter, not the {network.network} drafter this method needs"
        )
    vocab = DraftVocab.from_maps(state["d2t"], state["t2d"]) if "d2t" in state else None
    params = network.Params(**config.get("params", {}))
    net = network(backbone, params, vocab)
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise DecodeBenchError(
            f"{network.network} checkpoint {directory} does not fit: missing {missing}, unexpected {unexpected}"
        )
    return net.eval()


class EagleDrafter(Drafter):
    """EAGLE-1: the static tree."""

    @dataclass
    class Params:
        tree_nodes: int = 25  # draft nodes of the template used (EAGLE-1: all 25)
        checkpoint: str | None = None  # folder or hub id (published layout too); null = <cache>/drafters/<model>/eagle
        max_verify_cost: float | None = None  # cpu preset: size the tree from the latency curve

        def __post_init__(self) -> None:
            check(
                1 <= self.tree_nodes <= len(EAGLE_TREE),
                "method.params.tree_nodes",
                self.tree_nodes,
                f"1 .. {len(EAGLE_TREE)}",
            )
            check(
                self.max_verify_cost is None or self.max_verify_cost >= 1.0,
                "method.params.max_verify_cost",
                self.max_verify_cost,
                ">= 1.0 or null",
            )

    method_name = "eagle"
    network: type[EagleNet] = EagleNet  # its checkpoint: <cache>/drafters/<model>/<network.network>

    def __init__(self, params):
        self.params = params
        self.net: EagleNet | None = None

    # -- setup -------------------------------------------------------------------------------------
    def load_network(self, backbone: Backbone, directory: Path) -> EagleNet:
        """The drafter network from ``directory`` (EAGLE: a trained or a published checkpoint)."""
        from decodebench.methods.published import load_eagle_checkpoint

        return load_eagle_checkpoint(backbone, directory)

    def setup(self, backbone: Backbone, cache_dir: str | None = None) -> None:
        self.backbone = backbone
        directory = (
            Path(self.params.checkpoint).expanduser()
            if self.params.checkpoint
            else require_checkpoint(
                checkpoint_dir(cache_dir, model_key(backbone), self.network.network),
                self.method_name,
                self.network.network,
                model_key(backbone),
            )
        )
        self.net = self.load_network(backbone, directory)
        kernels = follow_backend(backbone, self.net)
        self.cache = self.net.new_cache(backbone)
        self.max_nodes = (
            self.budget_from_curve(backbone, cache_dir, self.params.max_verify_cost, self.largest_block()) - 1
        )
        log.info(
            "%s: drafter %s (%d draft nodes per step; its linears: %s)",
            self.method_name,
            directory,
            self.max_nodes,
            kernels,
        )

    def largest_block(self) -> int:
        return self.params.tree_nodes + 1

    # -- committed features ------------------------------------------------------------------------
    def begin(self, prompt_ids: list[int]) -> None:
        self.features: list[torch.Tensor] = []  # (k, hidden) chunks: target features of committed tokens
        self.known = 0  # committed tokens with a feature
        self.fed = 0  # committed pairs in the drafter cache
        self.cache.reset()

    def prefilled(self, output: ForwardOutput) -> None:
        self._add_features(output.last_hidden)

    def feedback(self, outcome: StepOutcome) -> None:
        rows = [0, *outcome.result.accepted_nodes]  # the root and the accepted path are now committed
        self._add_features(outcome.target.last_hidden[rows])

    def _add_features(self, rows: torch.Tensor) -> None:
        self.features.append(rows)
        self.known += rows.shape[0]

    # -- drafting ----------------------------------------------------------------------------------
    def _feed_committed(self, context: Sequence[int]) -> torch.Tensor:
        """Feed the committed pairs not yet in the drafter cache; returns the root's predicted
        feature ``(hidden,)`` (the pair of the last committed token with the last emitted one)."""
        committed = len(context) - 1
        if self.known != committed:
            raise RuntimeError(f"{self.method_name}: {self.known} target features for {committed} committed tokens")
        features = torch.cat(self.features) if len(self.features) > 1 else self.features[0]
        self.features = [features]
        self.cache.crop(self.fed)
        positions = torch.arange(self.fed, committed, device=self.backbone.device)
        tokens = torch.as_tensor(context[self.fed + 1 : committed + 1], device=self.backbone.device)
        mask = self.backbone._block_mask(self.fed, positions, None, None)
        predicted = self.net(features[self.fed : committed], tokens, positions, mask, self.cache)
        self.fed = committed
        return predicted[-1]

    def _forward_nodes(
        self,
        nodes: list[int],
        node_tokens: list[int],
        node_depths: list[int],
        parent_features: torch.Tensor,
        forwarded_parents: list[int],
        committed: int,
    ) -> torch.Tensor:
        """Forward draft nodes (appended to the drafter cache after the forwarded ones), each with its
        parent's output (``parent_features``; the network takes the feature it feeds back from it);
        returns their outputs. ``forwarded_parents`` = parent pointers among all forwarded nodes,
        these last (-1 = the root pair, last of the committed prefix)."""
        start = len(forwarded_parents) - len(nodes)
        device = self.backbone.device
        positions = torch.tensor([committed - 1 + node_depths[n] for n in nodes], device=device)
        mask = draft_attention_mask(
            committed,
            forwarded_parents,
            range(start, len(forwarded_parents)),
            self.net.attn_implementation,
            self.backbone.dtype,
            device,
        )
        tokens = torch.tensor([node_tokens[n] for n in nodes], device=device)
        return self.net(self.net.next_feature(parent_features), tokens, positions, mask, self.cache)

    @torch.inference_mode()
    def propose(self, context: list[int], max_tokens: int) -> Proposal:
        root_feature = self._feed_committed(context)
        budget = min(self.max_nodes, max_tokens)
        if budget <= 0:
            return Proposal()
        return self.grow(context, root_feature, budget)

    def grow(self, context: list[int], root_feature: torch.Tensor, budget: int) -> Proposal:
        """EAGLE-1: expand the static template's first ``budget`` nodes level by level."""
        vocab = self.net.head.weight.shape[0]
        paths = truncate_tree([p for p in EAGLE_TREE if max(p) < vocab], budget)
        parents = template_parents(paths)
        depth_of = [len(p) for p in paths]
        widest = max(p[-1] for p in paths) + 1
        committed = len(context) - 1
        tokens: list[int] = [0] * len(paths)
        logits = self.net.draft_logits(root_feature[None])
        ranked = self.net.to_target(logits.topk(widest, dim=-1).indices[0]).tolist()
        children_ranked = {-1: ranked}
        forwarded: list[int] = []  # node ids in drafter-cache order
        feature_of: dict[int, torch.Tensor] = {}
        for depth in range(1, max(depth_of) + 1):
            level = [i for i, d in enumerate(depth_of) if d == depth]
            for i in level:
                tokens[i] = children_ranked[parents[i]][paths[i][-1]]
            expand = [i for i in level if i in set(parents)]  # nodes with children get forwarded
            if not expand:
                break
            forwarded.extend(expand)
            position = {n: j for j, n in enumerate(forwarded)}
            forwarded_parents = [-1 if parents[n] < 0 else position[parents[n]] for n in forwarded]
            parent_features = torch.stack([root_feature if parents[n] < 0 else feature_of[parents[n]] for n in expand])
            predicted = self._forward_nodes(expand, tokens, depth_of, parent_features, forwarded_parents, committed)
            ranked_rows = self.net.to_target(self.net.draft_logits(predicted).topk(widest, dim=-1).indices).tolist()
            for j, n in enumerate(expand):
                feature_of[n] = predicted[j]
                children_ranked[n] = ranked_rows[j]
        return Proposal(tokens=tokens, parents=parents)


class Eagle2Drafter(EagleDrafter):
    """EAGLE-2: the context-aware dynamic tree."""

    @dataclass
    class Params:
        total_tokens: int = 60  # verified tokens per step, root included (reference eval default 60)
        depth: int = 5  # expansion rounds after the root's children (reference default 5)
        top_k: int = 10  # children per expanded node and nodes expanded per round (reference 10)
        checkpoint: str | None = None  # null = <cache>/drafters/<model>/eagle (EAGLE-1's weights)
        max_verify_cost: float | None = None  # cpu preset: total_tokens from the latency curve

        def __post_init__(self) -> None:
            check(self.total_tokens >= 2, "method.params.total_tokens", self.total_tokens, ">= 2")
            check(self.depth >= 0, "method.params.depth", self.depth, ">= 0")
            check(self.top_k >= 1, "method.params.top_k", self.top_k, ">= 1")
            check(
                self.max_verify_cost is None or self.max_verify_cost >= 1.0,
                "method.params.max_verify_cost",
                self.max_verify_cost,
                ">= 1.0 or null",
            )

    method_name = "eagle2"

    def largest_block(self) -> int:
        return self.params.total_tokens

    def grow(self, context: list[int], root_feature: torch.Tensor, budget: int) -> Proposal:
        top_k, committed = self.params.top_k, len(context) - 1
        logp = torch.log_softmax(self.net.draft_logits(root_feature[None])[0], dim=-1)
        best = logp.topk(min(top_k, logp.shape[0]))
        tokens = self.net.to_target(best.indices).tolist()
        scores = best.values.tolist()
        parents = [-1] * len(tokens)
        depths = [1] * len(tokens)
        frontier = list(range(len(tokens)))
        forwarded: list[int] = []
        feature_of: dict[int, torch.Tensor] = {}
        for _ in range(self.params.depth):
            forwarded.extend(frontier)
            position = {n: j for j, n in enumerate(forwarded)}
            forwarded_parents = [-1 if parents[n] < 0 else position[parents[n]] for n in forwarded]
            parent_features = torch.stack(
                [root_feature if parents[n] < 0 else feature_of[parents[n]] for n in frontier]
            )
            predicted = self._forward_nodes(frontier, tokens, depths, parent_features, forwarded_parents, committed)
            child_logp = torch.log_softmax(self.net.draft_logits(predicted), dim=-1)
            top = child_logp.topk(min(top_k, child_logp.shape[-1]), dim=-1)
            cumulative = top.values + torch.tensor([scores[n] for n in frontier], device=top.values.device)[:, None]
            child_tokens = self.net.to_target(top.indices).tolist()
            first_child = len(tokens)
            for j, n in enumerate(frontier):
                feature_of[n] = predicted[j]
                for c in range(top.indices.shape[1]):
                    tokens.append(child_tokens[j][c])
                    scores.append(float(cumulative[j, c]))
                    parents.append(n)
                    depths.append(depths[n] + 1)
            order = cumulative.flatten().topk(min(top_k, cumulative.numel())).indices.tolist()
            frontier = [first_child + i for i in order]
        # rerank: the budget's best nodes by cumulative score; a child never outscores its parent
        # (log-probabilities are <= 0), ties broken towards earlier (shallower) nodes
        ranked = sorted(range(len(tokens)), key=lambda n: (-scores[n], n))
        kept: set[int] = set()
        for n in ranked:
            if len(kept) == budget:
                break
            if parents[n] < 0 or parents[n] in kept:
                kept.add(n)
        chosen = sorted(kept, key=lambda n: (depths[n], n))
        index = {n: i for i, n in enumerate(chosen)}
        return Proposal(
            tokens=[tokens[n] for n in chosen], parents=[-1 if parents[n] < 0 else index[parents[n]] for n in chosen]
        )
