"""Draft budget from the verify-latency curve: how many tokens to draft when verifying costs T(k).

A step that drafts ``d`` tokens runs one target forward over ``k = d + 1`` tokens (last emitted
token + drafts) and, under a geometric acceptance model (each draft accepted with probability
``acceptance`` given its predecessors were), emits ``E(d) = 1 + a + a² + … + a^d`` tokens (bonus
included). The best budget maximises tokens per unit of time, ``E(d) / (T(d+1)/T(1))``; ``d = 0``
(plain AR, value 1) wins when no budget pays on this curve.

The curve is a stored ``decodebench-profile`` result (:func:`decodebench.engine.profile.load_latency_curve`).
An unmeasured k costs as the next measured one (bucketed backends pad up to it); beyond the largest
measured k the cost grows linearly from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class BudgetChoice:
    draft_tokens: int  # d: drafts per step (0 = do not speculate)
    expected_tokens: float  # E(d): emitted tokens per step, bonus included
    relative_cost: float  # T(d+1)/T(1)
    tokens_per_cost: float  # E(d) / relative cost (AR = 1.0)


def block_cost(curve: dict[str, Any], k: int) -> float:
    """T(k)/T(1) from ``curve`` (keys ``k`` and ``ratio``)."""
    points = sorted(zip(curve["k"], curve["ratio"]))
    for measured, ratio in points:
        if measured >= k:
            return float(ratio)
    last_k, last_ratio = points[-1]
    return float(last_ratio) * k / last_k


def expected_tokens(draft_tokens: int, acceptance: float) -> float:
    """E(d) = sum_{i=0..d} acceptance**i: tokens a step emits (accepted drafts + the bonus token)."""
    return sum(acceptance**i for i in range(draft_tokens + 1))


def pick_draft_budget(
    curve: dict[str, Any], acceptance: float, max_draft_tokens: int | None = None, draft_cost_ratio: float = 0.0
) -> BudgetChoice:
    """The draft budget maximising expected tokens per unit time on ``curve``.

    Args:
        curve: stored latency curve (``{"k": [...], "ratio": [...]}``, ratio = T(k)/T(1)).
        acceptance: per-draft acceptance probability of the method (0..1).
        max_draft_tokens: largest budget considered; default: the largest measured k minus one.
        draft_cost_ratio: ``c`` = T_draft(1)/T_target(1) of a separate draft model (0 for drafters
            that cost nothing): ``d`` drafts then cost ``d·c + T(d+1)/T(1)`` (Leviathan et al.'s
            ``γc + 1`` with the measured verify cost in place of 1).
    """
    if not 0.0 <= acceptance <= 1.0:
        raise ValueError(f"acceptance must be in [0, 1], got {acceptance}")
    largest = max_draft_tokens if max_draft_tokens is not None else max(curve["k"]) - 1
    best = BudgetChoice(0, 1.0, 1.0, 1.0)
    for draft_tokens in range(1, largest + 1):
        cost = block_cost(curve, draft_tokens + 1) / block_cost(curve, 1) + draft_tokens * draft_cost_ratio
        tokens = expected_tokens(draft_tokens, acceptance)
        if tokens / cost > best.tokens_per_cost + 1e-9:
            best = BudgetChoice(draft_tokens, tokens, cost, tokens / cost)
    return best


def node_budget(curve: dict[str, Any], max_verify_cost: float, largest: int) -> int:
    """Tokens per verify forward (root included) for a tree / draft method's CPU preset: the largest
    ``k <= largest`` whose ``T(k)/T(1) <= max_verify_cost`` on ``curve``, and at least 2 (one draft,
    so the method still drafts; on a curve where nothing that small pays it is as cheap as it gets).

    Tree methods have no closed-form E(k) like :func:`pick_draft_budget`'s chains (their τ depends on
    the tree shape and the data), so their presets bound what one verify may cost instead: on a flat
    curve the tree grows, on a steep one it shrinks to a chain of one.
    """
    if max_verify_cost < 1.0:
        raise ValueError(f"max_verify_cost must be >= 1.0, got {max_verify_cost}")
    fitting = [k for k in range(2, largest + 1) if block_cost(curve, k) / block_cost(curve, 1) <= max_verify_cost]
    return max(fitting, default=min(2, largest))


def curve_node_budget(
    backbone, cache_dir: str | None, max_verify_cost: float | None, largest: int
) -> tuple[int, str] | None:
    """:func:`node_budget` on the stored curve of ``backbone``'s model and backend in use, with where it
    came from (``"curve:<backend>"``); None when ``max_verify_cost`` is unset or no curve is stored."""
    if max_verify_cost is None or not getattr(backbone, "model_name", None):
        return None
    from decodebench.engine.profile import load_latency_curve  # noqa: PLC0415 (profile imports the engine)

    curve = load_latency_curve(backbone.model_name, backbone.backend, backbone.device.type, cache_dir)
    if curve is None:
        return None
    return node_budget(curve, max_verify_cost, largest), f"curve:{backbone.backend}"
