"""Judge backends for MT-Bench: an OpenAI-compatible chat endpoint, or a local Hugging Face model.

Both turn ``(system, user)`` into the judge's text; :mod:`decodebench.tasks.mt_bench_judging`
builds the prompts and parses the ratings. ``judge: none`` builds no judge at all.

- ``openai``: ``POST {base_url}/chat/completions`` (OpenAI, vLLM, llama.cpp server, ...). URL and
  model come from the config, else ``$OPENAI_BASE_URL`` / ``$DECODEBENCH_JUDGE_MODEL``, else
  FastChat's defaults (api.openai.com, gpt-4). The key is read ONLY from the environment variable
  the config names (``api_key_env``): a key written in the config would be copied into every run
  directory's ``config.yaml``.
- ``hf``: a catalogue model name (``conf/model/``), a local model directory or a hub id, decoded
  greedily with ``transformers``' ``generate`` (the judge is not what is being measured).
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from decodebench.config import check
from decodebench.registry import DecodeBenchError

log = logging.getLogger(__name__)

JUDGE_KINDS = ("none", "openai", "hf")
DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_OPENAI_MODEL = "gpt-4"  # FastChat's MT-Bench judge


@dataclass
class OpenAIJudgeConfig:
    base_url: str | None = None  # null: $OPENAI_BASE_URL, else https://api.openai.com/v1
    model: str | None = None  # null: $DECODEBENCH_JUDGE_MODEL, else gpt-4
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the key (unset: no key sent)
    temperature: float = 0.0  # FastChat: 0
    max_tokens: int = 2048  # FastChat: 2048
    timeout_s: float = 120.0
    retries: int = 3  # attempts after the first one, with exponential backoff

    def __post_init__(self) -> None:
        check(self.temperature >= 0, "task.params.openai.temperature", self.temperature, ">= 0")
        check(self.max_tokens >= 1, "task.params.openai.max_tokens", self.max_tokens, ">= 1")
        check(self.retries >= 0, "task.params.openai.retries", self.retries, ">= 0")


@dataclass
class HFJudgeConfig:
    model: str = "smollm2-135m"  # catalogue name, local HF model directory or hub id
    device: str = "cpu"
    dtype: str = "float32"
    max_new_tokens: int = 512

    def __post_init__(self) -> None:
        check(self.max_new_tokens >= 1, "task.params.hf.max_new_tokens", self.max_new_tokens, ">= 1")


class OpenAIJudge:
    """A judge behind an OpenAI-compatible ``/chat/completions`` endpoint."""

    def __init__(self, cfg: OpenAIJudgeConfig):
        self.cfg = cfg
        self.base_url = (cfg.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_OPENAI_BASE_URL).rstrip("/")
        self.model = cfg.model or os.environ.get("DECODEBENCH_JUDGE_MODEL") or DEFAULT_OPENAI_MODEL
        self.name = f"openai:{self.model}"

    def complete(self, system: str, user: str) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
                "temperature": self.cfg.temperature,
                "max_tokens": self.cfg.max_tokens,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.cfg.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        problem: Exception = DecodeBenchError("no attempt made")
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(min(2.0**attempt, 30.0))
            request = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
                    return json.loads(response.read())["choices"][0]["message"]["content"]
            except (urllib.error.URLError, OSError, KeyError, IndexError, json.JSONDecodeError) as error:
                problem = error
                log.warning("judge %s: attempt %d failed: %s", self.name, attempt + 1, error)
        raise DecodeBenchError(
            f"judge {self.name} at {self.base_url} failed after {self.cfg.retries + 1} attempts: {problem}"
        )


class HFJudge:
    """A local causal LM as judge (greedy decoding with ``generate``)."""

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int, name: str):
        self.model, self.tokenizer, self.max_new_tokens, self.name = model, tokenizer, max_new_tokens, name

    @classmethod
    def from_config(cls, cfg: HFJudgeConfig, cache_dir: str | None) -> HFJudge:
        from decodebench.config import ModelConfig
        from decodebench.models.loading import available_models, load_model, load_model_config

        if cfg.model in available_models():
            model_cfg = load_model_config(cfg.model)
        elif Path(cfg.model).expanduser().is_dir():
            model_cfg = ModelConfig(name=Path(cfg.model).name, source="path", path=cfg.model)
        else:
            model_cfg = ModelConfig(name=cfg.model, source="hub", hub_id=cfg.model)
        loaded = load_model(model_cfg, device=cfg.device, dtype=cfg.dtype, cache_dir=cache_dir)
        if loaded.tokenizer is None:
            raise DecodeBenchError(f"judge model '{cfg.model}' has no tokenizer")
        return cls(loaded.model, loaded.tokenizer, cfg.max_new_tokens, f"hf:{cfg.model}")

    def complete(self, system: str, user: str) -> str:
        import torch

        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
            ids = ids["input_ids"] if isinstance(ids, dict) else ids
        else:
            ids = self.tokenizer.encode(f"{system}\n\n{user}\n\n")
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([list(ids)], device=device)
        with torch.no_grad():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.eos_token_id,
            )
        return self.tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


def build_judge(kind: str, openai: OpenAIJudgeConfig, hf: HFJudgeConfig, cache_dir: str | None) -> Any | None:
    """The judge named by ``kind`` (``none`` → None)."""
    if kind == "none":
        return None
    if kind == "openai":
        return OpenAIJudge(openai)
    return HFJudge.from_config(hf, cache_dir)
