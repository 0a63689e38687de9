"""Request validation and proto conversion on the server side: pure functions, no server."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from clemserve.registry.errors import InvalidArgumentError
from clemserve.service import convert
from clemserve.service.domain import ImagePart
from clemserve.service.validation import (
    Limits,
    reject_unsupported_args,
    validate_max_tokens,
    validate_messages,
    validate_request_id,
    validate_temperature,
)
from clemserve.v1 import clemserve_pb2 as pb


def field_of(call: object, *args: object) -> str:
    with pytest.raises(InvalidArgumentError) as caught:
        call(*args)  # type: ignore[operator]
    return caught.value.field


def test_messages_rules_name_the_field() -> None:
    assert field_of(validate_messages, []) == "messages"
    assert field_of(validate_messages, [{"role": "user", "content": "a"}, {"role": "x", "content": "b"}]) == (
        "messages[1].role"
    )
    assert field_of(validate_messages, [{"role": "user", "content": None}]) == "messages[0].content"
    validate_messages([{"role": "system", "content": ""}, {"role": "user", "content": "ok"}])


@pytest.mark.parametrize("value", [-0.01, 2.01, math.inf, math.nan, "0.5", True, None])
def test_bad_temperatures(value: object) -> None:
    assert field_of(validate_temperature, value) == "args.temperature"


@pytest.mark.parametrize("value", [0, -5, 1.5, "10", False])
def test_bad_max_tokens(value: object) -> None:
    assert field_of(validate_max_tokens, value) == "args.max_tokens"


def test_good_values_pass_through() -> None:
    assert validate_temperature(0) == 0.0 and validate_temperature(2) == 2.0
    assert validate_max_tokens(1) == 1
    assert validate_request_id("abc-123") == "abc-123"
    assert field_of(validate_request_id, "x" * 129) == "request_id"
    assert field_of(validate_request_id, "line\nbreak") == "request_id"


def test_unsupported_args_are_named() -> None:
    reject_unsupported_args({"top_p": 0.9}, ("top_p",), "b")
    with pytest.raises(InvalidArgumentError) as caught:
        reject_unsupported_args({"top_p": 0.9, "seed": 1}, (), "b")
    assert caught.value.field == "args.seed" and "top_p" in str(caught.value)


def test_selector_conversion() -> None:
    assert convert.selector_from_proto(pb.ModelSelector(name="m")) == "m"
    spec = convert.selector_from_proto(pb.ModelSelector(spec=pb.ModelSpec(json='{"model_name":"m","n":1}')))
    assert spec == {"model_name": "m", "n": 1} and type(spec["n"]) is int
    assert field_of(convert.selector_from_proto, pb.ModelSelector()) == "model"
    assert field_of(convert.selector_from_proto, pb.ModelSelector(spec=pb.ModelSpec(json="[1]"))) == ("model.spec.json")


def test_message_conversion_keeps_extras_and_images() -> None:
    messages = convert.messages_from_proto(
        [
            pb.Message(
                role="user",
                content="look",
                images=[pb.Image(data=b"\x89PNG", mime_type="image/png", source="a.png")],
                extra_json='{"turn": 3}',
            )
        ]
    )
    assert messages[0]["turn"] == 3 and messages[0]["content"] == "look"
    assert messages[0]["image"] == [ImagePart(b"\x89PNG", "image/png", "a.png")]
    clash = pb.Message(role="user", content="x", extra_json='{"role": "system"}')
    assert field_of(convert.messages_from_proto, [clash]) == "messages[0].extra_json"


def test_gen_args_defaults_and_extras() -> None:
    args = convert.gen_args_from_proto(pb.GenerationArgs())
    assert (args.temperature, args.max_tokens, args.extra) == (0.0, 300, {})
    args = convert.gen_args_from_proto(pb.GenerationArgs(temperature=0.7, max_tokens=5, extra_json='{"top_k": 3}'))
    assert (args.temperature, args.max_tokens, args.extra) == (0.7, 5, {"top_k": 3})
    assert field_of(convert.gen_args_from_proto, pb.GenerationArgs(max_tokens=-2)) == "args.max_tokens"


def test_limits_are_equal_and_hash_alike_by_their_bounds() -> None:
    """The conversions key their caches on the server's Limits (a hash computed once): Limits with other
    bounds must not find what equal ones left there."""
    cache = {Limits(): "default"}
    assert cache[Limits()] == "default" and hash(Limits()) == hash(Limits())
    smaller = dataclasses.replace(Limits(), json_depth=2)
    assert smaller != Limits() and smaller not in cache
    cache[smaller] = "smaller"
    assert cache[Limits(json_depth=2)] == "smaller" and cache[Limits()] == "default"


def test_reply_json_is_json_dumps() -> None:
    # the reply's prompt and response objects: the text json.dumps(..., ensure_ascii=False) writes, refusals alike
    value = {"prompt": [{"role": "user", "content": 'Grüße, 世界 "q"\n'}], "n": 1.5, "none": None, "t": [True]}
    assert convert._json_text(value) == json.dumps(value, ensure_ascii=False)
    with pytest.raises(TypeError):
        convert._json_text({"x": object()})
