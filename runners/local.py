"""The local runner: load the model once, warm up, decode every sample × turn, write the run dir.

By default the AR baseline decodes the same prompts in the same process, interleaved per sample
(baseline first), so speedups never mix machines or thermal states; with ``shard=i/n`` the run
(and its baseline) decodes only its slice. ``baseline=shared`` measures no baseline here: the
report pairs the run with the sweep's ``method=ar`` run of the same ``baseline_key`` and node type.

With ``gen.num_samples`` n > 1 every selected problem becomes n samples decoded back to back
(:func:`repeat_samples`: ``<id>#0`` .. ``<id>#n-1``, each with its own RNG stream from the run seed,
the same for the baseline and the method), so a method that remembers a problem (STAND's
``scope: problem``) drafts sample i from samples 0 .. i-1; a shard keeps a problem's samples together.

Each (sample, turn, role) becomes one flushed record. Rerunning the same directory with the same
config (hash in ``manifest.json``) skips it when ``summary.json`` exists and otherwise resumes
after the last complete record; a changed config or ``overwrite=true`` starts over (except in a
SLURM task that was requeued after preemption or timeout: it resumes its own records). Drafters that
learn across prompts (``per_task`` state, STAND's memory of a problem's earlier samples) restart from
their initial state on resume: their lossless outputs are unchanged, their acceptance after the
resume point may differ.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from decodebench.config import (
    ConfigValueError,
    MethodConfig,
    ModelConfig,
    RunConfig,
    parse_shard,
    validate_before_loading,
)
from decodebench.engine.backbone import Backbone
from decodebench.engine.backends import apply_backend
from decodebench.engine.decode_loop import DecodeSettings, GenerationOutput, generate, generate_batch
from decodebench.engine.drafting import Drafter, forget_row_drafters, row_copy
from decodebench.engine.memory import peak_memory, reset_peak_memory
from decodebench.engine.profile import ensure_latency_curve, load_latency_curve, stored_curve_path
from decodebench.engine.sampling import SamplingParams
from decodebench.engine.self_check import self_check
from decodebench.methods import build_method
from decodebench.models.loading import (
    LoadedModel,
    available_models,
    check_same_tokenizer,
    draft_model_config,
    hf_location,
    load_model,
)
from decodebench.records import Record, first_divergence, ids_sha, sample_id_of, summarize, token_match_rate
from decodebench.runners.manifest import build_manifest, config_hash, slurm_info, utc_now
from decodebench.runners.run_dir import CONFIG_SCHEMA, LATENCY_CURVE, MANIFEST, SUMMARY, RunDirectory, check_schema
from decodebench.runners.wandb_logger import log_run
from decodebench.tasks import build_task
from decodebench.tasks.base import Sample, Task, TurnSettings
from decodebench.tasks.prompts import encode_prompt

log = logging.getLogger("decodebench")

BASELINE_CONFIG = MethodConfig(name="ar", impl="decodebench.methods.ar:AutoregressiveDrafter")


@dataclass
class Contender:
    """A method taking part in the run: the measured method or the same-process AR baseline."""

    role: str  # "method" | "baseline"
    label: str
    drafter: Drafter
    audit_lossless: bool  # compare its greedy output with the baseline's


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    records: list[Record]


def eos_token_ids(loaded: LoadedModel) -> list[int]:
    ids: set[int] = set()
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    for value in configured if isinstance(configured, list) else [configured]:
        if value is not None:
            ids.add(int(value))
    if loaded.tokenizer is not None and loaded.tokenizer.eos_token_id is not None:
        ids.add(int(loaded.tokenizer.eos_token_id))
    return sorted(ids)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def select_shard(samples: list[Sample], shard: str | None) -> list[Sample]:
    """Samples ``i, i+n, i+2n, ...`` for ``shard="i/n"`` (strided, so every shard gets a mix of
    categories and similar work); all samples when ``shard`` is None."""
    spec = parse_shard(shard)
    return samples if spec is None else samples[spec[0] :: spec[1]]


def repeat_samples(problems: list[Sample], num_samples: int) -> list[Sample]:
    """Each problem ``num_samples`` times in a row (``gen.num_samples``): sample ids
    ``<id>#0`` .. ``<id>#n-1`` with their ``sample_index``; the problems themselves when n = 1."""
    if num_samples == 1:
        return problems
    return [
        dataclasses.replace(problem, sample_id=sample_id_of(problem.sample_id, index), sample_index=index)
        for problem in problems
        for index in range(num_samples)
    ]


