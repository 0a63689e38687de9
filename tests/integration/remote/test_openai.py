"""openai, openai_compatible and openrouter against a stand-in of OpenAI's chat completions API.

Every request is the one the real OpenAI SDK sends from inside a real clemserve process; every answer
reaches the test through clemserve.client.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

import clemserve.client as backends
from tests.providers import FAKE_KEYS, assert_no_key_leaks
from tests.serving import ServerProcess
from tests.standin import Recorded, Reply, StandIn

CHAT = r"^/chat/completions$"
USER = [{"role": "user", "content": "Say hello."}]
#: everything clemserve handed back in this module, for the key-leak scan at the end
SEEN: list[str] = []

ENTRIES: list[dict[str, Any]] = [
    {"model_name": "gpt-test", "backend": "openai", "model_id": "gpt-4o-mini", "model_config": {}},
    {
        "model_name": "gpt-vision",
        "backend": "openai",
        "model_id": "gpt-4o",
        "model_config": {"multimodality": {"single_image": True, "multiple_images": True}},
    },
    {
        "model_name": "gpt-one-image",
        "backend": "openai",
        "model_id": "gpt-4o",
        "model_config": {"multimodality": {"single_image": True, "multiple_images": False}},
    },
    {"model_name": "gpt-mm-off", "backend": "openai", "model_id": "gpt-4o", "model_config": {"multimodality": False}},
    {"model_name": "o-test", "backend": "openai", "model_id": "o3-mini", "model_config": {"reasoning_model": True}},
    {"model_name": "o-off", "backend": "openai", "model_id": "o3-mini", "model_config": {"reasoning_model": False}},
    {
        "model_name": "gpt-extra-body",
        "backend": "openai",
        "model_id": "gpt-4o-mini",
        "model_config": {"extra_body": {"top_k": 5, "repetition_penalty": 1.1}},
    },
    {"model_name": "compat-test", "backend": "openai_compatible", "model_id": "Qwen/Qwen2.5-7B-Instruct"},
    {"model_name": "router-test", "backend": "openrouter", "model_id": "meta-llama/llama-3.1-8b-instruct"},
    {
        "model_name": "router-custom",
        "backend": "openrouter",
        "model_id": "meta-llama/llama-3.1-8b-instruct",
        "model_config": {"extra_body": {"provider": {"order": ["groq"]}}},
    },
    {
        "model_name": "router-reasoning",
        "backend": "openrouter",
        "model_id": "deepseek/deepseek-r1",
        "model_config": {"reasoning_model": True},
    },
]


def completion(content: str | None, model: str = "gpt-4o-mini", role: str = "assistant") -> dict[str, Any]:
    """A chat completion as OpenAI sends it."""
    return {
        "id": "chatcmpl-standin",
        "object": "chat.completion",
        "created": 1767225600,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": role, "content": content}, "logprobs": None, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
    }


def openai_error(status: int, message: str, code: str | None, type_: str = "invalid_request_error") -> Reply:
    return Reply(status, {"error": {"message": message, "type": type_, "param": None, "code": code}})


def answer_by_model(content: str) -> Any:
    """A responder that answers each request with a completion for the model it asked for."""

    def respond(request: Recorded) -> Reply:
        return Reply(200, completion(content, model=request.json["model"]))

    return respond


def tiny_png(path: Path, rgb: tuple[int, int, int] = (255, 0, 0)) -> Path:
    """A valid 1x1 PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    raw = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes([0, *rgb]))) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + raw)
    return path


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def seen(*values: Any) -> None:
    SEEN.extend(json.dumps(v, default=str) if not isinstance(v, str) else v for v in values)


def model_for(server: ServerProcess, name: str, timeout: float | None = None, **gen_args: Any) -> backends.Model:
    model = backends.get_model_for(name, address=server.address, timeout=timeout)
    model.set_gen_args(**{"temperature": 0.0, "max_tokens": 50, **gen_args})
    return model


def generate(server: ServerProcess, name: str, messages: Any = USER, **gen_args: Any) -> Any:
    prompt, response, text = model_for(server, name, **gen_args).generate_response(messages)
    seen(prompt, response, text)
    return prompt, response, text


def failure(server: ServerProcess, name: str, error: type[Exception], messages: Any = USER, **kw: Any) -> Any:
    with pytest.raises(error) as caught:
        model_for(server, name, **kw).generate_response(messages)
    seen(str(caught.value), getattr(caught.value, "metadata", {}))
    return caught.value


@pytest.fixture
def chat(standin: StandIn) -> StandIn:
    """The stand-in with its log emptied and every model answering "Hello!"."""
    standin.reset()
    standin.script("POST", CHAT, answer_by_model("  Hello!\n"))
    return standin


