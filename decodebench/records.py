"""The data contract between runners (which write) and analysis (which reads).

A run directory holds ``records.jsonl`` — one :class:`Record` per (sample × turn × method) — and
``summary.json`` — one :class:`Summary` per method. Every metric is defined ONCE, here, next to
its field; the report recomputes group-level numbers from records with the same definitions
(:func:`summarize`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional


def token_match_rate(ours: list[int], reference: list[int]) -> float:
    """Agreement with the AR output: positions ``i < max(len)`` where both outputs have the same
    token, divided by ``max(len)`` (a missing token counts as a mismatch; 1.0 = identical)."""
    longest = max(len(ours), len(reference))
    return sum(a == b for a, b in zip(ours, reference)) / longest if longest else 1.0


def first_divergence(ours: list[int], reference: list[int]) -> Optional[int]:
    """First new-token index where the outputs differ (a length difference counts); None if identical."""
    if ours == reference:
        return None
    return next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), min(len(ours), len(reference)))


def harness_overhead_share(records: Iterable["Record"]) -> Optional[float]:
    """Share of decode time spent outside the target's forwards: Σ (wall - prefill - forward) /
    Σ (wall - prefill) over the records that carry ``forward_s`` (drafting, verification, cache
    bookkeeping, stop checks, Python); None when none do. For AR this is the harness's own cost."""
    timed = [r for r in records if r.forward_s is not None and r.wall_s is not None and r.error is None]
    decode = sum(r.wall_s - (r.prefill_s or 0.0) for r in timed)
    if not timed or decode <= 0:
        return None
    return sum(r.wall_s - (r.prefill_s or 0.0) - r.forward_s for r in timed) / decode


def ids_sha(token_ids: Iterable[int]) -> str:
    """Short stable hash of a token-id sequence (used to compare outputs across runs)."""
    return hashlib.sha256(",".join(map(str, token_ids)).encode()).hexdigest()[:16]


@dataclass
class Record:
    """One generation: a (sample, turn) decoded by one method.

    An error is a record with ``error`` set and null metrics — never stale numbers.
    """

    method: str  # registry name of the method that produced this record
    role: str  # "method" or "baseline" (the same-process AR baseline)
    task: str
    model: str
    sample_id: str
    category: str  # the task's own category (Spec-Bench: 13 categories)
    group: str  # the category group reported in tables (Spec-Bench: 6 groups)
    turn: int  # 0-based turn index within a multi-turn sample
    seed: int
    prompt_tokens: Optional[int] = None
    # new_tokens: emitted token ids after the prompt, counted from ids (never re-tokenised text),
    # the same way for every method; includes the EOS token when one was generated.
    new_tokens: Optional[int] = None
    # wall_s: time of the whole turn, prefill included, tokenisation excluded.
    wall_s: Optional[float] = None
    prefill_s: Optional[float] = None
    draft_s: Optional[float] = None  # Σ time spent in the drafter's propose()
    verify_s: Optional[float] = None  # Σ time of target forwards + verification after prefill
    # forward_s: Σ time of the target forwards alone after prefill (part of verify_s); the decode
    # time outside model forwards is wall_s - prefill_s - forward_s (see harness_overhead_share)
    forward_s: Optional[float] = None
    # steps: target forward passes, prefill included (AR: steps == new_tokens).
    steps: Optional[int] = None
    # drafted / accepted: draft tokens proposed to / accepted by the verifier (bonus excluded).
    drafted: Optional[int] = None
    accepted: Optional[int] = None
    accepted_lengths: Optional[list[int]] = None  # per decode step: accepted draft tokens
    drafted_lengths: Optional[list[int]] = None  # per decode step: draft tokens proposed
    tree_sizes: Optional[list[int]] = None  # per decode step: nodes in the verified tree
    stop_reason: Optional[str] = None  # "eos" | "max_new_tokens" | "stop_string"
    output_text: Optional[str] = None
    output_ids: Optional[list[int]] = None
    output_sha: Optional[str] = None
    # lossless audit against the same-process AR baseline (null when not applicable):
    # quality: the task's metrics for this output (Task.score), e.g. {"exact_match": 1.0}
    quality: Optional[dict[str, float]] = None
    lossless: Optional[bool] = None  # output ids identical to the baseline's
    first_divergence: Optional[int] = None  # first differing new-token index, else null
    # agreement of a LOSSY method with the same-process AR baseline under greedy decoding (null for
    # lossless methods, which have ``lossless``, and without a baseline): see token_match_rate() above.
    token_match_rate: Optional[float] = None
    # batch_size: generations decoded together in one batch (gen.batch_size > 1); wall_s and
    # prefill_s are then the batch's times divided by it (so Σ wall_s = the batch's wall time).
    batch_size: Optional[int] = None
    # method_stats: method-specific counters of this generation (Drafter.request_stats), e.g.
    # ffn_skip's {"ffn_skipped": fraction of FFN blocks skipped}, skipdecode's {"layer_fraction": ...}
    method_stats: Optional[dict[str, float]] = None
    error: Optional[str] = None

    @property
    def tokens_per_s(self) -> Optional[float]:
        if self.error or not self.wall_s:
            return None
        return self.new_tokens / self.wall_s

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Record":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Summary:
    """Aggregate numbers for one method over a set of records (see :func:`summarize`)."""

    method: str
    task: str
    model: str
    records: int
    errors: int
    new_tokens: int
    wall_s: float
    # tokens_per_s = Σ new tokens / Σ wall time
    tokens_per_s: Optional[float]
    # tau (mean accepted tokens per target forward, bonus included) = Σ new tokens / Σ steps;
    # AR = 1.00 exactly.
    tau: Optional[float]
    # alpha (draft acceptance rate) = Σ accepted draft tokens / Σ drafted tokens; null if nothing drafted.
    alpha: Optional[float]
    # speedup = Σ AR wall time / Σ method wall time over the same (sample, turn) pairs, same process.
    speedup: Optional[float] = None
    # speedup_tps = mean over records of method tokens/s / mean over records of AR tokens/s
    # (Spec-Bench leaderboard convention, for comparison with its published numbers).
    speedup_tps: Optional[float] = None
    # lossless_rate = fraction of records whose output ids equal the AR baseline's (null when no baseline
    # or the method is not lossless under this decoding setting).
    lossless_rate: Optional[float] = None
    # token_match_rate = mean over records of Record.token_match_rate (agreement with AR; lossy methods)
    token_match_rate: Optional[float] = None
    # first_divergence = mean over agreement-audited records of the first token index that differs
    # from AR, an identical output counting as its full length (= mean length of the agreeing prefix)
    first_divergence: Optional[float] = None
    # per_position_acceptance[i] = P(draft token i accepted | a draft of length > i was proposed).
    per_position_acceptance: list[float] = field(default_factory=list)
    # quality[metric] = mean of the metric over the records that report it
    quality: dict[str, float] = field(default_factory=dict)
    draft_s: Optional[float] = None
    verify_s: Optional[float] = None
    prefill_s: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _ratio(num: float, den: float) -> Optional[float]:
    return num / den if den else None


