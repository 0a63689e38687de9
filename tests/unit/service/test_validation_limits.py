"""Input limits, pure: each bound refuses with INVALID_ARGUMENT naming the field, and lets the bound itself pass."""

from __future__ import annotations

import json
from typing import Any

import pytest

from clemserve.registry.errors import InvalidArgumentError
from clemserve.service import convert
from clemserve.service.config import parse_server_config
from clemserve.service.validation import (
    DEFAULT_LIMITS,
    Limits,
    parse_json_object,
    validate_extra_args,
    validate_request_size,
)
from clemserve.v1 import clemserve_pb2 as pb

SMALL = Limits(
    request_bytes=1000,
    messages=3,
    message_chars=10,
    total_chars=25,
    max_tokens=50,
    images=2,
    image_bytes=8,
    total_image_bytes=12,
    json_depth=3,
)


def message(content: str = "hi", role: str = "user", images: tuple[bytes, ...] = (), extra: str = "") -> pb.Message:
    return pb.Message(role=role, content=content, images=[pb.Image(data=d) for d in images], extra_json=extra)


def request(messages: list[pb.Message] | None = None, spec: str = "", **args: Any) -> pb.GenerateRequest:
    selector = pb.ModelSelector(spec=pb.ModelSpec(json=spec)) if spec else pb.ModelSelector(name="echo")
    return pb.GenerateRequest(
        model=selector, messages=messages if messages is not None else [message()], args=pb.GenerationArgs(**args)
    )


def refused(req: pb.GenerateRequest, limits: Limits = SMALL) -> InvalidArgumentError:
    with pytest.raises(InvalidArgumentError) as caught:
        convert.generate_request_from_proto(req, limits)
    return caught.value


def accepted(req: pb.GenerateRequest, limits: Limits = SMALL) -> None:
    convert.generate_request_from_proto(req, limits)


def nested(depth: int) -> str:
    """A JSON object ``depth`` levels deep: {"a": {"a": ... 1}}."""
    return '{"a": ' * depth + "1" + "}" * depth


def test_request_size() -> None:
    validate_request_size(1000, SMALL)
    with pytest.raises(InvalidArgumentError) as caught:
        validate_request_size(1001, SMALL)
    assert caught.value.field == "request" and "1000 bytes" in caught.value.description


def test_message_count() -> None:
    accepted(request([message()] * 3))
    assert refused(request([message()] * 4)).field == "messages"


def test_characters_per_message_and_in_all() -> None:
    accepted(request([message("x" * 10)]))
    assert refused(request([message(), message("x" * 11)])).field == "messages[1].content"
    accepted(request([message("x" * 10), message("y" * 10), message("z" * 5)]))
    err = refused(request([message("x" * 10), message("y" * 10), message("z" * 6)]))
    assert err.field == "messages" and "26 characters" in err.description


def test_characters_count_code_points_not_bytes() -> None:
    accepted(request([message("é" * 10)]))  # 20 bytes of UTF-8, 10 characters


def test_max_tokens_cap() -> None:
    accepted(request(max_tokens=50))
    err = refused(request(max_tokens=51))
    assert err.field == "args.max_tokens" and "at most 50" in err.description
    assert refused(request(extra_json='{"max_completion_tokens": 51}')).field == "args.max_completion_tokens"
    assert refused(request(extra_json='{"max_new_tokens": 0}')).field == "args.max_new_tokens"


def test_unset_max_tokens_is_the_default_or_the_cap() -> None:
    assert convert.gen_args_from_proto(pb.GenerationArgs(), SMALL).max_tokens == 50
    assert convert.gen_args_from_proto(pb.GenerationArgs(), DEFAULT_LIMITS).max_tokens == 300


def test_images_count_and_bytes() -> None:
    accepted(request([message(images=(b"12345678", b"1234"))]))
    err = refused(request([message(images=(b"1",)), message(images=(b"1", b"2"))]))
    assert err.field == "messages" and "3 images" in err.description
    assert refused(request([message(images=(b"1", b"123456789"))])).field == "messages[0].images[1]"
    err = refused(request([message(images=(b"12345678",)), message(images=(b"12345",))]))
    assert err.field == "messages" and "13 bytes of images" in err.description


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ('{"name": "\\ud800"}', "surrogate"),
        ('{"name": "a\\udfffb"}', "surrogate"),
        ('{"\\ud83d": 1}', "surrogate"),
        ('{"x": NaN}', "nan"),
        ('{"x": [Infinity]}', "inf"),
        ('{"x": -1e400}', "inf"),
    ],
)
def test_json_that_utf8_or_json_cannot_carry(text: str, what: str) -> None:
    err = refused(request([message(extra=text)]))
    assert err.field == "messages[0].extra_json" and what in err.description
    assert refused(request(extra_json=text)).field == "args.extra_json"
    spec = json.dumps({"model_name": "echo"})[:-1] + ", " + text[1:]
    assert refused(request(spec=spec)).field == "model.spec.json"


