"""Load-time self-check: the engine's forward equals the HF model's own forward on this checkpoint.

Run on every loaded model before anything is timed (``runners/local.py``): a short probe goes
through the HF model (``model(ids).logits``, its own masks, rotary tables and cache-free path) and
through the engine's own layer loop as a prefill, one cached step, a cached chain and a small token
tree. The largest absolute logit difference, relative to the probe's largest logit, must stay
within the dtype's rounding tolerance; otherwise the run stops with :class:`SelfCheckError`
(exit code 2) naming the architecture and the difference. A silently wrong model (a family whose
loop misses a scale, a mask, a norm) is never timed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from decodebench.engine.backbone import Backbone, BlockLayout
from decodebench.registry import DecodeBenchError

# |engine - HF| <= TOLERANCE[dtype] * max(1, max |HF logit|). fp32 differs by summation order only
# (~1e-6 relative); half precisions by their rounding accumulated over the layers. A wrong model
# (Cohere without its logit scale: 0.73 on logits of ~1) is far above every bound.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}
PROBE_PREFIX = 16  # prefill length
PROBE_CHAIN = 3  # tokens of the cached chain after one single-token step
# the probe tree after the chain: a root with two children, one of which has a child
PROBE_TREE_PARENTS = (-1, 0, 0, 1)


class SelfCheckError(DecodeBenchError):
    """The engine's forward differs from the HF model's own forward beyond the dtype's tolerance."""


@dataclass
class SelfCheckResult:
    """Goes to the run manifest (``engine.<model>.self_check``)."""

    architecture: str
    dtype: str
    max_abs_diff: float  # over prefill, cached step, chain and tree logits
    tolerance: float  # absolute bound the difference was held to
    max_abs_logit: float  # largest |HF logit| of the probe (the scale the tolerance is relative to)
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _probe_ids(vocab: int) -> tuple[list[int], list[int]]:
    """A fixed, model-independent probe: the sequence and the tree's tokens."""
    sequence = [(7 * i + 3) % vocab for i in range(PROBE_PREFIX + 1 + PROBE_CHAIN)]
    tree = [(11 * i + 5) % vocab for i in range(len(PROBE_TREE_PARENTS))]
    return sequence, tree


def _hf_logits(backbone: Backbone, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        out = backbone.model(torch.tensor([ids], device=backbone.device), use_cache=False)
    return out.logits[0].float()


def _leaf_paths(parents: tuple[int, ...]) -> list[list[int]]:
    """Node indices from the root to each leaf: one HF forward per leaf covers every node."""
    paths: list[list[int]] = []
    for node, parent in enumerate(parents):
        paths.append([*(paths[parent] if parent >= 0 else []), node])
    return [path for node, path in enumerate(paths) if node not in parents]


def self_check(backbone: Backbone) -> SelfCheckResult:
    """Compare the engine's forward with the HF model's own on the probe.

    Raises:
        SelfCheckError: a difference beyond ``TOLERANCE[dtype]`` (relative to the probe's logits).
    """
    started = time.perf_counter()
    sequence, tree_tokens = _probe_ids(backbone.config.vocab_size)
    reference = _hf_logits(backbone, sequence)
    cache = backbone.new_cache(len(sequence) + len(tree_tokens))
    pairs = []  # (engine logits, HF logits)
    pairs.append((backbone.forward(sequence[:PROBE_PREFIX], cache).logits, reference[:PROBE_PREFIX]))
    pairs.append(
        (
            backbone.forward(sequence[PROBE_PREFIX : PROBE_PREFIX + 1], cache).logits,
            reference[PROBE_PREFIX : PROBE_PREFIX + 1],
        )
    )
    pairs.append((backbone.forward(sequence[PROBE_PREFIX + 1 :], cache).logits, reference[PROBE_PREFIX + 1 :]))
    tree = backbone.forward(tree_tokens, cache, layout=BlockLayout(parents=list(PROBE_TREE_PARENTS))).logits
    for path in _leaf_paths(PROBE_TREE_PARENTS):
        expected = _hf_logits(backbone, sequence + [tree_tokens[i] for i in path])[-len(path) :]
        pairs.append((tree[path], expected))
    diff = max((ours.float() - theirs).abs().max().item() for ours, theirs in pairs)
    scale = max(theirs.abs().max().item() for _, theirs in pairs)
    tolerance = TOLERANCE.get(backbone.dtype, TOLERANCE[torch.float32]) * max(1.0, scale)
    result = SelfCheckResult(
        architecture=backbone.config.model_type,
        dtype=str(backbone.dtype).removeprefix("torch."),
        max_abs_diff=diff,
        tolerance=tolerance,
        max_abs_logit=scale,
        seconds=round(time.perf_counter() - started, 3),
    )
    if not diff <= tolerance:  # also catches NaN
        raise SelfCheckError(
            f"engine self-check failed for architecture '{result.architecture}' ({result.dtype}): "
            f"max |logit diff| vs the HF model's own forward {diff:.4g} > tolerance {tolerance:.4g} "
            f"(logits up to {scale:.3g}); the engine would time a wrong model"
        )
    return result
