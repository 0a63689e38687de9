"""The google backend against a stand-in Gemini API: the requests the SDK sends, the triple the client
gets, and every failure the provider can answer with."""

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
from tests.standin import Recorded, Reply, StandIn

MODEL_ID = "gemini-test-model"
#: the API version clemcore's google-genai 1.x calls; newer SDKs default to v1, so the server pins it
PATH = rf"^/v1beta/models/{MODEL_ID}:generateContent$"
ATTEMPTS = 4  # the server's default --remote-attempts
SAFETY = [
    {"category": category, "threshold": "BLOCK_MEDIUM_AND_ABOVE"}
    for category in (
        "HARM_CATEGORY_HARASSMENT",
        "HARM_CATEGORY_HATE_SPEECH",
        "HARM_CATEGORY_SEXUALLY_EXPLICIT",
        "HARM_CATEGORY_DANGEROUS_CONTENT",
    )
]


def entry(name: str, **config: Any) -> dict[str, Any]:
    return {"model_name": name, "backend": "google", "model_id": MODEL_ID, "model_config": config}


ENTRIES = [
    entry("gemini-test"),
    entry("gemini-mm", multimodality={"multiple_images": True}),
    entry("gemini-one-image", multimodality={"multiple_images": False}),
    entry("gemini-mm-off", multimodality=False),
    entry("gemini-thinking", thinking_mode=True),
    entry("gemini-thinking-off", thinking_mode=False),
    entry("gemini-v1", api_version="v1"),
    entry("gemini-bad-version", api_version="v1beta/../v1"),
]

#: every text, prompt, response and error message clemserve gave back, for the key-leak scan at the end
SEEN: list[str] = []


def answer(value: str | None, role: str = "model", finish: str = "STOP") -> dict[str, Any]:
    """A generateContent response body."""
    content: dict[str, Any] = {"role": role}
    if value is not None:
        content["parts"] = [{"text": value}]
    return {
        "candidates": [{"content": content, "finishReason": finish, "index": 0}],
        "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 3, "totalTokenCount": 12},
        "modelVersion": MODEL_ID,
        "responseId": "mAitaLmkHPPlz7IPvtfUqQ4",
    }


def error(status: int, name: str, said: str, *details: dict[str, Any], headers: dict[str, str] | None = None) -> Reply:
    body: dict[str, Any] = {"error": {"code": status, "message": said, "status": name}}
    if details:
        body["error"]["details"] = list(details)
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
    standin.script("POST", PATH, Reply(200, answer("  Hello there.\n")))


def model(server: ServerProcess, name: str = "gemini-test", **gen_args: Any) -> backends.Model:
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


def requests(standin: StandIn) -> list[Recorded]:
    return list(standin.matching(PATH))


def sent(standin: StandIn) -> list[Any]:
    return [r.json for r in requests(standin)]


def user(value: str) -> dict[str, Any]:
    return {"role": "user", "parts": [{"text": value}]}


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

    (request,) = requests(standin)
    assert request.method == "POST"
    # the key travels in a header, never in the URL (which HTTP libraries log)
    assert request.headers["x-goog-api-key"] == FAKE_KEYS["google"]
    assert "key=" not in request.path and "?" not in request.path
    contents = [user("u1"), {"role": "model", "parts": [{"text": "a1"}]}, user("u2")]
    body = request.json
    # the first system message is the system instruction; only temperature and max_tokens go with it
    assert body["systemInstruction"]["parts"] == [{"text": "first system"}]
    assert body == {
        "contents": contents,
        "systemInstruction": body["systemInstruction"],
        "safetySettings": SAFETY,
        "generationConfig": {"temperature": 0.5, "maxOutputTokens": 50},
    }
    # the prompt object is the Content list as JSON, without the system instruction, as in clembench
    assert prompt == contents
    assert response_text == "Hello there."  # stripped (clembench)
    clem_player = response.pop("clem_player")
    assert clem_player["response"] == "Hello there." and clem_player["model_name"] == "gemini-test"
    candidate = response["candidates"][0]
    assert candidate["content"]["role"] == "model" and candidate["content"]["parts"][0]["text"] == "  Hello there.\n"
    assert candidate["finish_reason"] == "STOP"
    assert response["usage_metadata"]["prompt_token_count"] == 9
    assert response["usage_metadata"]["candidates_token_count"] == 3


