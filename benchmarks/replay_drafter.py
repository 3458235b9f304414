"""Offline τ of a trained tree drafter (EAGLE, EAGLE-2, Medusa, Hydra): replay known greedy answers
through the method's real ``propose`` and count how many drafted tokens the answer accepts.

At every ``--stride``-th answer position the drafter gets exactly what it has in a decode — the
target's features of the committed prefix (one teacher-forced target forward of prompt + answer)
— and proposes its tree; the accepted length is the longest root-to-node path whose tokens
continue the answer (the greedy verifier's rule). τ = 1 + mean accepted length. Two sources:

* ``--corpus``: the held-out split of the drafter's own training corpus (in-domain), exactly the
  sequences ``decodebench-train`` held out;
* ``--run-dir``: the in-process AR baseline outputs of a ``decodebench`` run (e.g. Spec-Bench),
  first turns (:func:`replay_common.ar_cases`);
* ``--task``: the first turns of a task (run overrides, e.g. ``task=spec_bench
  task.per_category=2 gen.max_new_tokens=128``), answered here by batched greedy AR.

The gap between the two is the drafter's domain gap; a measured τ far below the ``--run-dir``
replay would point at the decode path instead.

Usage: python benchmarks/replay_drafter.py --method eagle:tree_nodes=5 eagle2:total_tokens=6,depth=3,top_k=4 \\
           [--corpus | --run-dir RUN | --task task=spec_bench task.per_category=2 gen.max_new_tokens=128]
           [--stride 3] [--limit 12]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from decodebench.config import MethodConfig, default_cache_dir  # noqa: E402
from decodebench.engine.backbone import Backbone  # noqa: E402
from decodebench.methods import build_method  # noqa: E402
from decodebench.methods.eagle import EagleDrafter  # noqa: E402
from decodebench.methods.medusa import MedusaDrafter  # noqa: E402
from decodebench.models.loading import load_model, load_model_config  # noqa: E402
from decodebench.training.cli import compose_train_config  # noqa: E402
from decodebench.training.corpus import corpus_dir, load_corpus, target_features  # noqa: E402
from decodebench.training.trainer import split  # noqa: E402


def accepted_length(tokens: list[int], parents: list[int], answer: list[int]) -> int:
    """Longest root-to-node path of the proposal whose tokens continue ``answer``."""
    parent, length = -1, 0
    while length < len(answer):
        match = next((i for i, t in enumerate(tokens) if parents[i] == parent and t == answer[length]), None)
        if match is None:
            break
        parent, length = match, length + 1
    return length


def seed(drafter, sequence, committed: int) -> None:
    """Put the drafter in the state a decode has after committing ``committed`` tokens (the root,
    token ``committed``, is the last emitted one)."""
    drafter.begin(sequence.ids[:committed].tolist())
    if isinstance(drafter, EagleDrafter):
        drafter.features, drafter.known, drafter.fed = [sequence.features[:committed]], committed, 0
    elif isinstance(drafter, MedusaDrafter):
        drafter.feature = sequence.features[committed - 1]
    else:
        raise SystemExit(f"replay supports EAGLE / EAGLE-2 / Medusa / Hydra, not {type(drafter).__name__}")


def task_answers(overrides: list[str], backbone: Backbone, loaded, cache_dir: str) -> list:
    """The first turns of the task of ``overrides`` with the target's batched greedy answers."""
    from decodebench.config import compose_run_config
    from decodebench.runners.local import eos_token_ids
    from decodebench.tasks import build_task
    from decodebench.tasks.prompts import encode_prompt
    from decodebench.training.corpus import greedy_answers

    cfg = compose_run_config(overrides)
    task = build_task(cfg.task, cfg.data_dir, cache_dir)
    prompts = [
        encode_prompt(loaded.tokenizer, task.build_messages(sample, 0, []), cfg.model.chat_template)
        for sample in task.load_samples()
    ]
    answers = greedy_answers(backbone, prompts, cfg.gen.max_new_tokens, len(prompts), eos_token_ids(loaded), False)
    return [target_features(backbone, p, a) for p, a in zip(prompts, answers) if len(a) >= 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--method",
        nargs="+",
        required=True,
        help="drafters as NAME or NAME:key=value,key=value (eagle | eagle2 | medusa | hydra), e.g. eagle:tree_nodes=5",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus", action="store_true", help="the held-out split of the default training corpus")
    source.add_argument("--run-dir", type=Path, help="a decodebench run with AR baseline records")
    source.add_argument("--task", nargs="+", help="run overrides naming a task; its first turns, answered greedily")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cache-dir", default=str(default_cache_dir()))
    parser.add_argument("--stride", type=int, default=3, help="replay every n-th answer position")
    parser.add_argument("--limit", type=int, default=12, help="sequences replayed")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model(load_model_config(args.model), device="cpu", dtype="float32", cache_dir=args.cache_dir)
    backbone = Backbone(loaded.model)
    backbone.model_name = args.model
    drafters = []
    for spec in args.method:
        name, _, given = spec.partition(":")
        params = {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in given.split(",") if p)}
        impl = yaml.safe_load((Path(__file__).parents[1] / "conf" / "method" / f"{name}.yaml").read_text())["impl"]
        drafter = build_method(MethodConfig(name=name, impl=impl, params=params))
        drafter.setup(backbone, args.cache_dir)
        drafters.append((spec, drafter))

    if args.corpus:
        cfg = compose_train_config([f"model={args.model}", f"cache_dir={args.cache_dir}"])
        corpus = load_corpus(corpus_dir(args.cache_dir, args.model, cfg.corpus, cfg.seed))
        if corpus is None:
            raise SystemExit("no training corpus in the cache: run decodebench-train first")
        _, sequences = split(corpus.sequences, cfg.drafter.validation_fraction, cfg.seed)
    elif args.run_dir:
        from replay_common import ar_cases

        _, cases = ar_cases(args.run_dir)
        sequences = [target_features(backbone, prompt, output) for prompt, output in cases]
    else:
        sequences = task_answers(args.task, backbone, loaded, args.cache_dir)
    sequences = sequences[: args.limit]

    for spec, drafter in drafters:
        lengths = []
        with torch.inference_mode():
            for sequence in sequences:
                ids = sequence.ids.tolist()
                for committed in range(sequence.answer_start, len(ids) - 1, args.stride):
                    seed(drafter, sequence, committed)
                    proposal = drafter.propose(ids[: committed + 1], 64)
                    lengths.append(accepted_length(proposal.tokens, proposal.parents, ids[committed + 1 :]))
        source = "corpus held-out" if args.corpus else str(args.run_dir or " ".join(args.task))
        tau = round(1 + sum(lengths) / max(len(lengths), 1), 3)
        print(
            json.dumps(
                {"drafter": spec, "source": source, "sequences": len(sequences), "positions": len(lengths), "tau": tau}
            )
        )


if __name__ == "__main__":
    main()