def record_generator(seed: int, sample_id: str, turn: int, device: torch.device) -> torch.Generator:
    """Per-record RNG: sampling runs are reproducible and independent of the sample order; every
    sample of a problem (``<id>#<i>``) gets its own stream, the baseline and the method the same one."""
    generator = torch.Generator(device=device)
    generator.manual_seed(zlib.crc32(f"{seed}/{sample_id}/{turn}".encode()))
    return generator


class Runner:
    def __init__(self, cfg: RunConfig, resolved_config: dict[str, Any]):
        self.cfg = cfg
        self.resolved_config = resolved_config
        self.run_dir = RunDirectory(cfg.run_dir or Path(cfg.results_dir) / "run")
        self.sampling = SamplingParams(cfg.gen.temperature, cfg.gen.top_p, cfg.gen.top_k)
        self.engine_info: dict[str, dict] = {}  # model name -> BackendInfo of its Backbone

    # -- setup -----------------------------------------------------------------------------------
    def _contenders(self) -> list[Contender]:
        method = Contender(
            role="method",
            label=self.cfg.method.label(self.cfg.device),
            drafter=build_method(self.cfg.method, self.cfg.device),
            audit_lossless=self.cfg.method.lossless and self.sampling.greedy,
        )
        if self.cfg.baseline != "ar" or self.cfg.method.name == "ar":
            return [method]
        baseline = Contender("baseline", "ar", build_method(BASELINE_CONFIG, self.cfg.device), False)
        return [baseline, method]

    def _decode_settings(
        self, loaded: LoadedModel, max_new_tokens: int, turn: TurnSettings = TurnSettings()
    ) -> DecodeSettings:
        """The run's generation settings plus what the task asks for this turn (Task.turn_settings)."""
        return DecodeSettings(
            max_new_tokens=max_new_tokens,
            sampling=self._sampling(turn),
            eos_token_ids=eos_token_ids(loaded) if self.cfg.gen.stop_on_eos else (),
            stop_strings=[*self.cfg.gen.stop_strings, *turn.stop_strings],
            tokenizer=loaded.tokenizer,
        )

    def _sampling(self, turn: TurnSettings) -> SamplingParams:
        """The run's sampling, at the task's temperature for this turn when it sets one (MT-Bench)."""
        return (
            self.sampling
            if turn.temperature is None
            else dataclasses.replace(self.sampling, temperature=turn.temperature)
        )

    # -- main ------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        # Validate everything that can fail on user input (method params, data, model) BEFORE the
        # run directory is touched: a bad invocation never deletes records already computed.
        validate_before_loading(cfg)  # draft model, batching, device
        contenders = self._contenders()
        self._check_models()
        digest = config_hash(self.resolved_config)
        previous = self.run_dir.read_json(MANIFEST)
        # a requeued SLURM task (preemption, timeout) resumes its own records even with overwrite=true
        overwrite = cfg.overwrite and int((slurm_info() or {}).get("restart_count") or 0) == 0
        if not overwrite:
            check_schema(previous, self.run_dir.path)  # another schema's records are never resumed or cleared
        restart = overwrite or bool(previous and previous.get("config_hash") != digest)
        finished_summary = None if restart else self.run_dir.read_json(SUMMARY)
        if finished_summary is not None:
            done = self.run_dir.existing_records()
            log.info("%s is complete (%d records): skipped; overwrite=true recomputes it", self.run_dir.path, len(done))
            return RunResult(self.run_dir.path, finished_summary, done)

        task = build_task(cfg.task, data_dir=cfg.data_dir, cache_dir=cfg.cache_dir)
        problems = select_shard(task.load_samples(), cfg.shard)  # a problem's samples stay in one shard
        samples = repeat_samples(problems, cfg.gen.num_samples)
        log.info(
            "task %s%s: %d samples%s, %d turns",
            task.name,
            f" shard {cfg.shard}" if cfg.shard else "",
            len(samples),
            f" ({len(problems)} problems x {cfg.gen.num_samples})" if cfg.gen.num_samples > 1 else "",
            sum(len(s.turns) for s in samples),
        )
        reset_peak_memory(cfg.device)
        loaded = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, cache_dir=cfg.cache_dir, seed=cfg.seed)
        backbone = self._backbone(loaded)
        needs_draft = any(c.drafter.needs_draft_model for c in contenders)
        draft = self._load_draft(loaded) if needs_draft else None
        for contender in contenders:
            if contender.drafter.needs_draft_model:
                contender.drafter.attach_draft(draft)
        curve = None
        if any(c.drafter.reads_latency_curve() for c in contenders):  # a cpu preset sizes drafts from it
            curve = ensure_latency_curve(backbone, cfg.cache_dir, draft=draft)
        for contender in contenders:
            contender.drafter.tokenizer = loaded.tokenizer
            contender.drafter.setup(backbone, cfg.cache_dir)

        if restart:
            if previous and not overwrite:
                log.warning("config changed since the records in %s were written: starting over", self.run_dir.path)
            self.run_dir.clear()
        done = self.run_dir.existing_records()
        self.run_dir.rewrite_records(done)  # drops a torn last line before appending
        if done:
            log.info("%s: resuming after %d records", self.run_dir.path, len(done))
        cache = backbone.new_cache(2048)

        manifest = build_manifest(
            self.resolved_config,
            cfg.device,
            cfg.seed,
            {
                "model": loaded.info,
                "method": contenders[-1].label,
                "method_preset": cfg.method.resolved_preset(cfg.device),
                "method_params": cfg.method.resolved_params(cfg.device),
                "method_pinned": cfg.method.pinned,
                "baseline": cfg.baseline,
                "baseline_key": cfg.baseline_key,
                "shard": cfg.shard,
                "task_samples": len(samples),
                "task_problems": len(problems),
                "resumed_records": len(done),
                "config_schema": CONFIG_SCHEMA,
                "engine": self.engine_info,
                "latency_curve": curve.to_dict() if curve else None,
            },
        )
        self.run_dir.write_config(self.resolved_config)
        self.run_dir.write_json(MANIFEST, manifest)
        self._save_latency_curve(loaded)

        self._warm_up(task, samples, loaded, backbone, contenders, cache)
        for contender in contenders:
            contender.drafter.reset_state()
            forget_row_drafters(contender.drafter)  # a batch's row copies restart from the reset state
        records = list(done)
        finished = {(r.role, r.sample_id, r.turn) for r in done}
        total = sum(len(s.turns) for s in samples) * len(contenders)
        progress = tqdm(
            total=total,
            initial=len(finished),
            desc=contenders[-1].label,
            unit="gen",
            disable=not cfg.progress,
            dynamic_ncols=True,
        )
        if cfg.gen.batch_size > 1:  # batched (speculative) decoding; still one record per (sample, turn, role)
            self._decode_batches(task, samples, loaded, backbone, contenders, records, finished, progress)
        for sample in samples if cfg.gen.batch_size == 1 else []:
            for contender in contenders:
                answers = [
                    r.output_text or ""
                    for r in sorted(
                        (r for r in done if r.role == contender.role and r.sample_id == sample.sample_id),
                        key=lambda r: r.turn,
                    )
                ]
                for turn in range(len(sample.turns)):
                    if (contender.role, sample.sample_id, turn) in finished:
                        continue
                    turn_settings = task.turn_settings(sample, turn)
                    record = self._decode_turn(
                        task, sample, turn, answers, loaded, backbone, contender, cache, turn_settings
                    )
                    self._audit(record, records, self._sampling(turn_settings).greedy)
                    self.run_dir.append_record(record)
                    records.append(record)
                    progress.update(1)
                    if record.error:
                        log.error("sample %s turn %d (%s): %s", sample.sample_id, turn, contender.label, record.error)
                        break  # later turns need this answer
                    answers.append(record.output_text)
                    progress.set_postfix(tok_s=f"{record.tokens_per_s:.1f}")
        progress.close()
        for contender in contenders:
            contender.drafter.finish()

        summary = self._summarize(records, contenders)
        self.run_dir.write_json(SUMMARY, summary)
        manifest["finished"] = utc_now()
        manifest["memory"] = peak_memory(cfg.device)  # peak RSS; on CUDA peak allocated / reserved bytes
        self.run_dir.write_json(MANIFEST, manifest)
        if cfg.logger.name == "wandb":
            log_run(
                cfg.logger,
                self.run_dir.path,
                self.resolved_config,
                records,
                summary,
                tags=[cfg.method.name, contenders[-1].label, task.name, cfg.model.name],
            )
        return RunResult(self.run_dir.path, summary, records)

    def _check_models(self) -> None:
        """Before any data or model is loaded: ``model.id`` / ``model.draft_id`` (``model=hf``) name an
        existing directory or a hub id (``validate_before_loading`` checked that a draft-model method has
        its draft)."""
        cfg = self.cfg
        for model_id in (cfg.model.id, cfg.model.draft_id) if cfg.model.source == "hf" else ():
            if model_id:
                hf_location(model_id)

    def _draft_config(self) -> ModelConfig:
        """The draft of ``model.draft`` (a catalogue name) or ``model.draft_id`` (``model=hf``).

        Raises:
            ConfigValueError: the draft-model method has no draft model.
        """
        cfg = self.cfg
        draft = draft_model_config(cfg.model)
        if draft is None:
            where = (
                "set model.draft_id to the draft's hub id or local directory (same tokenizer as the target)"
                if cfg.model.source == "hf"
                else f"set model.draft to one of: {', '.join(available_models())}"
            )
            raise ConfigValueError(f"method '{cfg.method.name}' drafts with a separate model: {where}")
        return draft

    def _load_draft(self, target: LoadedModel) -> Backbone:
        """The draft model (:meth:`_draft_config`), in the target's dtype; it must share the target's
        tokenizer."""
        cfg = self.cfg
        draft = load_model(
            self._draft_config(),
            device=cfg.device,
            dtype=target.info["dtype"],
            cache_dir=cfg.cache_dir,
            seed=cfg.seed + 1,
        )
        check_same_tokenizer(target, draft)
        return self._backbone(draft)

    def _backbone(self, loaded: LoadedModel) -> Backbone:
        """A Backbone running ``engine.backend``; packing / compiling happens here, before any timed
        region, and its time goes to the manifest (``engine``: one entry per loaded model)."""
        backbone = Backbone(loaded.model)
        # before the backend: the HF model's own forward is the reference, and nothing is timed yet
        checked = self_check(backbone)
        log.info(
            "engine self-check (%s, %s): max |logit diff| vs HF %.3g (tolerance %.3g), %.2f s",
            checked.architecture,
            checked.dtype,
            checked.max_abs_diff,
            checked.tolerance,
            checked.seconds,
        )
        info = apply_backend(
            backbone,
            self.cfg.engine.backend,
            buckets=self.cfg.engine.buckets,
            model_name=loaded.name,
            cache_dir=self.cfg.cache_dir,
        )
        self.engine_info[loaded.name] = {**info.to_dict(), "self_check": checked.to_dict()}
        return backbone

    def _save_latency_curve(self, loaded: LoadedModel) -> None:
        """Copy this machine's stored verify-latency curve (``decodebench-profile``) for the target
        model and the backend in use into the run dir, so ``decodebench-report`` puts the cost
        model's prediction next to the measured speedup without a ``--curve`` option."""
        backend = (self.engine_info.get(loaded.name) or {}).get("name")
        curve = backend and load_latency_curve(loaded.name, backend, self.cfg.device, self.cfg.cache_dir)
        if curve:
            self.run_dir.write_json(
                LATENCY_CURVE,
                {**curve, "source": str(stored_curve_path(loaded.name, backend, self.cfg.device, self.cfg.cache_dir))},
            )

    def _warm_up(self, task: Task, samples: list[Sample], loaded, backbone, contenders, cache) -> None:
        """Untimed generations so allocator, kernels and caches are warm before measuring."""
        if not samples or self.cfg.warmup == 0:
            return
        turn = task.turn_settings(samples[0], 0)
        prompt = encode_prompt(
            loaded.tokenizer,
            task.build_messages(samples[0], 0, []),
            loaded.info["chat_template"] and turn.chat_template,
        )
        settings = self._decode_settings(loaded, min(32, self.cfg.gen.max_new_tokens), turn)
        for _ in range(self.cfg.warmup):
            for contender in contenders:
                generate(
                    backbone,
                    contender.drafter,
                    prompt,
                    settings,
                    cache,
                    record_generator(self.cfg.seed, "warmup", 0, backbone.device),
                )

    def _decode_turn(
        self,
        task,
        sample: Sample,
        turn: int,
        answers: list[str],
        loaded,
        backbone,
        contender,
        cache,
        turn_settings: TurnSettings = TurnSettings(),
    ) -> Record:
        cfg = self.cfg
        record = self._new_record(task, sample, turn, contender)
        try:
            messages = task.build_messages(sample, turn, answers)
            prompt = encode_prompt(
                loaded.tokenizer,
                messages,  # not timed
                loaded.info["chat_template"] and turn_settings.chat_template,
            )
            out: GenerationOutput = generate(
                backbone,
                contender.drafter,
                prompt,
                self._decode_settings(loaded, cfg.gen.max_new_tokens, turn_settings),
                cache,
                record_generator(cfg.seed, sample.sample_id, turn, backbone.device),
            )
        except Exception as error:  # recorded, never hidden behind stale numbers
            log.debug("generation failed", exc_info=True)
            record.error = f"{type(error).__name__}: {error}"
            return record
        return self._fill_record(record, task, sample, turn, prompt, out, loaded)

    def _new_record(self, task, sample: Sample, turn: int, contender: Contender) -> Record:
        """The record of one generation before its measurements (:meth:`_fill_record`)."""
        return Record(
            method=contender.label,
            role=contender.role,
            task=task.name,
            model=self.cfg.model.name,
            sample_id=sample.sample_id,
            category=sample.category,
            group=sample.group,
            turn=turn,
            seed=self.cfg.seed,
            sample_index=sample.sample_index,
        )

    def _fill_record(
        self,
        record: Record,
        task,
        sample: Sample,
        turn: int,
        prompt: list[int],
        out: GenerationOutput,
        loaded,
        batch_size: int = 1,
        sequence_s: float | None = None,
    ) -> Record:
        """The record's measurements from one generation; in a batch of ``batch_size`` the batch's
        shared times (wall, prefill, the target's verify steps and forwards) are shared equally
        (Σ wall_s over the batch = its wall time); drafting is the row's own."""
        record.prompt_tokens = len(prompt)
        record.new_tokens = len(out.new_ids)
        record.wall_s = out.wall_s / batch_size
        record.prefill_s = out.prefill_s / batch_size
        record.batch_size = batch_size if batch_size > 1 else None
        record.sequence_s = out.wall_s if sequence_s is None else sequence_s
        record.method_stats = out.method_stats or None
        record.draft_s = sum(s.draft_s for s in out.steps)
        record.verify_s = sum(s.verify_s for s in out.steps) / batch_size
        record.forward_s = sum(s.forward_s for s in out.steps) / batch_size
        record.steps = out.target_forwards
        record.drafted = sum(s.drafted for s in out.steps)
        record.accepted = sum(s.accepted for s in out.steps)
        record.drafted_lengths = [s.drafted for s in out.steps]
        record.accepted_lengths = [s.accepted for s in out.steps]
        record.draft_depths = [s.depth for s in out.steps]
        record.emitted_lengths = [s.emitted for s in out.steps]
        record.tree_sizes = [s.tree_size for s in out.steps]
        record.stop_reason = out.stop_reason
        record.output_ids = out.new_ids
        record.output_sha = ids_sha(out.new_ids)
        record.output_text = loaded.tokenizer.decode(out.new_ids, skip_special_tokens=True) if loaded.tokenizer else ""
        try:
            record.quality = task.score(sample, turn, record.output_text)
            record.answers = task.answers(sample, turn, record.output_text)
        except Exception as error:  # a scoring bug must not discard the measured generation
            log.warning("scoring sample %s turn %d failed: %s", sample.sample_id, turn, error)
        return record

    def _decode_batches(
        self,
        task: Task,
        samples: list[Sample],
        loaded,
        backbone: Backbone,
        contenders: list[Contender],
        records: list[Record],
        finished: set,
        progress,
    ) -> None:
        """``gen.batch_size > 1``: decode chunks of ``batch_size`` samples together, turn by turn
        (turn ``t`` of a chunk needs each sample's answer to ``t - 1``), each contender in turn
        (AR baseline first) through :func:`generate_batch`. Samples of a chunk whose turn settings
        differ (MT-Bench sets a temperature per category) are batched separately."""
        cfg, size = self.cfg, self.cfg.gen.batch_size
        caches: dict[int, Any] = {}
        pad_id = getattr(loaded.tokenizer, "pad_token_id", None) or 0
        warmed: set[tuple[str, int]] = set()  # (role, batch size) already warmed up
        for start in range(0, len(samples), size):
            chunk = samples[start : start + size]
            for contender in contenders:
                answers = {
                    s.sample_id: [
                        r.output_text or ""
                        for r in sorted(
                            (
                                r
                                for r in records
                                if r.role == contender.role and r.sample_id == s.sample_id and not r.error
                            ),
                            key=lambda r: r.turn,
                        )
                    ]
                    for s in chunk
                }
                failed: set[str] = set()
                for turn in range(max(len(s.turns) for s in chunk)):
                    groups: dict[TurnSettings, list[Sample]] = {}  # insertion-ordered
                    for sample in chunk:
                        if (
                            turn < len(sample.turns)
                            and sample.sample_id not in failed
                            and (contender.role, sample.sample_id, turn) not in finished
                        ):
                            groups.setdefault(task.turn_settings(sample, turn), []).append(sample)
                    for turn_settings, members in groups.items():
                        prompts = [
                            encode_prompt(
                                loaded.tokenizer,
                                task.build_messages(s, turn, answers[s.sample_id]),
                                loaded.info["chat_template"] and turn_settings.chat_template,
                            )
                            for s in members
                        ]
                        settings = self._decode_settings(loaded, cfg.gen.max_new_tokens, turn_settings)
                        if len(members) not in caches:
                            caches[len(members)] = backbone.new_cache(2048, batch_size=len(members))
                        cache = caches[len(members)]
                        if cfg.warmup and (contender.role, len(members)) not in warmed:
                            warmed.add((contender.role, len(members)))  # untimed: kernels at the batch shape
                            generate_batch(
                                backbone,
                                row_copy(contender.drafter),  # a throwaway copy: learned state never sees warm-up
                                prompts,
                                dataclasses.replace(settings, max_new_tokens=min(8, settings.max_new_tokens)),
                                cache,
                                pad_token_id=pad_id,
                            )
                        generator = record_generator(cfg.seed, members[0].sample_id, turn, backbone.device)
                        try:
                            batch = generate_batch(
                                backbone, contender.drafter, prompts, settings, cache, generator, pad_token_id=pad_id
                            )
                            error = None
                        except Exception as exc:  # recorded, never hidden behind stale numbers
                            log.debug("batched generation failed", exc_info=True)
                            batch, error = None, f"{type(exc).__name__}: {exc}"
                        for index, (sample, prompt) in enumerate(zip(members, prompts)):
                            record = self._new_record(task, sample, turn, contender)
                            record.error = error
                            if batch is not None:
                                self._fill_record(
                                    record,
                                    task,
                                    sample,
                                    turn,
                                    prompt,
                                    batch.outputs[index],
                                    loaded,
                                    batch_size=len(members),
                                    sequence_s=batch.finish_s[index],
                                )
                            self._audit(record, records, self._sampling(turn_settings).greedy)
                            self.run_dir.append_record(record)
                            records.append(record)
                            progress.update(1)
                            if record.error:
                                failed.add(sample.sample_id)
                                log.error(
                                    "sample %s turn %d (%s): %s", sample.sample_id, turn, contender.label, record.error
                                )
                            else:
                                answers[sample.sample_id].append(record.output_text)

    def _audit(self, record: Record, records: list[Record], greedy: bool) -> None:
        """Agreement with AR: the method's greedy ids vs the baseline's for the same (sample, turn):
        the first divergence for every method, the lossless verdict for lossless methods and the
        token match rate for lossy ones; ``greedy`` tells whether this turn was decoded greedily
        (a task may set its temperature)."""
        if record.role != "method" or record.error or not greedy:
            return
        reference = next(
            (
                r
                for r in records
                if r.role == "baseline"
                and r.sample_id == record.sample_id
                and r.turn == record.turn
                and r.error is None
            ),
            None,
        )
        if reference is None:
            return
        ours, theirs = record.output_ids, reference.output_ids
        record.first_divergence = first_divergence(ours, theirs)
        if self.cfg.method.lossless:
            record.lossless = ours == theirs
        else:  # a lossy method's quality proxy
            record.token_match_rate = token_match_rate(ours, theirs)

    def _summarize(self, records: list[Record], contenders: list[Contender]) -> dict[str, Any]:
        by_role = {c.role: [r for r in records if r.role == c.role] for c in contenders}
        baseline = by_role.get("baseline")
        summary = summarize(by_role["method"], baseline).to_dict()
        if self.cfg.method.name == "ar":
            summary["speedup"] = summary["speedup_tps"] = 1.0
        if baseline:
            summary["baseline"] = summarize(baseline).to_dict()
        return summary


def run(cfg: RunConfig, resolved_config: dict[str, Any] | None = None) -> RunResult:
    """Python API: the CLI and tests call the same entry point."""
    from dataclasses import asdict

    return Runner(cfg, resolved_config or asdict(cfg)).run()