def test_empty_first_system_message_means_no_instruction(server: ServerProcess, standin: StandIn) -> None:
    # clembench takes the first system message's content, and only when it is not empty
    messages = [
        {"role": "user", "content": "u1"},
        {"role": "system", "content": ""},
        {"role": "assistant", "content": "a1"},
        {"role": "system", "content": "later"},
        {"role": "user", "content": "u2"},
    ]
    generate(model(server), messages)
    (body,) = sent(standin)
    assert "systemInstruction" not in body
    assert body["contents"] == [user("u1"), {"role": "model", "parts": [{"text": "a1"}]}, user("u2")]


def test_usage_on_the_wire(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.address) as channel:
        reply = pb_grpc.ModelServiceStub(channel).Generate(
            pb.GenerateRequest(
                model=pb.ModelSelector(name="gemini-test"),
                messages=[pb.Message(role="user", content="Hi!")],
                args=pb.GenerationArgs(max_tokens=50),
            )
        )
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (9, 3)


@pytest.mark.parametrize("name", ["gemini-test", "gemini-thinking", "gemini-thinking-off"])
def test_requests_go_to_v1beta_as_in_clemcore(server: ServerProcess, standin: StandIn, name: str) -> None:
    generate(model(server, name), USER)
    assert [r.path for r in standin.requests] == [f"/v1beta/models/{MODEL_ID}:generateContent"]


def test_model_config_chooses_another_api_version(server: ServerProcess, standin: StandIn) -> None:
    standin.script("POST", rf"^/v1/models/{MODEL_ID}:generateContent$", Reply(200, answer("from v1")))
    _, _, text = generate(model(server, "gemini-v1"), USER)
    assert text == "from v1"
    assert [r.path for r in standin.requests] == [f"/v1/models/{MODEL_ID}:generateContent"]


def test_malformed_api_version_names_the_field(server: ServerProcess, standin: StandIn) -> None:
    err = failure(model(server, "gemini-bad-version"), USER, backends.FailedPreconditionError)
    assert err.subject == "model_config.api_version"
    assert "model_config.api_version of gemini-bad-version must be a Gemini API version" in str(err)
    assert standin.requests == []


def test_thinking_mode(server: ServerProcess, standin: StandIn) -> None:
    generate(model(server, "gemini-thinking", temperature=0.2, max_tokens=50), USER)
    (body,) = sent(standin)
    config = body["generationConfig"]
    assert config["maxOutputTokens"] == 4146
    thinking = config["thinkingConfig"]
    assert thinking.get("thinkingBudget", thinking.get("thinking_budget")) == 4096
    assert config["temperature"] == 0.2


def test_thinking_mode_false_means_off(server: ServerProcess, standin: StandIn) -> None:
    generate(model(server, "gemini-thinking-off", max_tokens=50), USER)
    (body,) = sent(standin)
    assert body["generationConfig"] == {"temperature": 0.0, "maxOutputTokens": 50}


def test_extra_gen_args_are_refused(server: ServerProcess, standin: StandIn) -> None:
    err = failure(model(server, top_k=40), USER, backends.InvalidArgumentError)
    assert err.field == "args.top_k"
    assert sent(standin) == []


# -- images --------------------------------------------------------------------------------------------


def test_images_inline_and_by_url(server: ServerProcess, standin: StandIn, tmp_path: Path) -> None:
    data = png(tmp_path / "board.png")
    b64 = base64.b64encode(data).decode()
    # the SDK writes bytes in the URL-safe base64 alphabet, which the API reads as well as the standard one
    urlsafe = base64.urlsafe_b64encode(data).decode()
    standin.script("GET", r"^/img/cat\.png$", Reply(200, data, {"content-type": "image/png"}))
    url = f"{standin.url}/img/cat.png"
    messages = [
        {"role": "user", "content": "Look.", "image": [str(tmp_path / "board.png"), f"data:image/png;base64,{b64}"]},
        {"role": "assistant", "content": "I see."},
        {"role": "user", "content": "And this?", "image": [url]},
    ]
    prompt, _, _ = generate(model(server, "gemini-mm"), messages)
    (body,) = sent(standin)
    # no Files API upload (clembench uploads every image on every call): the bytes travel inline
    assert not any("/files" in r.path for r in standin.requests)
    first, second, third = body["contents"]
    assert first["role"] == "user" and first["parts"][0] == {"text": "Look."}
    for part in first["parts"][1:]:
        inline = part["inlineData"]
        assert inline["data"] == urlsafe
        assert inline.get("mimeType", inline.get("mime_type")) == "image/png"
    assert second == {"role": "model", "parts": [{"text": "I see."}]}
    # an http(s) image goes by URL, for Google to fetch
    assert third["parts"][0] == {"text": "And this?"}
    file_data = third["parts"][1]["fileData"]
    assert file_data.get("fileUri", file_data.get("file_uri")) == url
    assert file_data.get("mimeType", file_data.get("mime_type")) == "image/png"
    # the prompt object carries what was sent, as JSON
    inline_part = {"inline_data": {"data": urlsafe, "mime_type": "image/png"}}
    assert prompt == [
        {"role": "user", "parts": [{"text": "Look."}, inline_part, inline_part]},
        {"role": "model", "parts": [{"text": "I see."}]},
        {"role": "user", "parts": [{"text": "And this?"}, {"file_data": {"file_uri": url, "mime_type": "image/png"}}]},
    ]


