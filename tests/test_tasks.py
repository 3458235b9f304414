"""Tasks: Spec-Bench loading and selection, data-file lookup, chat messages and prompt encoding."""

import collections
import gzip
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from decodebench.config import ConfigValueError, TaskConfig
from decodebench.registry import DecodeBenchError, UnknownNameError
from decodebench.tasks import Sample, build_task
from decodebench.tasks.data import DATA_ENV_VAR, load_jsonl_records, resolve_data_file
from decodebench.tasks.prompts import encode_prompt
from decodebench.tasks.spec_bench import SpecBench

SPEC_BENCH_YAML = Path(__file__).resolve().parents[1] / "conf" / "task" / "spec_bench.yaml"
SPEC_BENCH_FILE = "spec_bench/question.jsonl"
GROUPS = ["mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"]


def spec_bench_yaml() -> dict:
    """conf/task/spec_bench.yaml without its schema line (``defaults: [base_task, _self_]``)."""
    data = OmegaConf.to_container(OmegaConf.load(SPEC_BENCH_YAML))
    data.pop("defaults", None)
    return data


def spec_bench_config(**overrides) -> TaskConfig:
    return TaskConfig(**{**spec_bench_yaml(), **overrides})


def load(data_dir, cache_dir, **overrides) -> list[Sample]:
    return build_task(spec_bench_config(**overrides), data_dir, cache_dir).load_samples()


@pytest.fixture(scope="module")
def all_samples(data_dir, tmp_path_factory):
    return load(data_dir, tmp_path_factory.mktemp("cache"))


def test_yaml_states_every_task_config_key():
    assert set(spec_bench_yaml()) == set(TaskConfig.__dataclass_fields__)
    assert spec_bench_config().impl == "decodebench.tasks.spec_bench:SpecBench"


def test_loads_all_480_questions(all_samples):
    assert len(all_samples) == 480
    assert [s.sample_id for s in all_samples] == [str(i) for i in range(81, 561)]
    assert len({s.category for s in all_samples}) == 13
    assert collections.Counter(s.group for s in all_samples) == {group: 80 for group in GROUPS}
    assert collections.Counter(len(s.turns) for s in all_samples) == {1: 400, 2: 80}
    assert all(len(s.turns) == 2 for s in all_samples if s.group == "mt_bench")
    assert sum(s.reference is not None for s in all_samples) == 359


def test_references_keep_their_types(all_samples):
    by_id = {s.sample_id: s for s in all_samples}
    # datasets' Json feature would turn these numeric-looking strings into ints.
    assert by_id["112"].reference == ["12000", "2000"]
    assert by_id["481"].group == "rag" and isinstance(by_id["481"].reference[0], list)
    assert by_id["81"].reference is None


def test_per_category_counts_groups(data_dir, tmp_path):
    samples = load(data_dir, tmp_path, per_category=2)
    assert len(samples) == 12
    assert collections.Counter(s.group for s in samples) == {group: 2 for group in GROUPS}
    assert [s.sample_id for s in samples[:2]] == ["81", "82"]  # file order within the group


def test_categories_accept_category_and_group_names(data_dir, tmp_path):
    samples = load(data_dir, tmp_path, categories=["writing", "rag"])
    assert collections.Counter(s.category for s in samples) == {"writing": 10, "rag": 80}
    assert {s.group for s in load(data_dir, tmp_path, categories=["mt_bench"])} == {"mt_bench"}
    with pytest.raises(UnknownNameError, match="Did you mean 'writing'"):
        load(data_dir, tmp_path, categories=["writting"])


def test_ids_and_limit(data_dir, tmp_path):
    assert [s.sample_id for s in load(data_dir, tmp_path, ids=[481, "81"])] == ["81", "481"]
    with pytest.raises(DecodeBenchError, match="999"):
        load(data_dir, tmp_path, ids=[81, 999])
    assert [s.sample_id for s in load(data_dir, tmp_path, limit=3)] == ["81", "82", "83"]
    assert len(load(data_dir, tmp_path, per_category=2, limit=5)) == 5
    with pytest.raises(DecodeBenchError, match="after the categories filter"):
        load(data_dir, tmp_path, categories=["rag"], ids=[81])


def test_missing_file_error_names_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path / "env"))
    with pytest.raises(DecodeBenchError) as error:
        resolve_data_file(SPEC_BENCH_FILE, tmp_path / "given", tmp_path / "cache")
    message = str(error.value)
    for place in ("given", "env", "cache/data"):
        assert str(tmp_path / place / SPEC_BENCH_FILE) in message
    assert "data_dir=" in message and DATA_ENV_VAR in message and "task.url" in message


