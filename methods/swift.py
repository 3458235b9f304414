"""SWIFT: on-the-fly self-speculative decoding by layer skipping (Xia et al. 2025, hemingkx/SWIFT).

The draft model is the target with a set of attention and MLP *sublayers* of layers ``1 .. L−2``
skipped (``Backbone.forward(skip_attention=, skip_mlp=)``; the first and last layers always run).
It drafts on top of the target's committed KV cache — the prefix's K/V are the full model's, as in
the reference, which drafts on a copy of the verified cache — and the loop's target cache is
cropped back to the committed prefix before the proposal is returned (skipped layers write no
K/V, and whatever the draft wrote is dropped), so verification sees exactly AR's cache.

Per step:

1. *Optimisation* (while the layer-set search is active, every ``opt_interval`` steps once the
   request has more than ``context_window + 1`` generated tokens): one search iteration
   (:class:`~decodebench.methods.swift_search.LayerSetSearch`: random candidates, Bayesian
   optimisation every ``bayes_interval`` iterations) scores a candidate skip set by running the
   skipped model in parallel over the request's first ``context_window + 1`` generated tokens on
   top of the prompt's K/V, as the fraction of positions where its argmax equals the token that
   followed (the reference's "matchness"). The best set so far drafts.
2. *Confidence-aware drafting*: the skipped model drafts a chain of top-1 tokens (a sample under
   sampling), at most ``max_draft_steps``, stopping after a draft whose top-1 probability is
   below ``stop_threshold``.
3. *Candidate tree*: at every depth the draft's top-``k`` tokens become siblings, ``k`` set by that
   step's confidence (``> 0.95 / 0.8 / 0.5 / else`` → ``3 / 5 / 8 / 10`` greedy, ``1 / 3 / 5 / 10``
   sampling, the reference's ``get_choices_list``); only the top-1 token continues. Under sampling
   the siblings are drawn without replacement and each carries the distribution it was drawn from,
   so the loop's multi-draft speculative sampling stays lossless.

The skip set (``skip_set``): ``auto`` optimises on the fly from the reference's initial set
(every other layer's attention and MLP) and stores the best set per model × task under
``<cache_dir>/swift/`` when the search stops and at the end of the run; ``cached`` loads that set
and never optimises; a list (``[a3, m3, m5, ...]``) fixes it. The search state is kept across the
prompts of a run and restarted by ``reset_state`` (after warm-up), so its cost is measured.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from decodebench.config import ConfigValueError, check, default_cache_dir
from decodebench.engine.backbone import Backbone
from decodebench.engine.drafting import Drafter, Proposal
from decodebench.engine.kv_cache import KVCache
from decodebench.engine.sampling import logits_to_probs, sample
from decodebench.extras import require_extra
from decodebench.methods.state_policy import model_key
from decodebench.methods.swift_search import (LayerSetSearch, SearchSettings, SkipSet, initial_skip_set,
                                              load_skip_set, save_skip_set, skip_set_path)

log = logging.getLogger("decodebench")

TOP_K = 10  # reference: the draft keeps its top-10 tokens per step for the tree


class PrefixView:
    """The first ``length`` entries of a :class:`KVCache`, read-only: a forward on top of it sees
    that prefix and its own K/V, which are never stored (the optimisation's parallel draft over
    already-generated tokens, whose committed K/V must not be touched)."""

    def __init__(self, cache: KVCache, length: int):
        self.cache, self.length = cache, length
        self.lengths = [length] * cache.num_layers

    def ensure_capacity(self, needed: int) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys = self.cache.keys[layer_idx][:, :, : self.length]
        values = self.cache.values[layer_idx][:, :, : self.length]
        return torch.cat([keys, key_states], dim=2), torch.cat([values, value_states], dim=2)


def candidate_count(confidence: float, thresholds: list[float], counts: list[int]) -> int:
    """Tree width at one depth: ``counts[i]`` for the first threshold the confidence exceeds."""
    for threshold, count in zip(thresholds, counts):
        if confidence > threshold:
            return count
    return counts[len(thresholds)]


class SwiftDrafter(Drafter):
    @dataclass
    class Params:
        skip_set: Any = "auto"  # auto | cached | list of sublayers [a3, m5, ...]
        task: str = "default"  # cache key of the optimised set (the YAML sets ${task.name})
        skip_ratio: float = 0.45  # fraction of the 2(L-2) sublayers a search candidate skips
        optimize: bool = True  # run the layer-set search under skip_set=auto
        opt_interval: int = 1  # one search iteration every n decode steps
        bayes_interval: int = 25  # every n-th iteration is a Bayesian-optimisation suggestion
        max_opt_iter: int = 1000
        max_tolerance_iter: int = 300  # stop after this many iterations without improvement
        max_score: float = 0.95  # stop once a candidate's matchness exceeds this
        context_window: int = 32  # generated tokens scored per iteration
        max_draft_steps: int = 25
        stop_threshold: float = 0.8  # stop drafting after a draft with top-1 prob below this
        confidence_thresholds: list[float] = field(default_factory=lambda: [0.95, 0.8, 0.5])
        # tree width per depth by confidence bin (reference get_choices_list)
        candidates_greedy: list[int] = field(default_factory=lambda: [3, 5, 8, 10])
        candidates_sampling: list[int] = field(default_factory=lambda: [1, 3, 5, 10])
        seed: int = 1  # the search's random candidates and the optimiser (reference: random_state=1)

        def __post_init__(self) -> None:
            if isinstance(self.skip_set, str):
                check(self.skip_set in ("auto", "cached"), "method.params.skip_set", self.skip_set,
                      "auto | cached | a list of sublayers such as [a3, m5]")
            else:
                self.skip_set = [str(name) for name in self.skip_set]
                check(bool(self.skip_set), "method.params.skip_set", self.skip_set,
                      "auto | cached | a non-empty list of sublayers such as [a3, m5]")
            if "${" in str(self.task):  # the YAML read outside Hydra (no task to interpolate)
                self.task = "default"
            check(0.0 < self.skip_ratio < 1.0, "method.params.skip_ratio", self.skip_ratio, "(0, 1)")
            for key in ("opt_interval", "bayes_interval", "max_opt_iter", "max_tolerance_iter",
                        "context_window", "max_draft_steps"):
                check(getattr(self, key) >= 1, f"method.params.{key}", getattr(self, key), ">= 1")
            check(0.0 <= self.stop_threshold <= 1.0, "method.params.stop_threshold", self.stop_threshold, "0 .. 1")
            for key in ("candidates_greedy", "candidates_sampling"):
                counts = getattr(self, key)
                check(len(counts) == len(self.confidence_thresholds) + 1 and all(1 <= c <= TOP_K for c in counts),
                      f"method.params.{key}", counts,
                      f"{len(self.confidence_thresholds) + 1} counts in 1 .. {TOP_K} (one per confidence bin)")

    def __init__(self, params: "SwiftDrafter.Params"):
        if params.optimize:  # the layer-set search's Bayesian optimiser (methods/swift_search.py)
            require_extra("swift", "bayes_opt", "method=swift with method.params.optimize=true")
        self.params = params
        self.backbone: Optional[Backbone] = None
        self.skip: SkipSet = SkipSet()
        self.search: Optional[LayerSetSearch] = None
        self.cache_file: Optional[Path] = None
        self.saved_iterations = -1
        self.prompt_length = 0
        self.step = 0

    # -- lifecycle --------------------------------------------------------------------------------
    def setup(self, backbone: Backbone, cache_dir: Optional[str] = None) -> None:
        self.backbone = backbone
        layers = backbone.num_layers
        if layers < 3:
            raise ConfigValueError(f"swift needs at least 3 layers (first and last are never skipped); "
                                   f"the model has {layers}")
        root = Path(cache_dir or default_cache_dir()).expanduser()
        self.cache_file = skip_set_path(root, model_key(backbone), self.params.task)
        choice = self.params.skip_set
        if choice == "cached":
            cached = load_skip_set(self.cache_file, layers)
            if cached is None:
                raise ConfigValueError(f"method.params.skip_set=cached, but no optimised skip set is stored at "
                                       f"{self.cache_file}: run once with skip_set=auto first")
            self.skip = cached
            meta = json.loads(self.cache_file.read_text())
            if not meta.get("finished"):
                log.warning("swift: the cached skip set %s comes from a search that had not finished (%s iterations, "
                            "score %.3f)", self.cache_file, meta.get("iterations"), meta.get("score", 0.0))
        elif choice != "auto":
            self.skip = SkipSet.parse(choice, layers)
        self.reset_state()

    def reset_state(self) -> None:
        if self.params.skip_set != "auto":
            return
        self.search = LayerSetSearch(self.backbone.num_layers, SearchSettings(
            skip_ratio=self.params.skip_ratio, bayes_interval=self.params.bayes_interval,
            max_opt_iter=self.params.max_opt_iter, max_tolerance_iter=self.params.max_tolerance_iter,
            max_score=self.params.max_score, seed=self.params.seed)) if self.params.optimize else None
        self.skip = initial_skip_set(self.backbone.num_layers)
        self.saved_iterations = -1

    def finish(self) -> None:
        self._save()

    def begin(self, prompt_ids: list[int]) -> None:
        self.prompt_length = len(prompt_ids)
        self.step = 0

    def request_stats(self) -> dict[str, float]:
        stats = {"swift_skipped_sublayers": float(len(self.skip))}
        if self.search is not None:
            stats.update(swift_opt_iterations=float(self.search.iterations),
                         swift_best_score=self.search.best_score, swift_optimizing=float(self.search.active))
        return stats

    def _save(self) -> None:
        search = self.search
        if search is None or search.iterations == 0 or search.iterations == self.saved_iterations:
            return
        save_skip_set(self.cache_file, search.best, {
            "score": search.best_score, "iterations": search.iterations, "finished": not search.active,
            "num_layers": self.backbone.num_layers, "skip_ratio": self.params.skip_ratio,
            "context_window": self.params.context_window})
        self.saved_iterations = search.iterations

    # -- optimisation -----------------------------------------------------------------------------
    def _matchness(self, skip_set: SkipSet, context: list[int]) -> float:
        """Fraction of the first ``context_window`` generated tokens the skipped model predicts
        (teacher-forced, one parallel forward on top of the prompt's K/V)."""
        window = self.params.context_window
        generated = context[self.prompt_length : self.prompt_length + window + 1]
        view = PrefixView(self.target_cache, self.prompt_length)
        out = self.backbone.forward(generated, view, skip_attention=skip_set.attention, skip_mlp=skip_set.mlp,
                                    logits_rows=slice(0, window))
        predicted = out.logits.argmax(-1).cpu()
        return float((predicted == torch.tensor(generated[1:])).float().mean())

    def _optimise(self, context: list[int]) -> None:
        search = self.search
        if search is None or not search.active:
            return
        if len(context) - self.prompt_length <= self.params.context_window + 1:
            return
        if self.step % self.params.opt_interval:
            return
        search.step(lambda candidate: self._matchness(candidate, context))
        self.skip = search.best
        if not search.active:
            self._save()

    # -- drafting ---------------------------------------------------------------------------------
    def propose(self, context: list[int], max_tokens: int) -> Proposal:
        self._optimise(context)
        self.step += 1
        depth_budget = min(self.params.max_draft_steps, max_tokens)
        if depth_budget <= 0:
            return Proposal()
        cache = self.target_cache
        committed = len(context) - 1
        if cache is None or cache.length != committed:
            raise RuntimeError("swift drafts on the decode loop's cache, which must hold exactly the committed "
                               f"context ({committed} tokens)")
        greedy = self.sampling.greedy
        counts = self.params.candidates_greedy if greedy else self.params.candidates_sampling
        tokens: list[int] = []
        parents: list[int] = []
        rows: list[torch.Tensor] = []
        spine_parent = -1
        token = context[-1]
        for _ in range(depth_budget):
            out = self.backbone.forward([token], cache, skip_attention=self.skip.attention, skip_mlp=self.skip.mlp)
            logits = out.logits[-1]
            raw = torch.softmax(logits, -1)
            if greedy:
                top = torch.topk(logits, TOP_K).indices.tolist()
                token = top[0]
                width = candidate_count(float(raw[token]), self.params.confidence_thresholds, counts)
                siblings = top[:width]
            else:
                q = logits_to_probs(logits, self.sampling)
                siblings, sibling_rows = [], []
                token = sample(q, self.generator)
                width = candidate_count(float(raw[token]), self.params.confidence_thresholds, counts)
                while True:  # without replacement: each sibling's row is q minus the earlier siblings
                    siblings.append(token if not siblings else sample(q, self.generator))
                    sibling_rows.append(q)
                    q = q.clone()
                    q[siblings[-1]] = 0.0
                    total = q.sum()
                    if len(siblings) == width or total <= 0:
                        break
                    q = q / total
                rows.extend(sibling_rows)
            spine_index = len(tokens)
            tokens.extend(siblings)
            parents.extend([spine_parent] * len(siblings))
            spine_parent = spine_index
            if float(raw[token]) < self.params.stop_threshold:
                break
        cache.crop(committed)  # drop the draft's K/V: verification starts from AR's exact cache
        return Proposal(tokens=tokens, parents=parents, probs=torch.stack(rows) if rows else None)
