"""The local runner: load the model once, warm up, decode every sample × turn, write the run dir.

By default the AR baseline decodes the same prompts in the same process, interleaved per sample
(baseline first), so speedups never mix machines or thermal states. Each (sample, turn, role)
becomes one flushed record; a rerun of the same directory resumes after the last record.
"""

from __future__ import annotations

import logging
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from decodebench.config import ConfigValueError, MethodConfig, RunConfig
from decodebench.engine.backbone import Backbone
from decodebench.engine.decode_loop import DecodeSettings, GenerationOutput, generate
from decodebench.engine.drafting import Drafter
from decodebench.engine.sampling import SamplingParams
from decodebench.methods import build_method
from decodebench.models.loading import (LoadedModel, available_models, check_same_tokenizer, load_model,
                                        load_model_config)
from decodebench.records import Record, ids_sha, summarize
from decodebench.runners.manifest import build_manifest, config_hash, utc_now
from decodebench.runners.run_dir import MANIFEST, SUMMARY, RunDirectory
from decodebench.tasks import build_task
from decodebench.tasks.base import Sample, Task
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


def record_generator(seed: int, sample_id: str, turn: int, device: torch.device) -> torch.Generator:
    """Per-record RNG: sampling runs are reproducible and independent of the sample order."""
    generator = torch.Generator(device=device)
    generator.manual_seed(zlib.crc32(f"{seed}/{sample_id}/{turn}".encode()))
    return generator


