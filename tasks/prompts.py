"""Turn chat messages into prompt token ids."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PLAIN_SEPARATOR = "\n\n"  # joins message contents when no chat template is used


def encode_prompt(tokenizer: Any, messages: list[dict[str, str]], use_chat_template: bool) -> list[int]:
    """Encode ``messages`` for generation.

    With a chat template (wanted and present on the tokenizer) the template is applied with
    ``add_generation_prompt=True``; otherwise the message contents are joined with blank lines
    and encoded with the tokenizer's default special tokens (e.g. BOS).

    Args:
        tokenizer: a Hugging Face tokenizer (or any object with ``apply_chat_template`` /
            ``chat_template`` and ``encode``).
        messages: ``[{"role": ..., "content": ...}, ...]`` as built by ``Task.build_messages``.
        use_chat_template: the model config's ``chat_template`` flag.

    Returns:
        The prompt ids as a plain list of ints, shape ``(prompt_len,)``.
    """
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        # transformers 5.x returns a BatchEncoding unless return_dict=False; accept either.
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        if isinstance(ids, Mapping):
            ids = ids["input_ids"]
    else:
        ids = tokenizer.encode(PLAIN_SEPARATOR.join(message["content"] for message in messages))
    return [int(token_id) for token_id in ids]
