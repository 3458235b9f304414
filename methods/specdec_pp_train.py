"""Train SpecDec++'s acceptance head on CPU (``python -m decodebench.methods.specdec_pp_train``).

Usage::

    python -m decodebench.methods.specdec_pp_train --model qwen2.5-coder-1.5b            # draft = model.draft
    python -m decodebench.methods.specdec_pp_train --model qwen2.5-coder-1.5b --samples 64 --modes greedy

Data. Text sequences ``prompt + answer`` (default: GSM8K test problems with their reference
solutions, taken from the END of the file and never one that Spec-Bench also asks, so the
benchmark's prompts stay unseen). For every answer position ``t`` with true prefix ``x_<t``:

* the target's and the draft's next-token distributions ``p_t``, ``q_t`` (one teacher-forced
  forward of each model);
* a draft token ``y_t``: the draft's argmax (``greedy`` head) or a sample from ``q_t`` at
  ``--temperature`` (``sampling`` head);
* its label: greedy ``1[argmax p_t = y_t]``; sampling the acceptance probability
  ``min(1, p_t(y_t) / q_t(y_t))`` (a soft label, as in the paper);
* its feature: the draft's final hidden state AT ``y_t`` given the true prefix — exactly what
  the drafter sees at inference. The engine's tree attention gives all of them in ONE draft
  forward (every ``y_t`` is a leaf hanging off ``x_{t-1}``). The paper instead feeds a causal
  sequence mixing draft and target tokens (mixing ratio 0.15) because a plain causal forward
  cannot attach each draft token to its own true prefix; the tree forward removes that
  approximation.

Training: the paper's loss, soft-label binary cross-entropy with weight ``--weight-mismatch``
(paper: 6) on the rejection class, AdamW, a held-out split for the reported metrics. The head is
saved where the ``specdec_pp`` method looks for it (``<cache>/specdec_pp/<target>__<draft>/``).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from decodebench.config import default_cache_dir
from decodebench.engine.backbone import Backbone, BlockLayout
from decodebench.engine.sampling import SamplingParams, logits_to_probs
from decodebench.methods.specdec_pp import MODES, AcceptanceHead, head_path, save_head
from decodebench.methods.sps import fit_vocab
from decodebench.registry import DecodeBenchError


@dataclass
class TrainingSequence:
    """One text: the prompt (context only) and the answer (labelled positions)."""

    prompt_ids: list[int]
    answer_ids: list[int]


@dataclass
class HeadTrainingConfig:
    num_layers: int = 3  # paper: 3 residual blocks
    weight_mismatch: float = 6.0  # paper: BCE weight of the rejection class
    epochs: int = 30
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 256
    validation_fraction: float = 0.1
    seed: int = 0


@torch.inference_mode()
def collect_examples(
    target: Backbone,
    draft: Backbone,
    sequences: Sequence[TrainingSequence],
    modes: Sequence[str] = MODES,
    temperature: float = 1.0,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Features and labels for each mode (see module docstring); ``log`` gets one line per text.

    Returns:
        ``{mode: (features (n, draft_hidden), labels (n,))}``; labels in [0, 1].
    """
    generator = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=temperature)
    out: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {mode: ([], []) for mode in modes}
    vocab = target.lm_head.out_features
    started = time.perf_counter()
    for number, sequence in enumerate(sequences, 1):
        prefix = sequence.prompt_ids + sequence.answer_ids
        first, count = len(sequence.prompt_ids) - 1, len(sequence.answer_ids)
        rows = slice(first, first + count)  # row t predicts answer token t
        target_logits = target.forward(prefix, target.new_cache(len(prefix)), logits_rows=rows).logits
        draft_logits = fit_vocab(draft.forward(prefix, draft.new_cache(len(prefix)), logits_rows=rows).logits, vocab)
        drafted: dict[str, list[int]] = {}
        labels: dict[str, torch.Tensor] = {}
        if "greedy" in modes:
            guess = draft_logits.argmax(-1)
            drafted["greedy"] = guess.tolist()
            labels["greedy"] = (target_logits.argmax(-1) == guess).float()
        if "sampling" in modes:
            p, q = logits_to_probs(target_logits, params), logits_to_probs(draft_logits, params)
            guess = torch.multinomial(q, 1, generator=generator)[:, 0]
            drafted["sampling"] = guess.tolist()
            ratio = p.gather(-1, guess[:, None])[:, 0] / q.gather(-1, guess[:, None])[:, 0]
            labels["sampling"] = ratio.clamp(max=1.0)
        # one tree forward: the true sequence as a chain, each mode's y_t a leaf under x_{t-1}
        tokens, parents = list(prefix), list(range(-1, len(prefix) - 1))
        for mode in modes:
            tokens += drafted[mode]
            parents += [first + t for t in range(count)]
        hidden = draft.forward(
            tokens, draft.new_cache(len(tokens)), layout=BlockLayout(parents=parents), logits_rows=[]
        ).last_hidden
        for index, mode in enumerate(modes):
            start = len(prefix) + index * count
            out[mode][0].append(hidden[start : start + count].float().clone())
            out[mode][1].append(labels[mode])
        if log is not None:
            log(
                f"[specdec_pp] text {number}/{len(sequences)}: {count} positions "
                f"({time.perf_counter() - started:.0f} s)"
            )
    return {mode: (torch.cat(features), torch.cat(values)) for mode, (features, values) in out.items()}


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, weight_mismatch: float) -> torch.Tensor:
    """Soft-label BCE, the rejection term weighted by ``weight_mismatch``, normalised by the
    total weight (the paper's loss)."""
    log_accept = nn.functional.logsigmoid(logits)
    log_reject = nn.functional.logsigmoid(-logits)
    loss = -(labels * log_accept + weight_mismatch * (1 - labels) * log_reject)
    return loss.sum() / (labels.sum() + weight_mismatch * (1 - labels).sum()).clamp(min=1e-8)