def only_request(standin: StandIn) -> Recorded:
    requests = list(standin.matching(CHAT))
    assert len(requests) == 1, [r.path for r in standin.requests]
    return requests[0]


# -- the requests the SDK sends --------------------------------------------------------------------


def test_openai_request_on_the_wire(server: ServerProcess, chat: StandIn) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hello.", "name": "alice"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again."},
    ]
    generate(server, "gpt-test", messages, temperature=0.7, max_tokens=42)
    sent = only_request(chat)
    assert sent.method == "POST" and sent.path == "/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {FAKE_KEYS['openai']}"
    # clembench reads the British spelling "organisation" from key.json
    assert sent.headers["openai-organization"] == "org-uk"
    # no SDK-side retries: clemserve's policy is the only one
    assert sent.headers["x-stainless-retry-count"] == "0"
    body = sent.json
    # the system message stays in the list; messages without images pass unchanged, extra keys included
    assert body == {"model": "gpt-4o-mini", "messages": messages, "temperature": 0.7, "max_tokens": 42}


def test_openai_passes_every_generation_argument(server: ServerProcess, chat: StandIn) -> None:
    generate(server, "gpt-test", temperature=0.2, max_tokens=9, top_p=0.5, seed=7, stop=["\n"])
    body = only_request(chat).json
    assert {k: body[k] for k in ("temperature", "max_tokens", "top_p", "seed", "stop")} == {
        "temperature": 0.2,
        "max_tokens": 9,
        "top_p": 0.5,
        "seed": 7,
        "stop": ["\n"],
    }


def test_sdk_options_are_not_generation_arguments(server: ServerProcess, chat: StandIn) -> None:
    err = failure(server, "gpt-test", backends.InvalidArgumentError, stream=True)
    assert err.field == "args.stream"
    assert list(chat.matching(CHAT)) == []


def test_reasoning_model_drops_max_tokens_and_needs_temperature(server: ServerProcess, chat: StandIn) -> None:
    generate(server, "o-test", temperature=1.0, max_tokens=100)
    body = only_request(chat).json
    # as clembench: no output limit at all (neither max_tokens nor max_completion_tokens)
    assert body == {"model": "o3-mini", "messages": USER, "temperature": 1.0}
    chat.reset()
    generate(server, "o-test", temperature=1.0, max_tokens=100, max_completion_tokens=500)
    assert only_request(chat).json["max_completion_tokens"] == 500

    chat.reset()
    err = failure(server, "o-test", backends.InvalidArgumentError, temperature=0.0)
    assert err.field == "args.temperature" and "temperature must be >0" in str(err)
    assert list(chat.matching(CHAT)) == []  # refused before anything is sent, and not retried


def test_flags_are_read_by_value(server: ServerProcess, chat: StandIn) -> None:
    # clembench treats "reasoning_model": false as a reasoning model (presence); clemserve does not
    generate(server, "o-off", temperature=0.0, max_tokens=12)
    body = only_request(chat).json
    assert body["max_tokens"] == 12 and body["temperature"] == 0.0


def test_extra_body_is_merged_into_the_body(server: ServerProcess, chat: StandIn) -> None:
    generate(server, "gpt-extra-body", max_tokens=5)
    body = only_request(chat).json
    assert body["top_k"] == 5 and body["repetition_penalty"] == 1.1 and "extra_body" not in body


def test_openai_compatible_request(server: ServerProcess, chat: StandIn) -> None:
    _, _, text = generate(server, "compat-test", temperature=0.3, max_tokens=7, top_p=0.8)
    sent = only_request(chat)
    assert sent.headers["authorization"] == f"Bearer {FAKE_KEYS['openai_compatible']}"
    assert sent.json == {
        "model": "Qwen/Qwen2.5-7B-Instruct",
        "messages": USER,
        "temperature": 0.3,
        "max_tokens": 7,
        "top_p": 0.8,
    }
    assert text == "Hello!"


def test_openrouter_request(server: ServerProcess, chat: StandIn) -> None:
    generate(server, "router-test", temperature=0.4, max_tokens=8)
    sent = only_request(chat)
    assert sent.headers["authorization"] == f"Bearer {FAKE_KEYS['openrouter']}"
    # only temperature and max_tokens, plus clembench's default provider routing
    assert sent.json == {
        "model": "meta-llama/llama-3.1-8b-instruct",
        "messages": USER,
        "temperature": 0.4,
        "max_tokens": 8,
        "provider": {"quantizations": ["fp8"]},
    }
    chat.reset()
    generate(server, "router-custom")
    assert only_request(chat).json["provider"] == {"order": ["groq"]}


