"""azure against stand-ins of Azure AI Foundry's two APIs: OpenAI's chat completions for GPT models and
Anthropic's Messages API (the anthropic SDK's Foundry client) for model ids containing "claude"."""

from __future__ import annotations

import base64
import json
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

import clemserve.client as backends
from tests.providers import FAKE_KEYS, assert_no_key_leaks, responses_reply
from tests.serving import ServerProcess
from tests.standin import Recorded, Reply, StandIn

CHAT = r"^/chat/completions$"
MESSAGES = r"^/v1/messages$"
RESPONSES = r"^/responses$"
USER = [{"role": "user", "content": "Say hello."}]
WITH_SYSTEM = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello."},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Again."},
]
SEEN: list[str] = []
MULTI = {"multimodality": {"single_image": True, "multiple_images": True}}
SINGLE = {"multimodality": {"single_image": True, "multiple_images": False}}

ENTRIES: list[dict[str, Any]] = [
    {"model_name": "azure-gpt", "backend": "azure", "model_id": "gpt-4.1", "model_config": MULTI},
    {"model_name": "azure-gpt-text", "backend": "azure", "model_id": "gpt-4o-mini", "model_config": {}},
    {
        "model_name": "azure-o",
        "backend": "azure",
        "model_id": "o4-mini",
        "model_config": {"reasoning_model": True, "reasoning_effort": "low"},
    },
    {"model_name": "upgpt-codex", "backend": "azure", "model_id": "gpt-5-codex", "model_config": {}},
    {"model_name": "azure-claude", "backend": "azure", "model_id": "Claude-Sonnet-4-5", "model_config": SINGLE},
    {
        "model_name": "azure-claude-thinking",
        "backend": "azure",
        "model_id": "claude-opus-4-1",
        "model_config": {"thinking_mode": True, "thinking_budget": 1024},
    },
    {
        "model_name": "azure-claude-thinking-off",
        "backend": "azure",
        "model_id": "claude-opus-4-1",
        "model_config": {"thinking_mode": False, "thinking_budget": 1024},
    },
    {
        "model_name": "azure-claude-no-budget",
        "backend": "azure",
        "model_id": "claude-opus-4-1",
        "model_config": {"thinking_mode": True},
    },
]


def completion(content: str | None, model: str = "gpt-4.1") -> dict[str, Any]:
    return {
        "id": "chatcmpl-azure",
        "object": "chat.completion",
        "created": 1767225600,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
    }


def claude_message(*blocks: dict[str, Any], role: str = "assistant") -> dict[str, Any]:
    """A Messages API answer as Anthropic sends it."""
    return {
        "id": "msg_azure",
        "type": "message",
        "role": role,
        "model": "claude-sonnet-4-5",
        "content": list(blocks),
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 4},
    }


def text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def openai_error(status: int, message: str, code: str | None) -> Reply:
    return Reply(status, {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}})


def anthropic_error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> Reply:
    body = {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_standin"}
    return Reply(status, body, headers=headers or {})


def tiny_png(path: Path, rgb: tuple[int, int, int] = (0, 255, 0)) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    raw = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes([0, *rgb]))) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + raw)
    return path


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def seen(*values: Any) -> None:
    SEEN.extend(v if isinstance(v, str) else json.dumps(v, default=str) for v in values)


def model_for(server: ServerProcess, name: str, timeout: float | None = None, **gen_args: Any) -> backends.Model:
    model = backends.get_model_for(name, address=server.address, timeout=timeout)
    model.set_gen_args(**{"temperature": 0.0, "max_tokens": 50, **gen_args})
    return model


def generate(server: ServerProcess, name: str, messages: Any = USER, **gen_args: Any) -> Any:
    triple = model_for(server, name, **gen_args).generate_response(messages)
    seen(*triple)
    return triple


def failure(server: ServerProcess, name: str, error: type[Exception], messages: Any = USER, **kw: Any) -> Any:
    with pytest.raises(error) as caught:
        model_for(server, name, **kw).generate_response(messages)
    seen(str(caught.value), getattr(caught.value, "metadata", {}))
    return caught.value


def sent(standin: StandIn, path: str, count: int = 1) -> list[Recorded]:
    requests = list(standin.matching(path))
    assert len(requests) == count, [r.path for r in standin.requests]
    return requests


@pytest.fixture
def azure(standin: StandIn) -> StandIn:
    standin.reset()
    standin.script("POST", CHAT, Reply(200, completion("  Hello from GPT.\n")))
    standin.script("POST", MESSAGES, Reply(200, claude_message(text_block(" Hello from Claude.\n"))))
    return standin


# -- GPT -------------------------------------------------------------------------------------------