@pytest.mark.parametrize("name", ["gemini-test", "gemini-mm-off"])
def test_images_refused_without_multimodality(
    server: ServerProcess, standin: StandIn, tmp_path: Path, name: str
) -> None:
    png(tmp_path / "a.png")
    messages = [{"role": "user", "content": "x", "image": [str(tmp_path / "a.png")]}]
    err = failure(model(server, name), messages, backends.InvalidArgumentError)
    assert err.field == "messages[0].image"
    assert sent(standin) == []


def test_several_images_refused_without_multiple_images(
    server: ServerProcess, standin: StandIn, tmp_path: Path
) -> None:
    png(tmp_path / "a.png")
    images = [str(tmp_path / "a.png")] * 2
    err = failure(
        model(server, "gemini-one-image"),
        [{"role": "user", "content": "x", "image": images}],
        backends.InvalidArgumentError,
    )
    assert err.field == "messages[0].image"
    assert sent(standin) == []
    generate(model(server, "gemini-one-image"), [{"role": "user", "content": "x", "image": images[:1]}])
    assert len(sent(standin)) == 1


# -- the answer's content ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        answer(""),
        answer(None, finish="MAX_TOKENS"),
        # a prompt blocked by the safety settings: no candidates at all
        {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9}},
    ],
    ids=["empty-text", "no-parts", "blocked-prompt"],
)
def test_empty_content_gives_empty_text(server: ServerProcess, standin: StandIn, body: dict[str, Any]) -> None:
    standin.script("POST", PATH, Reply(200, body))
    _, response, response_text = generate(model(server), USER)
    assert response_text == ""
    assert "clem_player" in response


def test_wrong_role_is_internal(server: ServerProcess, standin: StandIn) -> None:
    standin.script("POST", PATH, Reply(200, answer("hi", role="user")))
    mark = server.log_mark()
    err = failure(model(server), USER, backends.InternalError)
    assert err.request_id and err.request_id in str(err)
    assert "role 'user'" in server.log(since=mark)  # the detail stays in the server log
    assert len(sent(standin)) == 1  # a wrong answer is not retried


# -- failures ------------------------------------------------------------------------------------------


def _timed(times: list[float], replies: list[Reply]) -> Any:
    """A responder that records when each request arrived, then answers in order (the last repeating)."""

    def respond(_request: Any) -> Reply:
        times.append(time.monotonic())
        return replies.pop(0) if len(replies) > 1 else replies[0]

    return respond


RETRY_INFO = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0.3s"}


@pytest.mark.parametrize(
    "limited",
    [
        error(
            429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota).", headers={"retry-after": "0.3"}
        ),
        # Gemini's own way: google.rpc.RetryInfo in the body, no header
        error(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota.", RETRY_INFO),
    ],
    ids=["retry-after-header", "retry-info"],
)
def test_rate_limit_delay_is_honoured(server: ServerProcess, standin: StandIn, limited: Reply) -> None:
    times: list[float] = []
    standin.script("POST", PATH, _timed(times, [limited, Reply(200, answer("ok"))]))
    _, _, response_text = generate(model(server), USER)
    assert response_text == "ok"
    assert len(times) == 2
    assert times[1] - times[0] >= 0.3


