"""decodebench-train: prompt sources, the evaluation-set overlap refusal, bad input (exit 2 before any
model loads), and (slow) the whole pipeline on a tiny model: corpus built once and reused, checkpoint
+ manifest, the method decoding with it, and the missing-checkpoint exit code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from decodebench.registry import DecodeBenchError
from decodebench.training.cli import compose_train_config, main
from decodebench.training.config import CorpusConfig
from decodebench.training.corpus import check_no_overlap, file_prompts, find_overlaps, user_prefix


def test_overlap_found_by_equality_and_containment():
    rows = [
        ("gsm8k", "7", "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May."),
        ("mt_bench", "81", "Compose an engaging travel blog post about a recent trip to Hawaii."),
    ]
    prompts = [
        "compose an engaging travel blog post about a recent trip to  HAWAII",
        "Please solve: Natalia sold clips to 48 of her friends in April, and then she sold half as many "
        "in May. How many?",
        "Write a poem about autumn.",
    ]
    found = find_overlaps(prompts, rows)
    assert len(found) == 2
    assert "corpus prompt 0" in found[0] and "mt_bench row 81" in found[0]
    assert "corpus prompt 1" in found[1] and "gsm8k row 7" in found[1]


def test_a_corpus_with_benchmark_questions_is_refused(data_dir, tmp_path):
    question = json.loads((data_dir / "spec_bench" / "question.jsonl").read_text().splitlines()[100])
    file = tmp_path / "prompts.jsonl"
    file.write_text("\n".join(json.dumps({"text": t}) for t in ["Tell me about tea.", question["turns"][0]]) + "\n")
    prompts = file_prompts(CorpusConfig(source="jsonl", path=str(file), column="text"))
    with pytest.raises(
        DecodeBenchError, match=rf"corpus prompt 1 .* overlaps spec_bench row {question['question_id']}"
    ):
        check_no_overlap(prompts, str(data_dir), str(tmp_path))
    check_no_overlap(prompts[:1], str(data_dir), str(tmp_path))  # the clean part passes


def test_jsonl_prompts_name_the_missing_field(tmp_path):
    file = tmp_path / "p.jsonl"
    file.write_text(json.dumps({"instruction": "hi"}) + "\n")
    with pytest.raises(DecodeBenchError, match="no text in field 'prompt'.*fields: instruction"):
        file_prompts(CorpusConfig(source="jsonl", path=str(file)))
    conversation = {"conversations": [{"from": "human", "value": "first"}, {"from": "gpt", "value": "answer"}]}
    file.write_text(json.dumps(conversation) + "\n")
    assert file_prompts(CorpusConfig(source="jsonl", path=str(file), column="conversations")) == ["first"]


def test_user_prefix_of_the_chat_template():
    from decodebench.models.loading import load_model_config, load_tokenizer

    tokenizer = load_tokenizer(load_model_config("smollm2-135m"))
    assert user_prefix(tokenizer).endswith("<|im_start|>user\n")


@pytest.mark.parametrize(
    "args, message",
    [
        (["drafter=eagel"], "unknown drafter 'eagel'.*Did you mean 'eagle'"),
        (["corpus.source=web"], "corpus.source.*self | jsonl | dataset"),
        (["drafter.params.noise=0.1"], "unknown parameter 'noise' for drafter 'eagle'"),
        (["drafter.epochs=0"], "drafter.epochs"),
        (["corpus.source=jsonl"], "corpus.path"),
        (["drafter=specdec_pp"], "model.draft: drafter 'specdec_pp' trains on a draft model's features"),
        (["drafter=specdec_pp", "drafter.params.mode=beam"], "drafter.params.mode.*greedy | sampling"),
    ],
)
def test_bad_input_exits_2_before_loading(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_composed_config_has_the_network_defaults():
    cfg = compose_train_config(["drafter=medusa", "drafter.params.draft_vocab_size=512"])
    params = cfg.drafter.network_params()
    assert (params.num_heads, params.num_layers, params.draft_vocab_size) == (5, 1, 512)
    assert cfg.drafter.learning_rate == 1e-3 and cfg.corpus.source == "self"


@pytest.mark.slow
def test_train_cli_end_to_end_then_decode(tmp_path, data_dir):
    """Train EAGLE for tiny-llama from self-written prompts (corpus cached and reused), then decode with
    eagle2 losslessly; a method without its checkpoint exits 2 naming the command."""
    env_args = [f"cache_dir={tmp_path / 'cache'}", f"data_dir={data_dir}", "threads=1", "progress=false"]
    train = [
        sys.executable,
        "-m",
        "decodebench.training.cli",
        "drafter=eagle",
        "model=tiny-llama",
        "corpus.prompts=6",
        "corpus.answer_tokens=12",
        "corpus.prompt_tokens=12",
        "drafter.epochs=1",
        f"hydra.run.dir={tmp_path / 'train'}",
        *env_args,
    ]
    first = subprocess.run(train, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = tmp_path / "cache" / "drafters" / "tiny-llama" / "eagle"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["corpus"]["sequences"] >= 2 and manifest["training"]["steps"] >= 1
    assert set(manifest["held_out"]["after"]) == {"loss", "top1_agreement", "positions"}
    assert manifest["git"] and manifest["corpus"]["source"] == "self"
    second = subprocess.run(train, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert second.returncode == 0 and "corpus: reusing" in second.stdout + second.stderr

    from helpers import run_cli

    run = run_cli(
        "method=eagle2",
        "model=tiny-llama",
        "task.limit=1",
        "gen.max_new_tokens=16",
        f"hydra.run.dir={tmp_path / 'run'}",
        *env_args,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["lossless_rate"] == 1.0
    missing = run_cli(
        "method=medusa", "model=tiny-llama", "task.limit=1", f"hydra.run.dir={tmp_path / 'm'}", *env_args, cwd=tmp_path
    )
    assert missing.returncode == 2
    assert "decodebench-train drafter=medusa model=tiny-llama" in missing.stdout + missing.stderr


@pytest.mark.slow
def test_specdec_pp_head_trains_on_the_pipeline_then_decodes(tmp_path, data_dir):
    """decodebench-train drafter=specdec_pp (tiny-llama with its draft): checkpoint + manifest in
    the cache under the (mode, draft) name, then method=specdec_pp finds it and stays lossless."""
    env_args = [f"cache_dir={tmp_path / 'cache'}", f"data_dir={data_dir}", "threads=1", "progress=false"]
    pair = ["model=tiny-llama", "model.draft=tiny-llama-draft"]
    train = subprocess.run(
        [
            sys.executable,
            "-m",
            "decodebench.training.cli",
            "drafter=specdec_pp",
            *pair,
            "corpus.prompts=4",
            "corpus.answer_tokens=12",
            "corpus.prompt_tokens=8",
            "drafter.epochs=1",
            f"hydra.run.dir={tmp_path / 'train'}",
            *env_args,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=900,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    checkpoint = tmp_path / "cache" / "drafters" / "tiny-llama" / "specdec_pp-greedy-tiny-llama-draft"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["draft_model"] == "tiny-llama-draft" and manifest["training"]["steps"] >= 1

    from helpers import run_cli

    run = run_cli(
        "method=specdec_pp",
        *pair,
        "task.limit=1",
        "gen.max_new_tokens=12",
        f"hydra.run.dir={tmp_path / 'run'}",
        *env_args,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["lossless_rate"] == 1.0