def test_gpt_request_on_the_wire(server: ServerProcess, azure: StandIn) -> None:
    prompt, response, text = generate(server, "azure-gpt", WITH_SYSTEM, temperature=0.3, max_tokens=40)
    (request,) = sent(azure, CHAT)
    assert request.headers["authorization"] == f"Bearer {FAKE_KEYS['azure_gpt']}"
    assert request.headers["x-stainless-retry-count"] == "0"
    assert request.json == {
        "model": "gpt-4.1",
        "messages": WITH_SYSTEM,
        "temperature": 0.3,
        "max_completion_tokens": 40,
    }
    assert prompt == WITH_SYSTEM
    assert text == "Hello from GPT."
    assert response["choices"][0]["message"]["content"] == "  Hello from GPT.\n"
    assert response["clem_player"]["response"] == text and response["clem_player"]["model_name"] == "azure-gpt"
    assert sent(azure, MESSAGES, 0) == []


def test_gpt_takes_only_temperature_and_max_tokens(server: ServerProcess, azure: StandIn) -> None:
    err = failure(server, "azure-gpt", backends.InvalidArgumentError, top_p=0.9)
    assert err.field == "args.top_p"
    err = failure(server, "azure-claude", backends.InvalidArgumentError, top_k=5)
    assert err.field == "args.top_k"
    assert azure.requests == []


def test_gpt_reasoning_model(server: ServerProcess, azure: StandIn) -> None:
    generate(server, "azure-o", temperature=1.0, max_tokens=100)
    (request,) = sent(azure, CHAT)
    # reasoning_effort from the entry, and no output limit at all, as clembench
    assert request.json == {"model": "o4-mini", "messages": USER, "temperature": 1.0, "reasoning_effort": "low"}
    err = failure(server, "azure-o", backends.InvalidArgumentError, temperature=0.0)
    assert err.field == "args.temperature"
    sent(azure, CHAT, 1)


def test_gpt_images(server: ServerProcess, azure: StandIn, tmp_path: Path) -> None:
    png = tiny_png(tmp_path / "green.png")
    azure.script("GET", r"^/img/green\.png$", Reply(200, png.read_bytes(), headers={"content-type": "image/png"}))
    url = f"{azure.url}/img/green.png"
    messages = [{"role": "user", "content": "Compare <image> these.", "image": [str(png), url]}]
    prompt, _, _ = generate(server, "azure-gpt", messages)
    expected = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare these."},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(png)}"}},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]
    assert sent(azure, CHAT)[0].json["messages"] == expected and prompt == expected
    sent(azure, r"^/img/", 1)  # read by the client only
    err = failure(server, "azure-gpt-text", backends.InvalidArgumentError, messages)
    assert err.field == "messages[0].image"


def test_gpt_empty_content(server: ServerProcess, azure: StandIn) -> None:
    # clembench's content.strip() crashed on None; clemserve gives ""
    for content in (None, "", " \n "):
        azure.script("POST", CHAT, Reply(200, completion(content)))
        assert generate(server, "azure-gpt")[2] == ""


def test_codex_uses_the_responses_api(server: ServerProcess, azure: StandIn) -> None:
    answer = responses_reply(" print('hi')\n", "resp_standin", 4)
    azure.script("POST", RESPONSES, Reply(200, answer))
    prompt, response, text = generate(server, "upgpt-codex", WITH_SYSTEM)
    (request,) = sent(azure, RESPONSES)
    # as clembench: the messages as input and no generation arguments
    assert request.json == {"model": "gpt-5-codex", "input": WITH_SYSTEM}
    assert prompt == WITH_SYSTEM and text == "print('hi')"
    assert response["id"] == "resp_standin" and response["output"][0]["content"][0]["text"] == " print('hi')\n"


# -- Claude ------------------------------------------------------------------------------------------


def test_claude_request_on_the_wire(server: ServerProcess, azure: StandIn) -> None:
    prompt, response, text = generate(server, "azure-claude", WITH_SYSTEM, temperature=0.2, max_tokens=60)
    (request,) = sent(azure, MESSAGES)
    key = FAKE_KEYS["azure_claude"]
    assert request.headers["x-api-key"] == key and request.headers["api-key"] == key
    assert "authorization" not in request.headers
    assert request.headers["anthropic-version"] == "2023-06-01"
    conversation = WITH_SYSTEM[1:]
    # the system message goes in Anthropic's system field, not as a "system" role (clembench's bug)
    assert request.json == {
        "model": "Claude-Sonnet-4-5",
        "messages": conversation,
        "system": "You are terse.",
        "max_tokens": 60,
        "temperature": 0.2,
    }
    assert prompt == conversation
    assert text == " Hello from Claude.\n"  # not stripped
    block = response.pop("clem_player")
    assert block["response"] == text and block["model_name"] == "azure-claude"
    assert response["id"] == "msg_azure" and response["content"][0]["text"] == text
    assert response["usage"]["input_tokens"] == 12
    sent(azure, CHAT, 0)
    azure.reset()
    generate(server, "azure-claude")
    assert "system" not in sent(azure, MESSAGES)[0].json