def test_openrouter_refuses_other_generation_arguments(server: ServerProcess, chat: StandIn) -> None:
    err = failure(server, "router-test", backends.InvalidArgumentError, top_p=0.9)
    assert err.field == "args.top_p" and "openrouter" in str(err)
    assert list(chat.matching(CHAT)) == []


def test_openrouter_reasoning_rule(server: ServerProcess, chat: StandIn) -> None:
    generate(server, "router-reasoning", temperature=0.6, max_tokens=100)
    assert "max_tokens" not in only_request(chat).json
    err = failure(server, "router-reasoning", backends.InvalidArgumentError, temperature=0.0)
    assert err.field == "args.temperature"


# -- images ----------------------------------------------------------------------------------------


def test_image_from_a_file_becomes_a_data_url(server: ServerProcess, chat: StandIn, tmp_path: Path) -> None:
    png = tiny_png(tmp_path / "red.png")
    messages = [{"role": "user", "content": "What is in <image> this picture?", "image": [str(png)]}]
    prompt, _, _ = generate(server, "gpt-vision", messages)
    expected = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": data_url(png)}},
            ],
        }
    ]
    assert only_request(chat).json["messages"] == expected
    assert prompt == expected  # the prompt object records what the provider was sent


def test_image_url_is_passed_through(server: ServerProcess, chat: StandIn, tmp_path: Path) -> None:
    png = tiny_png(tmp_path / "blue.png", (0, 0, 255))
    chat.script("GET", r"^/images/blue\.png$", Reply(200, png.read_bytes(), headers={"content-type": "image/png"}))
    url = f"{chat.url}/images/blue.png"
    messages = [{"role": "user", "content": "Describe it.", "image": [url, str(png)]}]
    prompt, _, _ = generate(server, "gpt-vision", messages)
    parts = only_request(chat).json["messages"][0]["content"]
    assert parts[1] == {"type": "image_url", "image_url": {"url": url}}
    assert parts[2] == {"type": "image_url", "image_url": {"url": data_url(png)}}
    assert prompt[0]["content"] == parts
    # the client read the URL once; the server never fetched it
    assert len(list(chat.matching(r"^/images/"))) == 1


@pytest.mark.parametrize("name", ["gpt-test", "gpt-mm-off"])
def test_images_refused_without_multimodality(server: ServerProcess, chat: StandIn, tmp_path: Path, name: str) -> None:
    messages = [{"role": "user", "content": "Look.", "image": [str(tiny_png(tmp_path / "x.png"))]}]
    err = failure(server, name, backends.InvalidArgumentError, messages)
    assert err.field == "messages[0].image"
    assert list(chat.matching(CHAT)) == []


def test_several_images_refused_without_multiple_images(server: ServerProcess, chat: StandIn, tmp_path: Path) -> None:
    png = str(tiny_png(tmp_path / "x.png"))
    err = failure(
        server, "gpt-one-image", backends.InvalidArgumentError, [{"role": "user", "content": "?", "image": [png, png]}]
    )
    assert err.field == "messages[0].image"
    generate(server, "gpt-one-image", [{"role": "user", "content": "?", "image": [png]}])
    assert len(list(chat.matching(CHAT))) == 1


# -- the triple --------------------------------------------------------------------------------------


def test_triple_as_clembench_returns_it(server: ServerProcess, chat: StandIn) -> None:
    chat.script("POST", CHAT, Reply(200, completion("  Hello there!\n\n")))
    prompt, response, text = generate(server, "gpt-test")
    assert prompt == USER
    assert text == "Hello there!"  # (content or "").strip()
    block = response.pop("clem_player")
    assert block["response"] == text and block["model_name"] == "gpt-test"
    assert set(block) == {"call_start", "call_duration", "response", "model_name"}
    # ChatCompletion.model_dump(mode="json"): the SDK's fields, None included
    assert response["id"] == "chatcmpl-standin" and response["object"] == "chat.completion"
    assert response["choices"][0]["message"]["content"] == "  Hello there!\n\n"
    assert response["choices"][0]["message"]["refusal"] is None
    assert response["usage"]["total_tokens"] == 14


@pytest.mark.parametrize("name", ["gpt-test", "router-test"])
def test_empty_content_gives_empty_text(server: ServerProcess, chat: StandIn, name: str) -> None:
    # clembench: openai gives "" for None; openrouter crashed on None (content.strip()), clemserve gives ""
    for content in (None, "", "  \n"):
        chat.script("POST", CHAT, Reply(200, completion(content)))
        _, response, text = generate(server, name)
        assert text == "" and response["choices"][0]["message"]["content"] == content


