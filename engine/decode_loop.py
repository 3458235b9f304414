"""The ONE decode loop for every draft → verify method (AR included: it never drafts).

Per step:
  1. propose   — the drafter drafts a chain or tree from the context (may be empty);
  2. forward   — one target forward over [last emitted token] + drafts, tree-masked;
  3. verify    — greedy longest path or lossless speculative sampling;
  4. commit    — keep the accepted path's K/V (crop or compact), drop the rest;
  5. feedback  — the drafter sees the outcome (acceptance, target logits);
  6. emit/stop — append accepted tokens + bonus token; stop on EOS, max new tokens, stop strings.

:class:`StepStats` are recorded here, where the truth is, and never re-derived later. Every time
reading is :func:`decodebench.engine.timing.now`, which synchronises a CUDA device first.

Host round trips per step (what a GPU waits on): the verifier reads the block's argmax (greedy) or
its acceptance draws (sampling) on the host, since drafts, the output and the stop checks live
there; the block's ids, position offsets and (tree) ancestor mask go to the device (``q`` and
``q × q`` elements; the mask over the cached prefix is built on the device); compact sends the kept
slots. Drafters may read logits on the host in ``feedback`` (their own cost, in ``draft_s``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from decodebench.engine.backbone import Backbone, BlockLayout
from decodebench.engine.drafting import Drafter, Proposal, StepOutcome
from decodebench.engine.kv_cache import KVCache
from decodebench.engine.sampling import SamplingParams, next_token
from decodebench.engine.timing import now
from decodebench.engine.tree import ancestor_mask, chain_parents, tree_depths
from decodebench.engine.verify import verify_greedy, verify_sampling


@dataclass
class StepStats:
    drafted: int  # draft tokens proposed this step (tree nodes, root excluded)
    accepted: int  # draft tokens accepted (bonus excluded)
    emitted: int  # tokens appended to the output this step (accepted + bonus, after stop truncation)
    tree_size: int  # tokens in the target forward (root, drafts and auxiliary tokens)
    draft_s: float  # propose + feedback time
    verify_s: float  # target forward + verification + cache commit time
    # the target forward alone (part of verify_s); decode time outside model forwards, i.e. the
    # harness + drafter overhead, is wall - prefill - Σ forward_s (minus a draft model's forwards)
    forward_s: float = 0.0
    depth: int = 0  # draft levels: the longest root-to-leaf draft path (a chain: its length)


@dataclass
class DecodeSettings:
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    tokenizer: Any = None  # needed only for stop strings


@dataclass
class GenerationOutput:
    new_ids: list[int]
    steps: list[StepStats]  # one per decode step after prefill
    prefill_s: float
    wall_s: float  # prefill + all steps
    stop_reason: str  # "eos" | "max_new_tokens" | "stop_string"
    method_stats: dict[str, float] = field(default_factory=dict)  # Drafter.request_stats()

    @property
    def target_forwards(self) -> int:
        return len(self.steps) + 1  # the prefill emits the first token


class StopChecker:
    """Decides after each appended token whether generation ends (checked token by token, so
    every method stops at exactly the token AR would stop at)."""

    def __init__(self, settings: DecodeSettings):
        self.settings = settings
        self.eos = set(settings.eos_token_ids)
        self.longest_stop = max((len(s) for s in settings.stop_strings), default=0)

    def check(self, new_ids: list[int]) -> str | None:
        if new_ids[-1] in self.eos:
            return "eos"
        if self.longest_stop:
            # the stop string can only end in the last few tokens; decode a window, not everything
            tail = self.settings.tokenizer.decode(new_ids[-(self.longest_stop + 8) :], skip_special_tokens=False)
            if any(stop in tail for stop in self.settings.stop_strings):
                return "stop_string"
        if len(new_ids) >= self.settings.max_new_tokens:
            return "max_new_tokens"
        return None


def block_with_aux(block_parents: list[int], proposal: Proposal) -> tuple[torch.Tensor, list[int]]:
    """``(q, q)`` mask and position offsets for [root, drafts, aux]: drafts see only their
    ancestors (never aux tokens); aux tokens see what ``proposal.aux_mask`` says."""
    n, aux = len(block_parents), len(proposal.aux_tokens)
    if (
        proposal.aux_mask is None
        or tuple(proposal.aux_mask.shape) != (aux, n + aux)
        or len(proposal.aux_offsets or []) != aux
    ):
        raise ValueError(f"aux_mask must be ({aux}, {n + aux}) with {aux} aux_offsets")
    mask = torch.zeros(n + aux, n + aux, dtype=torch.bool)
    mask[:n, :n] = ancestor_mask(block_parents)
    mask[n:] = proposal.aux_mask.to(torch.bool).cpu()
    return mask, [*tree_depths(block_parents), *proposal.aux_offsets]


def generate(
    backbone: Backbone,
    drafter: Drafter,
    prompt_ids: Sequence[int],
    settings: DecodeSettings,
    cache: KVCache,
    generator: torch.Generator | None = None,
) -> GenerationOutput:
    """Decode one prompt with ``drafter`` speculating for ``backbone``; returns ids and step stats."""
    device = backbone.device
    params = settings.sampling
    stopper = StopChecker(settings)
    start = now(device)
    cache.reset()
    cache.ensure_capacity(len(prompt_ids) + settings.max_new_tokens + 64)
    drafter.target_cache = cache  # self-speculative drafters draft on top of its committed prefix
    drafter.start_request(list(prompt_ids), params, generator)

    prefill = backbone.forward(
        prompt_ids, cache, logits_rows=slice(-1, None), output_hidden_states=drafter.needs_hidden_states
    )
    new_ids = [next_token(prefill.logits[0], params, generator)]
    drafter.prefilled(prefill)
    prefill_s = now(device) - start
    context = [*prompt_ids, *new_ids]
    steps: list[StepStats] = []
    stop_reason = stopper.check(new_ids)

    while stop_reason is None:
        # 1. propose (at most as many drafts as could still be emitted before the bonus token)
        t_propose = now(device)
        proposal = drafter.propose(context, settings.max_new_tokens - len(new_ids) - 1)
        plan = drafter.forward_plan(len(new_ids))  # the full model unless the method is lossy
        t_forward = now(device)

        # 2. one target forward over [last emitted token] + drafts (+ auxiliary tokens)
        block_tokens = [context[-1], *proposal.tokens]
        if proposal.parents is None:
            block_parents, tree = chain_parents(len(block_tokens)), None
        else:
            block_parents = [-1, *(p + 1 for p in proposal.parents)]
            tree = block_parents
        base = cache.length
        if proposal.aux_tokens:
            block_mask, offsets = block_with_aux(block_parents, proposal)
            target = backbone.forward(
                [*block_tokens, *proposal.aux_tokens],
                cache,
                layout=BlockLayout(mask=block_mask, offsets=offsets),
                output_hidden_states=drafter.needs_hidden_states,
                plan=plan,
            )
        else:
            # early-exit drafters finish the forward they started (their first layers' K/V are reused)
            target = drafter.verify_forward(block_tokens, block_parents, cache)
            if target is None:
                target = backbone.forward(
                    block_tokens,
                    cache,
                    layout=BlockLayout(parents=tree),
                    output_hidden_states=drafter.needs_hidden_states,
                    plan=plan,
                )
        candidate_logits = target.logits[: len(block_tokens)]
        t_verify = now(device)  # the verifier reads the logits on the host next: no extra stall on CUDA

        # 3. verify
        if params.greedy:
            result = verify_greedy(block_tokens, block_parents, candidate_logits)
        else:
            draft_probs = None
            if proposal.probs is not None:  # row 0 (the root) is never a draft
                draft_probs = torch.cat([proposal.probs[:1] * 0, proposal.probs.to(target.logits.device)])
            result = verify_sampling(block_tokens, block_parents, candidate_logits, params, generator, draft_probs)

        # 4. commit: keep the root and the accepted path (drops rejected drafts and aux tokens)
        cache.compact(base, [0, *result.accepted_nodes])
        t_feedback = now(device)

        # 5. feedback
        drafter.feedback(
            StepOutcome(
                proposal=proposal,
                result=result,
                block_tokens=block_tokens,
                block_parents=block_parents,
                target=target,
                context_length=len(context),
            )
        )
        t_done = now(device)

        # 6. emit and check stops token by token
        emitted = 0
        for token in result.emitted_tokens:
            new_ids.append(token)
            context.append(token)
            emitted += 1
            stop_reason = stopper.check(new_ids)
            if stop_reason:
                break
        steps.append(
            StepStats(
                drafted=len(proposal),
                accepted=result.accepted,
                emitted=emitted,
                tree_size=len(block_tokens) + len(proposal.aux_tokens),
                draft_s=(t_forward - t_propose) + (t_done - t_feedback),
                verify_s=t_feedback - t_forward,
                forward_s=t_verify - t_forward,
                depth=draft_depth(proposal.parents, len(proposal)),
            )
        )

    return GenerationOutput(
        new_ids=new_ids,
        steps=steps,
        prefill_s=prefill_s,
        wall_s=now(device) - start,
        stop_reason=stop_reason,
        method_stats=drafter.request_stats(),
    )


def draft_depth(parents: Sequence[int] | None, drafted: int) -> int:
    """Levels of a draft: a chain's length, or the deepest node of a tree given parent pointers
    among the drafts (-1 = the root)."""
    if parents is None:
        return drafted
    depths: dict[int, int] = {}

    def depth(node: int) -> int:
        if node not in depths:
            depths[node] = 1 if parents[node] < 0 else depth(parents[node]) + 1
        return depths[node]

    return max((depth(node) for node in range(len(parents))), default=0)


def never_drafts(drafter: Drafter) -> bool:
    """True for drafters that keep the base class's empty :meth:`Drafter.propose` (AR, lossy
    forward-plan methods): the only ones batched decoding accepts."""
    return type(drafter).propose is Drafter.propose


@dataclass
class BatchGenerationOutput:
    """A batch decoded together: one output per prompt, timed as a whole."""

    outputs: list[GenerationOutput]  # per prompt; their ``wall_s`` is the batch's wall time
    prefill_s: float
    wall_s: float


def generate_batch(
    backbone: Backbone,
    drafter: Drafter,
    prompts: Sequence[Sequence[int]],
    settings: DecodeSettings,
    cache: KVCache,
    generator: torch.Generator | None = None,
    pad_token_id: int = 0,
) -> BatchGenerationOutput:
    """Decode several prompts together (left padding), for drafters that never draft: AR and the
    lossy forward-plan methods (SkipDecode's point is batched decoding).

    It is the batched form of :func:`generate`'s step — plan, one forward, next token, stop check —
    without speculation: verified drafts would give every row its own accepted length and break
    the batch's shared slot count. Per step every unfinished row gets one token; finished rows
    keep stepping (their tokens are discarded) until the whole batch is done.

    Args:
        prompts: token ids of each prompt (lengths may differ).
        cache: a cache from ``backbone.new_cache(capacity, batch_size=len(prompts))``.
        pad_token_id: id placed in padding slots (never attended to).

    Returns:
        BatchGenerationOutput; ``outputs[b].steps`` has one :class:`StepStats` per step in which
        row ``b`` was still generating.
    """
    device = backbone.device
    params = settings.sampling
    batch = len(prompts)
    if not never_drafts(drafter):
        raise ValueError(
            f"{type(drafter).__name__} drafts tokens: batched decoding needs a drafter that never "
            "drafts (AR or a lossy forward-plan method)"
        )
    if cache.batch_size != batch:
        raise ValueError(f"cache holds {cache.batch_size} rows for {batch} prompts")
    stopper = StopChecker(settings)
    start = now(device)
    cache.reset()
    width = max(len(p) for p in prompts)
    cache.padding = [width - len(p) for p in prompts]
    cache.ensure_capacity(width + settings.max_new_tokens + 64)
    drafter.start_request(list(prompts[0]), params, generator)

    ids = torch.tensor([[pad_token_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    prefill = backbone.forward_batch(ids, cache, logits_rows=slice(-1, None))
    new_ids = [[next_token(prefill.logits[b, -1], params, generator)] for b in range(batch)]
    prefill_s = now(device) - start
    stop_reasons: list[str | None] = [stopper.check(row) for row in new_ids]
    steps: list[list[StepStats]] = [[] for _ in range(batch)]

    generated = 1
    while any(reason is None for reason in stop_reasons):
        t_plan = now(device)
        plan = drafter.forward_plan(generated)
        t_forward = now(device)
        last = torch.tensor([[row[-1]] for row in new_ids], device=device)
        out = backbone.forward_batch(last, cache, plan=plan)
        t_next = now(device)
        for b in range(batch):
            if stop_reasons[b] is not None:
                continue
            new_ids[b].append(next_token(out.logits[b, -1], params, generator))
            stop_reasons[b] = stopper.check(new_ids[b])
        t_done = now(device)
        for b in range(batch):
            if len(steps[b]) < len(new_ids[b]) - 1:
                steps[b].append(
                    StepStats(
                        drafted=0,
                        accepted=0,
                        emitted=1,
                        tree_size=1,
                        draft_s=t_forward - t_plan,
                        verify_s=t_done - t_forward,
                        forward_s=t_next - t_forward,
                    )
                )
        generated += 1

    wall_s = now(device) - start
    stats = drafter.request_stats()
    outputs = [
        GenerationOutput(
            new_ids=new_ids[b],
            steps=steps[b],
            prefill_s=prefill_s,
            wall_s=wall_s,
            stop_reason=stop_reasons[b],
            method_stats=stats,
        )
        for b in range(batch)
    ]
    return BatchGenerationOutput(outputs=outputs, prefill_s=prefill_s, wall_s=wall_s)
