"""SWIFT's layer-set search: which attention / MLP sublayers the self-draft skips.

The search space is the ``2(L−2)`` sublayers of layers ``1 .. L−2`` (the first and last layers are
never skipped); a candidate skips ``⌊2(L−2)·skip_ratio⌋`` of them. Following hemingkx/SWIFT, each
optimisation iteration proposes a candidate — uniformly at random, except every
``bayes_interval``-th iteration, which asks a Gaussian-process Bayesian optimiser
(``bayes_opt``, UCB acquisition) for a point in ``[0, 1]^{2(L−2)}`` and skips its largest
coordinates — scores it, and keeps it when it beats the best score so far. Every scored point is
registered with the optimiser. The search stops when a score exceeds ``max_score``, after
``max_opt_iter`` iterations, or after ``max_tolerance_iter`` iterations without improvement.

A skip set is written ``a<i>`` (skip layer ``i``'s attention) / ``m<i>`` (its MLP), e.g.
``[a3, m3, m5]``; the optimised set is stored per model × task as JSON under
``<cache_dir>/swift/``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from decodebench.config import ConfigValueError

log = logging.getLogger("decodebench")

SUBLAYER = re.compile(r"^([am])(\d+)$")


@dataclass(frozen=True)
class SkipSet:
    """Skipped sublayers: layer indices whose attention / MLP the draft leaves out."""

    attention: frozenset[int] = frozenset()
    mlp: frozenset[int] = frozenset()

    def __len__(self) -> int:
        return len(self.attention) + len(self.mlp)

    def names(self) -> list[str]:
        return [f"a{i}" for i in sorted(self.attention)] + [f"m{i}" for i in sorted(self.mlp)]

    @classmethod
    def parse(cls, names: Sequence[str], num_layers: int) -> SkipSet:
        """From ``["a3", "m5", ...]``; layers must be in ``1 .. L−2``."""
        attention, mlp = set(), set()
        for name in names:
            match = SUBLAYER.match(str(name).strip())
            if not match or not 1 <= int(match.group(2)) <= num_layers - 2:
                raise ConfigValueError(
                    f"invalid value in 'method.params.skip_set': {name!r} (allowed: a<i> to skip layer i's "
                    f"attention, m<i> its MLP, with 1 <= i <= {num_layers - 2}; or auto | cached)"
                )
            (attention if match.group(1) == "a" else mlp).add(int(match.group(2)))
        return cls(frozenset(attention), frozenset(mlp))

    # the optimiser's coordinates: x0 .. x_{L-3} = attention of layers 1 .. L-2, then the MLPs
    @classmethod
    def from_coordinates(cls, chosen: Sequence[int], num_layers: int) -> SkipSet:
        middle = num_layers - 2
        return cls(
            frozenset(i + 1 for i in chosen if i < middle), frozenset(i - middle + 1 for i in chosen if i >= middle)
        )

    def point(self, num_layers: int) -> dict[str, float]:
        middle = num_layers - 2
        return {
            f"x{i}": float((i + 1) in self.attention if i < middle else (i - middle + 1) in self.mlp)
            for i in range(2 * middle)
        }


def initial_skip_set(num_layers: int) -> SkipSet:
    """SWIFT's starting set: attention and MLP of every other layer 1, 3, 5, … < L−1."""
    odd = frozenset(range(1, num_layers - 1, 2))
    return SkipSet(odd, odd)


@dataclass
class SearchSettings:
    skip_ratio: float = 0.45
    bayes_interval: int = 25
    max_opt_iter: int = 1000
    max_tolerance_iter: int = 300
    max_score: float = 0.95
    seed: int = 1


@dataclass
class LayerSetSearch:
    """The optimisation state (kept across the prompts of a run, as in the reference).

    ``score(skip_set) -> float`` is supplied per iteration by the caller (it needs the current
    request's cache and tokens).
    """

    num_layers: int
    settings: SearchSettings
    best: SkipSet = field(init=False)
    best_score: float = field(init=False, default=0.0)
    iterations: int = field(init=False, default=0)
    since_improvement: int = field(init=False, default=0)
    active: bool = field(init=False, default=True)

    def __post_init__(self) -> None:
        from bayes_opt import BayesianOptimization, acquisition  # heavy: imported only when searching

        self.best = initial_skip_set(self.num_layers)
        dims = 2 * (self.num_layers - 2)
        self.skip_count = int(dims * self.settings.skip_ratio)
        self.rng = np.random.default_rng(self.settings.seed)
        self.optimizer = BayesianOptimization(
            f=None,
            pbounds={f"x{i}": (0.0, 1.0) for i in range(dims)},
            acquisition_function=acquisition.UpperConfidenceBound(kappa=2.5),  # reference: UCB, kappa 2.5
            random_state=self.settings.seed,
            verbose=0,
            allow_duplicate_points=True,
        )
        self.optimizer.set_gp_params(alpha=1e-2)  # reference: noisy scores

    def candidate(self) -> tuple[SkipSet, dict[str, float]]:
        """The next skip set to score and its optimiser point."""
        if (self.iterations + 1) % self.settings.bayes_interval == 0:
            point = self.optimizer.suggest()
            order = sorted(range(len(point)), key=lambda i: -float(point[f"x{i}"]))
            return SkipSet.from_coordinates(order[: self.skip_count], self.num_layers), {
                k: float(v) for k, v in point.items()
            }
        chosen = self.rng.choice(2 * (self.num_layers - 2), self.skip_count, replace=False)
        skip_set = SkipSet.from_coordinates(chosen.tolist(), self.num_layers)
        return skip_set, skip_set.point(self.num_layers)

    def step(self, score: Callable[[SkipSet], float]) -> float:
        """One iteration: propose, score, register, keep if better, check the stop rules."""
        skip_set, point = self.candidate()
        value = float(score(skip_set))
        with contextlib.redirect_stdout(io.StringIO()):  # bayes_opt prints a line per duplicate point
            self.optimizer.register(params=point, target=value)
        self.iterations += 1
        if value > self.best_score:
            self.best, self.best_score, self.since_improvement = skip_set, value, 0
            if value > self.settings.max_score:
                self.active = False
        else:
            self.since_improvement += 1
        if self.since_improvement > self.settings.max_tolerance_iter or self.iterations > self.settings.max_opt_iter:
            self.active = False
        if not self.active:
            log.info(
                "swift: layer-set search stopped after %d iterations, best score %.3f, skipping %s",
                self.iterations,
                self.best_score,
                " ".join(self.best.names()),
            )
        return value


# -- the per model x task cache ---------------------------------------------------------------------
def skip_set_path(root: Path, model: str, task: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{model}__{task}")
    return root / "swift" / f"{safe}.json"


def save_skip_set(path: Path, skip_set: SkipSet, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"skip_set": skip_set.names(), **meta}, indent=2) + "\n")
    tmp.replace(path)


def load_skip_set(path: Path, num_layers: int) -> SkipSet | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("num_layers") != num_layers:
        raise ConfigValueError(
            f"{path} holds a skip set for {data.get('num_layers')} layers, the model has {num_layers}"
        )
    return SkipSet.parse(data["skip_set"], num_layers)
