"""The remote backends' shared part without a provider: the retry policy of ``RemoteBackend.call`` (which failures
are retried, the backoff, Retry-After, the caller's deadline, giving up, streams that already sent text), the error
each failure becomes, and the helpers the provider modules share. Time is a fake clock; nothing sleeps for real."""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from clemserve.registry import KeyRegistry, ModelSpec
from clemserve.registry.errors import (
    ContextExceededError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    ModelNotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from clemserve.service.backends import base, remote
from clemserve.service.backends.base import BackendContext, RetryPolicy
from clemserve.service.backends.rate_limits import RateLimit, RateLimits
from clemserve.service.backends.remote import RemoteBackend, UpstreamFailure
from clemserve.service.domain import FinishReason, GenArgs, ImagePart, Message, TextSink
from clemserve.service.logs import deadline_var

KEY = "sk-fake-0123456789abcdef"


class SdkError(Exception):
    """What the fake provider's SDK raises: an HTTP status, a Retry-After and a message."""

    def __init__(self, status: int, message: str = "upstream said no", retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.retry_after_s = status, retry_after_s


class TransportError(Exception):
    """Named like httpx's: a connection that broke, which the SDK let through unwrapped."""


class FakeProvider(RemoteBackend):
    """A provider whose SDK calls are what the test says; it records what it was asked."""

    name = "fake"
    key_name = "fake"
    provider = "Fake"

    def connect(self, key: Any) -> Any:
        return FakeClient()

    def build_request(self, messages: Sequence[Message], args: GenArgs) -> tuple[Any, dict[str, Any]]:
        prompt = [dict(m) for m in messages]
        return prompt, {"model": self.model_id, "messages": prompt, "max_tokens": args.max_tokens}

    async def send(self, request: dict[str, Any]) -> Any:
        return {"choices": [{"finish_reason": "stop"}], "text": "whole", "usage": {"input_tokens": 3}}

    async def send_stream(self, request: dict[str, Any], piece: TextSink) -> Any:
        for text in ("who", "le"):
            piece(text)
        return await self.send(request)

    def parse(self, response: Any) -> tuple[dict[str, Any], str]:
        return dict(response), str(response["text"])

    def classify(self, exc: Exception) -> UpstreamFailure | None:
        if isinstance(exc, SdkError):
            numbers = remote.context_numbers(str(exc))
            return UpstreamFailure(
                exc.status,
                str(exc),
                exc.retry_after_s,
                context=numbers,
                context_exceeded=numbers is not None or remote.looks_like_context_error(str(exc)),
            )
        return None


class FakeClient:
    def __init__(self) -> None:
        self.closed = 0

    async def close(self) -> None:
        self.closed += 1


class Clock:
    """time.monotonic and asyncio.sleep for the retry loop: a sleep moves the clock and returns at once."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(remote, "time", fake)
    monkeypatch.setattr(remote.asyncio, "sleep", fake.sleep)
    # full jitter draws from [0, the backoff]: take the upper end, so the backoff itself is seen
    monkeypatch.setattr(base.random, "uniform", lambda low, high: high)
    return fake


@pytest.fixture
def deadline() -> Iterator[Callable[[float], None]]:
    """Sets the caller's deadline (a time.monotonic() value) for the calls of one test."""
    tokens = []

    def set_deadline(at: float) -> None:
        tokens.append(deadline_var.set(at))

    yield set_deadline
    for token in reversed(tokens):
        deadline_var.reset(token)


def backend(tmp_path: Path, retry: RetryPolicy | None = None, key: str | None = KEY, **entry: Any) -> FakeProvider:
    keys = KeyRegistry(tmp_path / "key.json")
    if key is not None:
        keys.set_key_for("fake", {"api_key": key})
    context = BackendContext(keys, tmp_path, retry=retry or RetryPolicy(attempts=4, base_delay_s=0.5, max_delay_s=30))
    spec = ModelSpec.from_dict({"model_name": "m", "backend": "fake", "model_id": "fake-1", **entry})
    b = FakeProvider(spec, context)
    asyncio.run(b.load(lambda line, fraction=None: None))
    return b


class Script:
    """An attempt that fails as scripted, one item per try (an exception to raise, or a value to return)."""

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = list(outcomes)
        self.tries = 0

    async def __call__(self) -> Any:
        self.tries += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome is HANG:
            await asyncio.Event().wait()
        return outcome


HANG = object()


def call(b: FakeProvider, attempt: Callable[[], Awaitable[Any]], committed: Callable[[], bool] | None = None) -> Any:
    return asyncio.run(b.call(attempt, committed))


# -- which failures are retried --------------------------------------------------------------------------------


def test_an_answer_at_the_first_try_is_returned_without_a_pause(tmp_path: Path, clock: Clock) -> None:
    script = Script("reply")
    assert call(backend(tmp_path), script) == "reply"
    assert script.tries == 1 and clock.slept == []


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 529])
def test_transient_statuses_are_retried_until_an_answer(tmp_path: Path, clock: Clock, status: int) -> None:
    script = Script(SdkError(status), SdkError(status), "reply")
    assert call(backend(tmp_path), script) == "reply"
    assert script.tries == 3 and len(clock.slept) == 2


