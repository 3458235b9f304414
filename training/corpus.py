"""The training corpus of every trained drafter: the target's OWN responses (self-distillation, as
Medusa-2, EAGLE and HASS recommend) to prompts from one of three sources, stored once per
(model, corpus) in the DecodeBench cache and reused by every drafter trained on it.

Prompt sources (:class:`~decodebench.training.config.CorpusConfig`):

* ``self`` (offline default, downloads nothing): Magpie-style (Xu et al. 2024) — the target is given
  only its chat template's user prefix (e.g. ``<|im_start|>user\\n``) and samples what follows, up
  to its end-of-turn token; the texts are deduplicated;
* ``jsonl``: a local file, one JSON object per line, prompt in field ``column``;
* ``dataset``: a ``datasets`` id + split + column (for users online: ShareGPT, UltraChat; a column
  holding a conversation list contributes its first user turn).

Never an evaluation set: :func:`check_no_overlap` refuses prompts that overlap the Spec-Bench,
MT-Bench, GSM8K or HumanEval rows found in the data folders, naming them.

Each prompt is wrapped in the chat template and answered greedily by the engine's batched AR loop;
one teacher-forced target forward per ``prompt + answer`` then gives what the drafters learn from:
the final hidden state after the norm at every position (EAGLE's feature, Medusa's and Hydra's head
input) and the target's argmax there (for agreement).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from decodebench.config import EngineConfig
from decodebench.engine.backbone import Backbone
from decodebench.engine.backends import apply_backend, remove_backend
from decodebench.engine.decode_loop import DecodeSettings, generate_batch
from decodebench.engine.drafting import Drafter
from decodebench.engine.sampling import SamplingParams
from decodebench.methods.eagle_net import FeatureSequence
from decodebench.registry import DecodeBenchError
from decodebench.training.config import CorpusConfig

log = logging.getLogger("decodebench")

EVALUATION_TASKS = ("spec_bench", "mt_bench", "gsm8k", "humaneval")
SENTINEL = "\x00DECODEBENCH_USER_MESSAGE\x00"
MIN_OVERLAP_CHARS = 40  # a shared span at least this long (normalised) counts as overlap
CORPUS_FORMAT = 1


@dataclass
class Corpus:
    prompts: list[str]
    sequences: list[FeatureSequence]
    token_counts: torch.Tensor  # (vocab,) answer-token counts (draft vocabulary)
    info: dict[str, Any]  # what the manifest records: source, prompts, tokens, generation time, key

    @property
    def answer_tokens(self) -> int:
        return int(self.token_counts.sum())


# -- prompts ------------------------------------------------------------------------------------
def user_prefix(tokenizer) -> str:
    """The chat template's text up to where a user message starts (Magpie's pre-query template)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DecodeBenchError(
            "corpus.source=self needs a model with a chat template (its user prefix "
            "is what the model continues); use corpus.source=jsonl or dataset"
        )
    text = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False)
    if SENTINEL not in text:
        raise DecodeBenchError("the chat template does not place the user message verbatim; cannot find its prefix")
    return text[: text.index(SENTINEL)]


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


