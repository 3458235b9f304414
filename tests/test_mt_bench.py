"""MT-Bench: questions and turns, FastChat temperatures, judge prompts and [[rating]] parsing with a
fake judge, the OpenAI-compatible backend against a local HTTP server, and the HF backend."""

from __future__ import annotations

import collections
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from decodebench.config import ConfigValueError, compose_run_config
from decodebench.registry import DecodeBenchError
from decodebench.tasks import build_task
from decodebench.tasks.judges import HFJudge, OpenAIJudge, OpenAIJudgeConfig
from decodebench.tasks.mt_bench import FASTCHAT_TEMPERATURES, MTBench
from decodebench.tasks.mt_bench_judging import build_request, load_judge_prompts, parse_rating, prompt_name

REFERENCE_CATEGORIES = ("math", "reasoning", "coding")


def mt_bench(data_dir, cache_dir, *overrides):
    return build_task(compose_run_config(["task=mt_bench", *overrides]).task, data_dir, cache_dir)


class FakeJudge:
    """Answers every request with a fixed judgment and remembers what it was asked."""

    name = "fake"

    def __init__(self, reply="The answer is fine. Rating: [[7]]"):
        self.reply, self.requests = reply, []

    def complete(self, system, user):
        self.requests.append((system, user))
        return self.reply


@pytest.fixture(scope="module")
def prompts(data_dir):
    return load_judge_prompts(data_dir / "mt_bench" / "judge_prompts.jsonl")


def test_questions_turns_and_categories(data_dir, tmp_path):
    samples = mt_bench(data_dir, tmp_path).load_samples()
    assert len(samples) == 80 and [s.sample_id for s in samples[:2]] == ["81", "82"]
    assert all(len(s.turns) == 2 for s in samples)
    assert collections.Counter(s.group for s in samples) == {
        c: 10 for c in ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
    }
    assert all(s.reference is None for s in samples)  # references are loaded only to judge
    judged = {s.sample_id: s for s in mt_bench(data_dir, tmp_path, "task.params.judge=openai").load_samples()}
    assert len(judged["111"].reference) == 2 and judged["81"].reference is None  # math has GPT-4 references


def test_fastchat_temperatures_are_an_option(data_dir, tmp_path):
    task = mt_bench(data_dir, tmp_path)
    samples = {s.category: s for s in task.load_samples()}
    assert task.turn_settings(samples["writing"], 1).temperature is None
    task = mt_bench(data_dir, tmp_path, "task.params.use_category_temperatures=true")
    temperatures = {c: task.turn_settings(s, 0).temperature for c, s in samples.items()}
    assert temperatures == {
        "writing": 0.7,
        "roleplay": 0.7,
        "extraction": 0.0,
        "math": 0.0,
        "coding": 0.0,
        "reasoning": 0.0,
        "stem": 0.1,
        "humanities": 0.1,
    }
    # the config layer merges a user's table over the FastChat defaults (Params is the one source of
    # defaults), so a category can only go missing through the Python API
    partial = {c: t for c, t in FASTCHAT_TEMPERATURES.items() if c != "writing"}
    with pytest.raises(ConfigValueError, match="missing: writing"):
        MTBench.Params(use_category_temperatures=True, category_temperatures=partial)


def test_prompt_choice_follows_fastchat(prompts):
    assert prompt_name("writing", 0, REFERENCE_CATEGORIES) == "single-v1"
    assert prompt_name("writing", 1, REFERENCE_CATEGORIES) == "single-v1-multi-turn"
    assert prompt_name("math", 0, REFERENCE_CATEGORIES) == "single-math-v1"
    assert prompt_name("coding", 1, REFERENCE_CATEGORIES) == "single-math-v1-multi-turn"
    assert all(prompts[name].output_format == "[[rating]]" for name in prompts if name.startswith("single"))


def test_build_request_fills_questions_answers_and_references(prompts):
    questions, answers, references = ["Q1?", "Q2?"], ["A1.", "A2."], ["R1.", "R2."]
    first = build_request(prompts, "writing", 0, questions, answers[:1], None, REFERENCE_CATEGORIES)
    assert first.prompt_name == "single-v1" and first.system == "You are a helpful assistant."
    assert "[Question]\nQ1?\n\n[The Start of Assistant's Answer]\nA1.\n[The End of Assistant's Answer]" in first.user
    second = build_request(prompts, "math", 1, questions, answers, references, REFERENCE_CATEGORIES)
    assert second.prompt_name == "single-math-v1-multi-turn"
    assert "### Reference answer:\nR2." in second.user and "### Assistant A:\nA2." in second.user
    assert "### User:\nQ1?" in second.user and "second" in second.system
    with pytest.raises(ValueError, match="reference"):
        build_request(prompts, "math", 0, questions, answers, None, REFERENCE_CATEGORIES)
    with pytest.raises(ValueError, match="needs turn 0 or 1"):
        build_request(prompts, "writing", 1, questions, answers[:1], None, REFERENCE_CATEGORIES)