def test_escaped_pairs_and_plain_unicode_pass() -> None:
    value = parse_json_object('{"emoji": "\\ud83d\\ude00", "é": "ü"}', "f", SMALL)
    assert value == {"emoji": "😀", "é": "ü"}


def test_json_nesting_depth() -> None:
    assert parse_json_object(nested(3), "f", SMALL)
    for text in (nested(4), '{"a": [[[1]]]}', '{"a": [{"b": []}]}'):
        with pytest.raises(InvalidArgumentError, match="deeper than 3"):
            parse_json_object(text, "f", SMALL)
    assert refused(request([message(extra=nested(4))])).field == "messages[0].extra_json"
    assert refused(request(extra_json=nested(4))).field == "args.extra_json"
    assert refused(request(spec='{"model_name": "echo", "model_config": ' + nested(3) + "}")).field == (
        "model.spec.json"
    )


def test_nesting_past_the_interpreters_recursion_limit() -> None:
    deep = '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert refused(request(extra_json=deep), DEFAULT_LIMITS).field == "args.extra_json"


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"temperature": 5}, "args.extra_json"),
        ({"max_tokens": 10**9}, "args.extra_json"),
        ({"top_p": 1.5}, "args.top_p"),
        ({"top_p": "0.5"}, "args.top_p"),
        ({"top_p": True}, "args.top_p"),
        ({"min_p": -0.1}, "args.min_p"),
        ({"presence_penalty": 3}, "args.presence_penalty"),
        ({"frequency_penalty": -2.5}, "args.frequency_penalty"),
        ({"repetition_penalty": -1}, "args.repetition_penalty"),
        ({"top_k": 1.5}, "args.top_k"),
        ({"top_k": -2}, "args.top_k"),
        ({"seed": "x"}, "args.seed"),
        ({"seed": 2**64}, "args.seed"),
        ({"stop": 5}, "args.stop"),
        ({"stop": ["a", 1]}, "args.stop"),
        ({"max_completion_tokens": "10"}, "args.max_completion_tokens"),
    ],
)
def test_generation_arguments_of_the_wrong_type_or_range(extra: dict[str, Any], field: str) -> None:
    assert refused(request(extra_json=json.dumps(extra))).field == field


def test_generation_arguments_in_range_pass() -> None:
    extra = {"top_p": 1, "min_p": 0.0, "top_k": -1, "seed": -5, "stop": ["a"], "max_completion_tokens": 50}
    assert validate_extra_args(dict(extra), SMALL) == extra
    assert validate_extra_args({"stop": "x", "custom": {"any": [1, None]}}, SMALL)


def test_limits_in_count_tokens_and_selector_conversion() -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        convert.messages_from_proto([message()] * 4, limits=SMALL)
    assert caught.value.field == "messages"
    with pytest.raises(InvalidArgumentError) as caught:
        convert.selector_from_proto(pb.ModelSelector(spec=pb.ModelSpec(json=nested(4))), limits=SMALL)
    assert caught.value.field == "model.spec.json"


def test_server_flags_and_environment_twins() -> None:
    assert parse_server_config([], {}).limits == DEFAULT_LIMITS
    config = parse_server_config(
        [
            "--max-request-mb",
            "0.5",
            "--max-messages",
            "7",
            "--max-message-chars",
            "100",
            "--max-total-chars",
            "300",
            "--max-tokens-cap",
            "64",
            "--max-images",
            "0",
            "--max-image-mb",
            "1",
            "--max-images-mb",
            "2",
        ],
        {"CLEMSERVE_MAX_JSON_DEPTH": "5", "CLEMSERVE_MAX_MESSAGES": "99"},
    )
    assert config.limits == Limits(
        request_bytes=512 * 1024,
        messages=7,
        message_chars=100,
        total_chars=300,
        max_tokens=64,
        images=0,
        image_bytes=1024 * 1024,
        total_image_bytes=2 * 1024 * 1024,
        json_depth=5,
    )


@pytest.mark.parametrize(
    ("flag", "value"), [("--max-messages", "0"), ("--max-json-depth", "x"), ("--max-images", "-1")]
)
def test_bad_limit_values_stop_the_start(flag: str, value: str) -> None:
    with pytest.raises(SystemExit, match=flag):
        parse_server_config([flag, value], {})
