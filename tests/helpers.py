"""Shared test scaffolding: tiny models, test prompts, one-call decoding, and the CLI subprocess.

Import it as ``from helpers import tiny_backbone, repeating_prompts, decode, run_cli`` — the project
runs pytest with ``--import-mode=importlib``, so tests/conftest.py puts tests/ on ``sys.path``.
The shared *fixtures* built on these (``backbone``, ``ar_outputs``, ``one_thread``) are in
tests/conftest.py, section "shared test scaffolding".

Everything here is deterministic: the same call gives the same model weights and prompts, so
expectations written against them stay valid.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from decodebench.config import ModelConfig
from decodebench.engine.backbone import Backbone
from decodebench.engine.decode_loop import DecodeSettings, GenerationOutput, generate
from decodebench.engine.revision import engine_revision
from decodebench.engine.sampling import SamplingParams, logits_to_probs
from decodebench.models.tiny import build_tiny
from decodebench.records import Record

# --- tiny models -------------------------------------------------------------------------------
VOCAB = 101
#: the field a hand-written verify-latency curve needs to be read (curves of other engine revisions are not)
REVISION = {"engine_revision": engine_revision()}
#: The tiny random model of the method tests (3 layers, GQA 4/2 heads, 101-token vocabulary).
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    initializer_range=0.1,
)
#: The architectures the ``backbone`` fixture runs every test on.
ARCHS = ("llama", "qwen2")


def tiny_backbone(arch: str = "llama", **overrides) -> Backbone:
    """The TINY model (random weights, seed 0) of ``arch``, named ``tiny-<arch>``; ``overrides``
    replace TINY's sizes (e.g. ``num_hidden_layers=4``)."""
    config = ModelConfig(name=f"tiny-{arch}", source="tiny", architecture=arch, tiny={**TINY, **overrides})
    return Backbone(build_tiny(config, seed=0))


def damped_tiny(
    arch: str = "llama",
    layers: int = 6,
    vocab: int = VOCAB,
    damped: slice = slice(2, None),
    factor: float = 0.1,
    seed: int = 0,
) -> Backbone:
    """A tiny random model (named ``tiny``, max 512 positions) whose ``damped`` layers barely change
    the residual stream (their attention output and down projections scaled by ``factor``), so an
    early exit or a skipped layer often agrees with the full model: drafts are both accepted and
    rejected."""
    sizes = {**TINY, "vocab_size": vocab, "num_hidden_layers": layers, "max_position_embeddings": 512}
    model = build_tiny(ModelConfig(name="tiny", source="tiny", architecture=arch, tiny=sizes), seed)
    with torch.no_grad():
        for layer in model.model.layers[damped]:
            layer.self_attn.o_proj.weight.mul_(factor)
            layer.mlp.down_proj.weight.mul_(factor)
    return Backbone(model)


def tiny_pair(
    arch: str = "llama",
    vocab: int = VOCAB,
    noise: float = 0.05,
    layers: int = 3,
    seed: int = 0,
    lm_head_scale: float | None = None,
) -> tuple[Backbone, Backbone]:
    """``(target, draft)`` for draft-model methods: a tiny random target (named ``target``, built with
    ``seed``, max 512 positions) and a draft that is the target with relative weight noise ``noise``
    (close enough that drafts are often, but not always, accepted). ``lm_head_scale`` multiplies the
    target's LM head first (sharper next-token distributions)."""
    sizes = {**TINY, "vocab_size": vocab, "num_hidden_layers": layers, "max_position_embeddings": 512}
    target = build_tiny(ModelConfig(name="target", source="tiny", architecture=arch, tiny=sizes), seed)
    if lm_head_scale is not None:
        with torch.no_grad():
            target.lm_head.weight.mul_(lm_head_scale)
    draft = copy.deepcopy(target)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for weight in draft.parameters():
            if weight.numel() > 1:
                weight.add_(torch.randn(weight.shape, generator=generator) * noise * weight.std())
    return Backbone(target), Backbone(draft)


