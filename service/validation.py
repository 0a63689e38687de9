"""Request validation: pure rules, each raising an error that names the offending field."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from clemserve.registry.errors import InvalidArgumentError

from .domain import ImagePart, Message

ROLES = ("system", "user", "assistant")
MAX_TEMPERATURE = 2.0
MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """How much one request may hold; each bound is a server flag (``clemserve serve --help``)."""

    #: bytes of the serialized request (gRPC refuses messages over --max-message-mb before this)
    request_bytes: int = 48 * MiB
    messages: int = 1024
    #: characters (code points) of one message's content, and of all contents together
    message_chars: int = 1_000_000
    total_chars: int = 4_000_000
    #: the largest max_tokens (and max_completion_tokens, max_new_tokens, max_output_tokens) a caller may ask for
    max_tokens: int = 65_536
    images: int = 32
    image_bytes: int = 20 * MiB
    total_image_bytes: int = 40 * MiB
    #: nesting of JSON objects and lists in a model spec, extra_json and generation arguments
    json_depth: int = 16

    def __hash__(self) -> int:
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:
        """Computed once: the conversions key their caches on the server's Limits, on every call."""
        return hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))


DEFAULT_LIMITS = Limits()


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


def validate_max_tokens(value: Any, cap: int | None = None, field: str = "args.max_tokens") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(field, f"must be an integer, got {value!r}")
    if value < 1:
        raise InvalidArgumentError(field, f"must be at least 1, got {value}")
    if cap is not None and value > cap:
        raise InvalidArgumentError(field, f"must be at most {cap} on this server, got {value}")
    return value


def validate_request_id(value: str) -> str:
    if len(value) > 128 or not value.isprintable():
        raise InvalidArgumentError("request_id", "must be at most 128 printable characters")
    return value


def reject_unsupported_args(extra: dict[str, Any], supported: Sequence[str], backend: str) -> None:
    """Ignore nothing silently: a generation argument the backend cannot honour is an error."""
    if not extra:
        return
    unknown = sorted(set(extra) - set(supported))
    if unknown:
        allowed = ", ".join(("temperature", "max_tokens", *supported))
        raise InvalidArgumentError(
            f"args.{unknown[0]}",
            f"backend {backend} does not support generation argument(s) {', '.join(unknown)}; it takes {allowed}",
        )


# -- input limits -----------------------------------------------------------------------------------


def validate_request_size(size: int, limits: Limits) -> None:
    if size > limits.request_bytes:
        raise InvalidArgumentError(
            "request", f"is {size} bytes; this server takes requests of at most {limits.request_bytes} bytes"
        )


def validate_message_count(count: int, limits: Limits, field: str = "messages") -> None:
    if count > limits.messages:
        raise InvalidArgumentError(field, f"holds {count} messages; this server takes at most {limits.messages}")


def validate_message_sizes(messages: Sequence[Message], limits: Limits, field: str = "messages") -> None:
    """Characters per message and in all, images per request and their bytes, one by one and in all."""
    validate_message_count(len(messages), limits, field)
    chars = images = image_bytes = 0
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, str):
            if len(content) > limits.message_chars:
                raise InvalidArgumentError(
                    f"{field}[{i}].content",
                    f"holds {len(content)} characters; this server takes at most {limits.message_chars} per message",
                )
            chars += len(content)
        for j, image in enumerate(message.get("image") or ()):
            size = len(image.data) if isinstance(image, ImagePart) else 0
            if size > limits.image_bytes:
                raise InvalidArgumentError(
                    f"{field}[{i}].images[{j}]",
                    f"is {size} bytes; this server takes images of at most {limits.image_bytes} bytes",
                )
            images += 1
            image_bytes += size
    if chars > limits.total_chars:
        raise InvalidArgumentError(
            field, f"hold {chars} characters in all; this server takes at most {limits.total_chars}"
        )
    if images > limits.images:
        raise InvalidArgumentError(field, f"hold {images} images; this server takes at most {limits.images}")
    if image_bytes > limits.total_image_bytes:
        raise InvalidArgumentError(
            field, f"hold {image_bytes} bytes of images; this server takes at most {limits.total_image_bytes}"
        )


#: lone UTF-16 surrogates: a JSON text may spell them ("\\ud800"), UTF-8 cannot carry them
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def parse_json_object(text: str, field: str, limits: Limits) -> dict[str, Any]:
    """A JSON object ("" for none) of plain JSON values: finite numbers, UTF-8 strings, bounded nesting."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except RecursionError:
        raise InvalidArgumentError(field, f"nests deeper than {limits.json_depth} levels") from None
    except ValueError as exc:
        raise InvalidArgumentError(field, f"is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidArgumentError(field, f"must be a JSON object, got {type(value).__name__}")
    validate_json_value(value, field, limits.json_depth)
    return value


def validate_json_value(value: Any, field: str, max_depth: int) -> None:
    """Walk ``value`` without recursion: no deeper than ``max_depth`` objects and lists, nothing JSON lacks."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > max_depth:
                raise InvalidArgumentError(field, f"nests deeper than {max_depth} levels")
            if isinstance(item, dict):
                for key in item:
                    _check_text(key, field)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(item, str):
            _check_text(item, field)
        elif isinstance(item, float) and not math.isfinite(item):
            raise InvalidArgumentError(field, f"holds {item!r}, which JSON cannot carry")
        elif item is not None and not isinstance(item, bool | int | float):
            raise InvalidArgumentError(field, f"holds a {type(item).__name__}, which is not a JSON value")


def _check_text(text: Any, field: str) -> None:
    if not isinstance(text, str):
        raise InvalidArgumentError(field, f"has a key of type {type(text).__name__}; JSON keys are strings")
    if _SURROGATE.search(text):
        raise InvalidArgumentError(field, "holds a lone UTF-16 surrogate (such as \\ud800), which is not valid UTF-8")


def _number(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise InvalidArgumentError(f"args.{name}", f"must be a number between {low} and {high}, got {value!r}")


def _integer(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgumentError(f"args.{name}", f"must be an integer between {low} and {high}, got {value!r}")


#: caps on how many tokens a caller may ask for, whatever the backend calls the argument
_TOKEN_CAPS = ("max_completion_tokens", "max_new_tokens", "max_output_tokens")
#: further generation arguments the providers and engines share, with the types and ranges they accept
_RANGES = {
    "top_p": (0.0, 1.0),
    "min_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "repetition_penalty": (0.0, 10.0),
}
_INT64 = 2**63 - 1


def validate_extra_args(extra: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """The generation arguments besides temperature and max_tokens (which have fields of their own)."""
    if not extra:
        return extra
    repeated = sorted({"temperature", "max_tokens"} & extra.keys())
    if repeated:
        raise InvalidArgumentError(
            "args.extra_json", f"must not repeat {', '.join(repeated)}: set the field of that name instead"
        )
    for name, value in extra.items():
        if name in _TOKEN_CAPS:
            validate_max_tokens(value, limits.max_tokens, f"args.{name}")
        elif name in _RANGES:
            _number(name, value, *_RANGES[name])
        elif name == "top_k":
            _integer(name, value, -1, _INT64)
        elif name == "seed":
            _integer(name, value, -_INT64 - 1, _INT64)
        elif name == "stop" and not (
            isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        ):
            raise InvalidArgumentError("args.stop", f"must be a string or a list of strings, got {value!r}")
    return extra
