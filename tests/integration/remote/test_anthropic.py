"""The anthropic backend against a stand-in Messages API: the requests the SDK sends, the triple the
client gets, and every failure the provider can answer with."""

from __future__ import annotations

import base64
import json
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import grpc
import pytest

import clemserve.client as backends
from clemserve.v1 import clemserve_pb2 as pb
from clemserve.v1 import clemserve_pb2_grpc as pb_grpc
from tests.providers import FAKE_KEYS, assert_no_key_leaks
from tests.serving import ServerProcess
from tests.standin import Reply, StandIn

MESSAGES_PATH = r"^/v1/messages$"
MODEL_ID = "claude-test-model"
ATTEMPTS = 4  # the server's default --remote-attempts


def entry(name: str, **config: Any) -> dict[str, Any]:
    return {"model_name": name, "backend": "anthropic", "model_id": MODEL_ID, "model_config": config}


ENTRIES = [
    entry("claude-test"),
    entry("claude-mm", multimodality={"multiple_images": True}),
    entry("claude-one-image", multimodality={"multiple_images": False}),
    entry("claude-mm-off", multimodality=False),
    entry("claude-thinking", thinking_mode=True),
    entry("claude-thinking-off", thinking_mode=False),
]

#: every text, prompt, response and error message clemserve gave back, for the key-leak scan at the end
SEEN: list[str] = []


def message(*blocks: dict[str, Any], role: str = "assistant") -> dict[str, Any]:
    """An Anthropic Messages API response body."""
    return {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": role,
        "content": list(blocks),
        "model": MODEL_ID,
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 4},
    }


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def error(status: int, kind: str, said: str, headers: dict[str, str] | None = None) -> Reply:
    body = {"type": "error", "error": {"type": kind, "message": said}, "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy"}
    return Reply(status, body, headers or {})


