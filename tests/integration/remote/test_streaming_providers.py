"""GenerateStream on remote models: the text streams as each provider's stand-in sends it, through the
provider's own SDK in a real clemserve process, and the reply at the end is Generate's.

Every case streams the same text in the same pieces, slowly (``DELAY_S`` apart), after the same unary
reply: the pieces must reach the caller one by one before the reply ends, concatenate to the text before
clembench's cleaning, and be followed by exactly the reply (prompt, response object, text, usage, finish
reason) that Generate gives for the same request. A stream that breaks after text was sent is not
retried; one that breaks before is retried as Generate is.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import clemserve.client as backends
from clemserve.client import StreamReply, TextDelta
from clemserve.client.channel import channel_for
from clemserve.v1 import clemserve_pb2 as pb
from clemserve.v1 import clemserve_pb2_grpc as pb_grpc
from tests.providers import (
    anthropic_error_event,
    anthropic_events,
    assert_no_key_leaks,
    cohere_error_event,
    cohere_events,
    gemini_error_event,
    gemini_events,
    mistral_events,
    openai_error_event,
    openai_events,
    responses_error_event,
    responses_events,
    responses_reply,
    sse,
)
from tests.serving import ServerProcess
from tests.standin import Recorded, Reply, StandIn

#: the text before cleaning, in the pieces the stand-ins send (leading and trailing space on purpose:
#: OpenAI's, Mistral's and Gemini's text is stripped, Anthropic's and Cohere's is not)
PIECES = ["  Hello", " there,", " how", " are", " you", "?\n"]
RAW = "".join(PIECES)
DELAY_S = 0.06
USER = [{"role": "user", "content": "Say hello."}]
GEMINI = "gemini-stream-model"
#: what a streamed request adds to the unary request's body
STREAM_FIELDS = {"stream", "stream_options"}


def chat_completion(model: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-stream",
        "object": "chat.completion",
        "created": 1767225600,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": RAW}, "logprobs": None, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 6, "total_tokens": 17},
    }


def anthropic_message(*thinking: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "msg_01StreamStandIn",
        "type": "message",
        "role": "assistant",
        "content": [*thinking, {"type": "text", "text": RAW}],
        "model": "claude-test",
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 6},
    }


MISTRAL_REPLY = {**chat_completion("mistral-small-latest"), "id": "cmpl-stream"}
del MISTRAL_REPLY["choices"][0]["logprobs"]
COHERE_REPLY = {
    "id": "5a50480a-cf52-46f0-af01-53d18539bd31",
    "finish_reason": "COMPLETE",
    "message": {"role": "assistant", "content": [{"type": "text", "text": RAW}]},
    "usage": {
        "billed_units": {"input_tokens": 5, "output_tokens": 6},
        "tokens": {"input_tokens": 71, "output_tokens": 6},
    },
}
GEMINI_REPLY = {
    "candidates": [{"content": {"role": "model", "parts": [{"text": RAW}]}, "finishReason": "STOP", "index": 0}],
    "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 6, "totalTokenCount": 15},
    "modelVersion": GEMINI,
    "responseId": "mAitaLmkHPPlz7IPvtfUqQ4",
}
RESPONSES_REPLY = responses_reply(RAW, "resp_stream", 6)
THINKING = {"type": "thinking", "thinking": "The user wants a greeting.", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA"}

Events = Callable[[dict[str, Any], list[str]], list[tuple[str | None, Any]]]


@dataclass(frozen=True)
class Case:
    model: str
    entry: dict[str, Any]
    #: the unary and the streamed request's path (regex)
    path: str
    reply: dict[str, Any]
    events: Events
    #: the provider's own error event inside a stream, where it has one
    error_event: tuple[str | None, Any] | None
    stream_path: str | None = None


def entry(name: str, backend: str, model_id: str, **config: Any) -> dict[str, Any]:
    return {"model_name": name, "backend": backend, "model_id": model_id, "model_config": config}


CASES = [
    Case("s-openai", entry("s-openai", "openai", "gpt-4o-mini"), r"^/chat/completions$",
         chat_completion("gpt-4o-mini"), openai_events, openai_error_event()),
    Case("s-compatible", entry("s-compatible", "openai_compatible", "Qwen/Qwen2.5-7B-Instruct"),
         r"^/chat/completions$", chat_completion("Qwen/Qwen2.5-7B-Instruct"), openai_events, openai_error_event()),
    Case("s-openrouter", entry("s-openrouter", "openrouter", "meta-llama/llama-3.1-8b-instruct"),
         r"^/chat/completions$", chat_completion("meta-llama/llama-3.1-8b-instruct"), openai_events,
         openai_error_event()),
    Case("s-azure-gpt", entry("s-azure-gpt", "azure", "gpt-4.1"), r"^/chat/completions$",
         chat_completion("gpt-4.1"), openai_events, openai_error_event()),
    Case("upgpt-codex", entry("upgpt-codex", "azure", "gpt-5-codex"), r"^/responses$", RESPONSES_REPLY,
         responses_events, responses_error_event()),
    Case("s-azure-claude", entry("s-azure-claude", "azure", "Claude-Sonnet-4-5"), r"^/v1/messages$",
         anthropic_message(), anthropic_events, anthropic_error_event()),
    Case("s-anthropic", entry("s-anthropic", "anthropic", "claude-test"), r"^/v1/messages$",
         anthropic_message(), anthropic_events, anthropic_error_event()),
    Case("s-anthropic-thinking", entry("s-anthropic-thinking", "anthropic", "claude-test", thinking_mode=True),
         r"^/v1/messages$", anthropic_message(THINKING), anthropic_events, anthropic_error_event()),
    Case("s-mistral", entry("s-mistral", "mistral", "mistral-small-latest"), r"^/v1/chat/completions$",
         MISTRAL_REPLY, mistral_events, None),
    Case("s-cohere", entry("s-cohere", "cohere", "command-a-03-2025"), r"^/v2/chat$", COHERE_REPLY,
         cohere_events, cohere_error_event()),
    Case("s-google", entry("s-google", "google", GEMINI), rf"^/v1beta/models/{GEMINI}:generateContent$",
         GEMINI_REPLY, gemini_events, gemini_error_event(),
         stream_path=rf"^/v1beta/models/{GEMINI}:streamGenerateContent\?alt=sse$"),
]  # fmt: skip
IDS = [case.model for case in CASES]
SEEN: list[str] = []


ENTRIES = [case.entry for case in CASES]


@pytest.fixture(scope="module", autouse=True)
def loaded(server: ServerProcess) -> None:
    """Every case loaded first: importing an SDK is no part of the time to the first piece."""
    for case in CASES:
        backends.preload(case.model, address=server.address, timeout=60)


@pytest.fixture
def stand(standin: StandIn) -> Iterator[StandIn]:
    standin.reset()
    yield standin
    standin.release.set()


def is_streamed(recorded: Recorded) -> bool:
    return "streamGenerateContent" in recorded.path or bool((recorded.json or {}).get("stream"))


def script(stand: StandIn, case: Case, *streams: Reply) -> None:
    """Unary requests get the case's reply; streamed ones ``streams`` in order (the last one repeating)."""
    left = list(streams)

    def answer(recorded: Recorded) -> Reply:
        if not is_streamed(recorded):
            return Reply(200, case.reply)
        return left.pop(0) if len(left) > 1 else left[0]

    stand.script("POST", case.path, answer)
    if case.stream_path:
        stand.script("POST", case.stream_path, answer)


