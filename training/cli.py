"""``decodebench-train``: the Hydra app that trains one drafter network for one target.

    decodebench-train drafter=eagle model=smollm2-135m threads=1
    decodebench-train drafter=medusa corpus.source=jsonl corpus.path=prompts.jsonl corpus.column=prompt
    decodebench-train drafter=eagle corpus.source=dataset corpus.name=HuggingFaceH4/ultrachat_200k \\
        corpus.split=train_sft corpus.column=prompt                     # online users

Steps: corpus (the target's own answers, cached per model and corpus; :mod:`.corpus`) → the draft
vocabulary when ``drafter.params.draft_vocab_size`` is set (its most frequent answer tokens) →
AdamW training (:mod:`.trainer`) → checkpoint + manifest in ``<cache>/drafters/<model>/<network>/``,
where the methods look. Bad input exits with code 2 before any model is loaded.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from decodebench.config import ConfigValueError, _build, config_error, group_choices
from decodebench.registry import DecodeBenchError, UnknownNameError, import_entry
from decodebench.training.config import TrainConfig

log = logging.getLogger("decodebench")
GROUPS = ("model", "drafter")


def to_train_config(cfg: DictConfig) -> TrainConfig:
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    data.pop("hydra", None)
    train_cfg: TrainConfig = _build(TrainConfig, data, "")
    train_cfg.drafter.network_params()  # drafter.params against the network's Params
    if getattr(import_entry(train_cfg.drafter.impl), "needs_draft_model", False) and not train_cfg.model.draft:
        raise ConfigValueError(
            f"model.draft: drafter '{train_cfg.drafter.name}' trains on a draft model's features and model "
            f"'{train_cfg.model.name}' names none; set model.draft=<catalogue model sharing its tokenizer>"
        )
    return train_cfg


def compose_train_config(overrides: Sequence[str]) -> TrainConfig:
    """The TrainConfig of CLI-style overrides, exactly as ``decodebench-train`` builds it."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException

    for arg in overrides:
        key, sep, value = arg.lstrip("+~").partition("=")
        if sep and key in GROUPS and value not in ("", "null") and value not in group_choices(key):
            raise UnknownNameError(key, value, group_choices(key))
    try:
        with initialize_config_module("decodebench.conf", version_base="1.3"):
            return to_train_config(compose("train", overrides=list(overrides)))
    except HydraException as error:
        cause = error.__cause__
        if isinstance(cause, OmegaConfBaseException):
            raise config_error(cause) from error
        raise ConfigValueError(str(error).strip()) from error


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Build (or reuse) the corpus, train the network, write checkpoint + manifest; returns the manifest."""
    import torch

    from decodebench.engine.backbone import Backbone
    from decodebench.methods.draft_heads import DraftVocab, checkpoint_dir, save_checkpoint
    from decodebench.models.loading import load_model
    from decodebench.runners.local import eos_token_ids
    from decodebench.runners.manifest import git_info
    from decodebench.training.corpus import build_corpus
    from decodebench.training.trainer import train_network

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    network_cls = import_entry(cfg.drafter.impl)
    params = cfg.drafter.network_params()
    loaded = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, cache_dir=cfg.cache_dir, seed=cfg.seed)
    if loaded.tokenizer is None:
        raise DecodeBenchError(f"model '{cfg.model.name}' has no tokenizer to build a corpus with")
    backbone = Backbone(loaded.model)
    backbone.model_name = cfg.model.name
    corpus = build_corpus(
        backbone,
        loaded.tokenizer,
        cfg.model.name,
        cfg.model.chat_template,
        cfg.corpus,
        eos_token_ids(loaded),
        cfg.seed,
        cfg.data_dir,
        cfg.cache_dir,
        cfg.regenerate,
        cfg.progress,
        cfg.engine,
    )
    vocab_size = getattr(params, "draft_vocab_size", None)
    vocab = DraftVocab.most_frequent(corpus.token_counts, vocab_size) if vocab_size else None
    extra = {"draft": load_draft(cfg, loaded)} if getattr(network_cls, "needs_draft_model", False) else {}
    torch.manual_seed(cfg.seed)
    net = network_cls(backbone, params, vocab, **extra)
    result = train_network(net, backbone, corpus.sequences, cfg.drafter, cfg.seed, cfg.progress)
    directory = checkpoint_dir(cfg.cache_dir, cfg.model.name, net.network)
    manifest = {
        "network": net.network,
        "model": cfg.model.name,
        "draft_model": cfg.model.draft if extra else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "corpus": {
            k: corpus.info[k] for k in ("key", "source", "sequences", "answer_tokens", "total_tokens", "generation_s")
        },
        "training": {
            "epochs": result.epochs_run,
            "best_epoch": result.best_epoch,
            "steps": result.steps,
            "train_s": round(result.train_s, 1),
            "threads": torch.get_num_threads(),
            "train_sequences": result.train_sequences,
            "validation_sequences": result.validation_sequences,
            "config": {k: v for k, v in asdict(cfg.drafter).items() if k != "params"},
            "params": asdict(params),
            "history": result.history,
        },
        "held_out": {"before": asdict(result.before), "after": asdict(result.after)},
        "draft_vocab_size": None if vocab is None else vocab.size,
        "git": git_info(),
        "seed": cfg.seed,
    }
    save_checkpoint(directory, net.checkpoint_state(), net.checkpoint_config(backbone), manifest)
    log.info(
        "%s drafter for %s: held-out top-1 agreement %.3f -> %.3f (%d steps, %.0f s) -> %s",
        net.network,
        cfg.model.name,
        result.before.top1_agreement,
        result.after.top1_agreement,
        result.steps,
        result.train_s,
        directory,
    )
    return {"checkpoint": str(directory), **manifest}


def load_draft(cfg: TrainConfig, target):
    """The draft model ``model.draft`` (same tokenizer as the target), for networks trained on it."""
    from decodebench.engine.backbone import Backbone
    from decodebench.models.loading import check_same_tokenizer, load_model, load_model_config

    loaded = load_model(load_model_config(cfg.model.draft), device=cfg.device, dtype=cfg.dtype, cache_dir=cfg.cache_dir)
    check_same_tokenizer(target, loaded)
    draft = Backbone(loaded.model)
    draft.model_name = cfg.model.draft
    for parameter in draft.model.parameters():
        parameter.requires_grad_(False)
    return draft


@hydra.main(config_path="pkg://decodebench.conf", config_name="train", version_base="1.3")
def hydra_app(cfg: DictConfig) -> dict | None:
    try:
        manifest = train(to_train_config(cfg))
    except DecodeBenchError as error:
        log.error("%s", error)
        sys.exit(error.exit_code)
    summary = {k: manifest[k] for k in ("checkpoint", "corpus", "held_out", "draft_vocab_size")}
    summary["training"] = {k: v for k, v in manifest["training"].items() if k not in ("history", "config", "params")}
    print(json.dumps(summary, indent=2))
    return manifest


def main(argv: list[str] | None = None) -> None:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    overrides = [
        a for a in sys.argv[1:] if "=" in a and not a.startswith("-") and not a.lstrip("+~").startswith("hydra")
    ]
    try:
        compose_train_config(overrides)
    except DecodeBenchError as error:
        print(f"decodebench-train: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    hydra_app()


if __name__ == "__main__":
    main()