def per_position_acceptance(records: list[Record]) -> list[float]:
    """P(position i accepted | drafted beyond i), from per-step drafted/accepted lengths."""
    drafted_at: list[int] = []
    accepted_at: list[int] = []
    for rec in records:
        for drafted, accepted in zip(rec.drafted_lengths or [], rec.accepted_lengths or []):
            while len(drafted_at) < drafted:
                drafted_at.append(0)
                accepted_at.append(0)
            for i in range(drafted):
                drafted_at[i] += 1
                accepted_at[i] += i < accepted
    return [a / d for a, d in zip(accepted_at, drafted_at)]


def mean_quality(records: list[Record]) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    for rec in records:
        for metric, value in (rec.quality or {}).items():
            if value is not None:
                values.setdefault(metric, []).append(float(value))
    return {metric: sum(v) / len(v) for metric, v in sorted(values.items())}


def summarize(records: list[Record], baseline: Optional[list[Record]] = None) -> Summary:
    """Aggregate one method's records; ``baseline`` (AR records) enables speedup and lossless rate.

    Speedup pairs records by (sample_id, turn); pairs where either side errored are left out.
    """
    ok = [r for r in records if r.error is None]
    first = records[0] if records else None
    new_tokens = sum(r.new_tokens for r in ok)
    wall = sum(r.wall_s for r in ok)
    steps = sum(r.steps for r in ok)
    drafted = sum(r.drafted or 0 for r in ok)
    summary = Summary(
        method=first.method if first else "",
        task=first.task if first else "",
        model=first.model if first else "",
        records=len(records),
        errors=len(records) - len(ok),
        new_tokens=new_tokens,
        wall_s=wall,
        tokens_per_s=_ratio(new_tokens, wall),
        tau=_ratio(new_tokens, steps),
        alpha=_ratio(sum(r.accepted or 0 for r in ok), drafted) if drafted else None,
        per_position_acceptance=per_position_acceptance(ok),
        quality=mean_quality(ok),
        draft_s=sum(r.draft_s or 0.0 for r in ok),
        verify_s=sum(r.verify_s or 0.0 for r in ok),
        prefill_s=sum(r.prefill_s or 0.0 for r in ok),
    )
    if baseline:
        by_key = {(b.sample_id, b.turn): b for b in baseline if b.error is None}
        pairs = [(r, by_key[(r.sample_id, r.turn)]) for r in ok if (r.sample_id, r.turn) in by_key]
        if pairs:
            summary.speedup = _ratio(sum(b.wall_s for _, b in pairs), sum(r.wall_s for r, _ in pairs))
            mean_tps = sum(r.tokens_per_s for r, _ in pairs) / len(pairs)
            mean_base_tps = sum(b.tokens_per_s for _, b in pairs) / len(pairs)
            summary.speedup_tps = _ratio(mean_tps, mean_base_tps)
        audited = [r.lossless for r in ok if r.lossless is not None]
        summary.lossless_rate = sum(audited) / len(audited) if audited else None
        matched = [r for r in ok if r.token_match_rate is not None]
        if matched:
            summary.token_match_rate = sum(r.token_match_rate for r in matched) / len(matched)
            summary.first_divergence = sum(r.new_tokens if r.first_divergence is None else r.first_divergence
                                           for r in matched) / len(matched)
    return summary
