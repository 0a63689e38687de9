"""Domain types between the servicer and the backends (no protobuf, no grpc)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

#: A chat message as clembench passes it: {"role", "content", ["image": list[ImagePart]], ...extras}.
Message = dict[str, Any]

DEFAULT_TEMPERATURE = 0.0
DEFAULT_MAX_TOKENS = 300


@dataclass(frozen=True)
class ImagePart:
    """Image bytes a client read and sent; ``source`` is what the caller named (path, URL, 'data:')."""

    data: bytes
    mime_type: str
    source: str

    def __repr__(self) -> str:
        return f"ImagePart({self.mime_type or 'unknown'}, {len(self.data)} bytes, {self.source!r})"


@dataclass(frozen=True)
class GenArgs:
    temperature: float = DEFAULT_TEMPERATURE
    max_tokens: int = DEFAULT_MAX_TOKENS
    #: further arguments, e.g. {"top_p": 0.9}; each backend accepts the ones it can honour
    extra: dict[str, Any] = field(default_factory=dict)


class FinishReason(enum.Enum):
    UNSPECIFIED = 0
    STOP = 1
    LENGTH = 2


@dataclass
class Generation:
    """One row's result: clembench's (prompt, response_object, response_text) plus usage."""

    prompt: Any
    response: dict[str, Any]
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason = FinishReason.UNSPECIFIED


@dataclass(frozen=True)
class TokenCount:
    prompt_tokens: int
    context_size: int
    prompt: str = ""