def test_a_broken_connection_is_retried_like_a_transient_status(tmp_path: Path, clock: Clock) -> None:
    # no HTTP answer at all: the provider's classify does not know it, the transport check does
    script = Script(TransportError("connection reset"), UpstreamFailure(None, "stream cut"), "reply")
    assert call(backend(tmp_path), script) == "reply"
    assert script.tries == 3


@pytest.mark.parametrize(
    ("status", "becomes", "says"),
    [
        (400, InvalidArgumentError, "Fake answered HTTP 400: upstream said no"),
        (401, FailedPreconditionError, "Fake refused the API key of key.json entry 'fake' (HTTP 401)"),
        (403, FailedPreconditionError, "(HTTP 403)"),
        (404, ModelNotFoundError, "Fake answered HTTP 404: upstream said no (model_id fake-1)"),
        (422, InvalidArgumentError, "HTTP 422"),
    ],
)
def test_deterministic_failures_come_back_at_once_as_what_they_mean(
    tmp_path: Path, clock: Clock, status: int, becomes: type[Exception], says: str
) -> None:
    script = Script(SdkError(status), "never reached")
    with pytest.raises(becomes) as caught:
        call(backend(tmp_path), script)
    assert type(caught.value) is becomes and says in str(caught.value)
    assert caught.value.metadata == {"upstream_status": str(status), "provider": "Fake"}  # type: ignore[attr-defined]
    assert script.tries == 1 and clock.slept == []
    if becomes is FailedPreconditionError:
        assert caught.value.subject == "key.json: fake"  # type: ignore[attr-defined]
    if becomes is ModelNotFoundError:
        assert caught.value.selector == "m"  # type: ignore[attr-defined]


def test_a_prompt_over_the_context_is_not_retried_even_with_a_transient_status(tmp_path: Path, clock: Clock) -> None:
    said = "This model's maximum context length is 512 tokens. However, your prompt contains 600 input tokens"
    script = Script(SdkError(503, said), "never reached")
    with pytest.raises(ContextExceededError) as caught:
        call(backend(tmp_path), script)
    assert (caught.value.tokens_used, caught.value.context_size, caught.value.tokens_left) == (600, 512, -88)
    assert str(caught.value).startswith("Context token limit for m exceeded (Fake: ")
    assert script.tries == 1


def test_an_error_that_is_not_the_providers_is_raised_as_it_is(tmp_path: Path, clock: Clock) -> None:
    script = Script(KeyError("a bug"), "never reached")
    with pytest.raises(KeyError, match="a bug"):
        call(backend(tmp_path), script)
    assert script.tries == 1 and clock.slept == []


# -- the backoff, Retry-After and giving up --------------------------------------------------------------------