@torch.inference_mode()
def self_written_prompts(
    backbone: Backbone, tokenizer, cfg: CorpusConfig, eos_ids: Sequence[int], seed: int, progress: bool = True
) -> list[str]:
    """``cfg.prompts`` distinct prompts the target writes after its user prefix (sampled, batched)."""
    prefix = tokenizer.encode(user_prefix(tokenizer), add_special_tokens=False)
    settings = DecodeSettings(
        max_new_tokens=cfg.prompt_tokens,
        eos_token_ids=eos_ids,
        sampling=SamplingParams(temperature=cfg.prompt_temperature, top_p=cfg.prompt_top_p),
    )
    generator = torch.Generator(device=backbone.device).manual_seed(seed)
    prompts: dict[str, str] = {}
    attempts = 0
    bar = tqdm(total=cfg.prompts, desc="self-written prompts", disable=not progress)
    while len(prompts) < cfg.prompts:
        if attempts >= 4 * cfg.prompts:
            raise DecodeBenchError(
                f"the model wrote only {len(prompts)} distinct prompts in {attempts} tries; "
                "lower corpus.prompts or raise corpus.prompt_temperature"
            )
        batch = min(cfg.batch_size, cfg.prompts - len(prompts))
        out = generate_batch(
            backbone,
            Drafter(),
            [prefix] * batch,
            settings,
            backbone.new_cache(len(prefix) + cfg.prompt_tokens + 8, batch_size=batch),
            generator,
        )
        attempts += batch
        for output in out.outputs:
            text = tokenizer.decode(output.new_ids, skip_special_tokens=True).strip()
            key = normalise(text)
            if len(key) >= 10 and key not in prompts and len(prompts) < cfg.prompts:
                prompts[key] = text
                bar.update(1)
    bar.close()
    return list(prompts.values())


