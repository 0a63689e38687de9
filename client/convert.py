"""Python values <-> clemserve.v1 messages, on the client side."""

from __future__ import annotations

import base64
import binascii
import json
import mimetypes
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from clemserve.registry import ModelSpec, ensure_alternating_roles
from clemserve.registry.errors import InvalidArgumentError
from clemserve.v1 import clemserve_pb2 as pb

#: the triple clembench's generate_response returns
Triple = tuple[Any, Any, str]
Selector = str | Mapping[str, Any] | ModelSpec

_IMAGE_TIMEOUT_S = 30.0


def selector_spec(selector: Selector) -> ModelSpec:
    """The selector as a ModelSpec: a name is a spec of that name alone."""
    if isinstance(selector, ModelSpec):
        return selector
    if isinstance(selector, str):
        return ModelSpec.from_name(selector)
    return ModelSpec.from_dict(dict(selector))


def selector_to_proto(selector: Selector) -> pb.ModelSelector:
    if isinstance(selector, str):
        return pb.ModelSelector(name=selector)
    return pb.ModelSelector(spec=pb.ModelSpec(json=selector_spec(selector).to_string()))


def selector_name(selector: Selector) -> str | None:
    """The model name a selector gives (what a route matches), None where it names none."""
    name = selector_spec(selector).get("model_name")
    return str(name) if name else None


def spec_from_proto(spec: pb.ModelSpec) -> ModelSpec:
    return ModelSpec.from_dict(json.loads(spec.json))


def _sniff(data: bytes) -> str:
    signatures = {
        b"\x89PNG\r\n\x1a\n": "image/png",
        b"\xff\xd8\xff": "image/jpeg",
        b"GIF87a": "image/gif",
        b"GIF89a": "image/gif",
        b"BM": "image/bmp",
    }
    for magic, mime in signatures.items():
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return ""


def read_image(ref: str, field: str) -> pb.Image:
    """Read a local path, an http(s) URL or a data URL here, so the server never opens them."""
    try:
        if ref.startswith("data:"):
            header, _, payload = ref.partition(",")
            mime = header[5:].split(";")[0]
            data = base64.b64decode(payload, validate=True) if ";base64" in header else payload.encode()
            return pb.Image(data=data, mime_type=mime or _sniff(data), source="data:")
        if ref.startswith(("http://", "https://")):
            with urllib.request.urlopen(ref, timeout=_IMAGE_TIMEOUT_S) as reply:
                data = reply.read()
                mime = reply.headers.get_content_type() if reply.headers else ""
            return pb.Image(data=data, mime_type=_sniff(data) or mime, source=ref)
        data = Path(ref).read_bytes()
    except (OSError, ValueError, binascii.Error) as exc:
        raise InvalidArgumentError(field, f"cannot read image {ref[:80]!r}: {exc}") from None
    return pb.Image(data=data, mime_type=_sniff(data) or (mimetypes.guess_type(ref)[0] or ""), source=ref)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_shapes(messages: Sequence[Any], field: str) -> None:
    """What the wire cannot carry is refused here, with the field named as the server would."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidArgumentError(field, f"must be a list of message dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidArgumentError(f"{field}[{i}]", f"must be a dict, got {type(message).__name__}")
        if not isinstance(message.get("role"), str):
            raise InvalidArgumentError(f"{field}[{i}].role", "must be a string")
        content = message.get("content")
        culled = i == 0 and message["role"] == "system" and not content
        if not isinstance(content, str) and not culled:
            raise InvalidArgumentError(f"{field}[{i}].content", f"must be a string, got {type(content).__name__}")
        if isinstance(content, str) and not _is_utf8(content):
            raise InvalidArgumentError(f"{field}[{i}].content", "is not valid UTF-8 (it holds a lone surrogate)")


#: the message keys that have fields of their own; any other key travels in extra_json
_MESSAGE_FIELDS = frozenset(("role", "content", "image"))


def _merged(messages: Sequence[Mapping[str, Any]]) -> Sequence[Mapping[str, Any]]:
    """clembench's merging (``ensure_alternating_roles``). A game sends alternating turns, mostly: then there
    is nothing to merge or cull, and the messages are read as they are (nothing here changes them)."""
    first = messages[0]
    if first["role"] == "system" and not first["content"]:
        return ensure_alternating_roles([dict(m) for m in messages])
    for i in range(1, len(messages)):
        if messages[i - 1]["role"] == messages[i]["role"]:
            return ensure_alternating_roles([dict(m) for m in messages])
    return messages


def messages_to_proto(messages: Sequence[Mapping[str, Any]], field: str = "messages") -> list[pb.Message]:
    """clembench's message merging (the logged prompt must match in-process clembench), then encoding."""
    _check_shapes(messages, field)
    result = []
    for i, message in enumerate(_merged(messages) if messages else ()):
        wire = pb.Message(role=message["role"], content=message["content"])
        if len(message) > 2 or "image" in message:
            extras = {k: v for k, v in message.items() if k not in _MESSAGE_FIELDS}
            if extras:
                try:
                    extra_json = json.dumps(extras, ensure_ascii=False)
                except (TypeError, ValueError) as exc:
                    raise InvalidArgumentError(f"{field}[{i}]", f"extra keys must be JSON values: {exc}") from None
                if not _is_utf8(extra_json):
                    raise InvalidArgumentError(f"{field}[{i}]", "extra keys are not valid UTF-8 (a lone surrogate)")
                wire.extra_json = extra_json
            images = message.get("image") or []
            if isinstance(images, str):
                images = [images]
            wire.images.extend(read_image(str(ref), f"{field}[{i}].image[{j}]") for j, ref in enumerate(images))
        result.append(wire)
    return result


#: the generation arguments that have fields of their own; the others travel in extra_json
_ARG_FIELDS = ("temperature", "max_tokens")


def _numeric(name: str, value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if name == "max_tokens":
            raise InvalidArgumentError("args.max_tokens", f"must be an integer, got {value!r}")
        raise InvalidArgumentError(f"args.{name}", f"must be a number, got {value!r}")
    return value


def gen_args_to_proto(gen_args: Mapping[str, Any]) -> pb.GenerationArgs:
    args = pb.GenerationArgs()
    fields = 0
    if "temperature" in gen_args:
        fields += 1
        args.temperature = float(_numeric("temperature", gen_args["temperature"]))
    if "max_tokens" in gen_args:
        fields += 1
        value = _numeric("max_tokens", gen_args["max_tokens"])
        if not float(value).is_integer():
            raise InvalidArgumentError("args.max_tokens", f"must be an integer, got {value!r}")
        if abs(value) >= 2**63:
            raise InvalidArgumentError("args.max_tokens", f"is out of range: {value}")
        args.max_tokens = int(value)
    if len(gen_args) > fields:
        extra = {k: v for k, v in gen_args.items() if k not in _ARG_FIELDS}
        try:
            args.extra_json = json.dumps(extra)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError("args", f"generation arguments must be JSON values: {exc}") from None
    return args


def triple_from_proto(response: pb.GenerateResponse) -> Triple:
    return json.loads(response.prompt_json), json.loads(response.response_json), response.response_text
