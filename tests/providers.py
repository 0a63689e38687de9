"""What the remote-backend tests share: distinctive fake keys and the scan for leaked key parts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.serving import ServerProcess

#: distinctive fake keys, random so that redaction never meets them in ordinary words; the leak scans
#: look for any part of them longer than the last 4 characters
FAKE_KEYS = {
    "openai": "sk-u8jzPde0IgxLd6GncfBAepfJ",
    "openai_compatible": "sk-Bd0Kh8oOOL8dKLzdocJ2isAj",
    "openrouter": "sk-IhKtJ0RlgLKOmxgJTeKdNnFR",
    "azure_gpt": "sk-IBXuDL7DxtpYlSXpfKtHF4vU",
    "azure_claude": "sk-CsMehGAkWvj7FAc9QeWJKY40",
    "anthropic": "sk-uvSwMFLZDe1f8rESQedUStPK",
    "mistral": "sk-R0CsTy4Qwb8DwkNhFdnXsiVp",
    "cohere": "sk-zz63FfkCzJr4i0B3JrTAwR4y",
    "google": "sk-9ojfljoQoaF1LlqsajAIxNKu",
}

ServeRemote = Callable[..., ServerProcess]


def assert_no_key_leaks(text: str) -> None:
    """No fake key, nor any part of one longer than its last 4 characters, in ``text``."""
    for name, key in FAKE_KEYS.items():
        for i in range(len(key) - 4):
            assert key[i : i + 5] not in text, f"part of the {name} key leaked: {key[i : i + 5]!r}"


def openai_reply(content: str) -> dict[str, Any]:
    """A minimal OpenAI chat completion answering ``content`` (3 prompt tokens, 1 completion token)."""
    return {
        "id": "c1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }


def all_text(path: Path) -> str:
    return path.read_text(errors="replace")