def streamed(case: Case, events: list[tuple[str | None, Any]] | None = None, **options: Any) -> Reply:
    return Reply(200, chunks=sse(*(events if events is not None else case.events(case.reply, PIECES))), **options)


def model(server: ServerProcess, name: str) -> backends.Model:
    return backends.get_model_for(name, address=server.address, lease=False)


def without_streaming(body: dict[str, Any]) -> dict[str, Any]:
    """A request body without the fields that switch streaming on (Mistral's and Cohere's SDKs send
    ``"stream": false`` in unary requests too)."""
    return {k: v for k, v in body.items() if k not in STREAM_FIELDS}


def without_timing(response: dict[str, Any]) -> dict[str, Any]:
    """The response object without what differs between two calls by nature: the call's start and
    duration, and (Gemini) the HTTP headers of the reply the SDK records."""
    player = {k: v for k, v in response["clem_player"].items() if k not in ("call_start", "call_duration")}
    rest = {k: v for k, v in response.items() if k not in ("clem_player", "sdk_http_response")}
    return {**rest, "clem_player": player}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_pieces_arrive_as_sent_and_the_reply_is_generates(server: ServerProcess, stand: StandIn, case: Case) -> None:
    script(stand, case, streamed(case), streamed(case, chunk_delay_s=DELAY_S))
    found = model(server, case.model)
    list(found.generate_stream(USER))  # an SDK's first stream builds its event types (the Responses API's: 3 s)
    unary = found.generate_response(USER)

    started = time.monotonic()
    arrivals: list[tuple[float, Any]] = [(time.monotonic() - started, e) for e in found.generate_stream(USER)]
    pieces = [(at, e.text) for at, e in arrivals if isinstance(e, TextDelta)]
    (reply_at, reply), *_ = [(at, e) for at, e in arrivals if isinstance(e, StreamReply)]
    assert isinstance(arrivals[-1][1], StreamReply)
    # each piece as the provider sent it, the text before cleaning
    assert [text for _, text in pieces] == PIECES
    assert "".join(text for _, text in pieces) == RAW
    # the first piece long before the end: the rest of the stream still had 5 delays to go (the first
    # piece's way through the SDK may take longer than the last one's, hence the margin)
    first_at = pieces[0][0]
    assert reply_at - first_at >= (len(PIECES) - 1) * DELAY_S * 0.6, arrivals
    assert first_at < reply_at / 2, (first_at, reply_at)

    # the reply is Generate's: the same prompt, text (cleaned as Generate cleans it) and response object
    prompt, response, text = reply.triple
    assert prompt == unary[0] and text == unary[2]
    assert without_timing(response) == without_timing(unary[1])
    assert text in (RAW, RAW.strip())

    # on the wire: the unary request plus the provider's streaming switch, once (no retry)
    _, unary_request, stream_request = stand.requests
    assert not is_streamed(unary_request) and is_streamed(stream_request)
    assert without_streaming(stream_request.json) == without_streaming(unary_request.json)
    assert stream_request.json != unary_request.json or stream_request.path != unary_request.path
    SEEN.append(json.dumps(response))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_final_reply_carries_generates_usage_and_finish_reason(
    server: ServerProcess, stand: StandIn, case: Case
) -> None:
    script(stand, case, streamed(case))
    stub = pb_grpc.ModelServiceStub(channel_for(server.address, None))
    selector, messages = pb.ModelSelector(name=case.model), [pb.Message(role="user", content="Say hello.")]
    unary = stub.Generate(pb.GenerateRequest(model=selector, messages=messages), timeout=30)
    events = list(stub.GenerateStream(pb.GenerateStreamRequest(model=selector, messages=messages), timeout=30))
    final = events[-1].reply
    assert "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta") == RAW
    assert final.usage == unary.usage and final.usage.prompt_tokens > 0 and final.usage.completion_tokens > 0
    assert final.finish_reason == unary.finish_reason
    assert final.prompt_json == unary.prompt_json and final.response_text == unary.response_text
    assert without_timing(json.loads(final.response_json)) == without_timing(json.loads(unary.response_json))