@pytest.mark.parametrize(
    "first",
    [
        error(500, "INTERNAL", "An internal error has occurred."),
        error(503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
        Reply(502, "<html>Bad Gateway</html>", {"content-type": "text/html"}),
    ],
    ids=["500", "503", "502-html"],
)
def test_transient_failure_then_success(server: ServerProcess, standin: StandIn, first: Reply) -> None:
    standin.script("POST", PATH, first, Reply(200, answer("recovered")))
    _, _, response_text = generate(model(server), USER)
    assert response_text == "recovered"
    assert len(sent(standin)) == 2


def test_rate_limit_forever_is_resource_exhausted(server: ServerProcess, standin: StandIn) -> None:
    standin.script("POST", PATH, error(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota."))
    err = failure(model(server), USER, backends.ResourceExhaustedError)
    assert err.metadata["upstream_status"] == "429"
    assert err.metadata["provider"] == "Google"
    assert "quota" in str(err)
    assert len(sent(standin)) == ATTEMPTS


def test_unavailable_forever(server: ServerProcess, standin: StandIn) -> None:
    standin.script("POST", PATH, error(503, "UNAVAILABLE", "The model is overloaded."))
    err = failure(model(server), USER, backends.UnavailableError)
    assert f"failed {ATTEMPTS} time(s)" in str(err)
    assert err.metadata["upstream_status"] == "503"
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
    assert generate(m, USER)[2] == "Hello there."  # the server is still healthy


def test_malformed_json_is_unavailable(server: ServerProcess, standin: StandIn) -> None:
    standin.script("POST", PATH, Reply(200, '{"candidates": [', {"content-type": "application/json"}))
    err = failure(model(server), USER, backends.UnavailableError)
    assert "not JSON" in str(err)
    assert len(sent(standin)) == ATTEMPTS  # retried: a cut-off body is usually gone on the next try
    standin.script("POST", PATH, Reply(200, answer("fine")))
    assert generate(model(server), USER)[2] == "fine"


def test_context_error(server: ServerProcess, standin: StandIn) -> None:
    said = "The input token count (1048577) exceeds the maximum number of tokens allowed (1048576)."
    standin.script("POST", PATH, error(400, "INVALID_ARGUMENT", said))
    err = failure(model(server), USER, backends.ContextExceededError)
    assert (err.tokens_used, err.context_size, err.tokens_left) == (1048577, 1048576, -1)
    assert str(err).endswith("1048577/1048576")
    assert len(sent(standin)) == 1


def test_validation_error_is_not_retried(server: ServerProcess, standin: StandIn) -> None:
    said = "* GenerateContentRequest.contents: contents is not specified"
    standin.script("POST", PATH, error(400, "INVALID_ARGUMENT", said))
    err = failure(model(server), USER, backends.InvalidArgumentError)
    assert "contents is not specified" in str(err)
    assert len(sent(standin)) == 1


@pytest.mark.parametrize(
    "refusal",
    [
        error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials."),
        error(403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers."),
        # what Gemini really answers for a wrong key: a 400 whose ErrorInfo says API_KEY_INVALID
        error(
            400,
            "INVALID_ARGUMENT",
            "API key not valid. Please pass a valid API key.",
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
            },
        ),
    ],
    ids=["401", "403", "400-api-key-invalid"],
)
def test_refused_key_names_the_key_entry(server: ServerProcess, standin: StandIn, refusal: Reply) -> None:
    standin.script("POST", PATH, refusal)
    err = failure(model(server), USER, backends.FailedPreconditionError)
    assert "key.json entry 'google'" in str(err) and "Google" in str(err)
    assert err.subject == "key.json: google"
    assert len(sent(standin)) == 1


def test_unknown_model_id_is_not_found(server: ServerProcess, standin: StandIn) -> None:
    said = f"models/{MODEL_ID} is not found for API version v1beta, or is not supported for generateContent."
    standin.script("POST", PATH, error(404, "NOT_FOUND", said))
    err = failure(model(server), USER, backends.ModelNotFoundError)
    assert MODEL_ID in str(err)
    assert len(sent(standin)) == 1


def test_missing_key_entry_says_where_the_key_belongs(
    odd_keys_server: ServerProcess, odd_key_file: Path, standin: StandIn
) -> None:
    err = failure(model(odd_keys_server), USER, backends.FailedPreconditionError)
    assert str(err) == (
        f"the server has no key for google: add a `google` entry to the server's key.json (searched: {odd_key_file})"
        " or set GOOGLE_API_KEY or GEMINI_API_KEY on the server"
    )
    assert err.subject == "key.json: google"
    assert standin.requests == []
    assert_no_key_leaks(str(err) + odd_keys_server.log())


def test_no_key_leaks(server: ServerProcess) -> None:
    assert SEEN, "the tests above record what they saw"
    for seen in SEEN:
        assert_no_key_leaks(seen)
    assert_no_key_leaks(server.log())