def test_claude_images_are_anthropic_image_blocks(server: ServerProcess, azure: StandIn, tmp_path: Path) -> None:
    png = tiny_png(tmp_path / "green.png")
    azure.script("GET", r"^/img/green\.png$", Reply(200, png.read_bytes(), headers={"content-type": "image/png"}))
    for image in (str(png), f"{azure.url}/img/green.png"):
        azure.reset()
        messages = [{"role": "user", "content": "What is in <image> this?", "image": [image]}]
        prompt, _, _ = generate(server, "azure-claude", messages)
        expected = [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(png)}},
                ],
            }
        ]
        assert sent(azure, MESSAGES)[0].json["messages"] == expected and prompt == expected
    sent(azure, r"^/img/", 1)  # the URL was read once, by the client
    two = [{"role": "user", "content": "?", "image": [str(png), str(png)]}]
    err = failure(server, "azure-claude", backends.InvalidArgumentError, two)
    assert err.field == "messages[0].image"


def test_claude_thinking(server: ServerProcess, azure: StandIn) -> None:
    thinking = {"type": "thinking", "thinking": "Let me think.", "signature": "c2lnbmF0dXJl"}
    azure.script("POST", MESSAGES, Reply(200, claude_message(thinking, text_block("Hello after thinking."))))
    _, response, text = generate(server, "azure-claude-thinking", temperature=0.0, max_tokens=50)
    body = sent(azure, MESSAGES)[0].json
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert body["max_tokens"] == 1024 + 50 and body["temperature"] == 1.0
    assert text == "Hello after thinking."
    assert response["content"][0]["type"] == "thinking"

    azure.reset()
    generate(server, "azure-claude-thinking-off", temperature=0.0, max_tokens=50)
    body = sent(azure, MESSAGES)[0].json
    assert "thinking" not in body and body["max_tokens"] == 50 and body["temperature"] == 0.0

    err = failure(server, "azure-claude-no-budget", backends.FailedPreconditionError)
    assert err.subject == "model_config.thinking_budget"


def test_claude_without_text_block(server: ServerProcess, azure: StandIn) -> None:
    azure.script("POST", MESSAGES, Reply(200, claude_message()))
    assert generate(server, "azure-claude")[2] == ""


# -- faults --------------------------------------------------------------------------------------------


def test_claude_retry_after_is_honoured(server: ServerProcess, azure: StandIn) -> None:
    arrivals: list[float] = []
    replies = [
        anthropic_error(
            429, "rate_limit_error", "Number of requests has exceeded your rate limit", {"retry-after": "0.3"}
        ),
        Reply(200, claude_message(text_block("after the wait"))),
    ]

    def respond(request: Recorded) -> Reply:
        arrivals.append(time.monotonic())
        return replies[min(len(arrivals), len(replies)) - 1]

    azure.script("POST", MESSAGES, respond)
    assert generate(server, "azure-claude")[2] == "after the wait"
    assert len(arrivals) == 2 and arrivals[1] - arrivals[0] >= 0.3


def test_gpt_server_error_then_success(server: ServerProcess, azure: StandIn) -> None:
    azure.script("POST", CHAT, openai_error(500, "Internal server error", None), Reply(200, completion("ok")))
    assert generate(server, "azure-gpt")[2] == "ok"
    sent(azure, CHAT, 2)


def test_rate_limit_forever(server: ServerProcess, azure: StandIn) -> None:
    azure.script("POST", CHAT, openai_error(429, "Requests to the deployment have exceeded the rate limit", "429"))
    err = failure(server, "azure-gpt", backends.ResourceExhaustedError)
    assert err.metadata["upstream_status"] == "429" and err.metadata["provider"] == "Azure OpenAI"
    sent(azure, CHAT, 4)


def test_claude_overloaded_forever_is_unavailable(server: ServerProcess, azure: StandIn) -> None:
    azure.script("POST", MESSAGES, anthropic_error(529, "overloaded_error", "Overloaded"))
    err = failure(server, "azure-claude", backends.UnavailableError)
    assert "4 time(s)" in str(err) and "Overloaded" in str(err) and "529" in str(err)
    sent(azure, MESSAGES, 4)