ERRORS = [(case, "event") for case in CASES if case.error_event] + [(case, "cut") for case in CASES]


@pytest.mark.parametrize(("case", "how"), ERRORS, ids=[f"{c.model}-{how}" for c, how in ERRORS])
def test_an_error_after_text_ends_the_stream_unretried(
    server: ServerProcess, stand: StandIn, case: Case, how: str
) -> None:
    """Two pieces, then the provider's error event (or a dropped connection): the caller has the pieces,
    then UNAVAILABLE (the failure is transient, but text was sent, so it is not retried)."""
    events = case.events(case.reply, PIECES)
    # the events up to the one carrying the second piece (message and content starts included)
    head = events[: next(i for i, (_, data) in enumerate(events) if _carries(data, PIECES[1])) + 1]
    if how == "event":
        assert case.error_event is not None
        script(stand, case, streamed(case, [*head, case.error_event]))
    else:
        script(stand, case, streamed(case, head, cut=True))
    got: list[str] = []
    with pytest.raises(backends.ClemserveError) as caught:
        for event in model(server, case.model).generate_stream(USER):
            if isinstance(event, TextDelta):
                got.append(event.text)
    assert caught.value.code == "UNAVAILABLE", caught.value
    assert "broke off its streamed reply" in str(caught.value)
    assert got == PIECES[:2]
    assert len(stand.requests) == 1  # not retried
    SEEN.append(str(caught.value))


