"""Conversion between clemserve.v1 messages and domain types, in one place."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from clemserve.registry import ModelSpec
from clemserve.registry.errors import InvalidArgumentError
from clemserve.v1 import clemserve_pb2 as pb

from .domain import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    GenArgs,
    Generation,
    ImagePart,
    Message,
    TokenCount,
)
from .validation import validate_max_tokens, validate_temperature

Selector = str | dict[str, Any]


def _json_object(text: str, field: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidArgumentError(field, f"is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidArgumentError(field, f"must be a JSON object, got {type(value).__name__}")
    return value


def selector_from_proto(selector: pb.ModelSelector, field: str = "model") -> Selector:
    kind = selector.WhichOneof("selector")
    if kind == "name":
        if not selector.name:
            raise InvalidArgumentError(f"{field}.name", "must not be empty")
        return selector.name
    if kind == "spec":
        spec = _json_object(selector.spec.json, f"{field}.spec.json")
        if not spec:
            raise InvalidArgumentError(f"{field}.spec.json", "must be a non-empty JSON object")
        return spec
    raise InvalidArgumentError(field, "is required: set a model name or spec")


def messages_from_proto(messages: Sequence[pb.Message], field: str = "messages") -> list[Message]:
    result: list[Message] = []
    for i, message in enumerate(messages):
        converted: Message = _json_object(message.extra_json, f"{field}[{i}].extra_json")
        clash = {"role", "content", "image"} & converted.keys()
        if clash:
            raise InvalidArgumentError(
                f"{field}[{i}].extra_json", f"must not repeat the fields {', '.join(sorted(clash))}"
            )
        converted["role"] = message.role
        converted["content"] = message.content
        if message.images:
            converted["image"] = [
                ImagePart(data=img.data, mime_type=img.mime_type, source=img.source) for img in message.images
            ]
        result.append(converted)
    return result


def gen_args_from_proto(args: pb.GenerationArgs) -> GenArgs:
    temperature = args.temperature if args.HasField("temperature") else DEFAULT_TEMPERATURE
    max_tokens = args.max_tokens if args.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    return GenArgs(
        temperature=validate_temperature(temperature),
        max_tokens=validate_max_tokens(max_tokens),
        extra=_json_object(args.extra_json, "args.extra_json"),
    )


def spec_to_proto(spec: ModelSpec) -> pb.ModelSpec:
    return pb.ModelSpec(json=spec.to_string())


def generation_to_proto(generation: Generation, spec: ModelSpec, request_id: str) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        prompt_json=json.dumps(generation.prompt, ensure_ascii=False),
        response_json=json.dumps(generation.response, ensure_ascii=False),
        response_text=generation.text,
        usage=pb.Usage(prompt_tokens=generation.prompt_tokens, completion_tokens=generation.completion_tokens),
        finish_reason=pb.FinishReason.Value(f"FINISH_REASON_{generation.finish_reason.name}"),
        model_spec=spec_to_proto(spec),
        request_id=request_id,
    )


def token_count_to_proto(count: TokenCount) -> pb.CountTokensResponse:
    return pb.CountTokensResponse(
        prompt_tokens=count.prompt_tokens, context_size=count.context_size, prompt=count.prompt
    )
