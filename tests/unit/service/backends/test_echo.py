"""The diagnostic echo backend: the last user message back, words as tokens, max_tokens and the context size
honoured, the text streamed word by word."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from clemserve.registry import KeyRegistry, ModelSpec
from clemserve.registry.errors import ContextExceededError
from clemserve.service.backends.base import BackendContext
from clemserve.service.backends.echo import DEFAULT_CONTEXT, EchoBackend
from clemserve.service.domain import FinishReason, GenArgs, ImagePart, Message


def echo(tmp_path: Path, **entry: Any) -> EchoBackend:
    spec = ModelSpec.from_dict({"model_name": "e", "backend": "echo", **entry})
    backend = EchoBackend(spec, BackendContext(KeyRegistry(tmp_path / "key.json"), tmp_path))
    asyncio.run(backend.load(lambda line, fraction=None: None))
    return backend


CHAT: list[Message] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "first question"},
    {"role": "assistant", "content": "an answer"},
    {"role": "user", "content": "say  these  words"},
]


def test_the_reply_is_the_last_user_message(tmp_path: Path) -> None:
    done = asyncio.run(echo(tmp_path).generate(CHAT, GenArgs(max_tokens=10)))
    assert done.text == "say  these  words" and done.response == {"response": "say  these  words"}
    assert done.finish_reason is FinishReason.STOP
    # "role:" and the words of every message
    assert (done.prompt_tokens, done.completion_tokens) == (3 + 3 + 3 + 4, 3)
    assert done.prompt == CHAT


def test_max_tokens_cuts_the_words(tmp_path: Path) -> None:
    done = asyncio.run(echo(tmp_path).generate(CHAT, GenArgs(max_tokens=2)))
    assert (done.text, done.completion_tokens, done.finish_reason) == ("say these", 2, FinishReason.LENGTH)


def test_the_context_size_bounds_prompt_and_answer(tmp_path: Path) -> None:
    small = echo(tmp_path, context_size="16")
    asyncio.run(small.generate(CHAT, GenArgs(max_tokens=3)))  # 13 + 3 fit
    with pytest.raises(ContextExceededError) as caught:
        asyncio.run(small.generate(CHAT, GenArgs(max_tokens=4)))
    assert caught.value.context_size == 16
    assert echo(tmp_path).context_size == DEFAULT_CONTEXT


def test_a_stream_gets_the_words_with_their_spaces(tmp_path: Path) -> None:
    pieces: list[str] = []
    asyncio.run(echo(tmp_path).generate(CHAT, GenArgs(max_tokens=10), pieces.append))
    assert pieces == ["say", "  these", "  words"]


def test_images_are_recorded_by_what_the_caller_named(tmp_path: Path) -> None:
    image = ImagePart(data=b"\x89PNG", mime_type="image/png", source="board.png")
    messages: list[Message] = [{"role": "user", "content": "look", "image": [image]}]
    done = asyncio.run(echo(tmp_path).generate(messages, GenArgs()))
    assert done.prompt == [{"role": "user", "content": "look", "image": ["board.png"]}]


def test_count_tokens_counts_words_of_the_role_lines(tmp_path: Path) -> None:
    count = asyncio.run(echo(tmp_path, context_size="1k").count_tokens(CHAT[:2]))
    assert count.prompt == "system: be brief\nuser: first question"
    assert (count.prompt_tokens, count.context_size) == (6, 1024)