BY_MODEL = {case.model: case for case in CASES}
DETERMINISTIC = [
    # an error event's type (Anthropic) or code (OpenAI-compatible servers) is the status it stands for
    ("s-anthropic", ("error", {"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}),
     "INVALID_ARGUMENT"),
    ("s-openrouter", (None, {"error": {"message": "Rate limit exceeded", "code": 429}}), "RESOURCE_EXHAUSTED"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "error", "code"), DETERMINISTIC, ids=[d[0] for d in DETERMINISTIC])
def test_an_error_event_maps_to_the_status_its_http_twin_would(
    server: ServerProcess, stand: StandIn, name: str, error: tuple[str | None, Any], code: str
) -> None:
    case = BY_MODEL[name]
    events = case.events(case.reply, PIECES)
    head = events[: next(i for i, (_, data) in enumerate(events) if _carries(data, PIECES[0])) + 1]
    script(stand, case, streamed(case, [*head, error]))
    with pytest.raises(backends.ClemserveError) as caught:
        list(model(server, case.model).generate_stream(USER))
    assert caught.value.code == code, caught.value
    assert len(stand.requests) == 1


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_failures_before_the_first_piece_are_retried(server: ServerProcess, stand: StandIn, case: Case) -> None:
    """A 503, then a stream that breaks before any text: both retried as Generate retries them."""
    busy = Reply(503, {"error": {"message": "busy", "type": "server_error", "code": 503, "status": "UNAVAILABLE"}})
    script(stand, case, busy, Reply(200, chunks=[], cut=True), streamed(case))
    events = list(model(server, case.model).generate_stream(USER))
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == RAW
    assert isinstance(events[-1], StreamReply) and events[-1].response_text in (RAW, RAW.strip())
    assert len(stand.requests) == 3


def test_a_deadline_mid_stream_closes_the_providers_stream(server: ServerProcess, stand: StandIn) -> None:
    case = CASES[0]
    script(stand, case, streamed(case, chunk_delay_s=1.0))
    found = backends.get_model_for(case.model, address=server.address, lease=False, timeout=0.5)
    with pytest.raises(backends.ClemserveError) as caught:
        list(found.generate_stream(USER))
    assert caught.value.code == "DEADLINE_EXCEEDED"
    (request,) = stand.requests
    deadline = time.monotonic() + 3
    while not request.abandoned and time.monotonic() < deadline:
        time.sleep(0.05)
    assert request.abandoned, "the provider's stream stayed open after the caller gave up"


def test_no_key_leaks(server: ServerProcess) -> None:
    assert SEEN
    assert_no_key_leaks("\n".join(SEEN) + server.log())


def _carries(data: Any, piece: str) -> bool:
    """Whether an event's data is a delta holding exactly ``piece`` (not a whole reply holding the text)."""
    if isinstance(data, dict):
        if any(value == piece for key, value in data.items() if key in ("text", "content", "delta")):
            return True
        return any(_carries(value, piece) for value in data.values())
    if isinstance(data, list):
        return any(_carries(value, piece) for value in data)
    return False
