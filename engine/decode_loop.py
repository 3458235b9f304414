"""The ONE decode loop for every draft → verify method (AR included: it never drafts).

Per step:
  1. propose   — the drafter drafts a chain or tree from the context (may be empty);
  2. forward   — one target forward over [last emitted token] + drafts, tree-masked;
  3. verify    — greedy longest path or lossless speculative sampling;
  4. commit    — keep the accepted path's K/V (crop or compact), drop the rest;
  5. feedback  — the drafter sees the outcome (acceptance, target logits);
  6. emit/stop — append accepted tokens + bonus token; stop on EOS, max new tokens, stop strings.

A lossy method may instead emit tokens of its own with no target forward (``Proposal.unverified``:
EAD's small-model tokens): steps 2-5 are skipped, and the target's KV cache catches up on those
tokens at its next forward, as a chain in front of that step's block (:func:`with_catch_up`).

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

from decodebench.engine.backbone import Backbone, BlockLayout, ForwardOutput
from decodebench.engine.drafting import Drafter, Proposal, StepOutcome, row_drafters
from decodebench.engine.kv_cache import KVCache
from decodebench.engine.sampling import SamplingParams, next_token
from decodebench.engine.timing import now
from decodebench.engine.tree import ancestor_mask, chain_parents, tree_depths
from decodebench.engine.verify import VerifyResult, verify_greedy, verify_sampling


@dataclass
class StepStats:
    drafted: int  # draft tokens proposed this step (tree nodes, root excluded)
    accepted: int  # draft tokens accepted (bonus excluded)
    emitted: int  # tokens appended to the output this step (accepted + bonus, after stop truncation)
    # tokens in the target forward (caught-up tokens, root, drafts and auxiliary tokens); 0 = the step
    # ran no target forward (Proposal.unverified)
    tree_size: int
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
        # the prefill emits the first token; unverified steps (tree_size 0) run no target forward
        return sum(1 for step in self.steps if step.tree_size) + 1


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


@dataclass
class VerifyBlock:
    """One step's verified block: the root (last emitted token), the drafts and any aux tokens."""

    tokens: list[int]  # root + drafts (what the verifier reads)
    parents: list[int]  # parent pointers within ``tokens``
    aux_tokens: list[int]  # forwarded after the drafts, never accepted
    layout: BlockLayout

    @property
    def all_tokens(self) -> list[int]:
        return [*self.tokens, *self.aux_tokens]

    @property
    def size(self) -> int:
        return len(self.tokens) + len(self.aux_tokens)


def verify_block(last_token: int, proposal: Proposal) -> VerifyBlock:
    """The block a proposal is verified as (step 2 of the loop): a chain, a tree or a mask with aux."""
    tokens = [last_token, *proposal.tokens]
    if proposal.parents is None:
        parents, tree = chain_parents(len(tokens)), None
    else:
        parents = [-1, *(p + 1 for p in proposal.parents)]
        tree = parents
    if proposal.aux_tokens:
        mask, offsets = block_with_aux(parents, proposal)
        layout = BlockLayout(mask=mask, offsets=offsets)
    else:
        layout = BlockLayout(parents=tree)
    return VerifyBlock(tokens=tokens, parents=parents, aux_tokens=list(proposal.aux_tokens), layout=layout)


def with_catch_up(block: VerifyBlock, lag: list[int]) -> tuple[list[int], BlockLayout]:
    """The target forward's tokens and layout for ``block`` preceded by ``lag``: tokens emitted
    without a target forward (unverified steps) whose K/V the cache still lacks. They form a causal
    chain that every block token sees; the block keeps its own mask among its tokens."""
    if not lag:
        return block.all_tokens, block.layout
    tokens = [*lag, *block.all_tokens]
    layout = block.layout
    if layout.parents is None and layout.mask is None:
        return tokens, BlockLayout()  # a chain after a chain
    inner = ancestor_mask(layout.parents) if layout.mask is None else layout.mask.to(torch.bool).cpu()
    offsets = tree_depths(layout.parents) if layout.mask is None else layout.offsets
    n, q = len(lag), block.size
    mask = torch.zeros(n + q, n + q, dtype=torch.bool)
    mask[:n, :n] = torch.tril(torch.ones(n, n, dtype=torch.bool))
    mask[n:, :n] = True
    mask[n:, n:] = inner
    return tokens, BlockLayout(mask=mask, offsets=[*range(n), *(n + o for o in offsets)])


def append_tokens(
    tokens: Sequence[int], new_ids: list[int], context: list[int], stopper: StopChecker
) -> tuple[int, str | None]:
    """Step 6: append ``tokens`` to the output one by one until a stop; returns (appended, stop reason)."""
    emitted = 0
    for token in tokens:
        new_ids.append(token)
        context.append(token)
        emitted += 1
        stop_reason = stopper.check(new_ids)
        if stop_reason:
            return emitted, stop_reason
    return emitted, None