def _first_user_turn(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for turn in value:
            if isinstance(turn, dict) and str(turn.get("role", turn.get("from", ""))).lower() in ("user", "human"):
                text = turn.get("content", turn.get("value"))
                return text if isinstance(text, str) else None
    return None


def file_prompts(cfg: CorpusConfig) -> list[str]:
    """Prompts of a local JSONL file (``cfg.path``, field ``cfg.column``)."""
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise DecodeBenchError(f"corpus.path: no such file {path}")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        text = _first_user_turn(row.get(cfg.column))
        if text is None:
            raise DecodeBenchError(
                f"{path}:{number}: no text in field '{cfg.column}' (corpus.column); fields: {', '.join(sorted(row))}"
            )
        prompts.append(text)
    return prompts


def dataset_prompts(cfg: CorpusConfig, cache_dir: str) -> list[str]:
    """Prompts of a ``datasets`` dataset (``cfg.name``, ``cfg.split``, column ``cfg.column``)."""
    import datasets

    rows = datasets.load_dataset(cfg.name, split=cfg.split, cache_dir=str(Path(cache_dir) / "datasets"))
    if cfg.column not in rows.column_names:
        raise DecodeBenchError(
            f"corpus.column '{cfg.column}' is not a column of {cfg.name}; columns: {', '.join(rows.column_names)}"
        )
    return [text for text in (_first_user_turn(v) for v in rows[cfg.column]) if text]


def gather_prompts(
    cfg: CorpusConfig, backbone: Backbone, tokenizer, eos_ids: Sequence[int], seed: int, cache_dir: str, progress: bool
) -> list[str]:
    if cfg.source == "self":
        return self_written_prompts(backbone, tokenizer, cfg, eos_ids, seed, progress)
    prompts = file_prompts(cfg) if cfg.source == "jsonl" else dataset_prompts(cfg, cache_dir)
    unique = list({normalise(p): p for p in prompts if p.strip()}.values())
    return unique[: cfg.prompts]


# -- evaluation-set overlap ---------------------------------------------------------------------
def evaluation_texts(data_dir: str | None, cache_dir: str) -> tuple[list[tuple[str, str, str]], list[str]]:
    """``(task, sample id, user turn)`` of every evaluation row found, and the tasks not found."""
    from decodebench.config import TaskConfig, group_config
    from decodebench.tasks import build_task

    rows, missing = [], []
    for name in EVALUATION_TASKS:
        task = build_task(TaskConfig(**group_config("task", name)), data_dir, cache_dir)
        try:
            samples = task.all_samples()
        except DecodeBenchError:
            missing.append(name)
            continue
        rows.extend((name, sample.sample_id, turn) for sample in samples for turn in sample.turns)
    return rows, missing


def find_overlaps(prompts: Sequence[str], rows: Sequence[tuple[str, str, str]]) -> list[str]:
    """Descriptions of corpus prompts equal to, containing or contained in an evaluation turn
    (normalised text; containment only for spans of at least :data:`MIN_OVERLAP_CHARS`)."""
    normalised_rows = [(task, sample_id, normalise(turn)) for task, sample_id, turn in rows]
    exact = {text: (task, sample_id) for task, sample_id, text in normalised_rows}
    found = []
    for index, prompt in enumerate(prompts):
        text = normalise(prompt)
        hit = exact.get(text)
        if hit is None and len(text) >= MIN_OVERLAP_CHARS:
            hit = next(
                (
                    (task, sid)
                    for task, sid, turn in normalised_rows
                    if len(turn) >= MIN_OVERLAP_CHARS and (turn in text or text in turn)
                ),
                None,
            )
        if hit is not None:
            found.append(f"corpus prompt {index} ({prompt[:60]!r}) overlaps {hit[0]} row {hit[1]}")
    return found


def check_no_overlap(prompts: Sequence[str], data_dir: str | None, cache_dir: str) -> None:
    """Refuse a corpus that overlaps an evaluation set (the message names the rows)."""
    rows, missing = evaluation_texts(data_dir, cache_dir)
    if missing:
        log.warning(
            "overlap check: no data found for %s (set data_dir or $DECODEBENCH_DATA); those sets are not checked",
            ", ".join(missing),
        )
    overlaps = find_overlaps(prompts, rows)
    if overlaps:
        shown = "; ".join(overlaps[:10]) + (f"; ... ({len(overlaps)} in all)" if len(overlaps) > 10 else "")
        raise DecodeBenchError(
            f"the training corpus overlaps evaluation sets: {shown}. Remove those prompts "
            "(a drafter must never train on what it is timed on)"
        )


# -- answers and features -----------------------------------------------------------------------
@torch.inference_mode()
def greedy_answers(
    backbone: Backbone,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    eos_ids: Sequence[int],
    progress: bool = True,
) -> list[list[int]]:
    """The target's greedy answer to each prompt (batched AR, prompts of similar length together)."""
    settings = DecodeSettings(max_new_tokens=max_new_tokens, eos_token_ids=eos_ids)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    answers: dict[int, list[int]] = {}
    bar = tqdm(total=len(order), desc="target answers", disable=not progress)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        prompts = [list(prompt_ids[i]) for i in chunk]
        cache = backbone.new_cache(max(map(len, prompts)) + max_new_tokens + 8, batch_size=len(prompts))
        out = generate_batch(backbone, Drafter(), prompts, settings, cache)
        for i, output in zip(chunk, out.outputs):
            answers[i] = output.new_ids
        bar.update(len(chunk))
    bar.close()
    return [answers[i] for i in range(len(prompt_ids))]


def target_features(backbone: Backbone, prompt: Sequence[int], answer: Sequence[int]) -> FeatureSequence:
    """One teacher-forced target forward of ``prompt + answer`` (stored as normal tensors)."""
    ids = [*prompt, *answer]
    out = backbone.forward(ids, backbone.new_cache(len(ids) + 8))
    return FeatureSequence(
        ids=torch.tensor(ids),
        features=out.last_hidden.detach().clone().cpu(),
        target_next=out.logits.argmax(-1).clone().cpu(),
        answer_start=len(prompt),
    )


def corpus_key(model_name: str, cfg: CorpusConfig, seed: int) -> str:
    described = {"format": CORPUS_FORMAT, "model": model_name, "seed": seed, **asdict(cfg)}
    if cfg.source != "self":
        for unused in ("prompt_tokens", "prompt_temperature", "prompt_top_p"):
            described.pop(unused)
    described.pop("batch_size")  # batched greedy decoding gives the same tokens
    return hashlib.sha1(json.dumps(described, sort_keys=True).encode()).hexdigest()[:12]


def corpus_dir(cache_dir: str, model_name: str, cfg: CorpusConfig, seed: int) -> Path:
    return Path(cache_dir).expanduser() / "corpora" / model_name / corpus_key(model_name, cfg, seed)


def save_corpus(directory: Path, corpus: Corpus) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "prompts": corpus.prompts,
            "sequences": [asdict(s) for s in corpus.sequences],
            "token_counts": corpus.token_counts,
            "info": corpus.info,
        },
        directory / "corpus.pt",
    )
    (directory / "corpus.json").write_text(json.dumps({**corpus.info, "prompts": corpus.prompts}, indent=2) + "\n")