class Runner:
    def __init__(self, cfg: RunConfig, resolved_config: dict[str, Any]):
        self.cfg = cfg
        self.resolved_config = resolved_config
        self.run_dir = RunDirectory(cfg.run_dir or Path(cfg.results_dir) / "run")
        self.sampling = SamplingParams(cfg.gen.temperature, cfg.gen.top_p, cfg.gen.top_k)

    # -- setup -----------------------------------------------------------------------------------
    def _contenders(self) -> list[Contender]:
        method = Contender(
            role="method",
            label=self.cfg.method.label(self.cfg.device),
            drafter=build_method(self.cfg.method, self.cfg.device),
            audit_lossless=self.cfg.method.lossless and self.sampling.greedy,
        )
        if self.cfg.baseline is None or self.cfg.method.name == "ar":
            return [method]
        baseline = Contender("baseline", "ar", build_method(BASELINE_CONFIG, self.cfg.device), False)
        return [baseline, method]

    def _decode_settings(self, loaded: LoadedModel, max_new_tokens: int) -> DecodeSettings:
        return DecodeSettings(
            max_new_tokens=max_new_tokens,
            sampling=self.sampling,
            eos_token_ids=eos_token_ids(loaded) if self.cfg.gen.stop_on_eos else (),
            stop_strings=self.cfg.gen.stop_strings,
            tokenizer=loaded.tokenizer,
        )

    # -- main ------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        # Validate everything that can fail on user input (method params, data, model) BEFORE the
        # run directory is touched: a bad invocation never deletes records already computed.
        contenders = self._contenders()
        task = build_task(cfg.task, data_dir=cfg.data_dir, cache_dir=cfg.cache_dir)
        samples = task.load_samples()
        log.info("task %s: %d samples, %d turns", task.name, len(samples), sum(len(s.turns) for s in samples))
        loaded = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, cache_dir=cfg.cache_dir, seed=cfg.seed)
        backbone = Backbone(loaded.model)
        for contender in contenders:
            if contender.drafter.needs_draft_model:
                contender.drafter.attach_draft(self._load_draft(loaded))
            contender.drafter.setup(backbone, cfg.cache_dir)

        digest = config_hash(self.resolved_config)
        previous = self.run_dir.read_json(MANIFEST)
        if cfg.overwrite or (previous and previous.get("config_hash") != digest):
            if previous and not cfg.overwrite:
                log.warning("config changed since the records in %s were written: starting over", self.run_dir.path)
            self.run_dir.clear()
        done = self.run_dir.existing_records()
        self.run_dir.rewrite_records(done)  # drops a torn last line before appending
        if done:
            log.info("%s: resuming after %d records", self.run_dir.path, len(done))
        cache = backbone.new_cache(2048)

        manifest = build_manifest(
            self.resolved_config, cfg.device, cfg.seed,
            {"model": loaded.info, "method": contenders[-1].label, "method_preset":
             cfg.method.resolved_preset(cfg.device), "baseline": cfg.baseline, "task_samples": len(samples),
             "resumed_records": len(done)},
        )
        self.run_dir.write_config(self.resolved_config)
        self.run_dir.write_json(MANIFEST, manifest)

        self._warm_up(task, samples, loaded, backbone, contenders, cache)
        for contender in contenders:
            contender.drafter.reset_state()
        records = list(done)
        finished = {(r.role, r.sample_id, r.turn) for r in done}
        total = sum(len(s.turns) for s in samples) * len(contenders)
        progress = tqdm(total=total, initial=len(finished), desc=contenders[-1].label, unit="gen",
                        disable=not cfg.progress, dynamic_ncols=True)
        for sample in samples:
            for contender in contenders:
                answers = [r.output_text or "" for r in sorted(
                    (r for r in done if r.role == contender.role and r.sample_id == sample.sample_id),
                    key=lambda r: r.turn)]
                for turn in range(len(sample.turns)):
                    if (contender.role, sample.sample_id, turn) in finished:
                        continue
                    record = self._decode_turn(task, sample, turn, answers, loaded, backbone, contender, cache)
                    self._audit(record, records)
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
        self.run_dir.write_json(MANIFEST, manifest)
        return RunResult(self.run_dir.path, summary, records)

    def _load_draft(self, target: LoadedModel) -> Backbone:
        """The draft model named by ``model.draft``; it must share the target's tokenizer."""
        cfg = self.cfg
        if not cfg.model.draft:
            raise ConfigValueError(f"method '{cfg.method.name}' drafts with a separate model: set model.draft to "
                                   f"one of: {', '.join(available_models())}")
        draft = load_model(load_model_config(cfg.model.draft), device=cfg.device, dtype=cfg.dtype,
                           cache_dir=cfg.cache_dir, seed=cfg.seed + 1)
        check_same_tokenizer(target, draft)
        return Backbone(draft.model)

    def _warm_up(self, task: Task, samples: list[Sample], loaded, backbone, contenders, cache) -> None:
        """Untimed generations so allocator, kernels and caches are warm before measuring."""
        if not samples or self.cfg.warmup == 0:
            return
        prompt = encode_prompt(loaded.tokenizer, task.build_messages(samples[0], 0, []), self.cfg.model.chat_template)
        settings = self._decode_settings(loaded, min(32, self.cfg.gen.max_new_tokens))
        for _ in range(self.cfg.warmup):
            for contender in contenders:
                generate(backbone, contender.drafter, prompt, settings, cache,
                         record_generator(self.cfg.seed, "warmup", 0, backbone.device))

    def _decode_turn(self, task, sample: Sample, turn: int, answers: list[str], loaded, backbone, contender,
                     cache) -> Record:
        cfg = self.cfg
        record = Record(
            method=contender.label, role=contender.role, task=task.name, model=cfg.model.name,
            sample_id=sample.sample_id, category=sample.category, group=sample.group, turn=turn, seed=cfg.seed,
        )
        try:
            messages = task.build_messages(sample, turn, answers)
            prompt = encode_prompt(loaded.tokenizer, messages, cfg.model.chat_template)  # not timed
            out: GenerationOutput = generate(
                backbone, contender.drafter, prompt, self._decode_settings(loaded, cfg.gen.max_new_tokens), cache,
                record_generator(cfg.seed, sample.sample_id, turn, backbone.device),
            )
        except Exception as error:  # recorded, never hidden behind stale numbers
            log.debug("generation failed", exc_info=True)
            record.error = f"{type(error).__name__}: {error}"
            return record
        record.prompt_tokens = len(prompt)
        record.new_tokens = len(out.new_ids)
        record.wall_s = out.wall_s
        record.prefill_s = out.prefill_s
        record.draft_s = sum(s.draft_s for s in out.steps)
        record.verify_s = sum(s.verify_s for s in out.steps)
        record.steps = out.target_forwards
        record.drafted = sum(s.drafted for s in out.steps)
        record.accepted = sum(s.accepted for s in out.steps)
        record.drafted_lengths = [s.drafted for s in out.steps]
        record.accepted_lengths = [s.accepted for s in out.steps]
        record.tree_sizes = [s.tree_size for s in out.steps]
        record.stop_reason = out.stop_reason
        record.output_ids = out.new_ids
        record.output_sha = ids_sha(out.new_ids)
        record.output_text = loaded.tokenizer.decode(out.new_ids, skip_special_tokens=True) if loaded.tokenizer else ""
        try:
            record.quality = task.score(sample, turn, record.output_text)
        except Exception as error:  # a scoring bug must not discard the measured generation
            log.warning("scoring sample %s turn %d failed: %s", sample.sample_id, turn, error)
        return record

    def _audit(self, record: Record, records: list[Record]) -> None:
        """Lossless audit: the method's greedy ids vs the baseline's for the same (sample, turn)."""
        if record.role != "method" or record.error or not self.cfg.method.lossless or not self.sampling.greedy:
            return
        reference = next((r for r in records if r.role == "baseline" and r.sample_id == record.sample_id
                          and r.turn == record.turn and r.error is None), None)
        if reference is None:
            return
        ours, theirs = record.output_ids, reference.output_ids
        record.lossless = ours == theirs
        if not record.lossless:
            record.first_divergence = next(
                (i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))

    def _summarize(self, records: list[Record], contenders: list[Contender]) -> dict[str, Any]:
        by_role = {c.role: [r for r in records if r.role == c.role] for c in contenders}
        baseline = by_role.get("baseline")
        summary = summarize(by_role["method"], baseline).to_dict()
        if self.cfg.method.name == "ar":
            summary["speedup"] = summary["speedup_tps"] = 1.0
        if baseline:
            summary["baseline"] = summarize(baseline).to_dict()
        return summary


def run(cfg: RunConfig, resolved_config: Optional[dict[str, Any]] = None) -> RunResult:
    """Python API: the CLI and tests call the same entry point."""
    from dataclasses import asdict

    return Runner(cfg, resolved_config or asdict(cfg)).run()
