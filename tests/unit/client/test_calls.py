"""The retry plan's blocking and asyncio drivers against stand-in stubs: what they send, how often, how long
they pause between tries, and that a stream's call is cancelled however it ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from clemserve.client import calls, retry
from clemserve.client.retry import ServerWait, StreamWait
from clemserve.client.streaming import StreamReply, StreamState, TextDelta
from clemserve.registry import errors
from clemserve.v1 import clemserve_pb2 as pb
from tests.unit.client.rpc import REFUSED, decided

STATE = pb.GenerateStreamResponse(state=pb.StreamState(phase=pb.STREAM_PHASE_LOADING, progress=0.5))
DELTA = pb.GenerateStreamResponse(delta=pb.TextDelta(text="Hi"))
REPLY = pb.GenerateStreamResponse(reply=pb.GenerateResponse(prompt_json="{}", response_json="{}", response_text="Hi"))
NOT_FOUND = decided(errors.ModelNotFoundError("no such model"))


@pytest.fixture(autouse=True)
def pauses(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """The pauses the drivers take, recorded instead of slept."""
    monkeypatch.delenv("CLEMSERVE_WAIT_FOR_SERVER", raising=False)
    taken: list[float] = []

    async def asleep(seconds: float) -> None:
        taken.append(seconds)

    monkeypatch.setattr(calls.time, "sleep", taken.append)
    monkeypatch.setattr(calls.asyncio, "sleep", asleep)
    yield taken
    retry._reached.clear()


def seen(wait: ServerWait) -> ServerWait:
    wait.answered()
    return wait


class Unary:
    """A unary method that fails with ``failures`` in turn, then answers; records each try's arguments."""

    def __init__(self, *failures: grpc.RpcError) -> None:
        self.failures = list(failures)
        self.tries: list[tuple[str, float | None, Any]] = []

    def __call__(self, request: pb.GenerateRequest, *, timeout: float | None, metadata: Any) -> str:
        self.tries.append((request.request_id, timeout, metadata))
        if self.failures:
            raise self.failures.pop(0)
        return f"reply {len(self.tries)}"

    async def aio(self, request: pb.GenerateRequest, *, timeout: float | None, metadata: Any) -> str:
        return self(request, timeout=timeout, metadata=metadata)


def test_a_call_is_sent_again_while_the_server_is_away(pauses: list[float]) -> None:
    method, wait = Unary(REFUSED, REFUSED), seen(ServerWait("calls:1", 30))
    assert calls.call(method, pb.GenerateRequest(), wait) == "reply 3"
    assert pauses == [0.1, 0.2]
    ids = {request_id for request_id, _, _ in method.tries}
    assert ids == {wait.request_id}  # one request id for every try, in the request itself
    timeouts = [timeout for _, timeout, _ in method.tries]
    assert all(t is not None and 0 < t <= 30 for t in timeouts) and timeouts == sorted(timeouts, reverse=True)


def test_a_call_the_server_refused_is_raised_at_once(pauses: list[float]) -> None:
    method = Unary(NOT_FOUND)
    with pytest.raises(errors.ModelNotFoundError) as raised:
        calls.call(method, pb.GenerateRequest(), seen(ServerWait("calls:2", None)))
    assert raised.value.__cause__ is NOT_FOUND and len(method.tries) == 1 and pauses == []


def test_a_server_never_reached_is_not_waited_for(pauses: list[float]) -> None:
    method = Unary(REFUSED)
    with pytest.raises(errors.UnavailableError):
        calls.call(method, pb.GenerateRequest(), ServerWait("calls:never", None))
    assert len(method.tries) == 1 and pauses == []


def test_the_asyncio_call_follows_the_same_plan(pauses: list[float]) -> None:
    method = Unary(REFUSED, REFUSED, REFUSED)
    reply = asyncio.run(calls.acall(method.aio, pb.GenerateRequest(), seen(ServerWait("calls:3", None))))
    assert (reply, pauses) == ("reply 4", [0.1, 0.2, 0.4])
    refused = Unary(NOT_FOUND)
    with pytest.raises(errors.ModelNotFoundError):
        asyncio.run(calls.acall(refused.aio, pb.GenerateRequest(), ServerWait("calls:3", None)))
    assert len(refused.tries) == 1 and pauses == [0.1, 0.2, 0.4]


class Stream:
    """A streaming call: its messages, then the failure it is cut with (None: it ends)."""

    def __init__(self, messages: list[pb.GenerateStreamResponse], cut: grpc.RpcError | None = None) -> None:
        self.messages, self.cut, self.cancelled = messages, cut, False

    def __iter__(self) -> Iterator[pb.GenerateStreamResponse]:
        yield from self.messages
        if self.cut is not None:
            raise self.cut

    async def __aiter__(self) -> AsyncIterator[pb.GenerateStreamResponse]:
        for message in self:
            yield message

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class StreamMethod:
    """``GenerateStream``: each try gets the next of ``streams``."""

    def __init__(self, *streams: Stream) -> None:
        self.streams, self.started = list(streams), 0

    def __call__(self, request: pb.GenerateStreamRequest, *, timeout: float | None, metadata: Any) -> Stream:
        assert request.request_id and metadata is None
        self.started += 1
        return self.streams[self.started - 1]


def test_a_stream_cut_before_any_text_is_sent_again(pauses: list[float]) -> None:
    first, second = Stream([STATE], cut=REFUSED), Stream([STATE, DELTA, REPLY])
    method = StreamMethod(first, second)
    events = list(calls.stream(method, pb.GenerateStreamRequest(), seen(StreamWait("calls:4", None))))
    assert [type(e) for e in events] == [StreamState, StreamState, TextDelta, StreamReply]
    assert events[-1] == StreamReply({}, {}, "Hi")
    assert (method.started, pauses, first.cancelled, second.cancelled) == (2, [0.1], True, True)


def test_a_stream_cut_after_text_is_raised(pauses: list[float]) -> None:
    method = StreamMethod(Stream([STATE, DELTA], cut=REFUSED))
    got: list[object] = []
    with pytest.raises(errors.UnavailableError):
        for event in calls.stream(method, pb.GenerateStreamRequest(), seen(StreamWait("calls:5", None))):
            got.append(event)
    assert (len(got), method.started, pauses, method.streams[0].cancelled) == (2, 1, [], True)


def test_leaving_a_stream_early_cancels_its_call() -> None:
    method = StreamMethod(Stream([STATE, DELTA, REPLY]))
    events = calls.stream(method, pb.GenerateStreamRequest(), StreamWait("calls:6", None))
    assert isinstance(next(events), StreamState) and not method.streams[0].cancelled
    events.close()
    assert method.streams[0].cancelled


def test_the_asyncio_stream_follows_the_same_plan(pauses: list[float]) -> None:
    cut, whole = Stream([STATE], cut=REFUSED), Stream([DELTA, REPLY])
    method = StreamMethod(cut, whole)

    async def play() -> list[object]:
        return [e async for e in calls.astream(method, pb.GenerateStreamRequest(), seen(StreamWait("calls:7", None)))]

    assert [type(e) for e in asyncio.run(play())] == [StreamState, TextDelta, StreamReply]
    assert (pauses, cut.cancelled, whole.cancelled) == ([0.1], True, True)
    after_text = StreamMethod(Stream([DELTA], cut=REFUSED))

    async def cut_after_text() -> None:
        async for _ in calls.astream(after_text, pb.GenerateStreamRequest(), StreamWait("calls:7", None)):
            pass

    with pytest.raises(errors.UnavailableError):
        asyncio.run(cut_after_text())
    assert after_text.started == 1 and pauses == [0.1]