@pytest.mark.parametrize(
    "judgment, rating",
    [
        ("Good answer.\nRating: [[8]]", 8.0),
        ("Rating: [[7.5]]", 7.5),
        ("no double brackets, backup: [6]", 6.0),  # FastChat's backup pattern
        ("Rating: [[3]] ... later [[9]]", 3.0),  # the first match counts
        ("I cannot rate this.", None),
    ],
)
def test_parse_rating(judgment, rating):
    assert parse_rating(judgment) == rating


def test_scoring_with_a_fake_judge_uses_the_turn_one_answer(data_dir, tmp_path):
    task = mt_bench(data_dir, tmp_path, "task.params.judge=openai")
    task.judge = fake = FakeJudge()
    sample = next(s for s in task.load_samples() if s.sample_id == "111")  # math: reference-graded
    task.build_messages(sample, 0, [])
    assert task.score(sample, 0, "My first answer") == {"mt_bench_score": 7.0, "mt_bench_score_turn1": 7.0}
    messages = task.build_messages(sample, 1, ["My first answer"])
    assert messages[1] == {"role": "assistant", "content": "My first answer"}
    assert task.score(sample, 1, "My second answer") == {"mt_bench_score": 7.0, "mt_bench_score_turn2": 7.0}
    system, user = fake.requests[-1]
    assert "My first answer" in user and "My second answer" in user and sample.reference[1] in user
    # identical conversations (a lossless method repeats AR's output) are judged once
    task.build_messages(sample, 0, [])
    task.score(sample, 0, "My first answer")
    assert len(fake.requests) == 2
    # an unparseable judgment or an unknown turn-1 answer gives no score rather than a wrong one
    task.judge = FakeJudge("no rating here")
    task.build_messages(sample, 0, [])
    assert task.score(sample, 0, "another answer") is None
    assert task.score(sample, 1, "turn 2 without build_messages") is None


def test_judge_none_scores_nothing(data_dir, tmp_path):
    task = mt_bench(data_dir, tmp_path)
    sample = task.load_samples()[0]
    task.build_messages(sample, 0, [])
    assert task.score(sample, 0, "anything") is None and task.judge is None


def test_bad_judge_name_is_a_config_error(data_dir, tmp_path):
    with pytest.raises(ConfigValueError, match="task.params.judge"):
        mt_bench(data_dir, tmp_path, "task.params.judge=gpt")
    with pytest.raises(ConfigValueError, match="Did you mean 'model'"):
        mt_bench(data_dir, tmp_path, "+task.params.openai.modle=x")


class ChatCompletions(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible endpoint: fails the first ``failures`` calls, then answers."""

    failures = 0
    seen: list = []

    def do_POST(self):  # noqa: N802 (http.server naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, self.headers.get("Authorization"), body))
        if type(self).failures > 0:
            type(self).failures -= 1
            self.send_response(503)
            self.end_headers()
            return
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": "Rating: [[9]]"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    ChatCompletions.failures, ChatCompletions.seen = 0, []
    server = HTTPServer(("127.0.0.1", 0), ChatCompletions)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_judge_talks_to_a_compatible_endpoint(endpoint, monkeypatch):
    monkeypatch.setattr("decodebench.tasks.judges.time.sleep", lambda seconds: None)  # no retry backoff
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    monkeypatch.setenv("DECODEBENCH_JUDGE_MODEL", "local-judge")
    judge = OpenAIJudge(OpenAIJudgeConfig(base_url=endpoint, api_key_env="JUDGE_KEY", retries=1))
    ChatCompletions.failures = 1  # one transient error, then an answer
    assert judge.complete("system text", "user text") == "Rating: [[9]]"
    path, auth, body = ChatCompletions.seen[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test" and judge.name == "openai:local-judge"
    assert body["messages"] == [{"role": "system", "content": "system text"}, {"role": "user", "content": "user text"}]
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("local-judge", 0.0, 2048)


def test_openai_judge_from_environment_and_failure(endpoint, monkeypatch):
    monkeypatch.setattr("decodebench.tasks.judges.time.sleep", lambda seconds: None)
    monkeypatch.setenv("OPENAI_BASE_URL", endpoint)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    judge = OpenAIJudge(OpenAIJudgeConfig(retries=0))
    assert judge.model == "gpt-4" and judge.base_url == endpoint
    assert judge.complete("s", "u") == "Rating: [[9]]" and ChatCompletions.seen[-1][1] is None  # no key sent
    ChatCompletions.failures = 5
    with pytest.raises(DecodeBenchError, match="failed after 1 attempts"):
        judge.complete("s", "u")


class CharTokenizer:
    """Characters as token ids (vocab 128) with a trivial chat template."""

    chat_template = "{{ messages }}"
    eos_token_id = 0

    def apply_chat_template(self, messages, **kwargs):
        return [ord(c) % 128 for c in "".join(m["content"] for m in messages)][-64:]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i)) for i in ids)


def test_hf_judge_generates_with_a_local_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            eos_token_id=0,
        )
    ).eval()
    judge = HFJudge(model, CharTokenizer(), max_new_tokens=6, name="hf:tiny")
    first = judge.complete("system", "user")
    assert isinstance(first, str) and 0 < len(first) <= 6 and judge.complete("system", "user") == first
