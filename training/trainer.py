"""The one training loop of every trained drafter network (EAGLE, Medusa, Hydra).

A network implements ``loss(sequence, backbone, noise) -> (loss, Agreement)`` over one corpus
sequence and ``trainable_parameters()``; the target stays frozen. AdamW (seeded), one sequence per
step, linear learning-rate decay, gradient value clipping; after every epoch the held-out split
gives loss and top-1 agreement with the target (the drafted token equals the target's argmax: an
estimate of per-token acceptance), shown on the progress bar. The epoch with the best held-out
agreement is kept (a small self-generated corpus overfits in later epochs); when no epoch beats the
untrained network, its weights are kept and the manifest says so (``best_epoch`` 0).
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from decodebench.engine.backbone import Backbone
from decodebench.methods.eagle_net import FeatureSequence
from decodebench.registry import DecodeBenchError
from decodebench.training.config import DrafterConfig


@dataclass
class HeldOut:
    loss: float
    top1_agreement: float
    positions: int


@dataclass
class TrainingResult:
    before: HeldOut
    after: HeldOut
    best_epoch: int
    epochs_run: int
    steps: int
    train_sequences: int
    validation_sequences: int
    train_s: float
    history: list[dict[str, Any]] = field(default_factory=list)


def split(sequences: Sequence[FeatureSequence], fraction: float, seed: int) -> tuple[list, list]:
    """(training, held-out) sequences, a seeded shuffle."""
    if len(sequences) < 2:
        raise DecodeBenchError(f"training needs at least 2 corpus sequences, got {len(sequences)}")
    order = list(range(len(sequences)))
    random.Random(seed).shuffle(order)
    held = max(1, round(len(order) * fraction))
    return [sequences[i] for i in order[held:]], [sequences[i] for i in order[:held]]


def evaluate(net, backbone: Backbone, sequences: Sequence[FeatureSequence]) -> HeldOut:
    net.eval()
    loss = correct = positions = 0.0
    with torch.no_grad():
        for sequence in sequences:
            value, agreement = net.loss(sequence, backbone, noise=False)
            loss += float(value) * agreement.positions
            correct += agreement.correct
            positions += agreement.positions
    return HeldOut(loss=loss / max(positions, 1), top1_agreement=correct / max(positions, 1), positions=int(positions))


def train_network(
    net, backbone: Backbone, sequences: Sequence[FeatureSequence], cfg: DrafterConfig, seed: int, progress: bool = True
) -> TrainingResult:
    """Train ``net`` in place on ``sequences``; it ends holding the best held-out epoch's weights."""
    prepare = getattr(net, "training_sequences", None)  # networks reading more than the stored features (EAGLE-3)
    if prepare is not None:
        sequences = prepare(backbone, sequences)
    training, validation = split(sequences, cfg.validation_fraction, seed)
    torch.manual_seed(seed)
    for parameter in backbone.model.parameters():
        parameter.requires_grad_(False)
    parameters = net.trainable_parameters()
    for parameter in parameters:
        parameter.requires_grad_(True)
    before = evaluate(net, backbone, validation)
    optimizer = torch.optim.AdamW(
        parameters, lr=cfg.learning_rate, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
    )
    total = cfg.epochs * len(training)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / max(total, 1))
    rng = random.Random(seed + 1)
    best = (before, 0, copy.deepcopy(net.state_dict()))
    history: list[dict[str, Any]] = []
    start = time.perf_counter()
    deadline = start + 60 * cfg.max_minutes if cfg.max_minutes else None
    steps = epochs_run = 0
    bar = tqdm(total=total, desc=f"train {cfg.name}", disable=not progress)
    bar.set_postfix(held_out_top1=f"{before.top1_agreement:.3f}")
    running = None
    for epoch in range(1, cfg.epochs + 1):
        rng.shuffle(training)
        net.train()
        for sequence in training:
            loss, _ = net.loss(sequence, backbone, noise=True)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_value_(parameters, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            steps += 1
            value = float(loss.detach())
            running = value if running is None else 0.95 * running + 0.05 * value
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}", held_out_top1=f"{best[0].top1_agreement:.3f}")
            if deadline and time.perf_counter() > deadline:
                break
        epochs_run = epoch
        held = evaluate(net, backbone, validation)
        history.append(
            {
                "epoch": epoch,
                "steps": steps,
                "train_loss": running,
                "held_out_loss": held.loss,
                "held_out_top1": held.top1_agreement,
            }
        )
        if held.top1_agreement > best[0].top1_agreement:
            best = (held, epoch, copy.deepcopy(net.state_dict()))
        bar.set_postfix(loss=f"{running:.3f}", held_out_top1=f"{held.top1_agreement:.3f}")
        if deadline and time.perf_counter() > deadline:
            break
    bar.close()
    net.load_state_dict(best[2])
    net.eval()
    for parameter in parameters:
        parameter.requires_grad_(False)
    return TrainingResult(
        before=before,
        after=best[0],
        best_epoch=best[1],
        epochs_run=epochs_run,
        steps=steps,
        train_sequences=len(training),
        validation_sequences=len(validation),
        train_s=time.perf_counter() - start,
        history=history,
    )