def test_pauses_double_from_the_base_delay_up_to_the_maximum(tmp_path: Path, clock: Clock) -> None:
    policy = RetryPolicy(attempts=6, base_delay_s=0.5, max_delay_s=3.0)
    script = Script(*[SdkError(503)] * 5, "reply")
    assert call(backend(tmp_path, policy), script) == "reply"
    assert clock.slept == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_the_pause_is_drawn_with_full_jitter(tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[tuple[float, float]] = []
    monkeypatch.setattr(base.random, "uniform", lambda low, high: drawn.append((low, high)) or low + (high - low) / 4)
    script = Script(SdkError(500), SdkError(500), "reply")
    call(backend(tmp_path), script)
    assert drawn == [(0, 0.5), (0, 1.0)] and clock.slept == [0.125, 0.25]


def test_retry_after_replaces_the_backoff_and_is_capped_at_the_maximum(tmp_path: Path, clock: Clock) -> None:
    script = Script(SdkError(429, retry_after_s=7.0), SdkError(429, retry_after_s=120.0), SdkError(503), "reply")
    assert call(backend(tmp_path), script) == "reply"
    assert clock.slept == [7.0, 30.0, 2.0]  # the third pause is the backoff of the third try again


def test_after_the_last_try_it_gives_up_with_the_last_failure(tmp_path: Path, clock: Clock) -> None:
    script = Script(SdkError(502), SdkError(500), SdkError(503, "overloaded, retry later"), "never reached")
    with pytest.raises(UnavailableError) as caught:
        call(backend(tmp_path, RetryPolicy(attempts=3)), script)
    assert str(caught.value) == "Fake failed 3 time(s), last with HTTP 503: overloaded, retry later"
    assert caught.value.metadata == {"upstream_status": "503", "provider": "Fake"}
    assert script.tries == 3 and len(clock.slept) == 2  # no pause after the last try


def test_a_rate_limit_to_the_end_is_resource_exhausted_with_its_retry_delay(tmp_path: Path, clock: Clock) -> None:
    script = Script(SdkError(429, retry_after_s=1.0), SdkError(429, "slow down", retry_after_s=4.0))
    with pytest.raises(ResourceExhaustedError) as caught:
        call(backend(tmp_path, RetryPolicy(attempts=2)), script)
    assert caught.value.retry_after_s == 4.0 and "last with HTTP 429: slow down" in str(caught.value)
    assert clock.slept == [1.0]


def test_one_attempt_means_no_retry(tmp_path: Path, clock: Clock) -> None:
    script = Script(SdkError(503), "never reached")
    with pytest.raises(UnavailableError, match="failed 1 time"):
        call(backend(tmp_path, RetryPolicy(attempts=1)), script)
    assert clock.slept == []


def test_a_try_that_does_not_answer_within_the_request_timeout_is_retried(tmp_path: Path, clock: Clock) -> None:
    policy = RetryPolicy(attempts=3, request_timeout_s=0.01)
    script = Script(HANG, HANG, "reply")
    assert call(backend(tmp_path, policy), script) == "reply"
    script = Script(HANG, HANG, HANG)
    with pytest.raises(UnavailableError) as caught:
        call(backend(tmp_path, policy), script)
    assert str(caught.value) == "Fake failed 3 time(s), last with no answer: no answer within 0.0 s"


# -- the caller's deadline -------------------------------------------------------------------------------------


def test_no_retry_when_its_pause_would_end_past_the_callers_deadline(
    tmp_path: Path, clock: Clock, deadline: Callable[[float], None], caplog: pytest.LogCaptureFixture
) -> None:
    deadline(clock.now + 5.0)
    script = Script(SdkError(503), SdkError(503, retry_after_s=10.0), "never reached")
    with caplog.at_level(logging.INFO, logger=remote.__name__), pytest.raises(UnavailableError) as caught:
        call(backend(tmp_path), script)
    assert script.tries == 2 and clock.slept == [0.5]
    assert "failed 2 time(s), last with HTTP 503" in str(caught.value)
    assert "no retry, the caller's deadline is nearer than 10.00 s" in caplog.text


def test_a_try_is_cut_at_the_callers_deadline_and_says_so(
    tmp_path: Path, clock: Clock, deadline: Callable[[float], None]
) -> None:
    deadline(clock.now + 0.02)  # nearer than the request timeout: the try gets what is left, 0.02 s
    script = Script(HANG, "never reached")
    with pytest.raises(DeadlineExceededError) as caught:
        call(backend(tmp_path), script)
    assert str(caught.value) == "the caller's deadline passed while Fake had not answered (try 1 of 4)"
    assert script.tries == 1 and clock.slept == []


def test_a_deadline_already_past_leaves_no_time_for_a_try(
    tmp_path: Path, clock: Clock, deadline: Callable[[float], None]
) -> None:
    deadline(clock.now - 1.0)
    with pytest.raises(DeadlineExceededError):
        call(backend(tmp_path), Script(HANG))


def test_a_far_deadline_changes_nothing(tmp_path: Path, clock: Clock, deadline: Callable[[float], None]) -> None:
    deadline(clock.now + 3600.0)
    script = Script(SdkError(503), SdkError(503), "reply")
    assert call(backend(tmp_path), script) == "reply"
    assert clock.slept == [0.5, 1.0]


# -- streams: retried until their first text, never after it ---------------------------------------------------


def test_a_failure_after_text_was_sent_is_not_retried(tmp_path: Path, clock: Clock) -> None:
    sent = {"text": False}
    script = Script(UpstreamFailure(None, "connection reset"), "never reached")
    sent["text"] = True
    with pytest.raises(UnavailableError) as caught:
        call(backend(tmp_path), script, committed=lambda: sent["text"])
    assert str(caught.value) == (
        "Fake broke off its streamed reply after text was sent (not retried), with a broken stream: connection reset"
    )
    assert script.tries == 1 and clock.slept == []


def test_a_deterministic_failure_after_text_is_mapped_as_for_generate(tmp_path: Path, clock: Clock) -> None:
    with pytest.raises(InvalidArgumentError, match="HTTP 400"):
        call(backend(tmp_path), Script(SdkError(400)), committed=lambda: True)
    with pytest.raises(ResourceExhaustedError, match=r"broke off .* with HTTP 429"):
        call(backend(tmp_path), Script(SdkError(429, retry_after_s=2.0)), committed=lambda: True)


def test_a_stream_that_fails_before_its_first_text_is_retried(tmp_path: Path, clock: Clock) -> None:
    b = backend(tmp_path)
    tries = []

    async def send_stream(request: dict[str, Any], piece: TextSink) -> Any:
        tries.append(request)
        piece("")  # an empty piece is no text sent
        if len(tries) == 1:
            raise SdkError(503)
        piece("Hel")
        piece("lo")
        return {"text": "Hello", "stop_reason": "end_turn"}

    b.send_stream = send_stream  # type: ignore[method-assign]
    pieces: list[str] = []
    assert asyncio.run(b.call_streaming({"model": "fake-1"}, pieces.append)) == {
        "text": "Hello",
        "stop_reason": "end_turn",
    }
    assert pieces == ["Hel", "lo"] and len(tries) == 2 and clock.slept == [0.5]


def test_a_stream_cut_by_the_deadline_after_text_says_it_was_streaming(
    tmp_path: Path, clock: Clock, deadline: Callable[[float], None]
) -> None:
    b = backend(tmp_path)

    async def send_stream(request: dict[str, Any], piece: TextSink) -> Any:
        piece("partial")
        await asyncio.Event().wait()

    b.send_stream = send_stream  # type: ignore[method-assign]
    deadline(clock.now + 0.02)
    pieces: list[str] = []
    with pytest.raises(DeadlineExceededError, match="while Fake was still streaming its reply"):
        asyncio.run(b.call_streaming({}, pieces.append))
    assert pieces == ["partial"]


# -- the backend around the call: load, generate, unload -------------------------------------------------------


def test_generate_returns_the_parsed_reply_with_usage_and_finish_reason(tmp_path: Path, clock: Clock) -> None:
    b = backend(tmp_path)
    messages: list[Message] = [{"role": "user", "content": "hi"}]
    done = asyncio.run(b.generate(messages, GenArgs(max_tokens=5)))
    assert (done.text, done.prompt, done.prompt_tokens, done.completion_tokens) == ("whole", messages, 3, 0)
    assert done.finish_reason is FinishReason.STOP
    pieces: list[str] = []
    streamed = asyncio.run(b.generate(messages, GenArgs(max_tokens=5), pieces.append))
    assert pieces == ["who", "le"] and streamed.text == "whole"


def test_generate_refuses_images_the_entry_does_not_enable(tmp_path: Path, clock: Clock) -> None:
    image = ImagePart(data=b"png", mime_type="image/png", source="a.png")
    messages: list[Message] = [{"role": "user", "content": "look", "image": [image]}]
    with pytest.raises(InvalidArgumentError) as caught:
        asyncio.run(backend(tmp_path).generate(messages, GenArgs()))
    assert caught.value.field == "messages[0].image"


def test_load_needs_a_model_id_and_an_api_key(tmp_path: Path) -> None:
    keys = KeyRegistry(tmp_path / "key.json")
    no_id = FakeProvider(ModelSpec.from_dict({"model_name": "m", "backend": "fake"}), BackendContext(keys, tmp_path))
    with pytest.raises(FailedPreconditionError) as caught:
        asyncio.run(no_id.load(lambda line, fraction=None: None))
    assert caught.value.subject == "model_id"
    with pytest.raises(FailedPreconditionError) as caught:
        backend(tmp_path, key="  ")
    assert caught.value.subject == "key.json: fake" and "has no api_key" in str(caught.value)


def test_a_missing_sdk_names_the_extra_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def connect(self: FakeProvider, key: Any) -> Any:
        raise ModuleNotFoundError("No module named 'fake_sdk'", name="fake_sdk")

    monkeypatch.setattr(FakeProvider, "connect", connect)
    with pytest.raises(FailedPreconditionError) as caught:
        backend(tmp_path)
    assert caught.value.subject == "pip install '/path/to/clemserve[remote]'" and "fake_sdk" in str(caught.value)


def test_unload_closes_the_client_once_and_survives_a_failing_close(tmp_path: Path) -> None:
    b = backend(tmp_path)
    client = b.client
    asyncio.run(b.unload())
    assert client.closed == 1

    class Broken:
        def close(self) -> None:
            raise OSError("already closed")

    b.client = Broken()
    asyncio.run(b.unload())  # logged, not raised


def test_remote_models_do_not_count_tokens(tmp_path: Path) -> None:
    with pytest.raises(FailedPreconditionError, match="count tokens on the provider's side"):
        asyncio.run(backend(tmp_path).count_tokens([{"role": "user", "content": "hi"}]))


def test_text_chat_request_sends_text_temperature_and_max_tokens_only(tmp_path: Path) -> None:
    b = backend(tmp_path)
    messages: list[Message] = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    prompt, request = b.text_chat_request(messages, GenArgs(temperature=0.3, max_tokens=9))
    assert prompt == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert request == {"model": "fake-1", "messages": prompt, "temperature": 0.3, "max_tokens": 9}
    image = ImagePart(data=b"png", mime_type="image/png", source="a.png")
    with pytest.raises(InvalidArgumentError) as caught:
        b.text_chat_request([{"role": "user", "content": "x", "image": [image]}], GenArgs())
    assert caught.value.field == "messages[0].image" and "sends text only" in str(caught.value)


# -- the helpers the provider modules share --------------------------------------------------------------------


def test_transient_means_no_answer_or_a_status_worth_retrying() -> None:
    assert UpstreamFailure(None, "x").transient
    assert all(UpstreamFailure(status, "x").transient for status in remote.TRANSIENT_STATUSES)
    assert not any(UpstreamFailure(status, "x").transient for status in (400, 401, 403, 404, 409, 413, 422))


def test_retry_after_from_seconds_milliseconds_or_a_date(monkeypatch: pytest.MonkeyPatch) -> None:
    assert remote.retry_after_seconds({"retry-after": "3"}) == 3.0
    assert remote.retry_after_seconds({"retry-after": "-2"}) == 0.0
    assert remote.retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert remote.retry_after_seconds({}) is None and remote.retry_after_seconds(None) is None
    assert remote.retry_after_seconds({"retry-after": "soon"}) is None
    clock = Clock()
    clock.now = 1_700_000_000.0
    monkeypatch.setattr(remote, "time", clock)
    in_a_minute = email.utils.formatdate(clock.now + 60, usegmt=True)
    assert remote.retry_after_seconds({"retry-after": in_a_minute}) == pytest.approx(60.0)
    assert remote.retry_after_seconds({"retry-after": email.utils.formatdate(clock.now - 60, usegmt=True)}) == 0.0


@pytest.mark.parametrize(
    ("said", "numbers"),
    [
        ("maximum context length is 4097 tokens. However, you requested 5000 tokens", (5000, 4097)),
        ("maximum context length is 512 tokens. However, your prompt contains at least 600 input tokens", (600, 512)),
        ("prompt is too long: 208310 tokens > 200000 maximum", (208310, 200000)),
        ("input length and `max_tokens` exceed context limit: 198000 + 8192 > 200000", (206192, 200000)),
        ("The input token count (1048577) exceeds the maximum number of tokens allowed (1048576).", (1048577, 1048576)),
        (
            "Prompt contains 40000 tokens and 0 draft tokens, too large for model with 32768 maximum context",
            (40000, 32768),
        ),
        ("context_length_exceeded", None),
    ],
)
def test_context_numbers_from_each_providers_message(said: str, numbers: tuple[int, int] | None) -> None:
    assert remote.context_numbers(said) == numbers


def test_context_words_without_numbers_still_say_context_error() -> None:
    for said in ("context_length_exceeded", "prompt is too long", "Too many tokens in the context window"):
        assert remote.looks_like_context_error(said), said
    assert not remote.looks_like_context_error("Rate limit reached for requests")
    assert remote.context_numbers("Rate limit reached for 4097 tokens") is None


def test_images_travel_as_base64_and_data_urls() -> None:
    png = ImagePart(data=b"\x89PNG", mime_type="image/png", source="a.png")
    assert remote.image_base64(png) == "iVBORw=="
    assert remote.image_data_url(png) == "data:image/png;base64,iVBORw=="
    assert remote.image_mime(ImagePart(data=b"x", mime_type="", source="a")) == "image/png"
    assert remote.image_mime(ImagePart(data=b"x", mime_type="image/jpeg", source="a.jpg")) == "image/jpeg"


@pytest.mark.parametrize(
    ("config", "images", "field"),
    [
        ({}, 0, None),
        ({}, 1, "messages[1].image"),
        ({"multimodality": False}, 1, "messages[1].image"),
        ({"multimodality": {"single_image": True}}, 1, None),
        ({"multimodality": {"single_image": True}}, 2, "messages[1].image"),
        ({"multimodality": {"multiple_images": True}}, 2, None),
    ],
)
def test_check_images_reads_the_entrys_flags_by_value(config: dict[str, Any], images: int, field: str | None) -> None:
    picture = ImagePart(data=b"x", mime_type="image/png", source="a.png")
    messages: list[Message] = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u", "image": [picture] * images},
    ]
    if field is None:
        remote.check_images(messages, config, "m")
    else:
        with pytest.raises(InvalidArgumentError) as caught:
            remote.check_images(messages, config, "m")
        assert caught.value.field == field