def png(path: Path) -> bytes:
    """A real 1x1 PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
    data += chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b"")
    path.write_bytes(data)
    return data


@pytest.fixture(autouse=True)
def fresh(standin: StandIn) -> None:
    standin.script("POST", MESSAGES_PATH, Reply(200, message(text(" Hello there. "))))


def model(server: ServerProcess, name: str = "claude-test", **gen_args: Any) -> backends.Model:
    m = backends.get_model_for(name, address=server.address)
    m.set_gen_args(**{"temperature": 0.0, "max_tokens": 50, **gen_args})
    return m


def generate(m: backends.Model, messages: list[dict[str, Any]]) -> tuple[Any, Any, str]:
    prompt, response, response_text = m.generate_response(messages)
    SEEN.extend([json.dumps(prompt), json.dumps(response), response_text])
    return prompt, response, response_text


def failure(m: backends.Model, messages: list[dict[str, Any]], kind: type[Exception]) -> Any:
    with pytest.raises(kind) as caught:
        m.generate_response(messages)
    SEEN.append(str(caught.value))
    return caught.value


def sent(standin: StandIn) -> list[Any]:
    return [r.json for r in standin.matching(MESSAGES_PATH)]


USER = [{"role": "user", "content": "Hi!"}]


# -- the request and the triple ------------------------------------------------------------------------


def test_request_and_triple(server: ServerProcess, standin: StandIn) -> None:
    messages = [
        {"role": "system", "content": "first system"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "system", "content": "last system"},
        {"role": "user", "content": "u2"},
    ]
    prompt, response, response_text = generate(model(server, temperature=0.5, max_tokens=50), messages)

    (request,) = standin.matching(MESSAGES_PATH)
    assert request.method == "POST"
    assert request.headers["authorization"] == f"Bearer {FAKE_KEYS['anthropic']}"
    assert request.headers["anthropic-version"] == "2023-06-01"
    encoded = [
        {"role": "user", "content": [text("u1")]},
        {"role": "assistant", "content": [text("a1")]},
        {"role": "user", "content": [text("u2")]},
    ]
    # the last system message wins; only temperature and max_tokens go with it
    assert request.json == {
        "model": MODEL_ID,
        "messages": encoded,
        "system": "last system",
        "max_tokens": 50,
        "temperature": 0.5,
    }
    # the prompt object is the encoded list without the system prompt, as in clembench
    assert prompt == encoded
    assert response_text == " Hello there. "  # not stripped (clembench)
    clem_player = response.pop("clem_player")
    assert clem_player["response"] == " Hello there. " and clem_player["model_name"] == "claude-test"
    assert response["id"] == "msg_01XFDUDYJgAACzvnptvVoYEL" and response["role"] == "assistant"
    assert response["content"][0]["text"] == " Hello there. "
    assert response["usage"]["input_tokens"] == 12 and response["usage"]["output_tokens"] == 4


def test_system_defaults_to_empty(server: ServerProcess, standin: StandIn) -> None:
    generate(model(server), USER)
    (body,) = sent(standin)
    assert body["system"] == ""
    assert body["messages"] == [{"role": "user", "content": [text("Hi!")]}]


def test_usage_on_the_wire(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.address) as channel:
        reply = pb_grpc.ModelServiceStub(channel).Generate(
            pb.GenerateRequest(
                model=pb.ModelSelector(name="claude-test"),
                messages=[pb.Message(role="user", content="Hi!")],
                args=pb.GenerationArgs(max_tokens=50),
            )
        )
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (12, 4)


def test_thinking_mode(server: ServerProcess, standin: StandIn) -> None:
    thinking = {"type": "thinking", "thinking": "Let me think.", "signature": "EqQBCgIYAhIM"}
    standin.script("POST", MESSAGES_PATH, Reply(200, message(thinking, text("The answer."))))
    _, response, response_text = generate(model(server, "claude-thinking", temperature=0.0, max_tokens=50), USER)
    (body,) = sent(standin)
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 4000}
    assert body["temperature"] == 1.0 and body["max_tokens"] == 4050
    # the first text block, wherever it is (clembench: content[1])
    assert response_text == "The answer."
    assert response["content"][0]["type"] == "thinking"


def test_thinking_mode_false_means_off(server: ServerProcess, standin: StandIn) -> None:
    generate(model(server, "claude-thinking-off", temperature=0.3, max_tokens=50), USER)
    (body,) = sent(standin)
    assert "thinking" not in body
    assert body["temperature"] == 0.3 and body["max_tokens"] == 50


def test_extra_gen_args_are_refused(server: ServerProcess, standin: StandIn) -> None:
    err = failure(model(server, top_p=0.9), USER, backends.InvalidArgumentError)
    assert err.field == "args.top_p"
    assert sent(standin) == []


# -- images --------------------------------------------------------------------------------------------


def test_images_from_file_data_url_and_http(server: ServerProcess, standin: StandIn, tmp_path: Path) -> None:
    data = png(tmp_path / "board.png")
    b64 = base64.b64encode(data).decode()
    standin.script("GET", r"^/img/cat\.png$", Reply(200, data, {"content-type": "image/png"}))
    url = f"{standin.url}/img/cat.png"
    messages = [
        {"role": "user", "content": "Look.", "image": [str(tmp_path / "board.png"), f"data:image/png;base64,{b64}"]},
        {"role": "assistant", "content": "I see."},
        {"role": "user", "content": "And this?", "image": [url]},
    ]
    prompt, _, _ = generate(model(server, "claude-mm"), messages)
    base64_block = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}}
    encoded = [
        {"role": "user", "content": [text("Look."), base64_block, base64_block]},
        {"role": "assistant", "content": [text("I see.")]},
        # an http(s) image goes as a URL source, for Anthropic to fetch
        {"role": "user", "content": [text("And this?"), {"type": "image", "source": {"type": "url", "url": url}}]},
    ]
    (body,) = sent(standin)
    assert body["messages"] == encoded
    assert prompt == encoded


@pytest.mark.parametrize("name", ["claude-test", "claude-mm-off"])
def test_images_refused_without_multimodality(
    server: ServerProcess, standin: StandIn, tmp_path: Path, name: str
) -> None:
    png(tmp_path / "a.png")
    err = failure(
        model(server, name),
        [{"role": "user", "content": "x", "image": [str(tmp_path / "a.png")]}],
        backends.InvalidArgumentError,
    )
    assert err.field == "messages[0].image"
    assert sent(standin) == []


def test_several_images_refused_without_multiple_images(
    server: ServerProcess, standin: StandIn, tmp_path: Path
) -> None:
    png(tmp_path / "a.png")
    images = [str(tmp_path / "a.png")] * 2
    err = failure(
        model(server, "claude-one-image"),
        [{"role": "user", "content": "x", "image": images}],
        backends.InvalidArgumentError,
    )
    assert err.field == "messages[0].image"
    assert sent(standin) == []
    # one image is fine
    generate(model(server, "claude-one-image"), [{"role": "user", "content": "x", "image": images[:1]}])
    assert len(sent(standin)) == 1


# -- the answer's content ------------------------------------------------------------------------------


@pytest.mark.parametrize("blocks", [[], [text("")]], ids=["no-blocks", "empty-text"])
def test_empty_content_gives_empty_text(server: ServerProcess, standin: StandIn, blocks: list[Any]) -> None:
    standin.script("POST", MESSAGES_PATH, Reply(200, message(*blocks)))
    _, response, response_text = generate(model(server), USER)
    assert response_text == ""
    assert [block["text"] for block in response["content"]] == [block["text"] for block in blocks]


def test_wrong_role_is_internal(server: ServerProcess, standin: StandIn) -> None:
    standin.script("POST", MESSAGES_PATH, Reply(200, message(text("hi"), role="user")))
    mark = server.log_mark()
    err = failure(model(server), USER, backends.InternalError)
    assert err.request_id and err.request_id in str(err)
    assert "role 'user'" in server.log(since=mark)  # the detail stays in the server log
    assert len(sent(standin)) == 1  # a wrong answer is not retried


# -- failures ------------------------------------------------------------------------------------------


def test_rate_limit_retry_after_is_honoured(server: ServerProcess, standin: StandIn) -> None:
    standin.script(
        "POST",
        MESSAGES_PATH,
        error(
            429, "rate_limit_error", "Number of request tokens has exceeded your rate limit.", {"retry-after": "0.3"}
        ),
        Reply(200, message(text("after the wait"))),
    )
    times: list[float] = []
    standin.script(
        "POST",
        MESSAGES_PATH,
        _timed(
            times,
            [error(429, "rate_limit_error", "slow down", {"retry-after": "0.3"}), Reply(200, message(text("ok")))],
        ),
    )
    _, _, response_text = generate(model(server), USER)
    assert response_text == "ok"
    assert len(times) == 2
    assert times[1] - times[0] >= 0.3


@pytest.mark.parametrize(
    "first",
    [
        error(500, "api_error", "Internal server error"),
        error(529, "overloaded_error", "Overloaded"),
        Reply(503, "<html>upstream connect error</html>", {"content-type": "text/html"}),
    ],
    ids=["500", "529-overloaded", "503-html"],
)
def test_transient_failure_then_success(server: ServerProcess, standin: StandIn, first: Reply) -> None:
    standin.script("POST", MESSAGES_PATH, first, Reply(200, message(text("recovered"))))
    _, _, response_text = generate(model(server), USER)
    assert response_text == "recovered"
    assert len(sent(standin)) == 2


def test_rate_limit_forever_is_resource_exhausted(server: ServerProcess, standin: StandIn) -> None:
    standin.script(
        "POST", MESSAGES_PATH, error(429, "rate_limit_error", "Number of requests has exceeded your rate limit")
    )
    err = failure(model(server), USER, backends.ResourceExhaustedError)
    assert err.metadata["upstream_status"] == "429"
    assert err.metadata["provider"] == "Anthropic"
    assert "rate limit" in str(err)
    assert len(sent(standin)) == ATTEMPTS


def test_unavailable_forever(server: ServerProcess, standin: StandIn) -> None:
    standin.script("POST", MESSAGES_PATH, error(503, "api_error", "Service unavailable"))
    err = failure(model(server), USER, backends.UnavailableError)
    assert f"failed {ATTEMPTS} time(s)" in str(err)
    assert err.metadata["upstream_status"] == "503"
    assert len(sent(standin)) == ATTEMPTS


def test_overloaded_forever_keeps_the_real_status_in_the_message(server: ServerProcess, standin: StandIn) -> None:
    standin.script("POST", MESSAGES_PATH, error(529, "overloaded_error", "Overloaded"))
    err = failure(model(server), USER, backends.UnavailableError)
    assert "HTTP 529" in str(err) and "Overloaded" in str(err)
    assert len(sent(standin)) == ATTEMPTS


def test_hanging_provider_meets_the_callers_deadline(server: ServerProcess, standin: StandIn) -> None:
    m = model(server)
    generate(m, USER)  # loaded and warm: the deadline below is the provider's alone
    standin.release.clear()  # replies now wait until the test lets them go
    m.timeout = 1.0
    start = time.monotonic()
    # the caller's timer and the server's copy of the deadline expire together: either may answer first
    with pytest.raises((backends.DeadlineExceededError, backends.UnavailableError)) as caught:
        m.generate_response(USER)
    elapsed = time.monotonic() - start
    SEEN.append(str(caught.value))
    assert isinstance(caught.value, backends.DeadlineExceededError) or "no answer within" in str(caught.value)
    assert elapsed < 2.0
    standin.release.set()
    m.timeout = None
    assert generate(m, USER)[2] == " Hello there. "  # the server is still healthy


def test_malformed_json_is_unavailable(server: ServerProcess, standin: StandIn) -> None:
    standin.script(
        "POST", MESSAGES_PATH, Reply(200, '{"id": "msg_01", "content": [', {"content-type": "application/json"})
    )
    err = failure(model(server), USER, backends.UnavailableError)
    assert "not JSON" in str(err)
    assert len(sent(standin)) == ATTEMPTS  # retried: a cut-off body is usually gone on the next try
    standin.script("POST", MESSAGES_PATH, Reply(200, message(text("fine"))))
    assert generate(model(server), USER)[2] == "fine"


@pytest.mark.parametrize(
    ("said", "used", "size"),
    [
        ("prompt is too long: 208310 tokens > 200000 maximum", 208310, 200000),
        (
            "input length and `max_tokens` exceed context limit: 198000 + 8192 > 200000, "
            "decrease input length or `max_tokens` and try again",
            206192,
            200000,
        ),
    ],
    ids=["prompt-too-long", "input-plus-max-tokens"],
)
def test_context_error(server: ServerProcess, standin: StandIn, said: str, used: int, size: int) -> None:
    standin.script("POST", MESSAGES_PATH, error(400, "invalid_request_error", said))
    err = failure(model(server), USER, backends.ContextExceededError)
    assert (err.tokens_used, err.context_size, err.tokens_left) == (used, size, size - used)
    assert str(err).endswith(f"{used}/{size}")
    assert len(sent(standin)) == 1


def test_validation_error_is_not_retried(server: ServerProcess, standin: StandIn) -> None:
    standin.script("POST", MESSAGES_PATH, error(400, "invalid_request_error", "messages: roles must alternate"))
    err = failure(model(server), USER, backends.InvalidArgumentError)
    assert "roles must alternate" in str(err)
    assert len(sent(standin)) == 1


def test_refused_key_names_the_key_entry(server: ServerProcess, standin: StandIn) -> None:
    standin.script("POST", MESSAGES_PATH, error(401, "authentication_error", "invalid x-api-key"))
    err = failure(model(server), USER, backends.FailedPreconditionError)
    assert "key.json entry 'anthropic'" in str(err) and "Anthropic" in str(err)
    assert err.subject == "key.json: anthropic"
    assert len(sent(standin)) == 1


def test_unknown_model_id_is_not_found(server: ServerProcess, standin: StandIn) -> None:
    standin.script("POST", MESSAGES_PATH, error(404, "not_found_error", f"model: {MODEL_ID}"))
    err = failure(model(server), USER, backends.ModelNotFoundError)
    assert MODEL_ID in str(err)
    assert len(sent(standin)) == 1


def test_missing_key_entry(odd_keys_server: ServerProcess, standin: StandIn) -> None:
    err = failure(model(odd_keys_server), USER, backends.FailedPreconditionError)
    assert err.subject == "key.json: anthropic"
    assert sent(standin) == []
    assert_no_key_leaks(odd_keys_server.log())


def test_no_key_leaks(server: ServerProcess) -> None:
    assert SEEN, "the tests above record what they saw"
    for seen in SEEN:
        assert_no_key_leaks(seen)
    assert_no_key_leaks(server.log())


def _timed(times: list[float], replies: list[Reply]) -> Any:
    """A responder that records when each request arrived, then answers in order (the last repeating)."""

    def answer(_request: Any) -> Reply:
        times.append(time.monotonic())
        return replies.pop(0) if len(replies) > 1 else replies[0]

    return answer