# --- prompts -----------------------------------------------------------------------------------
def repeating_prompts(count: int = 6, vocab: int = VOCAB, seed: int = 11) -> list[list[int]]:
    """``count`` prompts with repeated n-grams (something for lookup / n-gram drafters to find):
    prompt ``i`` is ``motif + noise + motif + noise[:3] + motif`` with a random motif of ``5 + i``
    tokens and 7 noise tokens, ids in ``[3, vocab)``. The first k prompts do not depend on ``count``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        motif = torch.randint(3, vocab, (5 + i,), generator=gen).tolist()
        noise = torch.randint(3, vocab, (7,), generator=gen).tolist()
        out.append(motif + noise + motif + noise[:3] + motif)
    return out


def random_prompts(count: int, vocab: int = VOCAB, length: int = 12, seed: int = 5) -> list[list[int]]:
    """``count`` uniformly random prompts of ``length`` ids in ``[3, vocab)`` (draft-model tests)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=generator).tolist() for _ in range(count)]


# --- decoding ----------------------------------------------------------------------------------
def decode(
    backbone: Backbone,
    drafter,
    prompt: Sequence[int],
    max_new_tokens: int = 48,
    sampling: SamplingParams | None = None,
    generator: torch.Generator | None = None,
    *,
    seed: int | None = None,
    eos: Sequence[int] = (),
    setup: bool = False,
    cache=None,
) -> GenerationOutput:
    """One :func:`generate` call on ``cache`` (default: a fresh one, block 16): greedy unless ``sampling`` is given;
    ``seed`` makes a fresh ``torch.Generator`` (instead of passing ``generator``); ``eos`` are the
    stop ids. The drafter is set up first only with ``setup=True`` (otherwise the caller decides when
    state is set up)."""
    if setup:
        drafter.setup(backbone)
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    settings = DecodeSettings(max_new_tokens=max_new_tokens, sampling=sampling or SamplingParams(), eos_token_ids=eos)
    return generate(backbone, drafter, prompt, settings, cache or backbone.new_cache(16), generator)