def test_flags_are_read_by_value() -> None:
    assert remote.flag({"x": True}, "x") and not remote.flag({"x": False}, "x") and not remote.flag({}, "x")


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        ({"choices": [{"finish_reason": "length"}]}, FinishReason.LENGTH),
        ({"choices": [{"finish_reason": "stop"}]}, FinishReason.STOP),
        ({"stop_reason": "max_tokens"}, FinishReason.LENGTH),
        ({"stop_reason": "end_turn"}, FinishReason.STOP),
        ({"candidates": [{"finish_reason": "MAX_TOKENS"}]}, FinishReason.LENGTH),
        ({"finish_reason": "COMPLETE"}, FinishReason.STOP),
        ({"choices": [{"finish_reason": "content_filter"}]}, FinishReason.UNSPECIFIED),
        ({"choices": []}, FinishReason.UNSPECIFIED),
        ({}, FinishReason.UNSPECIFIED),
    ],
)
def test_finish_reason_from_where_each_provider_says_it(response: dict[str, Any], reason: FinishReason) -> None:
    assert remote.finish_reason(response) is reason


def test_transport_failures_are_told_by_their_class_names() -> None:
    failure = remote.transport_failure(TransportError("reset by peer"))
    assert failure is not None and failure.status is None and failure.reason == "TransportError: reset by peer"
    assert remote.transport_failure(ValueError("not a connection")) is None