def test_wrong_role_is_internal(server: ServerProcess, chat: StandIn) -> None:
    chat.script("POST", CHAT, Reply(200, completion("hi", role="user")))
    mark = server.log_mark()
    err = failure(server, "gpt-test", backends.InternalError)
    assert err.request_id and err.request_id in server.log(since=mark)
    assert "should be 'assistant'" in server.log(since=mark)
    assert len(list(chat.matching(CHAT))) == 1  # not retried


# -- faults ------------------------------------------------------------------------------------------


def test_retry_after_is_honoured(server: ServerProcess, chat: StandIn) -> None:
    arrivals: list[float] = []
    replies = [
        Reply(429, {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}},
              headers={"retry-after": "0.3"}),
        Reply(200, completion("after the wait")),
    ]  # fmt: skip

    def respond(request: Recorded) -> Reply:
        arrivals.append(time.monotonic())
        return replies[min(len(arrivals), len(replies)) - 1]

    chat.script("POST", CHAT, respond)
    _, _, text = generate(server, "gpt-test")
    assert text == "after the wait"
    assert len(arrivals) == 2 and arrivals[1] - arrivals[0] >= 0.3


def test_server_error_then_success(server: ServerProcess, chat: StandIn) -> None:
    chat.script(
        "POST", CHAT, openai_error(500, "The server had an error", None, "server_error"), Reply(200, completion("ok"))
    )
    assert generate(server, "gpt-test")[2] == "ok"
    assert len(list(chat.matching(CHAT))) == 2


def test_rate_limit_forever_is_resource_exhausted(server: ServerProcess, chat: StandIn) -> None:
    chat.script(
        "POST", CHAT, openai_error(429, "Rate limit reached for gpt-4o-mini", "rate_limit_exceeded", "requests")
    )
    err = failure(server, "gpt-test", backends.ResourceExhaustedError)
    assert err.metadata["upstream_status"] == "429" and err.metadata["provider"] == "OpenAI"
    assert "Rate limit reached" in str(err)
    assert len(list(chat.matching(CHAT))) == 4  # the server's default: 4 attempts


def test_unavailable_forever(server: ServerProcess, chat: StandIn) -> None:
    chat.script("POST", CHAT, openai_error(503, "The engine is currently overloaded", None, "server_error"))
    err = failure(server, "compat-test", backends.UnavailableError)
    assert "4 time(s)" in str(err) and "HTTP 503" in str(err) and "overloaded" in str(err)
    assert err.metadata["upstream_status"] == "503"


def test_caller_deadline(server: ServerProcess, chat: StandIn) -> None:
    chat.script("POST", CHAT, Reply(200, completion("too late"), delay_s=3.0))
    model = model_for(server, "gpt-test", timeout=0.5)
    started = time.monotonic()
    with pytest.raises((backends.DeadlineExceededError, backends.ServerError)) as caught:
        model.generate_response(USER)
    assert time.monotonic() - started < 2.0
    assert caught.value.code == "DEADLINE_EXCEEDED"
    seen(str(caught.value))
    chat.script("POST", CHAT, Reply(200, completion("still serving")))
    assert generate(server, "gpt-test")[2] == "still serving"


def test_malformed_body_is_unavailable(server: ServerProcess, chat: StandIn) -> None:
    # a garbled 200 is the provider's (or a proxy's) fault, not clemserve's: retried, then UNAVAILABLE
    chat.script("POST", CHAT, Reply(200, '{"id": "chatcmpl-1", "choices": [{"ind'))
    err = failure(server, "gpt-test", backends.UnavailableError)
    assert "not valid JSON" in str(err)
    chat.script("POST", CHAT, Reply(200, "<html>Bad gateway</html>", headers={"content-type": "text/html"}))
    err = failure(server, "gpt-test", backends.UnavailableError)
    assert "no chat completion" in str(err)
    chat.script("POST", CHAT, Reply(200, completion("fine again")))
    assert generate(server, "gpt-test")[2] == "fine again"


def test_context_length_error(server: ServerProcess, chat: StandIn) -> None:
    message = (
        "This model's maximum context length is 4097 tokens. However, you requested 5000 tokens "
        "(4700 in the messages, 300 in the completion). Please reduce the length of the messages or completion."
    )
    chat.script("POST", CHAT, openai_error(400, message, "context_length_exceeded"))
    err = failure(server, "gpt-test", backends.ContextExceededError)
    assert (err.tokens_used, err.context_size, err.tokens_left) == (5000, 4097, -903)
    assert str(err).endswith(" 5000/4097") and "gpt-test" in str(err)
    assert len(list(chat.matching(CHAT))) == 1