# --- distribution checks -----------------------------------------------------------------------
def stop_at_different_steps(target: Backbone, prompts: Sequence[Sequence[int]], new_tokens: int) -> DecodeSettings:
    """Greedy, ``new_tokens`` tokens, with a stop id that ends AR on ``prompts`` after as many different
    numbers of decode steps as any token can (a token AR emits in some rows, never among a row's first
    two tokens): batched decoding then sees rows leave the batch at different steps."""
    from decodebench.config import MethodConfig  # noqa: PLC0415
    from decodebench.methods import build_method  # noqa: PLC0415

    ar = build_method(MethodConfig())
    answers = [generate(target, ar, p, DecodeSettings(new_tokens), target.new_cache(16)).new_ids for p in prompts]

    def row_lengths(stop: int) -> list[int]:
        return [answer.index(stop) + 1 if stop in answer else len(answer) for answer in answers]

    candidates = sorted(
        {t for answer in answers for t in answer if all(t not in a or a.index(t) >= 2 for a in answers)}
    )
    stop = max(candidates, key=lambda token: len(set(row_lengths(token))))
    return DecodeSettings(max_new_tokens=new_tokens, eos_token_ids=(stop,))


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit (Wilson–Hilferty approximation of the p-value)."""
    keep = probs > 0
    expected = probs[keep] * counts.sum()
    statistic = float(((counts[keep] - expected) ** 2 / expected).sum())
    dof = int(keep.sum()) - 1
    z = ((statistic / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


@torch.inference_mode()
def exact_second_and_third(target: Backbone, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """Exact target distribution of the 2nd and 3rd generated tokens, ``(vocab * vocab,)``:
    P(t2, t3) = Σ_t1 p(t1 | prompt) p(t2 | prompt, t1) p(t3 | prompt, t1, t2)."""
    vocab = target.config.vocab_size
    first = logits_to_probs(target.model(torch.tensor([prompt])).logits[0, -1], params)
    grid = torch.tensor([prompt + [a, b] for a in range(vocab) for b in range(vocab)])
    logits = target.model(grid).logits
    second = logits_to_probs(logits[:, -2], params).view(vocab, vocab, vocab)[:, 0]  # (t1, t2)
    third = logits_to_probs(logits[:, -1], params).view(vocab, vocab, vocab)  # (t1, t2, t3)
    return (first[:, None, None] * second[:, :, None] * third).sum(0).reshape(-1)


# --- the CLI in a subprocess -------------------------------------------------------------------
CLI = [sys.executable, "-m", "decodebench.cli"]


def sample_second_and_third(
    target: Backbone, drafter, prompt: list[int], params: SamplingParams, runs: int
) -> tuple[torch.Tensor, int]:
    """Counts of the (2nd, 3rd) sampled tokens over ``runs`` seeds of ``drafter`` on a 5-token
    vocabulary (compare with :func:`exact_second_and_third`), and the drafts accepted in all."""
    counts, accepted = torch.zeros(25), 0
    for seed in range(runs):
        out = decode(target, drafter, prompt, max_new_tokens=4, sampling=params, seed=seed)
        counts[out.new_ids[1] * 5 + out.new_ids[2]] += 1
        accepted += sum(s.accepted for s in out.steps)
    return counts, accepted


def load_benchmark(name: str):
    """The module of ``benchmarks/<name>.py`` (a script folder, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(*overrides: str, cwd: Path, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m decodebench.cli *overrides`` in ``cwd`` (offline hub; ``env`` adds variables);
    returns the completed process with text stdout / stderr."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([*CLI, *overrides], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=timeout)


def embedded_method_summary(
    method: str, tmp_path: Path, data_dir: Path, *overrides: str, max_new_tokens: int = 48, timeout: float = 1800
) -> dict:
    """Run ``method`` on the embedded model (one sample per category, ``max_new_tokens`` tokens) with
    run dir ``tmp_path / "run"`` (records.jsonl is there too), assert it exits 0 (showing the tail of
    stderr otherwise), and return its summary.json. ``overrides`` are extra CLI overrides."""
    run_dir = tmp_path / "run"
    result = run_cli(
        f"method={method}",
        "task.per_category=1",
        f"gen.max_new_tokens={max_new_tokens}",
        *overrides,
        f"hydra.run.dir={run_dir}",
        f"data_dir={data_dir}",
        "progress=false",
        cwd=tmp_path,
        timeout=timeout,
        env={"DECODEBENCH_DATA": str(data_dir)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


# --- the embedded model --------------------------------------------------------------------------
EMBEDDED_PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Write a Python function that returns the n-th Fibonacci number.",
]


def embedded_lossless(method: str, cache_dir=None, prepare=None, **params) -> tuple[int, int]:
    """SmolLM2-135M (fp32, greedy), ``method`` with its cpu preset (+ ``params``) vs AR on two chat
    prompts, 48 new tokens each; returns (accepted, drafted). ``cache_dir`` goes to the drafter's
    setup; ``prepare(drafter)`` runs after it. Skips when the embedded model is not prepared."""
    import pytest

    from decodebench.config import MethodConfig, default_cache_dir
    from decodebench.methods import build_method, method_config
    from decodebench.models.embedded import embedded_model_dir, read_prepared_marker
    from decodebench.models.loading import load_model, load_model_config
    from decodebench.tasks.prompts import encode_prompt

    cfg = load_model_config("smollm2-135m")
    if read_prepared_marker(embedded_model_dir(cfg, default_cache_dir())) is None:
        pytest.skip("smollm2-135m is not prepared (make setup)")
    loaded = load_model(cfg)
    backbone = Backbone(loaded.model)
    method_cfg = method_config(method)
    method_cfg.params.update(method_cfg.presets["cpu"], **params)
    method_cfg.preset = None
    drafter = build_method(method_cfg)
    drafter.tokenizer = loaded.tokenizer  # as the runner does (retrieval corpora are text)
    drafter.setup(backbone, None if cache_dir is None else str(cache_dir))
    if prepare is not None:
        prepare(drafter)
    settings = DecodeSettings(max_new_tokens=48, eos_token_ids=[loaded.tokenizer.eos_token_id])
    accepted = drafted = 0
    for text in EMBEDDED_PROMPTS:
        prompt = encode_prompt(loaded.tokenizer, [{"role": "user", "content": text}], cfg.chat_template)
        reference = generate(backbone, build_method(MethodConfig()), prompt, settings, backbone.new_cache(256))
        ours = generate(backbone, drafter, prompt, settings, backbone.new_cache(256))
        assert ours.new_ids == reference.new_ids, text
        accepted += sum(s.accepted for s in ours.steps)
        drafted += sum(s.drafted for s in ours.steps)
    return accepted, drafted


def make_record(**fields) -> Record:
    """A Record with placeholder identity fields (task "t", model "m", sample "1", category "c",
    group "g", turn 0, seed 0) under the given ones: tests of metrics and files state only what
    they measure."""
    identity = {"task": "t", "model": "m", "sample_id": "1", "category": "c", "group": "g", "turn": 0, "seed": 0}
    return Record(**{**identity, **fields})


# -- trained drafters ---------------------------------------------------------------------------------
def save_network(net, backbone: Backbone, cache_dir) -> None:
    """A drafter network's checkpoint where its method looks: ``<cache_dir>/drafters/<model>/<network>``."""
    from decodebench.methods.draft_heads import checkpoint_dir, model_key, save_checkpoint

    save_checkpoint(
        checkpoint_dir(str(cache_dir), model_key(backbone), net.network),
        net.checkpoint_state(),
        net.checkpoint_config(backbone),
    )


def own_answers(backbone: Backbone, prompts: Sequence[Sequence[int]], answer_tokens: int, stop_ids: Sequence[int] = ()):
    """``backbone``'s greedy answers to ``prompts`` as training sequences (target features), and the
    answer tokens' counts over the vocabulary (for a reduced draft vocabulary)."""
    from decodebench.training.corpus import greedy_answers, target_features

    answers = greedy_answers(backbone, [list(p) for p in prompts], answer_tokens, 8, list(stop_ids), progress=False)
    sequences = [target_features(backbone, list(p), a) for p, a in zip(prompts, answers)]
    counts = torch.bincount(torch.tensor([t for a in answers for t in a]), minlength=backbone.config.vocab_size)
    return sequences, counts


def embedded_own_answers(texts: Sequence[str], answer_tokens: int, stop_at_eos: bool = False):
    """SmolLM2-135M (``model_name`` set) and its greedy answers to chat prompts ``texts``
    (:func:`own_answers`); skips the test when the embedded model is not prepared."""
    import pytest

    from decodebench.config import default_cache_dir
    from decodebench.models.embedded import embedded_model_dir, read_prepared_marker
    from decodebench.models.loading import load_model, load_model_config
    from decodebench.tasks.prompts import encode_prompt

    cfg = load_model_config("smollm2-135m")
    if read_prepared_marker(embedded_model_dir(cfg, default_cache_dir())) is None:
        pytest.skip("smollm2-135m is not prepared (make setup)")
    loaded = load_model(cfg)
    backbone = Backbone(loaded.model)
    backbone.model_name = "smollm2-135m"
    prompts = [encode_prompt(loaded.tokenizer, [{"role": "user", "content": t}], cfg.chat_template) for t in texts]
    stop_ids = [loaded.tokenizer.eos_token_id] if stop_at_eos else []
    return (backbone, *own_answers(backbone, prompts, answer_tokens, stop_ids))
