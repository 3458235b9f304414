"""ADED — adaptive draft-verification with a tri-gram matrix and MCTS (Liu et al. 2024,
arXiv 2407.12021; liuxukun2000/ADED, renamed Adaptix; its Rust ``DraftRetriever``).

Each step:

1. the tri-gram matrix is reinforced with the context's last ``reinforce_window`` tokens (every
   tri-gram there gains ``reinforce_step``, capped at ``reinforce_cap``) — the adaptive part;
2. an MCTS over token pairs, rooted at the context's last two tokens, finds the most visited
   continuations (:func:`~decodebench.methods.aded_search.mcts_paths`);
3. the paths are pruned to ``max_draft_tokens`` distinct tokens and merged into a draft tree,
   verified in one tree-masked forward.

The matrix starts from a corpus (``corpus_files``): by default the target model's own greedy
answers to prompts that are not benchmark questions (GSM8K test questions that do not occur in
Spec-Bench, HumanEval prompts). Generating the corpus is a cached step: the answers are stored
under ``<cache_dir>/state/aded-corpus-<model>-<digest>.pt`` and reused by later runs with the same
corpus settings. The reinforced matrix is learned state (``state: per_task`` by default: the
reference reinforces one matrix for its whole run).

Followed from the reference: tri-gram frequencies normalised per pair then pruned to the top 12;
reinforcement of the last 16 tokens by 0.04 per step, capped at 3.0; the MCTS (150 iterations,
paths of the root pair + 3 tokens, PUCT with c1 = 1.814 and c2 = 8, expansion of every successor
at a leaf continuing from the last child, rollouts sampled in proportion to the weights,
back-propagation of visits and scores); the 24 most visited nodes, each extended by its most
likely successor; ``cut_to_choices`` to 64 tokens; a breadth-first tree of at most 64 nodes.

Differs, and why:

* Corpus: the reference counts tri-grams of ShareGPT / UltraChat conversations (not on disk
  here); DecodeBench uses the target's own answers on a non-benchmark corpus, as the issue asks.
* Rollout score: the reference adds ``matrix[pair][pair[1]]`` (the weight of the pair's own last
  token, almost always 0, so every rollout scores 1); we add the weight of the token the rollout
  actually took — the score the paper describes (path likelihood), so visits favour likely paths.
* Deterministic: the MCTS's random generator is seeded per prompt, and successor order is by
  weight (the reference iterates Rust hash maps, whose order is random).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from decodebench.config import ConfigValueError, check, default_cache_dir
from decodebench.engine.backbone import Backbone
from decodebench.engine.decode_loop import DecodeSettings, generate
from decodebench.engine.drafting import Drafter, Proposal
from decodebench.methods.aded_search import MctsConfig, TrigramMatrix, cut_to_choices, mcts_paths, paths_to_tree
from decodebench.methods.state_policy import StatefulDrafter, check_state_policy, model_key

log = logging.getLogger("decodebench")


@dataclass
class CorpusSpec:
    """Which prompts the corpus answers: ``files`` as ``path:field`` (relative to the data folder),
    the first ``per_file`` rows of each whose text occurs in no ``exclude`` file."""

    files: list[str]
    per_file: int
    exclude: list[str]
    max_new_tokens: int

    def digest(self) -> str:
        text = json.dumps([self.files, self.per_file, self.exclude, self.max_new_tokens])
        return hashlib.sha256(text.encode()).hexdigest()[:12]


class AdedDrafter(StatefulDrafter):
    """Draft trees from an adaptive tri-gram matrix searched with MCTS."""

    state_name = "aded"

    @dataclass
    class Params:
        top_k: int = 12  # successors kept per token pair when the corpus matrix is built
        mcts_iterations: int = 150  # reference: MCTS::run(150)
        path_length: int = 4  # MCTS path: the root pair + 3 tokens
        top_paths: int = 24  # most visited search nodes turned into draft paths
        max_draft_tokens: int = 64  # cut_to_choices budget and tree size cap
        reinforce_window: int = 16  # last tokens whose tri-grams are reinforced each step
        reinforce_step: float = 0.04
        reinforce_cap: float = 3.0
        corpus_files: list[str] = field(default_factory=lambda: ["gsm8k/test.jsonl:question"])
        corpus_per_file: int = 32
        corpus_exclude: list[str] = field(default_factory=lambda: ["spec_bench/question.jsonl"])
        corpus_max_new_tokens: int = 128
        state: str = "per_task"  # the reinforced matrix: per_prompt | per_task | persistent
        seed: int = 0  # MCTS rollouts (per prompt: seed and prompt hashed)
        # cpu preset: max_draft_tokens from the stored latency curve of the backend in use (the largest
        # tree whose verify costs <= this x a 1-token step, engine/budget.py node_budget)
        max_verify_cost: float | None = None

        def __post_init__(self) -> None:
            check(
                self.max_verify_cost is None or self.max_verify_cost >= 1.0,
                "method.params.max_verify_cost",
                self.max_verify_cost,
                ">= 1.0 or null",
            )
            for key in ("top_k", "mcts_iterations", "top_paths", "max_draft_tokens", "corpus_max_new_tokens"):
                check(getattr(self, key) >= 1, f"method.params.{key}", getattr(self, key), ">= 1")
            check(self.path_length >= 2, "method.params.path_length", self.path_length, ">= 2")
            check(self.reinforce_window >= 3, "method.params.reinforce_window", self.reinforce_window, ">= 3")
            check(self.reinforce_step >= 0, "method.params.reinforce_step", self.reinforce_step, ">= 0")
            check(self.reinforce_cap > 0, "method.params.reinforce_cap", self.reinforce_cap, "> 0")
            check(self.corpus_per_file >= 0, "method.params.corpus_per_file", self.corpus_per_file, ">= 0")
            for spec in self.corpus_files:
                check(":" in spec, "method.params.corpus_files", spec, "entries 'path:field'")
            check_state_policy(self.state)

    def __init__(self, params: AdedDrafter.Params):
        super().__init__(params)
        self.corpus_matrix = TrigramMatrix()
        self.matrix = TrigramMatrix()
        self.mcts = MctsConfig(params.mcts_iterations, params.path_length, params.top_paths)
        self.rng = random.Random(params.seed)
        self.max_draft_tokens = params.max_draft_tokens

    # -- learned state (the reinforced matrix) ---------------------------------------------------
    def _clear_state(self) -> None:
        self.matrix = self.corpus_matrix.copy()

    def _state_dict(self) -> dict[str, Any]:
        rows = [(a, b, c, w) for (a, b), row in self.matrix.rows.items() for c, w in row.items()]
        return {
            "keys": torch.tensor([r[:3] for r in rows], dtype=torch.long).reshape(-1, 3),
            "weights": torch.tensor([r[3] for r in rows], dtype=torch.float64),
        }

    def _load_state_dict(self, state: dict[str, Any]) -> bool:
        rows: dict[tuple[int, int], dict[int, float]] = {}
        for (a, b, c), weight in zip(state["keys"].tolist(), state["weights"].tolist()):
            rows.setdefault((a, b), {})[c] = weight
        self.matrix = TrigramMatrix(rows)
        return True

    # -- Drafter API -----------------------------------------------------------------------------
    def setup(self, backbone: Backbone, cache_dir: str | None = None) -> None:
        """Build (or load the cached) corpus matrix, then apply the state policy."""
        sequences = self._corpus(backbone, cache_dir) if self.params.corpus_files else []
        self.corpus_matrix = TrigramMatrix.from_sequences(sequences, self.params.top_k)
        self.max_draft_tokens = (
            self.budget_from_curve(backbone, cache_dir, self.params.max_verify_cost, self.params.max_draft_tokens + 1)
            - 1
        )
        log.info("aded: corpus matrix with %d token pairs from %d answers", len(self.corpus_matrix), len(sequences))
        super().setup(backbone, cache_dir)

    def begin(self, prompt_ids: list[int]) -> None:
        super().begin(prompt_ids)
        self.rng = random.Random(zlib.crc32(f"{self.params.seed}/{','.join(map(str, prompt_ids))}".encode()))

    def propose(self, context: list[int], max_tokens: int) -> Proposal:
        p = self.params
        self.matrix.reinforce(context, p.reinforce_window, p.reinforce_step, p.reinforce_cap)
        if max_tokens <= 0 or len(context) < 2:
            return Proposal()
        paths = mcts_paths(self.matrix, (context[-2], context[-1]), self.mcts, self.rng)
        unique = [list(path) for path in dict.fromkeys(tuple(path) for path in paths)]
        budget = self.max_draft_tokens
        tokens, parents = paths_to_tree(cut_to_choices(unique, budget), budget, max_tokens)
        return Proposal(tokens=tokens, parents=parents) if tokens else Proposal()

    # -- the corpus (a cached step) --------------------------------------------------------------
    def _corpus(self, backbone: Backbone, cache_dir: str | None) -> list[list[int]]:
        """The target's answers to the corpus prompts, generated once and cached.

        Answers are saved as they are generated (``.partial.pt``), so an interrupted build resumes
        where it stopped; the finished file is renamed into place.
        """
        p = self.params
        spec = CorpusSpec(list(p.corpus_files), p.corpus_per_file, list(p.corpus_exclude), p.corpus_max_new_tokens)
        root = Path(cache_dir or default_cache_dir()).expanduser()
        path = root / "state" / f"aded-corpus-{model_key(backbone)}-{spec.digest()}.pt"
        if path.is_file():
            return load_sequences(path)
        partial = path.with_suffix(".partial.pt")
        answers = load_sequences(partial) if partial.is_file() else []
        texts = corpus_texts(spec, root)
        log.info(
            "aded: generating the corpus (%d of %d prompts left, %d new tokens each) into %s",
            len(texts) - len(answers),
            len(texts),
            spec.max_new_tokens,
            path,
        )
        tokenizer = self._tokenizer(backbone)
        for text in texts[len(answers) :]:
            answers.extend(generate_answers(backbone, tokenizer, [text], spec.max_new_tokens))
            save_sequences(partial, answers, spec)
        save_sequences(path, answers, spec)
        partial.unlink(missing_ok=True)
        return answers

    def _tokenizer(self, backbone: Backbone) -> Any:
        """The target's tokenizer, read from the checkpoint folder it was loaded from."""
        from transformers import AutoTokenizer

        location = str(getattr(backbone.config, "_name_or_path", "") or "")
        try:
            return AutoTokenizer.from_pretrained(location)
        except (OSError, ValueError) as error:
            raise ConfigValueError(
                f"aded: cannot load the tokenizer of '{location or backbone.config.model_type}' to build the "
                f"corpus ({error}); set method.params.corpus_files=[] to start from an empty matrix"
            ) from error


