"""Train Kangaroo's adapter on CPU: ``decodebench-train-kangaroo`` (or
``python -m decodebench.methods.kangaroo_train``).

Usage::

    decodebench-train-kangaroo --model smollm2-135m                  # the decodebench-train corpus
    decodebench-train-kangaroo --model smollm2-135m --corpus my_prompts.txt --epochs 4

Data — self-distillation on the model's OWN greedy generations: every corpus prompt is wrapped in
the model's chat template and answered greedily by the engine's AR decode loop; one teacher-forced
forward of ``prompt + answer`` gives, at every answer position ``t``, the shallow hidden state
(output of layer ``exit_layer - 1``) — the adapter's input — and the target's final hidden state,
whose LM-head distribution is the adapter's soft label (as in the reference ``train.py``: cross
entropy against the target's distribution). The default corpus is the training pipeline's
(:mod:`decodebench.training.corpus`): prompts the model writes itself from its chat template,
checked against every evaluation set, answered greedily, cached in ``<cache>/corpora/<model>/``
and shared with ``decodebench-train`` and ADED. ``--corpus`` reads any ``.txt`` (one prompt per
line) or ``.jsonl`` (field ``prompt``, ``instruction`` or ``text``).

Training: AdamW on the adapter only (attention + 2 norms; the shallow layers and LM head are
frozen and shared), one sequence per step, linear learning-rate decay; a held-out split gives the
reported top-1 agreement (adapter argmax = target argmax, an estimate of per-token acceptance)
and picks the epoch whose weights are kept (lowest held-out loss: the self-generated corpus is
small, later epochs overfit). The adapter is saved where
the ``kangaroo`` method looks for it: ``<cache>/kangaroo/<model>/adapter.pt`` (+ ``adapter.json``
with the training time and metrics). With ``--corpus`` the answers are kept next to it
(``generations.pt``) and reused by a retraining with the same model, prompts and answer length
(``--regenerate`` recomputes either corpus): generation is most of the cost on a CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from decodebench.config import default_cache_dir
from decodebench.engine.backbone import Backbone
from decodebench.engine.decode_loop import DecodeSettings, generate, generate_batch
from decodebench.engine.drafting import Drafter
from decodebench.methods.kangaroo import KangarooAdapter, adapter_path, save_adapter
from decodebench.registry import DecodeBenchError
from decodebench.training.config import CorpusConfig
from decodebench.training.corpus import build_corpus


@dataclass
class TrainingSequence:
    """One self-generated text: the shallow hidden states (adapter input) and the target's final
    normed hidden states (soft-label source) at every position, and where the answer starts."""

    shallow: torch.Tensor  # (T, hidden): output of layer exit_layer - 1
    final: torch.Tensor  # (T, hidden): target's final hidden state after the final norm
    answer_start: int  # positions >= answer_start - 1 predict answer tokens (loss positions)


@dataclass
class AdapterTrainingConfig:
    exit_layer: int = 2  # paper: 2
    epochs: int = 12
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    grad_clip: float = 0.5  # reference train.py clips gradient values at 0.5
    validation_fraction: float = 0.15
    seed: int = 0


@torch.inference_mode()
def self_generate(
    backbone: Backbone,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    log: Callable[[str], None] | None = None,
    batch_size: int = 1,
) -> list[list[int]]:
    """The model's greedy answer to each prompt: the engine's AR decode loop, or its batched form
    (:func:`generate_batch`, same greedy tokens, several times the throughput on a CPU)."""
    settings = DecodeSettings(max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids)
    answers: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start : start + batch_size]]
        if len(chunk) == 1:
            answers.append(generate(backbone, Drafter(), chunk[0], settings, backbone.new_cache(512)).new_ids)
        else:
            out = generate_batch(backbone, Drafter(), chunk, settings, backbone.new_cache(512, batch_size=len(chunk)))
            answers.extend(o.new_ids for o in out.outputs)
        if log:
            log(f"generated {len(answers)}/{len(prompts)} answers")
    return answers


@torch.inference_mode()
def collect_sequences(
    backbone: Backbone, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], exit_layer: int
) -> list[TrainingSequence]:
    """Teacher-forced target forward of each ``prompt + answer`` → adapter inputs and labels."""
    sequences = []
    for prompt, answer in zip(prompts, answers):
        if not answer:
            continue
        ids = [*prompt, *answer]
        cache = backbone.new_cache(len(ids) + 8)
        out = backbone.forward(ids, cache, output_hidden_states=True, logits_rows=slice(0, 0))
        sequences.append(
            TrainingSequence(
                shallow=out.hidden_states[exit_layer].clone(), final=out.last_hidden.clone(), answer_start=len(prompt)
            )
        )
    return sequences


def _adapter_logits(adapter: KangarooAdapter, backbone: Backbone, sequence: TrainingSequence):
    """Adapter log-probs and target probs at the loss positions of one sequence."""
    hidden = sequence.shallow[None].clone()  # a normal (autograd-capable) tensor
    length = hidden.shape[1]
    positions = torch.arange(length, device=hidden.device)
    mask = backbone._block_mask(0, positions, None, None)  # None (= causal) for sdpa
    out = adapter(hidden, backbone.layer_position_embeddings(hidden, positions[None], adapter.exit_layer), mask)[0]
    rows = slice(sequence.answer_start - 1, length)
    log_q = torch.log_softmax(backbone.head(out[rows]).float(), dim=-1)
    with torch.no_grad():
        p = torch.softmax(backbone.head(sequence.final[rows].clone()).float(), dim=-1)
    return log_q, p


def evaluate(adapter: KangarooAdapter, backbone: Backbone, sequences: Sequence[TrainingSequence]) -> dict[str, float]:
    """Held-out soft cross entropy and top-1 agreement with the target (per-token acceptance)."""
    loss = agree = count = 0.0
    with torch.no_grad():
        for sequence in sequences:
            log_q, p = _adapter_logits(adapter, backbone, sequence)
            loss += float(-(p * log_q).sum())
            agree += float((log_q.argmax(-1) == p.argmax(-1)).sum())
            count += p.shape[0]
    return {"loss": loss / max(count, 1), "top1_agreement": agree / max(count, 1), "positions": int(count)}


def train_adapter(
    backbone: Backbone,
    sequences: Sequence[TrainingSequence],
    config: AdapterTrainingConfig,
    log: Callable[[str], None] | None = None,
) -> tuple[KangarooAdapter, dict]:
    """Train a fresh adapter (initialised from the target's layer ``exit_layer``) on ``sequences``.

    Returns:
        The adapter (eval mode) and metrics: held-out loss / top-1 agreement before and after.
    """
    if len(sequences) < 2:
        raise DecodeBenchError("kangaroo training needs at least 2 generated sequences")
    order = list(range(len(sequences)))
    random.Random(config.seed).shuffle(order)
    held = max(1, round(len(order) * config.validation_fraction))
    validation = [sequences[i] for i in order[:held]]
    training = [sequences[i] for i in order[held:]]
    torch.manual_seed(config.seed)
    adapter = KangarooAdapter.from_backbone(backbone, config.exit_layer)
    for parameter in backbone.model.parameters():
        parameter.requires_grad_(False)
    adapter.train()
    for parameter in adapter.parameters():
        parameter.requires_grad_(True)
    before = evaluate(adapter, backbone, validation)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    total_steps = config.epochs * len(training)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / max(total_steps, 1))
    rng = random.Random(config.seed + 1)
    best: tuple[dict, int, dict] | None = None  # (held-out metrics, epoch, weights)
    for epoch in range(config.epochs):
        rng.shuffle(training)
        epoch_loss = 0.0
        for sequence in training:
            log_q, p = _adapter_logits(adapter, backbone, sequence)
            loss = -(p * log_q).sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_value_(adapter.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            epoch_loss += float(loss.detach())
        metrics = evaluate(adapter, backbone, validation)
        if best is None or metrics["loss"] < best[0]["loss"]:  # keep the best held-out epoch
            best = (metrics, epoch + 1, copy.deepcopy(adapter.state_dict()))
        if log:
            log(
                f"epoch {epoch + 1}/{config.epochs}: train loss {epoch_loss / len(training):.3f}, held-out "
                f"loss {metrics['loss']:.3f}, top-1 agreement {metrics['top1_agreement']:.3f}"
            )
    after, best_epoch, state = best
    adapter.load_state_dict(state)
    adapter.eval()
    return adapter, {
        "train_sequences": len(training),
        "validation_sequences": len(validation),
        "before": before,
        "after": after,
        "best_epoch": best_epoch,
    }


def read_corpus(path: str) -> list[str]:
    """Prompts from ``path`` (.txt: one per line; .jsonl: prompt | instruction | text)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DecodeBenchError(f"corpus file not found: {file}")
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if file.suffix != ".jsonl":
        return lines
    prompts = []
    for number, line in enumerate(lines, start=1):
        row = json.loads(line)
        text = next((row[k] for k in ("prompt", "instruction", "text") if isinstance(row.get(k), str)), None)
        if text is None:
            raise DecodeBenchError(f"{file}:{number}: no 'prompt', 'instruction' or 'text' field")
        prompts.append(text)
    return prompts


def file_corpus(args, loaded, model_config, backbone: Backbone, path: Path, log) -> tuple[list, list, float]:
    """Prompts of ``--corpus`` and the model's greedy answers (kept in ``generations.pt`` next to the
    adapter and reused by a retraining with the same model, prompts and answer length)."""
    from decodebench.runners.local import eos_token_ids
    from decodebench.tasks.prompts import encode_prompt

    texts = read_corpus(args.corpus)[: args.prompts]
    prompts = [
        encode_prompt(loaded.tokenizer, [{"role": "user", "content": text}], model_config.chat_template)
        for text in texts
    ]
    data_file = path.with_name("generations.pt")
    data_key = {"model": args.model, "prompts": prompts, "max_new_tokens": args.max_new_tokens}
    stored = torch.load(data_file, weights_only=True) if data_file.is_file() and not args.regenerate else None
    if stored is not None and stored["key"] == data_key:
        log(f"reusing {len(stored['answers'])} answers from {data_file} (--regenerate to recompute)")
        return prompts, stored["answers"], float(stored["generation_s"])
    start = time.perf_counter()
    log(f"generating {len(prompts)} greedy answers ({args.max_new_tokens} tokens max) with {args.model}")
    answers = self_generate(backbone, prompts, args.max_new_tokens, eos_token_ids(loaded), log, args.batch_size)
    generation_s = time.perf_counter() - start
    data_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": data_key, "answers": answers, "generation_s": generation_s}, data_file)
    return prompts, answers, generation_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="decodebench-train-kangaroo",
        description="Train Kangaroo's adapter on the model's own greedy generations (CPU).",
    )
    parser.add_argument("--model", default="smollm2-135m", help="catalogue model name (conf/model/)")
    parser.add_argument(
        "--corpus",
        help="prompt file (.txt one per line, .jsonl with 'prompt'); default: the "
        "decodebench-train corpus (prompts the model writes itself, cached and shared)",
    )
    parser.add_argument("--prompts", type=int, default=None, help="use N corpus prompts (default: all / 96)")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="length of each self-generated answer")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts answered together (greedy, batched AR)")
    parser.add_argument("--exit-layer", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--cache-dir", default=None, help="DecodeBench cache (default: $DECODEBENCH_CACHE)")
    parser.add_argument("--output", default=None, help="adapter file (default: <cache>/kangaroo/<model>/adapter.pt)")
    parser.add_argument(
        "--regenerate",
        action="store_true",
        help="regenerate the answers even if generations.pt next to the adapter matches",
    )
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(f"[kangaroo-train] {message}", file=sys.stderr, flush=True)

    from decodebench.models.loading import load_model, load_model_config
    from decodebench.runners.local import eos_token_ids

    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        cache_dir = args.cache_dir or default_cache_dir()
        model_config = load_model_config(args.model)
        loaded = load_model(model_config, device="cpu", dtype="float32", cache_dir=cache_dir, seed=args.seed)
        if loaded.tokenizer is None:
            raise DecodeBenchError(f"model '{args.model}' has no tokenizer to encode the corpus")
        backbone = Backbone(loaded.model)
        path = Path(args.output).expanduser() if args.output else adapter_path(cache_dir, backbone)
        if args.corpus is None:  # the training pipeline's corpus: self-written prompts, cached and shared
            backbone.model_name = args.model
            corpus_cfg = CorpusConfig(
                prompts=args.prompts or CorpusConfig.prompts,
                answer_tokens=args.max_new_tokens,
                batch_size=args.batch_size,
            )
            corpus = build_corpus(
                backbone,
                loaded.tokenizer,
                args.model,
                model_config.chat_template,
                corpus_cfg,
                eos_token_ids(loaded),
                args.seed,
                os.environ.get("DECODEBENCH_DATA"),
                cache_dir,
                args.regenerate,
            )
            prompts = [s.ids[: s.answer_start].tolist() for s in corpus.sequences]
            answers = [s.ids[s.answer_start :].tolist() for s in corpus.sequences]
            generation_s = float(corpus.info["generation_s"])
        else:
            prompts, answers, generation_s = file_corpus(args, loaded, model_config, backbone, path, log)
        sequences = collect_sequences(backbone, prompts, answers, args.exit_layer)
        config = AdapterTrainingConfig(
            exit_layer=args.exit_layer, epochs=args.epochs, learning_rate=args.lr, seed=args.seed
        )
        train_start = time.perf_counter()
        adapter, metrics = train_adapter(backbone, sequences, config, log)
        train_s = time.perf_counter() - train_start
        meta = {
            "model": args.model,
            "corpus": args.corpus or f"decodebench-train {corpus.info['key']}",
            "prompts": len(prompts),
            "answer_tokens": sum(len(a) for a in answers),
            "max_new_tokens": args.max_new_tokens,
            "generation_s": round(generation_s, 1),
            "train_s": round(train_s, 1),
            "threads": torch.get_num_threads(),
            "config": asdict(config),
            **metrics,
        }
        save_adapter(path, adapter, meta)
    except DecodeBenchError as error:
        print(f"decodebench-train-kangaroo: error: {error}", file=sys.stderr)
        return error.exit_code
    log(
        f"saved {path} (generation {generation_s:.0f} s, training {train_s:.0f} s; held-out top-1 agreement "
        f"{metrics['before']['top1_agreement']:.3f} -> {metrics['after']['top1_agreement']:.3f})"
    )
    print(json.dumps({"adapter": str(path), **meta}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
