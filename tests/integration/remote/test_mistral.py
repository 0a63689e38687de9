"""The mistral backend against a stand-in of Mistral's chat API, through a real clemserve process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import clemserve.client as backends
from tests.providers import FAKE_KEYS, assert_no_key_leaks
from tests.standin import Recorded, Reply, StandIn

PATH = "/v1/chat/completions"
ATTEMPTS = 4  # the server's default --remote-attempts
USER = [{"role": "user", "content": "Say hello"}]

ENTRIES: list[dict[str, Any]] = [
    {"model_name": "mistral-test", "backend": "mistral", "model_id": "mistral-small-latest", "model_config": {}},
    {
        "model_name": "mistral-mm",
        "backend": "mistral",
        "model_id": "pixtral-large-latest",
        "model_config": {"multimodality": {"single_image": True, "multiple_images": False}},
    },
    {
        "model_name": "mistral-mm-false",
        "backend": "mistral",
        "model_id": "mistral-small-latest",
        "model_config": {"multimodality": False},
    },
]

#: every text that came back from clemserve, scanned for the key at the end
SEEN: list[str] = []


def completion(content: Any = " Hello there! ", role: str = "assistant") -> dict[str, Any]:
    return {
        "id": "cmpl-e5cc70bb28c444948073e77776eb30ef",
        "object": "chat.completion",
        "created": 1702256327,
        "model": "mistral-small-latest",
        "choices": [{"index": 0, "message": {"role": role, "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 16, "completion_tokens": 34, "total_tokens": 50},
    }


def mistral_error(message: Any, kind: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    return {"object": "error", "message": message, "type": kind, "param": None, "code": code}


@pytest.fixture
def stand(standin: StandIn) -> Iterator[StandIn]:
    standin.reset()
    yield standin
    standin.reset()


def model(server: Any, name: str = "mistral-test", **kwargs: Any) -> backends.Model:
    found = backends.get_model_for(name, address=server.address, **kwargs)
    found.set_gen_args(temperature=0.0, max_tokens=100)
    return found


def generate(found: backends.Model, messages: list[dict[str, Any]]) -> tuple[Any, dict[str, Any], str]:
    prompt, response, text = found.generate_response(messages)
    SEEN.extend([repr(prompt), repr(response), text])
    return prompt, response, text


def failure(found: backends.Model, messages: list[dict[str, Any]], error: type[Exception]) -> Any:
    with pytest.raises(error) as caught:
        found.generate_response(messages)
    SEEN.append(f"{caught.value!r} {caught.value}")
    return caught.value


def timed(*replies: Reply) -> tuple[list[float], Any]:
    """A responder that answers ``replies`` in order (the last repeating) and notes when each request came."""
    arrivals: list[float] = []
    queue = list(replies)

    def answer(_: Recorded) -> Reply:
        arrivals.append(time.monotonic())
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return arrivals, answer


def png(tmp_path: Path, name: str = "tiny.png") -> str:
    path = tmp_path / name
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16)
    return str(path)


# -- the request on the wire and the triple --------------------------------------------------------------


def test_request_on_the_wire_and_the_triple(server: Any, stand: StandIn) -> None:
    stand.script("POST", PATH, Reply(200, completion()))
    found = model(server)
    found.set_gen_args(temperature=0.7, max_tokens=55)
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hello", "turn": 1},
        {"role": "user", "content": "twice"},
    ]
    prompt, response, text = generate(found, messages)

    (request,) = stand.matching(PATH)
    assert request.method == "POST"
    assert request.path == PATH
    assert request.headers["authorization"] == f"Bearer {FAKE_KEYS['mistral']}"
    assert request.json == {
        "model": "mistral-small-latest",
        # merged, system kept in the list, text only, extra keys not sent
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hello\n\ntwice"},
        ],
        "temperature": 0.7,
        "max_tokens": 55,
        "stream": False,
    }
    assert prompt == request.json["messages"]
    assert text == "Hello there!"  # stripped, as clembench does
    clem_player = response.pop("clem_player")
    assert clem_player["response"] == "Hello there!"
    assert clem_player["model_name"] == "mistral-test"
    assert response["id"] == "cmpl-e5cc70bb28c444948073e77776eb30ef"
    assert response["choices"][0]["message"]["content"] == " Hello there! "
    assert response["choices"][0]["message"]["role"] == "assistant"
    assert response["usage"] == {"prompt_tokens": 16, "completion_tokens": 34, "total_tokens": 50}


@pytest.mark.parametrize("content", ["", None, "   "])
def test_empty_content_is_an_empty_text(server: Any, stand: StandIn, content: Any) -> None:
    stand.script("POST", PATH, Reply(200, completion(content)))
    assert generate(model(server), USER)[2] == ""


def test_reasoning_chunks_give_their_text(server: Any, stand: StandIn) -> None:
    chunks = [
        {"type": "thinking", "thinking": [{"type": "text", "text": "hmm"}]},
        {"type": "text", "text": " The answer. "},
    ]
    stand.script("POST", PATH, Reply(200, completion(chunks)))
    assert generate(model(server), USER)[2] == "The answer."


def test_wrong_role_is_an_internal_error(server: Any, stand: StandIn) -> None:
    stand.script("POST", PATH, Reply(200, completion(role="user")))
    mark = server.log_mark()
    err = failure(model(server), USER, backends.InternalError)
    assert err.request_id
    assert "should be 'assistant'" in server.log(since=mark)


def test_extra_generation_arguments_are_refused(server: Any, stand: StandIn) -> None:
    found = model(server)
    found.set_gen_args(temperature=0.0, max_tokens=10, top_p=0.9)
    err = failure(found, USER, backends.InvalidArgumentError)
    assert err.field == "args.top_p"
    assert list(stand.matching(PATH)) == []


# -- images ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mistral-test", "mistral-mm-false"])
def test_images_refused_without_multimodality(server: Any, stand: StandIn, tmp_path: Path, name: str) -> None:
    err = failure(model(server, name), [{**USER[0], "image": [png(tmp_path)]}], backends.InvalidArgumentError)
    assert err.field == "messages[0].image"
    assert "multimodality" in str(err)
    assert list(stand.matching(PATH)) == []


def test_images_refused_even_when_the_entry_enables_multimodality(server: Any, stand: StandIn, tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    messages.append({"role": "user", "content": "What is this?", "image": [png(tmp_path)]})
    err = failure(model(server, "mistral-mm"), messages, backends.InvalidArgumentError)
    assert err.field == "messages[2].image"
    assert "text only" in str(err)
    assert list(stand.matching(PATH)) == []


def test_several_images_refused_without_multiple_images(server: Any, stand: StandIn, tmp_path: Path) -> None:
    images = [png(tmp_path, "a.png"), png(tmp_path, "b.png")]
    err = failure(model(server, "mistral-mm"), [{**USER[0], "image": images}], backends.InvalidArgumentError)
    assert err.field == "messages[0].image"
    assert "one image" in str(err)
    assert list(stand.matching(PATH)) == []


# -- faults ------------------------------------------------------------------------------------------------


def test_429_with_retry_after_is_retried_after_the_wait(server: Any, stand: StandIn) -> None:
    arrivals, answer = timed(
        Reply(429, {"message": "Requests rate limit exceeded"}, {"Retry-After": "0.3"}),
        Reply(200, completion()),
    )
    stand.script("POST", PATH, answer)
    assert generate(model(server), USER)[2] == "Hello there!"
    assert len(arrivals) == 2
    assert arrivals[1] - arrivals[0] >= 0.3


def test_500_then_success(server: Any, stand: StandIn) -> None:
    stand.script(
        "POST", PATH, Reply(500, mistral_error("Internal server error", "internal_error")), Reply(200, completion())
    )
    assert generate(model(server), USER)[2] == "Hello there!"
    assert len(list(stand.matching(PATH))) == 2


def test_429_forever_is_resource_exhausted(server: Any, stand: StandIn) -> None:
    stand.script("POST", PATH, Reply(429, {"message": "Requests rate limit exceeded"}))
    err = failure(model(server), USER, backends.ResourceExhaustedError)
    assert err.metadata["upstream_status"] == "429"
    assert "Requests rate limit exceeded" in str(err)
    assert len(list(stand.matching(PATH))) == ATTEMPTS


def test_503_forever_is_unavailable_after_all_attempts(server: Any, stand: StandIn) -> None:
    stand.script("POST", PATH, Reply(503, "<html>upstream connect error</html>", {"content-type": "text/html"}))
    err = failure(model(server), USER, backends.UnavailableError)
    assert f"failed {ATTEMPTS} time(s)" in str(err)
    assert err.metadata["upstream_status"] == "503"
    assert len(list(stand.matching(PATH))) == ATTEMPTS


def test_hanging_provider_meets_the_callers_deadline(server: Any, stand: StandIn) -> None:
    stand.script("POST", PATH, Reply(200, completion(), delay_s=3))
    found = model(server)  # resolve without the short timeout
    found.timeout = 0.5
    started = time.monotonic()
    with pytest.raises(backends.ClemserveError) as caught:
        found.generate_response(USER)
    assert time.monotonic() - started < 2
    err = caught.value
    SEEN.append(str(err))
    # The server's attempt ends at the same deadline, so its answer can beat the client's own timer:
    # then it is UNAVAILABLE "no answer within". Anything else (a success, a retry past the deadline) fails.
    assert err.code == "DEADLINE_EXCEEDED" or (err.code == "UNAVAILABLE" and "no answer within" in str(err)), err
    # the server goes on serving
    stand.script("POST", PATH, Reply(200, completion()))
    assert generate(model(server), USER)[2] == "Hello there!"


def test_malformed_json_is_unavailable_after_retries(server: Any, stand: StandIn) -> None:
    stand.script("POST", PATH, Reply(200, '{"id": "cmpl-1", "choices": [', {"content-type": "application/json"}))
    err = failure(model(server), USER, backends.UnavailableError)
    assert "unreadable answer" in str(err)
    assert len(list(stand.matching(PATH))) == ATTEMPTS
    stand.script("POST", PATH, Reply(200, completion()))
    assert generate(model(server), USER)[2] == "Hello there!"


@pytest.mark.parametrize(
    ("message", "used", "size"),
    [
        ("Prompt contains 40000 tokens and 0 draft tokens, too large for model with 32768 maximum context length",
         40000, 32768),
        ("Prompt contains 300000 tokens, too large for model with 131072 maximum context length", 300000, 131072),
    ],
)  # fmt: skip
def test_context_error_is_context_exceeded(server: Any, stand: StandIn, message: str, used: int, size: int) -> None:
    stand.script("POST", PATH, Reply(400, mistral_error(message)))
    err = failure(model(server), USER, backends.ContextExceededError)
    assert (err.tokens_used, err.context_size, err.tokens_left) == (used, size, size - used)
    assert len(list(stand.matching(PATH))) == 1


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, mistral_error("Invalid temperature: must be between 0 and 1.5")),
        (
            422,
            mistral_error(
                {"detail": [{"type": "less_than_equal", "loc": ["body", "temperature"], "msg": "too high"}]},
                "invalid_request_message_error",
            ),
        ),
    ],
)
def test_validation_error_is_invalid_argument_at_once(server: Any, stand: StandIn, status: int, body: Any) -> None:
    stand.script("POST", PATH, Reply(status, body))
    err = failure(model(server), USER, backends.InvalidArgumentError)
    assert "Mistral" in str(err)
    assert "temperature" in str(err)
    assert len(list(stand.matching(PATH))) == 1


def test_401_names_the_key_entry(server: Any, stand: StandIn) -> None:
    stand.script("POST", PATH, Reply(401, {"message": "Unauthorized", "request_id": "9c1b8f4e"}))
    err = failure(model(server), USER, backends.FailedPreconditionError)
    assert "key.json entry 'mistral'" in str(err)
    assert "Mistral" in str(err)
    assert err.subject == "key.json: mistral"
    assert len(list(stand.matching(PATH))) == 1


@pytest.mark.parametrize(
    ("status", "body"),
    [
        # what Mistral answers for an unknown model
        (400, mistral_error("Invalid model: mistral-small-latest", "invalid_model", "1500")),
        (404, {"detail": "Not Found"}),
    ],
)
def test_unknown_model_is_model_not_found(server: Any, stand: StandIn, status: int, body: Any) -> None:
    stand.script("POST", PATH, Reply(status, body))
    err = failure(model(server), USER, backends.ModelNotFoundError)
    assert "mistral-small-latest" in str(err)
    assert len(list(stand.matching(PATH))) == 1


def test_key_entry_without_api_key(odd_keys_server: Any, standin: StandIn) -> None:
    err = failure(model(odd_keys_server), USER, backends.FailedPreconditionError)
    assert err.subject == "key.json: mistral"
    assert "api_key" in str(err)
    assert standin.requests == []
    assert_no_key_leaks(odd_keys_server.log())


def test_no_key_leaks(server: Any) -> None:
    assert SEEN
    assert_no_key_leaks(server.log())
    for text in SEEN:
        assert_no_key_leaks(text)
