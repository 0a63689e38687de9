"""The cohere backend against a stand-in of Cohere's v2 chat API, through a real clemserve process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import clemserve.client as backends
from tests.providers import FAKE_KEYS, assert_no_key_leaks
from tests.standin import Recorded, Reply, StandIn

PATH = "/v2/chat"
ATTEMPTS = 4  # the server's default --remote-attempts
USER = [{"role": "user", "content": "Say hello"}]

ENTRIES: list[dict[str, Any]] = [
    {"model_name": "cohere-test", "backend": "cohere", "model_id": "command-a-03-2025", "model_config": {}},
    {
        "model_name": "cohere-mm",
        "backend": "cohere",
        "model_id": "command-a-vision-07-2025",
        "model_config": {"multimodality": {"single_image": True, "multiple_images": False}},
    },
    {
        "model_name": "cohere-mm-false",
        "backend": "cohere",
        "model_id": "command-a-03-2025",
        "model_config": {"multimodality": False},
    },
]

#: every text that came back from clemserve, scanned for the key at the end
SEEN: list[str] = []


def chat(content: Any = None, role: str = "assistant") -> dict[str, Any]:
    if content is None:
        content = [{"type": "text", "text": " Hello there! "}]
    return {
        "id": "5a50480a-cf52-46f0-af01-53d18539bd31",
        "finish_reason": "COMPLETE",
        "message": {"role": role, "content": content},
        "usage": {
            "billed_units": {"input_tokens": 5, "output_tokens": 4},
            "tokens": {"input_tokens": 71, "output_tokens": 4},
        },
    }


def cohere_error(message: str) -> dict[str, Any]:
    return {"id": "0a8b4b1e-2d1c-4f7e-9b4e-6f3a2c1d0e9f", "message": message}


@pytest.fixture
def stand(standin: StandIn) -> Iterator[StandIn]:
    standin.reset()
    yield standin
    standin.reset()


def model(server: Any, name: str = "cohere-test") -> backends.Model:
    found = backends.get_model_for(name, address=server.address)
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
    stand.script("POST", PATH, Reply(200, chat()))
    found = model(server)
    found.set_gen_args(temperature=0.7, max_tokens=55)
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hello", "turn": 1},
        {"role": "user", "content": "twice"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Again"},
    ]
    prompt, response, text = generate(found, messages)

    (request,) = stand.matching(PATH)
    assert request.method == "POST"
    assert request.path == PATH
    assert request.headers["authorization"] == f"Bearer {FAKE_KEYS['cohere']}"
    assert request.json == {
        "model": "command-a-03-2025",
        # merged, system kept in the list, text only, extra keys not sent
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hello\n\ntwice"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Again"},
        ],
        "temperature": 0.7,
        "max_tokens": 55,
        "stream": False,
    }
    assert prompt == request.json["messages"]
    assert text == " Hello there! "  # not stripped, as clembench
    clem_player = response.pop("clem_player")
    assert clem_player["response"] == " Hello there! "
    assert clem_player["model_name"] == "cohere-test"
    assert response["id"] == "5a50480a-cf52-46f0-af01-53d18539bd31"
    assert response["finish_reason"] == "COMPLETE"
    assert response["message"] == {"role": "assistant", "content": [{"type": "text", "text": " Hello there! "}]}
    assert response["usage"]["tokens"] == {"input_tokens": 71, "output_tokens": 4}


@pytest.mark.parametrize("content", [[{"type": "text", "text": ""}], []])
def test_empty_content_is_an_empty_text(server: Any, stand: StandIn, content: Any) -> None:
    stand.script("POST", PATH, Reply(200, chat(content)))
    assert generate(model(server), USER)[2] == ""


def test_thinking_item_first_gives_the_text_item(server: Any, stand: StandIn) -> None:
    content = [{"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": "The answer.\n"}]
    stand.script("POST", PATH, Reply(200, chat(content)))
    assert generate(model(server), USER)[2] == "The answer.\n"


def test_wrong_role_is_an_internal_error(server: Any, stand: StandIn) -> None:
    stand.script("POST", PATH, Reply(200, chat(role="user")))
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


@pytest.mark.parametrize("name", ["cohere-test", "cohere-mm-false"])
def test_images_refused_without_multimodality(server: Any, stand: StandIn, tmp_path: Path, name: str) -> None:
    err = failure(model(server, name), [{**USER[0], "image": [png(tmp_path)]}], backends.InvalidArgumentError)
    assert err.field == "messages[0].image"
    assert "multimodality" in str(err)
    assert list(stand.matching(PATH)) == []


def test_images_refused_even_when_the_entry_enables_multimodality(server: Any, stand: StandIn, tmp_path: Path) -> None:
    err = failure(model(server, "cohere-mm"), [{**USER[0], "image": [png(tmp_path)]}], backends.InvalidArgumentError)
    assert err.field == "messages[0].image"
    assert "text only" in str(err)
    assert list(stand.matching(PATH)) == []


def test_several_images_refused_without_multiple_images(server: Any, stand: StandIn, tmp_path: Path) -> None:
    images = [png(tmp_path, "a.png"), png(tmp_path, "b.png")]
    err = failure(model(server, "cohere-mm"), [{**USER[0], "image": images}], backends.InvalidArgumentError)
    assert err.field == "messages[0].image"
    assert "one image" in str(err)
    assert list(stand.matching(PATH)) == []


# -- faults ------------------------------------------------------------------------------------------------


def test_429_with_retry_after_is_retried_after_the_wait(server: Any, stand: StandIn) -> None:
    arrivals, answer = timed(
        Reply(429, cohere_error("You are using a Trial key, which is limited to 20 API calls / minute."),
              {"Retry-After": "0.3"}),
        Reply(200, chat()),
    )  # fmt: skip
    stand.script("POST", PATH, answer)
    assert generate(model(server), USER)[2] == " Hello there! "
    assert len(arrivals) == 2
    assert arrivals[1] - arrivals[0] >= 0.3


def test_500_then_success(server: Any, stand: StandIn) -> None:
    stand.script("POST", PATH, Reply(500, cohere_error("internal server error")), Reply(200, chat()))
    assert generate(model(server), USER)[2] == " Hello there! "
    assert len(list(stand.matching(PATH))) == 2


def test_429_forever_is_resource_exhausted(server: Any, stand: StandIn) -> None:
    stand.script("POST", PATH, Reply(429, cohere_error("Too many requests")))
    err = failure(model(server), USER, backends.ResourceExhaustedError)
    assert err.metadata["upstream_status"] == "429"
    assert "Too many requests" in str(err)
    assert len(list(stand.matching(PATH))) == ATTEMPTS


def test_503_forever_is_unavailable_after_all_attempts(server: Any, stand: StandIn) -> None:
    stand.script("POST", PATH, Reply(503, "<html>no healthy upstream</html>", {"content-type": "text/html"}))
    err = failure(model(server), USER, backends.UnavailableError)
    assert f"failed {ATTEMPTS} time(s)" in str(err)
    assert err.metadata["upstream_status"] == "503"
    assert len(list(stand.matching(PATH))) == ATTEMPTS


def test_hanging_provider_meets_the_callers_deadline(server: Any, stand: StandIn) -> None:
    stand.script("POST", PATH, Reply(200, chat(), delay_s=3))
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
    stand.script("POST", PATH, Reply(200, chat()))
    assert generate(model(server), USER)[2] == " Hello there! "


def test_malformed_json_is_unavailable_after_retries(server: Any, stand: StandIn) -> None:
    stand.script("POST", PATH, Reply(200, '{"id": "5a50", "message": {', {"content-type": "application/json"}))
    err = failure(model(server), USER, backends.UnavailableError)
    assert "unreadable answer" in str(err)
    assert len(list(stand.matching(PATH))) == ATTEMPTS
    stand.script("POST", PATH, Reply(200, chat()))
    assert generate(model(server), USER)[2] == " Hello there! "


@pytest.mark.parametrize(
    ("message", "used", "size"),
    [
        ("too many tokens: size limit exceeded by 19296 tokens. Try using shorter or fewer inputs. "
         "The limit for this model is 132000 tokens.", 151296, 132000),
        ("too many tokens: total number of tokens in the prompt cannot exceed 4081 - received 4292. "
         "Try using a shorter prompt, or enabling prompt truncating.", 4292, 4081),
        # no numbers given: the error still says the context is exceeded
        ("too many tokens: size limit exceeded by 11326 tokens. Try using shorter or fewer inputs.", 0, 0),
    ],
)  # fmt: skip
def test_context_error_is_context_exceeded(server: Any, stand: StandIn, message: str, used: int, size: int) -> None:
    stand.script("POST", PATH, Reply(400, cohere_error(message)))
    err = failure(model(server), USER, backends.ContextExceededError)
    assert (err.tokens_used, err.context_size, err.tokens_left) == (used, size, size - used)
    assert "too many tokens" in str(err)
    assert len(list(stand.matching(PATH))) == 1


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (400, "invalid request: temperature must be between 0 and 1.0 inclusive."),
        # "too many tokens" about max_tokens is not a context error
        (400, "too many tokens: max tokens must be less than or equal to 4096, the maximum output for this model"),
        (422, "invalid request: temperature is not a number"),
    ],
)
def test_validation_error_is_invalid_argument_at_once(server: Any, stand: StandIn, status: int, message: str) -> None:
    stand.script("POST", PATH, Reply(status, cohere_error(message)))
    err = failure(model(server), USER, backends.InvalidArgumentError)
    assert "Cohere" in str(err)
    assert message in str(err)
    assert len(list(stand.matching(PATH))) == 1


@pytest.mark.parametrize("status", [401, 498])
def test_refused_key_names_the_key_entry(server: Any, stand: StandIn, status: int) -> None:
    stand.script("POST", PATH, Reply(status, cohere_error("invalid api token")))
    err = failure(model(server), USER, backends.FailedPreconditionError)
    assert "key.json entry 'cohere'" in str(err)
    assert "Cohere" in str(err)
    assert "invalid api token" in str(err)
    assert err.subject == "key.json: cohere"
    assert len(list(stand.matching(PATH))) == 1


def test_unknown_model_is_model_not_found(server: Any, stand: StandIn) -> None:
    message = "model 'command-a-03-2025' not found, make sure the correct model ID was used"
    stand.script("POST", PATH, Reply(404, cohere_error(message)))
    err = failure(model(server), USER, backends.ModelNotFoundError)
    assert "command-a-03-2025" in str(err)
    assert len(list(stand.matching(PATH))) == 1


def test_missing_key_entry(odd_keys_server: Any, standin: StandIn) -> None:
    err = failure(model(odd_keys_server), USER, backends.FailedPreconditionError)
    assert err.subject == "key.json: cohere"
    assert standin.requests == []
    assert_no_key_leaks(odd_keys_server.log())


def test_no_key_leaks(server: Any) -> None:
    assert SEEN
    assert_no_key_leaks(server.log())
    for text in SEEN:
        assert_no_key_leaks(text)