def verify_rows(
    drafter: Drafter,
    block: VerifyBlock,
    logits: torch.Tensor,
    proposal: Proposal,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> VerifyResult:
    """Step 3: the method's own verifier (only lossy methods have one), else greedy longest path or
    lossless speculative sampling, on the block's ``(n+1, vocab)`` target logits."""
    own = drafter.verify(block.tokens, block.parents, logits, params, generator)
    if own is not None:
        return own
    if params.greedy:
        return verify_greedy(block.tokens, block.parents, logits)
    draft_probs = None
    if proposal.probs is not None:  # row 0 (the root) is never a draft
        draft_probs = torch.cat([proposal.probs[:1] * 0, proposal.probs.to(logits.device)])
    return verify_sampling(block.tokens, block.parents, logits, params, generator, draft_probs)


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
        allowed = settings.max_new_tokens - len(new_ids) - 1
        if drafter.speculation is not None:  # SmartSpec: the goodput-optimal length this step
            allowed = min(allowed, drafter.speculation.choose(1))
        proposal = drafter.propose(context, allowed)
        if proposal.unverified:  # a lossy method's own tokens, emitted without a target forward
            emitted, stop_reason = append_tokens(proposal.tokens, new_ids, context, stopper)
            draft_s = now(device) - t_propose
            steps.append(StepStats(drafted=0, accepted=0, emitted=emitted, tree_size=0, draft_s=draft_s, verify_s=0.0))
            continue
        plan = drafter.forward_plan(len(new_ids))  # the full model unless the method is lossy
        t_forward = now(device)

        # 2. one target forward over [tokens emitted unverified, if any] + [last emitted token] + drafts
        # (+ auxiliary tokens)
        block = verify_block(context[-1], proposal)
        block_tokens, block_parents = block.tokens, block.parents
        base = cache.length
        lag = context[base:-1]  # emitted by unverified steps: the target's cache catches up on them now
        if lag and drafter.needs_hidden_states:
            raise ValueError(f"{type(drafter).__name__} reads target hidden states: it cannot emit unverified tokens")
        # early-exit drafters finish the forward they started (their first layers' K/V are reused)
        target = None if proposal.aux_tokens or lag else drafter.verify_forward(block_tokens, block_parents, cache)
        if target is None:
            forward_tokens, layout = with_catch_up(block, lag)
            target = backbone.forward(
                forward_tokens,
                cache,
                layout=layout,
                output_hidden_states=drafter.needs_hidden_states,
                plan=plan,
                logits_rows=slice(len(lag), None) if lag else None,
            )
        candidate_logits = target.logits[: len(block_tokens)]
        t_verify = now(device)  # the verifier reads the logits on the host next: no extra stall on CUDA

        # 3. verify
        result = verify_rows(drafter, block, candidate_logits, proposal, params, generator)

        # 4. commit: keep the caught-up tokens, the root and the accepted path (drops rejected drafts
        # and aux tokens)
        cache.compact(base, [*range(len(lag)), *(len(lag) + node for node in [0, *result.accepted_nodes])])
        if drafter.speculation is not None:
            drafter.speculation.observe(allowed, [(len(proposal), result.accepted, t_forward - t_propose)])
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
        emitted, stop_reason = append_tokens(result.emitted_tokens, new_ids, context, stopper)
        steps.append(
            StepStats(
                drafted=len(proposal),
                accepted=result.accepted,
                emitted=emitted,
                tree_size=len(lag) + block.size,
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
    forward-plan methods): one instance then serves every row of a batch."""
    return type(drafter).propose is Drafter.propose


@dataclass
class BatchGenerationOutput:
    """A batch decoded together: one output per prompt, timed as a whole."""

    outputs: list[GenerationOutput]  # per prompt; their ``wall_s`` is the batch's wall time
    prefill_s: float
    wall_s: float
    # per prompt: seconds from the batch's start until that row's last token (per-sequence latency)
    finish_s: list[float] = field(default_factory=list)


@dataclass
class _Row:
    """One sequence of a batch while it decodes (``slot`` = its row in the cache, or None when done)."""

    drafter: Drafter
    prompt: list[int]
    new_ids: list[int]
    steps: list[StepStats] = field(default_factory=list)
    stop_reason: str | None = None
    finish_s: float = 0.0

    @property
    def context(self) -> list[int]:
        return [*self.prompt, *self.new_ids]


def generate_batch(
    backbone: Backbone,
    drafter: Drafter,
    prompts: Sequence[Sequence[int]],
    settings: DecodeSettings,
    cache: KVCache,
    generator: torch.Generator | None = None,
    pad_token_id: int = 0,
) -> BatchGenerationOutput:
    """Decode several prompts together: :func:`generate`'s six steps with one target forward per
    step for the whole batch (batched speculation).

    Every row has its own drafter (:func:`~decodebench.engine.drafting.row_drafters`; one shared
    instance for drafters that never draft), proposes its own chain or tree, and sits at its own
    length in ``cache`` (right padding, :class:`KVCache` per-row lengths). Per step:

      1. propose   — each unfinished row's drafter drafts from its own context
                     (:meth:`Drafter.propose_rows`: row by row by default, self-speculative drafters
                     on a one-row view of the batch cache; SpS runs its draft model batched);
      2. forward   — ONE target forward over every row's [last emitted token] + drafts (+ aux),
                     padded to the longest block and masked (:meth:`Backbone.forward_batch`);
      3. verify    — per row, on that row's logits (greedy or lossless sampling);
      4. commit    — per row, keep the accepted path (:meth:`KVCache.commit_rows`);
      5. feedback  — per row, with that row's slice of the target output;
      6. emit/stop — per row; rows that stop leave the batch (:meth:`KVCache.keep_rows`) and
                     cost nothing afterwards.

    Under greedy decoding each row's output equals :func:`generate`'s for its prompt (tested for
    every lossless method). Sampling draws from the one ``generator`` row after row, so a row's
    tokens follow the same distribution as unbatched ones but not the same draws.

    Args:
        prompts: token ids of each prompt (lengths may differ).
        cache: a cache from ``backbone.new_cache(capacity, batch_size=len(prompts))``.
        pad_token_id: id placed in padding slots (never attended to by real tokens).

    Returns:
        BatchGenerationOutput; ``outputs[b].steps`` has one :class:`StepStats` per step in which
        row ``b`` was still generating (``verify_s`` / ``forward_s``: the batch's shared step).
    """
    device = backbone.device
    params = settings.sampling
    batch = len(prompts)
    cache.reset()  # also brings back the rows a previous batch let go (KVCache.keep_rows)
    if cache.batch_size != batch:
        raise ValueError(f"cache holds {cache.batch_size} rows for {batch} prompts")
    shared = never_drafts(drafter)
    drafters = [drafter] * batch if shared else row_drafters(drafter, batch)
    stopper = StopChecker(settings)
    start = now(device)
    sizes = [len(p) for p in prompts]
    headroom = settings.max_new_tokens + 64  # drafts and aux tokens past the last emitted token
    cache.ensure_capacity(max(sizes) + headroom)
    rows = [_Row(drafter=drafters[b], prompt=list(prompts[b]), new_ids=[]) for b in range(batch)]
    for index, row in enumerate(rows if not shared else rows[:1]):
        row.drafter.target_cache = cache.row_view(index)
        row.drafter.start_request(row.prompt, params, generator)

    # prefill: every prompt right-padded to the longest, each row's logits at its last token
    ids = torch.tensor([[*p, *[pad_token_id] * (max(sizes) - len(p))] for p in prompts], device=device)
    hidden_states = any(d.needs_hidden_states for d in drafters)
    prefill = backbone.forward_batch(ids, cache, sizes=sizes, last_logits_only=True, output_hidden_states=hidden_states)
    cache.commit_rows([0] * batch, [range(n) for n in sizes])
    for index, row in enumerate(rows):
        row.new_ids.append(next_token(prefill.logits[index, -1], params, generator))
        if not shared:
            row.drafter.prefilled(
                ForwardOutput(
                    logits=prefill.logits[index],
                    hidden_states=None
                    if prefill.hidden_states is None
                    else [h[index, : sizes[index]] for h in prefill.hidden_states],
                    last_hidden=prefill.last_hidden[index, : sizes[index]],
                )
            )
        row.stop_reason = stopper.check(row.new_ids)
    if shared:
        drafter.prefilled(prefill)
    prefill_s = now(device) - start
    live = [row for row in rows if row.stop_reason is None]  # live[r] sits in cache row r
    for row in rows:
        row.finish_s = prefill_s
    if len(live) < batch:
        cache.keep_rows([rows.index(row) for row in live])

    while live:
        cache.ensure_capacity(max(cache.lengths) + headroom)
        # 1. propose, for every live row at once (row by row unless the drafter batches its drafting,
        # Drafter.propose_rows; a lossy method's forward plan is the batch's: its rows never draft, so
        # all of them have generated the same number of tokens)
        policy = live[0].drafter.speculation  # SmartSpec (shared by the rows): this step's length
        allowed = None if policy is None else policy.choose(len(live))
        limits = [settings.max_new_tokens - len(row.new_ids) - 1 for row in live]
        if not shared:
            for slot, row in enumerate(live):
                row.drafter.target_cache = cache.row_view(slot)
        drafted = live[0].drafter.propose_rows(
            [row.drafter for row in live],
            [row.context for row in live],
            limits if allowed is None else [min(limit, allowed) for limit in limits],
            device,
        )
        proposals, draft_s = drafted.proposals, drafted.draft_s
        if any(proposal.unverified for proposal in proposals):  # such drafters set supports_batch = False
            raise ValueError(f"{type(live[0].drafter).__name__} emits unverified tokens: not in a batch")
        plan = live[0].drafter.forward_plan(len(live[0].new_ids))
        t_forward = now(device)

        # 2. one target forward over every row's block, padded to the longest and masked (or the
        # drafter's own forward of the same blocks, Drafter.verify_forward_rows)
        blocks = [verify_block(row.context[-1], proposal) for row, proposal in zip(live, proposals)]
        bases = [cache.row_length(slot) for slot in range(len(live))]
        own = live[0].drafter.verify_forward_rows(
            [row.drafter for row in live], [b.tokens for b in blocks], [b.parents for b in blocks], cache
        )
        if own is None:
            width = max(block.size for block in blocks)
            target = backbone.forward_batch(
                torch.tensor([[*b.all_tokens, *[pad_token_id] * (width - b.size)] for b in blocks], device=device),
                cache,
                sizes=[block.size for block in blocks],
                layouts=[block.layout for block in blocks],
                plan=plan,
                output_hidden_states=hidden_states,
            )
            row_sizes = [block.size for block in blocks]
        else:
            target, row_sizes = own.output, own.sizes
        t_verify = now(device)

        # 3. verify, per row
        results = [
            verify_rows(row.drafter, block, target.logits[slot, : len(block.tokens)], proposal, params, generator)
            for slot, (row, block, proposal) in enumerate(zip(live, blocks, proposals))
        ]

        # 4. commit: each row keeps its root and accepted path
        cache.commit_rows(bases, [[0, *result.accepted_nodes] for result in results])
        if policy is not None:
            policy.observe(allowed, [(len(p), r.accepted, d) for p, r, d in zip(proposals, results, draft_s)])
        t_feedback = now(device)
        verify_s = t_feedback - t_forward

        # 5. feedback, per row with its slice of the target output
        for slot, (row, block, proposal, result, size) in enumerate(zip(live, blocks, proposals, results, row_sizes)):
            t_start = now(device)
            if not shared:
                row.drafter.target_cache = cache.row_view(slot)
            row.drafter.feedback(
                StepOutcome(
                    proposal=proposal,
                    result=result,
                    block_tokens=block.tokens,
                    block_parents=block.parents,
                    target=ForwardOutput(
                        logits=target.logits[slot, :size],
                        hidden_states=None
                        if target.hidden_states is None
                        else [h[slot, :size] for h in target.hidden_states],
                        last_hidden=target.last_hidden[slot, :size],
                    ),
                    context_length=bases[slot] + 1,
                )
            )
            draft_s[slot] += now(device) - t_start

        # 6. emit and check stops token by token; finished rows leave the batch
        step_end = now(device)
        for slot, (row, proposal, result) in enumerate(zip(live, proposals, results)):
            emitted = 0
            for token in result.emitted_tokens:
                row.new_ids.append(token)
                emitted += 1
                row.stop_reason = stopper.check(row.new_ids)
                if row.stop_reason:
                    break
            row.finish_s = step_end - start
            row.steps.append(
                StepStats(
                    drafted=len(proposal),
                    accepted=result.accepted,
                    emitted=emitted,
                    tree_size=blocks[slot].size,
                    draft_s=draft_s[slot],
                    verify_s=verify_s,
                    forward_s=t_verify - t_forward,
                    depth=draft_depth(proposal.parents, len(proposal)),
                )
            )
        still = [slot for slot, row in enumerate(live) if row.stop_reason is None]
        if len(still) < len(live):
            live = [live[slot] for slot in still]
            if live:
                cache.keep_rows(still)

    wall_s = now(device) - start
    outputs = [
        GenerationOutput(
            new_ids=row.new_ids,
            steps=row.steps,
            prefill_s=prefill_s,
            wall_s=wall_s,
            stop_reason=row.stop_reason,
            method_stats=row.drafter.request_stats(),
        )
        for row in rows
    ]
    return BatchGenerationOutput(
        outputs=outputs, prefill_s=prefill_s, wall_s=wall_s, finish_s=[row.finish_s for row in rows]
    )
