"""LayerSkip-style static self-speculation (Elhoushi et al. 2024; facebookresearch/LayerSkip,
transformers ``assistant_early_exit``).

The draft model is the target itself cut after its first ``E`` decoder layers: the exit layer's
hidden state goes through the model's own final norm and LM head. A chain of at most
``num_draft_tokens`` drafts is proposed, then the full model verifies it in one forward. Greedy
output equals AR; under sampling the drafts carry the early-exit distribution they were drawn
from, so the loop's speculative sampling is lossless too.

KV reuse (the point of LayerSkip's shared cache). The draft runs the first ``E`` layers of the
root and of every draft but the last on top of the target's committed cache, so those layers'
K/V of the block are exactly what the verifier would compute. ``propose`` hides them (the cache's
lengths go back to the committed prefix, the buffers keep the entries) and :meth:`verify_forward`
brings them back: it runs the first ``E`` layers only for the one draft not fed yet, then layers
``E .. L-1`` for the whole block starting from the cached exit-layer hidden states (LayerSkip's
"exit query cache"). The loop then crops every layer to the accepted prefix as usual, so the
first ``E`` layers of accepted tokens are never recomputed. Plain checkpoints draft poorly from an
early layer (their intermediate states were not trained for the LM head); LayerSkip-trained ones
(``facebook/layerskip-*``) are the intended target.

:class:`EarlyExitDrafter` holds the drafting and the reuse; DEL (``methods/dynamic_exit.py``)
subclasses it with a per-round choice of exit layer and draft length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from decodebench.config import ConfigValueError, check
from decodebench.engine.backbone import Backbone, BlockLayout, ForwardOutput, ForwardPlan
from decodebench.engine.drafting import Drafter, Proposal
from decodebench.engine.kv_cache import KVCache
from decodebench.engine.sampling import logits_to_probs, sample
from decodebench.engine.tree import is_chain


@dataclass
class PendingDraft:
    """What a proposal left in the target cache for :meth:`EarlyExitDrafter.verify_forward`.

    Attributes:
        committed: cache length before drafting (= the root's position).
        exit_layer: number of layers the draft ran (``E``).
        fed: tokens whose first-``E``-layer K/V sit, hidden, after ``committed`` (root + drafts[:-1]).
        layer_states: per fed token, its hidden states ``[embedding, out_0, .., out_{E-1}]``, each
            ``(1, hidden)`` (the last one is the exit state the remaining layers continue from).
    """

    committed: int
    exit_layer: int
    fed: list[int]
    layer_states: list[list[torch.Tensor]]


class EarlyExitDrafter(Drafter):
    """Drafts a chain with the target's first ``E`` layers + LM head; verifies reusing their K/V."""

    def __init__(self) -> None:
        self.backbone: Backbone | None = None
        self.pending: PendingDraft | None = None
        # hidden states of every layer for the last verified block (filled by verify_forward):
        # block_states[j] = output of layer j-1 ([0] = embeddings), each (q, hidden)
        self.block_states: list[torch.Tensor] | None = None
        self.exit_layers: list[int] = []  # exit layer of every drafting round of the current request

    def setup(self, backbone: Backbone, cache_dir: str | None = None) -> None:
        self.backbone = backbone

    def begin(self, prompt_ids: list[int]) -> None:
        self.pending = None
        self.block_states = None
        self.exit_layers = []

    def request_stats(self) -> dict[str, float]:
        """``exit_layer``: mean number of layers the drafts ran, over this request's drafting
        rounds; ``exit_layer_min`` / ``exit_layer_max``: the range chosen (equal for a static E)."""
        if not self.exit_layers:
            return {}
        return {
            "exit_layer": sum(self.exit_layers) / len(self.exit_layers),
            "exit_layer_min": float(min(self.exit_layers)),
            "exit_layer_max": float(max(self.exit_layers)),
        }

    # -- drafting ---------------------------------------------------------------------------------
    def check_exit_layer(self, exit_layer: int, key: str = "method.params.exit_layer") -> None:
        layers = self.backbone.num_layers
        if not 1 <= exit_layer < layers:
            raise ConfigValueError(
                f"invalid value for '{key}': {exit_layer} (allowed: 1 .. {layers - 1} for this model's {layers} layers)"
            )

    def draft_chain(self, context: list[int], exit_layer: int, max_tokens: int, stop_below: float = 0.0) -> Proposal:
        """Draft up to ``max_tokens`` tokens after ``context`` with the first ``exit_layer`` layers.

        Drafting stops early after a draft whose top-1 early-exit probability is below
        ``stop_below`` (that draft is still proposed). Leaves the target cache at its committed
        length, with the fed tokens' first-layer K/V kept in the buffers for verify_forward.
        """
        cache = self.target_cache
        committed = len(context) - 1
        if cache is None or cache.length != committed:
            raise RuntimeError(
                f"{type(self).__name__} drafts on the decode loop's cache, which must hold "
                f"exactly the committed context ({committed} tokens)"
            )
        layers = range(exit_layer)
        self.exit_layers.append(exit_layer)
        token = context[-1]
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        states: list[list[torch.Tensor]] = []
        while True:
            out = self.backbone.forward([token], cache, plan=ForwardPlan(layers=layers), output_hidden_states=True)
            states.append(out.hidden_states)
            logits = out.logits[-1]
            if self.sampling.greedy:
                token = int(logits.argmax())
                confidence = float(torch.softmax(logits, -1)[token])
            else:
                q = logits_to_probs(logits, self.sampling)
                token = sample(q, self.generator)
                rows.append(q)
                confidence = float(torch.softmax(logits, -1).max())
            tokens.append(token)
            if len(tokens) >= max_tokens or confidence < stop_below:
                break
        cache.crop(committed)  # hide the draft's entries from the loop; verify_forward restores them
        self.pending = PendingDraft(committed, exit_layer, [context[-1], *tokens[:-1]], states)
        return Proposal(tokens=tokens, probs=torch.stack(rows) if rows else None)

    # -- verification with reuse ------------------------------------------------------------------
    def verify_forward(self, block_tokens: list[int], block_parents: list[int], cache: KVCache) -> ForwardOutput | None:
        pending, self.pending = self.pending, None
        self.block_states = None
        if (
            pending is None
            or cache is not self.target_cache
            or cache.length != pending.committed
            or not is_chain(block_parents)
            or block_tokens[: len(pending.fed)] != pending.fed
        ):
            return None  # nothing reusable: the loop runs a plain full forward
        backbone, exit_layer, fed = self.backbone, pending.exit_layer, len(pending.fed)
        early = range(exit_layer)
        # 1. bring back the first-E-layer K/V the draft wrote for root + drafts[:-1]
        for layer in early:
            cache.lengths[layer] = pending.committed + fed
        states = [torch.cat(column) for column in zip(*pending.layer_states)]  # E+1 x (fed, hidden)
        # 2. first E layers for the drafts not fed yet (the last one); no LM head needed
        rest = block_tokens[fed:]
        if rest:
            out = backbone.forward(
                rest, cache, plan=ForwardPlan(layers=early), output_hidden_states=True, logits_rows=slice(0, 0)
            )
            states = [torch.cat([done, new]) for done, new in zip(states, out.hidden_states)]
        # 3. layers E .. L-1 for the whole block, from the exit-layer states
        late = backbone.forward(
            block_tokens,
            cache,
            plan=ForwardPlan(layers=range(exit_layer, backbone.num_layers)),
            input_hidden=states[-1],
            layout=BlockLayout(start=pending.committed),
            output_hidden_states=True,
        )
        self.block_states = [*states, *late.hidden_states[1:]]
        return ForwardOutput(logits=late.logits, hidden_states=self.block_states, last_hidden=late.last_hidden)


class EarlyExitSpecDrafter(EarlyExitDrafter):
    """Static self-speculation: fixed exit layer ``E`` and draft length (LayerSkip)."""

    @dataclass
    class Params:
        exit_layer: int = 8  # E: draft with layers 0 .. E-1 (LayerSkip Llama2-7B: 8 of 32)
        num_draft_tokens: int = 6  # drafts per round (LayerSkip: num_speculations 6)
        stop_below: float = 0.0  # stop drafting after a draft with top-1 prob below this (0 = never)

        def __post_init__(self) -> None:
            check(self.exit_layer >= 1, "method.params.exit_layer", self.exit_layer, ">= 1")
            check(self.num_draft_tokens >= 1, "method.params.num_draft_tokens", self.num_draft_tokens, ">= 1")
            check(0.0 <= self.stop_below <= 1.0, "method.params.stop_below", self.stop_below, "0 .. 1")

    def __init__(self, params: EarlyExitSpecDrafter.Params):
        super().__init__()
        self.params = params

    def setup(self, backbone: Backbone, cache_dir: str | None = None) -> None:
        super().setup(backbone, cache_dir)
        self.check_exit_layer(self.params.exit_layer)

    def propose(self, context: list[int], max_tokens: int) -> Proposal:
        self.pending = None
        budget = min(self.params.num_draft_tokens, max_tokens)
        if budget <= 0:
            return Proposal()
        return self.draft_chain(context, self.params.exit_layer, budget, self.params.stop_below)