def train_head(
    features: torch.Tensor, labels: torch.Tensor, config: HeadTrainingConfig
) -> tuple[AcceptanceHead, dict[str, float]]:
    """Fit an :class:`AcceptanceHead` on ``features (n, hidden)`` / ``labels (n,)``.

    Returns:
        The head (eval mode) and held-out metrics: ``val_loss``, ``val_mean_label``,
        ``val_mean_predicted`` (of the weighted-loss head, biased low by design), ``val_auc``.
    """
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(labels), generator=generator)
    n_val = max(1, int(len(labels) * config.validation_fraction))
    val, train = order[:n_val], order[n_val:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        head = AcceptanceHead(features.shape[1], config.num_layers)
    optimiser = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    for _ in range(config.epochs):
        head.train()
        shuffled = train[torch.randperm(len(train), generator=generator)]
        for start in range(0, len(shuffled), config.batch_size):
            batch = shuffled[start : start + config.batch_size]
            loss = weighted_bce(head(features[batch]), labels[batch], config.weight_mismatch)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    head.eval()
    with torch.no_grad():
        val_logits = head(features[val])
        metrics = {
            "val_loss": float(weighted_bce(val_logits, labels[val], config.weight_mismatch)),
            "val_mean_label": float(labels[val].mean()),
            "val_mean_predicted": float(torch.sigmoid(val_logits).mean()),
            "val_auc": auc(torch.sigmoid(val_logits), labels[val] >= 0.5),
        }
    return head, metrics


def auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve (probability a positive outranks a negative); NaN if one class."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    wins = (pos[:, None] > neg[None, :]).float().mean() + 0.5 * (pos[:, None] == neg[None, :]).float().mean()
    return float(wins)


# -- data ------------------------------------------------------------------------------------------
GSM8K_FILE = "gsm8k/test.jsonl"
SPEC_BENCH_FILE = "spec_bench/question.jsonl"


def gsm8k_sequences(
    tokenizer, count: int, max_answer_tokens: int, data_dir: str | None, cache_dir: str, chat_template: bool = True
) -> list[TrainingSequence]:
    """``count`` GSM8K problems from the end of the test file (none that Spec-Bench asks), as
    chat prompts + reference solutions (calculator annotations ``<<…>>`` removed, EOS appended)."""
    from decodebench.tasks.data import load_jsonl_records, resolve_data_file
    from decodebench.tasks.prompts import encode_prompt

    rows = load_jsonl_records(resolve_data_file(GSM8K_FILE, data_dir, cache_dir), cache_dir)
    held_out: set[str] = set()
    try:
        for row in load_jsonl_records(resolve_data_file(SPEC_BENCH_FILE, data_dir, cache_dir), cache_dir):
            held_out.update(" ".join(turn.split()) for turn in row["turns"])
    except DecodeBenchError:
        pass  # no Spec-Bench file: nothing to keep apart
    sequences = []
    for row in reversed(rows):
        if " ".join(row["question"].split()) in held_out:
            continue
        prompt = encode_prompt(tokenizer, [{"role": "user", "content": row["question"]}], chat_template)
        answer = re.sub(r"<<[^>]*>>", "", row["answer"])
        answer_ids = tokenizer.encode(answer, add_special_tokens=False)[:max_answer_tokens]
        if tokenizer.eos_token_id is not None and len(answer_ids) < max_answer_tokens:
            answer_ids.append(int(tokenizer.eos_token_id))
        sequences.append(TrainingSequence(prompt, answer_ids))
        if len(sequences) == count:
            break
    return sequences


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m decodebench.methods.specdec_pp_train",
        description="Train SpecDec++ acceptance heads for a target/draft pair on CPU.",
    )
    parser.add_argument("--model", required=True, help="target catalogue model (conf/model/<name>.yaml)")
    parser.add_argument("--draft", default=None, help="draft catalogue model (default: the target's model.draft)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--samples", type=int, default=32, help="training texts (GSM8K problems)")
    parser.add_argument("--max-answer-tokens", type=int, default=192)
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling head: the decoding temperature")
    defaults = HeadTrainingConfig()
    parser.add_argument("--layers", type=int, default=defaults.num_layers)
    parser.add_argument("--weight-mismatch", type=float, default=defaults.weight_mismatch)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--lr", type=float, default=defaults.learning_rate)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data-dir", default=None, help="folder holding gsm8k/test.jsonl (else $DECODEBENCH_DATA)")
    parser.add_argument("--cache-dir", default=default_cache_dir())
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from decodebench.models.loading import check_same_tokenizer, load_model, load_model_config

    try:
        target_cfg = load_model_config(args.model)
        draft_name = args.draft or target_cfg.draft
        if not draft_name:
            raise DecodeBenchError(f"model '{args.model}' names no draft (model.draft); pass --draft NAME")
        started = time.perf_counter()
        target = load_model(target_cfg, cache_dir=args.cache_dir)
        draft = load_model(load_model_config(draft_name), cache_dir=args.cache_dir)
        check_same_tokenizer(target, draft)
        if target.tokenizer is None:
            raise DecodeBenchError("training texts need a tokenizer; tiny random models have none")
        sequences = gsm8k_sequences(
            target.tokenizer,
            args.samples,
            args.max_answer_tokens,
            args.data_dir,
            args.cache_dir,
            target_cfg.chat_template,
        )
    except DecodeBenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    target_backbone, draft_backbone = Backbone(target.model), Backbone(draft.model)
    print(
        f"[specdec_pp] {len(sequences)} texts, {sum(len(s.answer_ids) for s in sequences)} answer tokens; "
        f"collecting features ({args.model} / {draft_name})",
        flush=True,
    )
    examples = collect_examples(
        target_backbone,
        draft_backbone,
        sequences,
        args.modes,
        args.temperature,
        args.seed,
        log=lambda line: print(line, flush=True),
    )
    collected = time.perf_counter()
    config = HeadTrainingConfig(
        num_layers=args.layers,
        weight_mismatch=args.weight_mismatch,
        epochs=args.epochs,
        learning_rate=args.lr,
        seed=args.seed,
    )
    for mode, (features, labels) in examples.items():
        head, metrics = train_head(features, labels, config)
        path = head_path(args.cache_dir, target_backbone, draft_backbone, mode)
        meta = {
            "target": args.model,
            "draft": draft_name,
            "mode": mode,
            "temperature": args.temperature if mode == "sampling" else 0.0,
            "data": f"{GSM8K_FILE} (last {len(sequences)} problems not in Spec-Bench)",
            "examples": int(len(labels)),
            "training": asdict(config),
            **metrics,
        }
        save_head(path, head, meta)
        print(
            f"[specdec_pp] {mode}: {len(labels)} examples, mean label {metrics['val_mean_label']:.3f}, "
            f"held-out loss {metrics['val_loss']:.3f}, AUC {metrics['val_auc']:.3f} -> {path}",
            flush=True,
        )
    print(
        f"[specdec_pp] done: features {collected - started:.0f} s (incl. loading), "
        f"training {time.perf_counter() - collected:.0f} s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