@pytest.mark.parametrize(
    ("kind", "message", "code", "status", "reason"),
    [
        ("rate_limit_error", "slow down", None, 429, "rate_limit_error: slow down"),
        ("overloaded_error", "busy", None, 503, "overloaded_error: busy"),
        ("invalid_request_error", "bad", "400", 400, "invalid_request_error: bad"),
        ("whatever", "odd", 502, 502, "whatever: odd"),
        ("unknown_kind", "?", None, None, "unknown_kind: ?"),
        (None, "bare message", None, None, "bare message"),
    ],
)
def test_errors_inside_a_stream_get_an_http_status(
    kind: Any, message: str, code: Any, status: int | None, reason: str
) -> None:
    failure = remote.stream_error(kind, message, code)
    assert (failure.status, failure.reason) == (status, reason)


def test_an_incomplete_stream_is_a_transient_failure() -> None:
    failure = remote.incomplete_stream()
    assert failure.status is None and failure.transient and "ended before" in failure.reason


def test_json_ready_dumps_sdk_objects_and_skips_bytes() -> None:
    class SdkObject:
        def model_dump(self, mode: str, exclude_none: bool) -> dict[str, Any]:
            assert (mode, exclude_none) == ("json", True)
            return {"id": "resp-1"}

    assert remote.json_ready({"r": SdkObject(), "b": b"abc", "n": [1, None]}) == {
        "r": {"id": "resp-1"}, "b": "<3 bytes>", "n": [1, None],
    }  # fmt: skip


