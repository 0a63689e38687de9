"""Input limits through the real server and client: each bound, set small, refuses with INVALID_ARGUMENT naming
the field, and the server goes on serving; a message over gRPC's own limit is RESOURCE_EXHAUSTED."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

import clemserve.client as backends
from clemserve.v1 import clemserve_pb2 as pb
from clemserve.v1 import clemserve_pb2_grpc as pb_grpc
from tests.serving import ServerProcess, start_server

USER = [{"role": "user", "content": "hi"}]
LIMIT_FLAGS = (
    "--max-request-mb", "0.01",  # 10485 bytes
    "--max-messages", "4",
    "--max-message-chars", "50",
    "--max-total-chars", "120",
    "--max-tokens-cap", "64",
    "--max-images", "2",
    "--max-image-mb", "0.0001",  # 104 bytes
    "--max-images-mb", "0.00015",  # 157 bytes
    "--max-message-mb", "1",  # gRPC's own limit
)  # fmt: skip


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # one limit through its environment twin
    proc = start_server(tmp_path_factory.mktemp("limited"), *LIMIT_FLAGS, env={"CLEMSERVE_MAX_JSON_DEPTH": "4"})
    yield proc
    assert proc.stop() == 0, proc.log()


def image(size: int) -> str:
    return "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * (size - 8)).decode()


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"k": value}
    return value


def alternating(count: int, content: str = "hi") -> list[dict[str, str]]:
    return [{"role": ("user", "assistant")[i % 2], "content": content} for i in range(count)]


# (what is sent, the field named); each row is sent through clemserve.client's Model
CASES: list[tuple[str, list[dict[str, Any]], dict[str, Any], str]] = [
    ("request size", [{"role": "user", "content": "x" * 11_000}], {}, "request"),
    ("messages", alternating(5), {}, "messages"),
    ("characters per message", [*alternating(2), {"role": "user", "content": "x" * 51}], {}, "messages[2].content"),
    ("characters in all", alternating(3, "x" * 45), {}, "messages"),
    ("max_tokens cap", USER, {"max_tokens": 65}, "args.max_tokens"),
    ("max_completion_tokens cap", USER, {"max_completion_tokens": 1000}, "args.max_completion_tokens"),
    ("images", [{"role": "user", "content": "x", "image": [image(10)] * 3}], {}, "messages"),
    ("image bytes", [{"role": "user", "content": "x", "image": [image(20), image(105)]}], {}, "messages[0].images[1]"),
    ("image bytes in all", [{"role": "user", "content": "x", "image": [image(100)] * 2}], {}, "messages"),
    ("JSON depth of a message", [{"role": "user", "content": "x", "meta": nested(4)}], {}, "messages[0].extra_json"),
    ("JSON depth of the arguments", USER, {"logit_bias": nested(4)}, "args.extra_json"),
    ("a number JSON lacks", [{"role": "user", "content": "x", "score": float("nan")}], {}, "messages[0].extra_json"),
    ("an argument's type", USER, {"top_p": "high"}, "args.top_p"),
    ("an argument's range", USER, {"top_p": 1.5}, "args.top_p"),
    ("an integer argument's range", USER, {"seed": 2**64}, "args.seed"),
]


@pytest.mark.parametrize(("messages", "args", "field"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_each_limit_names_the_field_and_the_server_goes_on(
    limited: ServerProcess, messages: list[dict[str, Any]], args: dict[str, Any], field: str
) -> None:
    model = backends.get_model_for("echo", address=limited.address)
    model.set_gen_args(**{"temperature": 0.0, "max_tokens": 8, **args})
    with pytest.raises(backends.InvalidArgumentError) as caught:
        model.generate_response(messages)
    assert caught.value.code == "INVALID_ARGUMENT"
    assert caught.value.field == field, caught.value
    assert caught.value.request_id
    # the bound itself passes, and the server answers the next request
    ok = backends.get_model_for("echo", address=limited.address)
    ok.set_gen_args(temperature=0.0, max_tokens=64)
    assert ok.generate_response([*alternating(3, "x" * 40)[:-1], {"role": "user", "content": "x" * 40}])[2]


def test_images_at_the_limits_pass(limited: ServerProcess) -> None:
    model = backends.get_model_for("echo", address=limited.address)
    model.set_gen_args(temperature=0.0, max_tokens=8)
    prompt, _, text = model.generate_response([{"role": "user", "content": "look", "image": [image(104), image(53)]}])
    assert text == "look" and prompt[0]["image"] == ["data:", "data:"]


def test_count_tokens_and_selectors_are_bounded_too(limited: ServerProcess) -> None:
    model = backends.get_model_for("echo", address=limited.address)
    with pytest.raises(backends.InvalidArgumentError) as caught:
        model.count_tokens(alternating(5))
    assert caught.value.field == "messages"
    with pytest.raises(backends.InvalidArgumentError) as caught:
        backends.get_model_for({"model_name": "echo", "model_config": nested(4)}, address=limited.address)
    assert caught.value.field == "model.spec.json" and "deeper than 4" in str(caught.value)
    assert model.count_tokens(USER).prompt_tokens == 2


def raw_generate(address: str, request: pb.GenerateRequest) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.ModelServiceStub(channel).Generate(request)
    return caught.value


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r: r.messages[0].__setattr__("extra_json", '{"name": "\\ud800"}'), "messages[0].extra_json"),
        (lambda r: r.args.__setattr__("extra_json", '{"stop": ["a\\udfff"]}'), "args.extra_json"),
        (lambda r: r.model.spec.__setattr__("json", '{"model_name": "echo\\ud83d"}'), "model.spec.json"),
        (lambda r: r.args.__setattr__("extra_json", '{"x": ' + "[" * 3000 + "]" * 3000 + "}"), "args.extra_json"),
        (lambda r: r.args.__setattr__("extra_json", '{"temperature": 9}'), "args.extra_json"),
    ],
    ids=["surrogate in a message", "surrogate in the arguments", "surrogate in a spec", "deep nesting",
         "temperature twice"],
)  # fmt: skip
def test_json_text_the_client_would_not_send(
    limited: ServerProcess, change: Callable[[pb.GenerateRequest], None], field: str
) -> None:
    """Lone surrogates escaped in JSON text, nesting past the interpreter's recursion limit: raw requests."""
    request = pb.GenerateRequest(model=pb.ModelSelector(name="echo"), messages=[pb.Message(role="user", content="x")])
    change(request)
    err = raw_generate(limited.address, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details().startswith(f"{field}: ")
    model = backends.get_model_for("echo", address=limited.address)
    model.set_gen_args(temperature=0.0, max_tokens=8)
    assert model.generate_response(USER)[2] == "hi"


def test_oversized_message_is_resource_exhausted_from_grpc(limited: ServerProcess) -> None:
    model = backends.get_model_for("echo", address=limited.address)
    mark = limited.log_mark()
    with pytest.raises(backends.ClemserveError) as caught:
        model.generate_response([{"role": "user", "content": "x" * (2 * 1024 * 1024)}])
    assert caught.value.code == "RESOURCE_EXHAUSTED"
    # gRPC refused it before clemserve saw it (the request limit would answer INVALID_ARGUMENT): no handler
    # ran, so the log has no Generate line
    assert "Generate ->" not in limited.log(since=mark)
    model.set_gen_args(temperature=0.0, max_tokens=8)
    assert model.generate_response(USER)[2] == "hi"
    with grpc.insecure_channel(limited.address) as channel:
        big = pb.GenerateRequest(
            model=pb.ModelSelector(name="echo"), messages=[pb.Message(role="user", content="y" * 1_100_000)]
        )
        with pytest.raises(grpc.RpcError) as raw:
            pb_grpc.ModelServiceStub(channel).Generate(big)
        assert raw.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_defaults_serve_ordinary_requests(server: ServerProcess) -> None:
    model = backends.get_model_for("echo", address=server.address)
    model.set_gen_args(temperature=0.0, max_tokens=300, top_p=0.9)
    with pytest.raises(backends.InvalidArgumentError) as caught:  # echo takes no top_p: refused by the backend
        model.generate_response(USER)
    assert caught.value.field == "args.top_p"
    model.set_gen_args(temperature=0.0, max_tokens=65_536)
    assert model.generate_response([{"role": "user", "content": "z" * 100_000}])[2] == "z" * 100_000
    model.set_gen_args(max_tokens=65_537)
    with pytest.raises(backends.InvalidArgumentError, match="at most 65536"):
        model.generate_response(USER)


def test_nesting_past_the_recursion_limit_at_default_limits(server: ServerProcess) -> None:
    extra = '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    request = pb.GenerateRequest(
        model=pb.ModelSelector(name="echo"),
        messages=[pb.Message(role="user", content="x")],
        args=pb.GenerationArgs(extra_json=extra),
    )
    err = raw_generate(server.address, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "args.extra_json: nests deeper than 16 levels"
