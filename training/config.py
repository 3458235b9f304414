"""Typed configuration of ``decodebench-train`` (``conf/train.yaml``), registered in Hydra's
ConfigStore like the run schema (:mod:`decodebench.config`): ``base_train`` for the primary config,
``drafter/base_drafter`` for the YAMLs of ``conf/drafter/``. A drafter network's own settings
(``drafter.params``) are checked against its ``Params`` dataclass, the one source of their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from decodebench.config import (
    OPEN,
    EngineConfig,
    ModelConfig,
    _open_dicts,
    check,
    check_params,
    default_cache_dir,
    schema,
)
from decodebench.registry import import_entry

PROMPT_SOURCES = ("self", "jsonl", "dataset")


@dataclass
class CorpusConfig:
    """Where the prompts come from; the answers are always the target's own (greedy, batched AR)."""

    # self: Magpie-style prompts the target writes from its chat template's user prefix (offline);
    # jsonl: a local file (``path``, field ``column``); dataset: a ``datasets`` id (``name``, ``split``,
    # ``column``), e.g. anon8231489123/ShareGPT_Vicuna_unfiltered or HuggingFaceH4/ultrachat_200k online
    source: str = "self"
    path: str | None = None
    name: str | None = None
    split: str = "train"
    column: str = "prompt"
    # sized for a CPU: on 2 quiet cores SmolLM2-135M (engine.backend=tuned) writes these 1024 prompts
    # in ~4 min, answers them in ~14 and takes their features in ~6 (157k answer tokens); the retrieval
    # methods' training corpus (REST, SAM, ADED: method.params.corpus_prompts / corpus_max_new_tokens)
    # is a smaller one, 96 x 96
    prompts: int = 1024  # prompts kept (after deduplication)
    answer_tokens: int = 192  # max new tokens of each answer
    prompt_tokens: int = 32  # max tokens of a self-written prompt
    prompt_temperature: float = 1.0  # sampling of self-written prompts (Magpie: 1.0, top-p 0.99)
    prompt_top_p: float = 0.99
    batch_size: int = 32  # prompts generated together (batched AR)

    def __post_init__(self) -> None:
        check(self.source in PROMPT_SOURCES, "corpus.source", self.source, " | ".join(PROMPT_SOURCES))
        check(
            self.source != "jsonl" or bool(self.path),
            "corpus.path",
            self.path,
            "a .jsonl file when corpus.source=jsonl",
        )
        check(
            self.source != "dataset" or bool(self.name),
            "corpus.name",
            self.name,
            "a datasets id when corpus.source=dataset",
        )
        for key in ("prompts", "answer_tokens", "prompt_tokens", "batch_size"):
            check(getattr(self, key) >= 1, f"corpus.{key}", getattr(self, key), ">= 1")
        check(self.prompt_temperature > 0, "corpus.prompt_temperature", self.prompt_temperature, "> 0")
        check(0 < self.prompt_top_p <= 1, "corpus.prompt_top_p", self.prompt_top_p, "(0, 1]")


@schema("drafter")
@dataclass
class DrafterConfig:
    """A trainable drafter network (``impl``: its class) and how it is trained (AdamW)."""

    name: str = "eagle"
    impl: str = "decodebench.methods.eagle_net:EagleNet"
    params: dict[str, Any] = field(default_factory=dict, metadata=OPEN)  # the network's Params
    epochs: int = 4
    learning_rate: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    grad_clip: float = 0.5  # gradient value clipping (EAGLE / Kangaroo reference)
    validation_fraction: float = 0.1  # held-out sequences for the agreement / best-epoch choice
    max_minutes: float | None = None  # stop training after this long (the best epoch so far is kept)

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "drafter.epochs", self.epochs, ">= 1")
        check(self.learning_rate > 0, "drafter.learning_rate", self.learning_rate, "> 0")
        check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "drafter.betas",
            self.betas,
            "two values in [0, 1)",
        )
        check(0 < self.validation_fraction < 1, "drafter.validation_fraction", self.validation_fraction, "(0, 1)")
        check(self.max_minutes is None or self.max_minutes > 0, "drafter.max_minutes", self.max_minutes, "> 0 or null")

    def network_params(self) -> Any:
        """The network's ``Params`` from ``params`` (unknown names and wrong types are errors)."""
        cls = import_entry(self.impl).Params
        return cls(**check_params(cls, self.params, "drafter.params", "parameter", f"drafter '{self.name}'"))


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    drafter: DrafterConfig = field(default_factory=DrafterConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    # the backend that generates the corpus (batched AR + one teacher-forced forward per sequence),
    # as a run's engine.backend; training itself runs the eager layers (autograd through the frozen
    # target where a network needs it)
    engine: EngineConfig = field(default_factory=EngineConfig)
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    data_dir: str | None = None  # evaluation sets the corpus must not overlap
    cache_dir: str | None = None
    results_dir: str = "results"
    regenerate: bool = False  # rebuild the corpus even if the cache holds it
    progress: bool = True

    def __post_init__(self) -> None:
        check(self.threads is None or self.threads >= 1, "threads", self.threads, ">= 1 or null")
        check(self.dtype == "float32", "dtype", self.dtype, "float32 (drafters train in fp32)")
        if self.cache_dir is None:
            self.cache_dir = default_cache_dir()


ConfigStore.instance().store(name="base_train", node=_open_dicts(OmegaConf.structured(TrainConfig), TrainConfig))