@pytest.mark.parametrize(
    ("response", "tokens"),
    [
        # OpenAI's chat completions (Azure, OpenRouter, Mistral, compatible servers): details are parts
        (
            {
                "usage": {
                    "prompt_tokens": 100,
                    "completion_tokens": 30,
                    "prompt_tokens_details": {"cached_tokens": 64},
                    "completion_tokens_details": {"reasoning_tokens": 20},
                }
            },
            (100, 30, 64, 20),
        ),
        ({"usage": {"prompt_tokens": 3, "completion_tokens": 1, "prompt_tokens_details": None}}, (3, 1, 0, 0)),
        # OpenAI's Responses API
        (
            {
                "usage": {
                    "input_tokens": 50,
                    "output_tokens": 9,
                    "input_tokens_details": {"cached_tokens": 32},
                    "output_tokens_details": {"reasoning_tokens": 4},
                }
            },
            (50, 9, 32, 4),
        ),
        # Anthropic: input_tokens leaves the cache's tokens out; the prompt holds them all, its writes told apart
        (
            {
                "usage": {
                    "input_tokens": 10,
                    "output_tokens": 5,
                    "cache_read_input_tokens": 80,
                    "cache_creation_input_tokens": 6,
                }
            },
            (96, 5, 80, 0, 6),
        ),
        ({"usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": None}}, (10, 5, 0, 0)),
        # Google: thoughts are output tokens, reported apart from the candidates'
        (
            {
                "usage_metadata": {
                    "prompt_token_count": 40,
                    "candidates_token_count": 7,
                    "cached_content_token_count": 16,
                    "thoughts_token_count": 12,
                }
            },
            (40, 19, 16, 12),
        ),
        # Cohere v2
        (
            {
                "usage": {
                    "billed_units": {"input_tokens": 1, "output_tokens": 1},
                    "tokens": {"input_tokens": 22, "output_tokens": 8},
                    "cached_tokens": 12,
                }
            },
            (22, 8, 12, 0),
        ),
        ({}, (0, 0, 0, 0)),
        ({"usage": None}, (0, 0, 0, 0)),
    ],
)
def test_usage_from_each_providers_shape(response: dict[str, Any], tokens: tuple[int, ...]) -> None:
    assert remote.usage_of(response) == remote.Tokens(*tokens)


