"""Request validation: pure rules, each raising an error that names the offending field."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from clemserve.registry.errors import InvalidArgumentError

from .domain import Message

ROLES = ("system", "user", "assistant")
MAX_TEMPERATURE = 2.0


def validate_messages(messages: Sequence[Message], field: str = "messages") -> None:
    if not messages:
        raise InvalidArgumentError(field, "must hold at least one message")
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise InvalidArgumentError(
                f"{field}[{i}].role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}"
            )
        if not isinstance(message.get("content"), str):
            raise InvalidArgumentError(f"{field}[{i}].content", "must be a string")


def validate_temperature(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgumentError("args.temperature", f"must be a finite number, got {value!r}")
    if not 0.0 <= value <= MAX_TEMPERATURE:
        raise InvalidArgumentError("args.temperature", f"must be between 0 and {MAX_TEMPERATURE}, got {value}")
    return float(value)


def validate_max_tokens(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError("args.max_tokens", f"must be an integer, got {value!r}")
    if value < 1:
        raise InvalidArgumentError("args.max_tokens", f"must be at least 1, got {value}")
    return value


def validate_request_id(value: str) -> str:
    if len(value) > 128 or not value.isprintable():
        raise InvalidArgumentError("request_id", "must be at most 128 printable characters")
    return value


def reject_unsupported_args(extra: dict[str, Any], supported: Sequence[str], backend: str) -> None:
    """Ignore nothing silently: a generation argument the backend cannot honour is an error."""
    unknown = sorted(set(extra) - set(supported))
    if unknown:
        allowed = ", ".join(("temperature", "max_tokens", *supported))
        raise InvalidArgumentError(
            f"args.{unknown[0]}",
            f"backend {backend} does not support generation argument(s) {', '.join(unknown)}; it takes {allowed}",
        )