@pytest.mark.parametrize(
    ("message", "used", "size"),
    [
        ("max_tokens=600 cannot be greater than max_model_len=512. Please request fewer output tokens.", 600, 512),
        (
            "This model's maximum context length is 512 tokens. However, your prompt contains 700 input tokens, "
            "which exceeds this limit even without any output tokens. Please reduce the length of the input prompt.",
            700,
            512,
        ),
    ],
)
def test_vllm_context_errors(server: ServerProcess, chat: StandIn, message: str, used: int, size: int) -> None:
    # vLLM's error body: the status code as "code", no context_length_exceeded
    chat.script(
        "POST", CHAT, Reply(400, {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}})
    )
    err = failure(server, "compat-test", backends.ContextExceededError, max_tokens=600)
    assert (err.tokens_used, err.context_size, err.tokens_left) == (used, size, size - used)
    assert len(list(chat.matching(CHAT))) == 1


def test_validation_error_is_not_retried(server: ServerProcess, chat: StandIn) -> None:
    chat.script("POST", CHAT, openai_error(400, "Invalid key in 'logit_bias': x.", "invalid_value"))
    err = failure(server, "gpt-test", backends.InvalidArgumentError, logit_bias={"x": 5})
    assert "Invalid key in 'logit_bias'" in str(err) and "HTTP 400" in str(err)
    assert len(list(chat.matching(CHAT))) == 1
    # a value clemserve can check itself never reaches the provider
    err = failure(server, "gpt-test", backends.InvalidArgumentError, top_p=3)
    assert err.field == "args.top_p"
    assert len(list(chat.matching(CHAT))) == 1


def test_bad_key_is_failed_precondition(server: ServerProcess, chat: StandIn) -> None:
    key = FAKE_KEYS["openai"]
    echoed = f"Incorrect API key provided: {key[:6]}{'*' * 14}{key[-4:]}. You can find your API key at https://platform.openai.com/account/api-keys."
    chat.script("POST", CHAT, openai_error(401, echoed, "invalid_api_key"))
    err = failure(server, "gpt-test", backends.FailedPreconditionError)
    assert "key.json entry 'openai'" in str(err) and "OpenAI" in str(err)
    assert err.subject == "key.json: openai"
    assert len(list(chat.matching(CHAT))) == 1


def test_unknown_model_is_not_found(server: ServerProcess, chat: StandIn) -> None:
    chat.script(
        "POST",
        CHAT,
        openai_error(404, "The model `gpt-4o-mini` does not exist or you do not have access to it.", "model_not_found"),
    )
    err = failure(server, "gpt-test", backends.ModelNotFoundError)
    assert "does not exist" in str(err) and "gpt-4o-mini" in str(err)
    assert len(list(chat.matching(CHAT))) == 1


# -- concurrency --------------------------------------------------------------------------------------


def test_concurrent_calls_share_one_model(server: ServerProcess, chat: StandIn) -> None:
    chat.script("POST", CHAT, Reply(200, completion("in parallel"), delay_s=1.0))
    model = model_for(server, "gpt-test").as_async()

    async def all_at_once() -> list[Any]:
        return await asyncio.gather(*(model.generate_response(USER) for _ in range(64)))

    results = asyncio.run(all_at_once())
    assert [text for _, _, text in results] == ["in parallel"] * 64
    assert len(list(chat.matching(CHAT))) == 64
    assert chat.max_in_flight >= 32, chat.max_in_flight


# -- keys ----------------------------------------------------------------------------------------------


def test_key_entries(odd_keys_server: ServerProcess, standin: StandIn) -> None:
    """Its key file: openai with the US spelling "organization", openrouter without api_key, openai_compatible
    without base_url."""
    standin.script("POST", CHAT, answer_by_model("Hi"))
    generate(odd_keys_server, "gpt-test")
    assert only_request(standin).headers["openai-organization"] == "org-us"

    err = failure(odd_keys_server, "router-test", backends.FailedPreconditionError)
    assert err.subject == "key.json: openrouter" and "api_key" in str(err)
    err = failure(odd_keys_server, "compat-test", backends.FailedPreconditionError)
    assert err.subject == "key.json: openai_compatible" and "base_url" in str(err)
    assert len(list(standin.matching(CHAT))) == 1
    assert_no_key_leaks(odd_keys_server.log())


def test_no_key_leaks(server: ServerProcess) -> None:
    assert SEEN
    for text in SEEN:
        assert_no_key_leaks(text)
    assert_no_key_leaks(server.log())