def test_claude_caller_deadline(server: ServerProcess, azure: StandIn) -> None:
    azure.script("POST", MESSAGES, Reply(200, claude_message(text_block("late")), delay_s=3.0))
    started = time.monotonic()
    with pytest.raises((backends.DeadlineExceededError, backends.ServerError)) as caught:
        model_for(server, "azure-claude", timeout=0.5).generate_response(USER)
    assert time.monotonic() - started < 2.0 and caught.value.code == "DEADLINE_EXCEEDED"
    azure.script("POST", MESSAGES, Reply(200, claude_message(text_block("still serving"))))
    assert generate(server, "azure-claude")[2] == "still serving"


@pytest.mark.parametrize(("name", "path"), [("azure-claude", MESSAGES), ("azure-gpt", CHAT)])
def test_malformed_body_is_unavailable(server: ServerProcess, azure: StandIn, name: str, path: str) -> None:
    azure.script("POST", path, Reply(200, '{"id": "cut off'))
    err = failure(server, name, backends.UnavailableError)
    assert "not valid JSON" in str(err)
    sent(azure, path, 4)


@pytest.mark.parametrize(
    ("message", "used", "size"),
    [
        ("prompt is too long: 208310 tokens > 200000 maximum", 208310, 200000),
        (
            "input length and `max_tokens` exceed context limit: 198000 + 8192 > 200000, decrease input length",
            206192,
            200000,
        ),
    ],
)
def test_claude_context_error(server: ServerProcess, azure: StandIn, message: str, used: int, size: int) -> None:
    azure.script("POST", MESSAGES, anthropic_error(400, "invalid_request_error", message))
    err = failure(server, "azure-claude", backends.ContextExceededError)
    assert (err.tokens_used, err.context_size, err.tokens_left) == (used, size, size - used)
    sent(azure, MESSAGES, 1)


def test_gpt_context_error(server: ServerProcess, azure: StandIn) -> None:
    message = (
        "This model's maximum context length is 128000 tokens. However, your messages resulted in 130000 tokens. "
        "Please reduce the length of the messages."
    )
    azure.script("POST", CHAT, openai_error(400, message, "context_length_exceeded"))
    err = failure(server, "azure-gpt", backends.ContextExceededError)
    assert (err.tokens_used, err.context_size) == (130000, 128000)


def test_claude_validation_error_is_not_retried(server: ServerProcess, azure: StandIn) -> None:
    azure.script("POST", MESSAGES, anthropic_error(400, "invalid_request_error", "temperature: range: 0..1"))
    err = failure(server, "azure-claude", backends.InvalidArgumentError, temperature=1.5)
    assert "temperature: range: 0..1" in str(err) and "HTTP 400" in str(err)
    sent(azure, MESSAGES, 1)


@pytest.mark.parametrize(
    ("name", "path", "entry"), [("azure-claude", MESSAGES, "azure_claude"), ("azure-gpt", CHAT, "azure_gpt")]
)
def test_bad_key(server: ServerProcess, azure: StandIn, name: str, path: str, entry: str) -> None:
    reply = (
        anthropic_error(401, "authentication_error", "invalid x-api-key")
        if path == MESSAGES
        else Reply(
            401,
            {
                "error": {
                    "code": "401",
                    "message": "Access denied due to invalid subscription key or wrong API endpoint.",
                }
            },
        )
    )
    azure.script("POST", path, reply)
    err = failure(server, name, backends.FailedPreconditionError)
    assert err.subject == f"key.json: {entry}" and f"key.json entry '{entry}'" in str(err) and "Azure" in str(err)
    sent(azure, path, 1)


def test_gpt_unknown_deployment(server: ServerProcess, azure: StandIn) -> None:
    azure.script(
        "POST",
        CHAT,
        Reply(
            404,
            {
                "error": {
                    "code": "DeploymentNotFound",
                    "message": "The API deployment for this resource does not exist.",
                }
            },
        ),
    )
    err = failure(server, "azure-gpt", backends.ModelNotFoundError)
    assert "deployment for this resource does not exist" in str(err)
    sent(azure, CHAT, 1)


# -- keys ----------------------------------------------------------------------------------------------


def test_key_entries(odd_keys_server: ServerProcess, standin: StandIn) -> None:
    """Its key file: azure_claude as usual, azure_gpt over plain http to another machine."""
    standin.script("POST", MESSAGES, Reply(200, claude_message(text_block("Hi"))))
    assert generate(odd_keys_server, "azure-claude")[2] == "Hi"
    err = failure(odd_keys_server, "azure-gpt", backends.FailedPreconditionError)
    assert err.subject == "key.json: azure_gpt" and "https" in str(err)
    assert standin.requests and not list(standin.matching(CHAT))
    assert_no_key_leaks(odd_keys_server.log())


def test_no_key_leaks(server: ServerProcess) -> None:
    assert SEEN
    for text in SEEN:
        assert_no_key_leaks(text)
    assert_no_key_leaks(server.log())