# -- under a rate limiter (--rate-limit) -----------------------------------------------------------------------


def limited(b: FakeProvider, limit: RateLimit) -> RateLimits:
    """Give ``b`` a rate limiter for its key entry; returns the server's limiters."""
    limits = RateLimits([("fake", limit)])
    b.context = dataclasses.replace(b.context, rate_limits=limits)
    return limits


def test_under_a_rate_limiter_429s_send_the_call_back_to_its_queue_without_using_up_tries(
    tmp_path: Path, clock: Clock
) -> None:
    b = backend(tmp_path, RetryPolicy(attempts=2))
    limits = limited(b, RateLimit(concurrency=8))
    script = Script(*[SdkError(429, retry_after_s=0.0)] * 5, "reply")
    assert call(b, script) == "reply"
    (state,) = limits.states()
    assert script.tries == 6 and state.rate_limited == 5
    # lowered at the first 429 from the one try in flight: to 1 (two successes at 1 would raise it)
    assert state.concurrency == 1 and state.in_flight == 0
    assert clock.slept == []  # the limiter's pause holds the call, not a sleep of its own


def test_under_a_rate_limiter_a_429_whose_pause_passes_the_deadline_is_resource_exhausted(
    tmp_path: Path, clock: Clock, deadline: Callable[[float], None]
) -> None:
    b = backend(tmp_path, RetryPolicy(attempts=4))
    limits = limited(b, RateLimit(concurrency=8))
    deadline(clock.now + 0.5)
    script = Script(SdkError(429, "slow down", retry_after_s=1.0), "never reached")
    with pytest.raises(ResourceExhaustedError, match="last with HTTP 429: slow down"):
        call(b, script)
    assert script.tries == 1 and limits.states()[0].in_flight == 0


def test_under_a_rate_limiter_other_failures_use_up_tries_as_before(tmp_path: Path, clock: Clock) -> None:
    b = backend(tmp_path, RetryPolicy(attempts=2))
    limits = limited(b, RateLimit(concurrency=8))
    with pytest.raises(UnavailableError, match="failed 2 time"):
        call(b, Script(SdkError(503), SdkError(503)))
    (state,) = limits.states()
    assert state.concurrency == 8 and state.in_flight == 0


def test_a_generation_is_charged_its_estimate_then_its_real_usage(tmp_path: Path) -> None:
    b = backend(tmp_path)
    limits = limited(b, RateLimit(tpm=100_000))
    seen = []
    sent = b.send

    async def send(request: dict[str, Any]) -> Any:
        seen.append(limits.states()[0].window_tokens)
        return await sent(request)

    b.send = send  # type: ignore[method-assign]
    asyncio.run(b.generate([{"role": "user", "content": "x" * 40}], GenArgs(max_tokens=50)))
    assert seen == [10 + 50]  # 40 characters / 4, plus max_tokens
    assert limits.states()[0].window_tokens == 3  # the provider said 3 input tokens