def load_corpus(directory: Path) -> Corpus | None:
    path = directory / "corpus.pt"
    if not path.is_file():
        return None
    stored = torch.load(path, weights_only=True)
    return Corpus(
        prompts=stored["prompts"],
        sequences=[FeatureSequence(**s) for s in stored["sequences"]],
        token_counts=stored["token_counts"],
        info=stored["info"],
    )


def build_corpus(
    backbone: Backbone,
    tokenizer,
    model_name: str,
    chat_template: bool,
    cfg: CorpusConfig,
    eos_ids: Sequence[int],
    seed: int,
    data_dir: str | None,
    cache_dir: str,
    regenerate: bool = False,
    progress: bool = True,
    engine: EngineConfig | None = None,
) -> Corpus:
    """The corpus of ``cfg`` for this model: from the cache, else built (prompts → overlap check →
    greedy answers → features) and stored. ``engine``: the backend to build it with, applied only
    when the corpus is built and removed afterwards (None: the backbone as it is)."""
    from decodebench.tasks.prompts import encode_prompt

    directory = corpus_dir(cache_dir, model_name, cfg, seed)
    stored = None if regenerate else load_corpus(directory)
    if stored is not None:
        log.info(
            "corpus: reusing %s (%d sequences, %d answer tokens)",
            directory,
            len(stored.sequences),
            stored.answer_tokens,
        )
        return stored
    start = time.perf_counter()
    backend = None
    if engine is not None:
        backend = apply_backend(backbone, engine.backend, buckets=engine.buckets, cache_dir=cache_dir)
        log.info("corpus: built with engine backend %s (setup %.1f s)", backend.name, backend.setup_s)
    try:
        prompts = gather_prompts(cfg, backbone, tokenizer, eos_ids, seed, cache_dir, progress)
        check_no_overlap(prompts, data_dir, cache_dir)
        prompt_ids = [encode_prompt(tokenizer, [{"role": "user", "content": p}], chat_template) for p in prompts]
        answers = greedy_answers(backbone, prompt_ids, cfg.answer_tokens, cfg.batch_size, eos_ids, progress)
        kept = [(p, ids, a) for p, ids, a in zip(prompts, prompt_ids, answers) if len(a) >= 2]
        sequences = [
            target_features(backbone, ids, a) for _, ids, a in tqdm(kept, desc="target features", disable=not progress)
        ]
    finally:
        if engine is not None:
            remove_backend(backbone)
    counts = torch.bincount(torch.tensor([t for _, _, a in kept for t in a]), minlength=backbone.config.vocab_size)
    info = {
        "key": directory.name,
        "model": model_name,
        "source": cfg.source,
        "config": asdict(cfg),
        "seed": seed,
        "sequences": len(sequences),
        "answer_tokens": int(counts.sum()),
        "total_tokens": int(sum(s.ids.shape[0] for s in sequences)),
        "generation_s": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
        "engine_backend": backbone.backend if backend is None else backend.name,
    }
    corpus = Corpus(prompts=[p for p, _, _ in kept], sequences=sequences, token_counts=counts, info=info)
    save_corpus(directory, corpus)
    log.info(
        "corpus: %d sequences, %d answer tokens in %.0f s -> %s",
        len(sequences),
        info["answer_tokens"],
        info["generation_s"],
        directory,
    )
    return corpus