def save_sequences(path: Path, sequences: list[list[int]], spec: CorpusSpec) -> None:
    """Store token sequences flat (tokens + lengths), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = [token for sequence in sequences for token in sequence]
    partial = path.with_name(path.name + ".tmp")
    torch.save(
        {
            "tokens": torch.tensor(flat, dtype=torch.long),
            "lengths": torch.tensor([len(s) for s in sequences], dtype=torch.long),
            "spec": json.dumps(spec.__dict__),
        },
        partial,
    )
    partial.replace(path)


def load_sequences(path: Path) -> list[list[int]]:
    """Read what :func:`save_sequences` wrote."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    tokens, out, start = saved["tokens"].tolist(), [], 0
    for length in saved["lengths"].tolist():
        out.append(tokens[start : start + length])
        start += length
    return out


def corpus_texts(spec: CorpusSpec, cache_dir: Path) -> list[str]:
    """The first ``spec.per_file`` texts of each corpus file that no excluded file contains."""
    from decodebench.tasks.data import load_jsonl_records, resolve_data_file

    excluded = "\n".join(
        text
        for name in spec.exclude
        for row in load_jsonl_records(resolve_data_file(name, None, cache_dir), cache_dir)
        for text in _strings(row)
    )
    texts: list[str] = []
    for entry in spec.files:
        name, column = entry.rsplit(":", 1)
        rows = load_jsonl_records(resolve_data_file(name, None, cache_dir), cache_dir)
        kept = [row[column] for row in rows if row.get(column) and row[column].strip() not in excluded]
        texts.extend(kept[: spec.per_file])
    return texts


def _strings(value: Any) -> list[str]:
    """Every string inside a JSON value (questions, turns, references)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


def generate_answers(backbone: Backbone, tokenizer: Any, texts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Greedy answers of the target to ``texts`` (as user turns with its chat template), on the
    engine's own decode loop with a drafter that never drafts."""
    from decodebench.tasks.prompts import encode_prompt

    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(backbone.model.generation_config, "eos_token_id", None)
    eos.update(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    settings = DecodeSettings(max_new_tokens=max_new_tokens, eos_token_ids=sorted(eos))
    cache = backbone.new_cache(1024)
    answers = []
    for text in texts:
        prompt = encode_prompt(tokenizer, [{"role": "user", "content": text}], use_chat_template=True)
        answers.append(generate(backbone, Drafter(), prompt, settings, cache).new_ids)
    return answers