def test_failed_download_is_reported(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    url = (tmp_path / "nowhere.jsonl").as_uri()
    with pytest.raises(DecodeBenchError) as error:
        load(None, tmp_path / "cache", url=url)
    message = str(error.value)
    assert f"{DATA_ENV_VAR} not set" in message and f"download {url}" in message and "failed" in message


def test_lookup_order_and_download(data_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    downloaded = resolve_data_file(SPEC_BENCH_FILE, None, cache, url=(data_dir / SPEC_BENCH_FILE).as_uri())
    assert downloaded == cache / "data" / SPEC_BENCH_FILE and downloaded.stat().st_size > 0
    assert resolve_data_file(SPEC_BENCH_FILE, None, cache) == downloaded
    monkeypatch.setenv(DATA_ENV_VAR, str(data_dir))
    assert resolve_data_file(SPEC_BENCH_FILE, None, cache) == data_dir / SPEC_BENCH_FILE
    explicit = tmp_path / "explicit"
    (explicit / "spec_bench").mkdir(parents=True)
    (explicit / SPEC_BENCH_FILE).write_text("{}\n")
    assert resolve_data_file(SPEC_BENCH_FILE, explicit, cache) == explicit / SPEC_BENCH_FILE


def test_jsonl_gz_and_missing_keys(tmp_path):
    path = tmp_path / "rows.jsonl.gz"
    with gzip.open(path, "wt") as out:
        out.write(json.dumps({"id": 1, "text": "a", "extra": ["x"]}) + "\n" + json.dumps({"id": 2, "text": "b"}) + "\n")
    assert load_jsonl_records(path, tmp_path) == [
        {"id": 1, "text": "a", "extra": ["x"]},
        {"id": 2, "text": "b", "extra": None},
    ]


@pytest.mark.parametrize("content", ["", "\n\n", '{"a": 1}\n{"a": \n'])
def test_unreadable_jsonl_is_a_clear_error(tmp_path, content):
    path = tmp_path / "rows.jsonl"
    path.write_text(content)
    with pytest.raises(DecodeBenchError, match="cannot read JSON lines from"):
        load_jsonl_records(path, tmp_path)


def test_build_task_rejects_bad_impl(tmp_path):
    with pytest.raises(ConfigValueError, match="cannot be imported"):
        build_task(spec_bench_config(impl="decodebench.tasks.nope:Nope"), None, tmp_path)
    with pytest.raises(ConfigValueError, match="not a Task subclass"):
        build_task(spec_bench_config(impl="decodebench.tasks.base:Sample"), None, tmp_path)


SAMPLE = Sample(sample_id="81", category="writing", group="mt_bench", turns=["Q1", "Q2"])


def test_multi_turn_messages_include_previous_answer(tmp_path):
    task = SpecBench(spec_bench_config(system_prompt="Be brief."), None, tmp_path)
    assert task.build_messages(SAMPLE, 1, ["A1"]) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    assert SpecBench(spec_bench_config(), None, tmp_path).build_messages(SAMPLE, 0, []) == [
        {"role": "user", "content": "Q1"}
    ]
    with pytest.raises(ValueError, match="needs 1 previous answers"):
        task.build_messages(SAMPLE, 1, [])


class FakeTokenizer:
    """Characters as token ids; the 'template' tags each message and appends a generation prompt."""

    def __init__(self, chat_template, return_mapping=False):
        self.chat_template = chat_template
        self.return_mapping = return_mapping
        self.calls = []

    def encode(self, text):
        return [1] + [ord(c) for c in text]  # 1 = BOS

    def apply_chat_template(self, messages, **kwargs):
        self.calls.append(kwargs)
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        text += "<assistant>" if kwargs["add_generation_prompt"] else ""
        ids = [ord(c) for c in text]
        return {"input_ids": ids} if self.return_mapping else ids


@pytest.mark.parametrize("return_mapping", [False, True])
def test_encode_prompt_with_chat_template(return_mapping):
    tokenizer = FakeTokenizer("{{ template }}", return_mapping)
    ids = encode_prompt(tokenizer, [{"role": "user", "content": "hi"}], use_chat_template=True)
    assert ids == [ord(c) for c in "<user>hi<assistant>"] and type(ids) is list
    assert tokenizer.calls[0]["add_generation_prompt"] is True


def test_encode_prompt_plain_text():
    messages = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]
    expected = [1] + [ord(c) for c in "Q1\n\nA1"]
    assert encode_prompt(FakeTokenizer("{{ t }}"), messages, use_chat_template=False) == expected
    assert encode_prompt(FakeTokenizer(None), messages, use_chat_template=True) == expected
