"""The models' drivers against a stand-in stub, without a server: the lease taken once and released, a refused
lease, streams cancelled when the caller leaves early, and the retry plan followed by every method."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from clemserve.client import calls, retry
from clemserve.client.model import AsyncModel, Model
from clemserve.client.streaming import StreamState, TextDelta
from clemserve.registry import ModelSpec, errors
from clemserve.v1 import clemserve_pb2 as pb
from tests.unit.client.rpc import REFUSED, bare

SPEC = ModelSpec(model_name="stand-in", backend="echo")
REPLY = pb.GenerateResponse(prompt_json='{"p": 1}', response_json="{}", response_text="hello")
EVENTS = [
    pb.GenerateStreamResponse(state=pb.StreamState(phase=pb.STREAM_PHASE_READY)),
    pb.GenerateStreamResponse(delta=pb.TextDelta(text="hel")),
    pb.GenerateStreamResponse(delta=pb.TextDelta(text="lo")),
    pb.GenerateStreamResponse(reply=REPLY),
]
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(autouse=True)
def _no_sleep(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("CLEMSERVE_WAIT_FOR_SERVER", raising=False)

    async def asleep(seconds: float) -> None:
        pass

    monkeypatch.setattr(calls.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(calls.asyncio, "sleep", asleep)
    yield
    retry._reached.clear()


class LeaseCall:
    """A LeaseModel call kept open: its first message, then nothing until cancelled."""

    def __init__(self, refusal: grpc.RpcError | None = None) -> None:
        self.refusal, self.cancelled = refusal, False

    def __next__(self) -> pb.LeaseModelResponse:
        if self.refusal is not None:
            raise self.refusal
        return pb.LeaseModelResponse(lease_id="l1", expires_in_seconds=300)

    async def read(self) -> pb.LeaseModelResponse:
        await asyncio.sleep(0)
        return next(self)

    def done(self) -> bool:
        return self.cancelled

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class Stream:
    def __init__(self, messages: list[pb.GenerateStreamResponse]) -> None:
        self.messages, self.cancelled = messages, False

    def __iter__(self) -> Iterator[pb.GenerateStreamResponse]:
        return iter(self.messages)

    async def __aiter__(self) -> AsyncIterator[pb.GenerateStreamResponse]:
        for message in self.messages:
            yield message

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class Stub:
    """The methods a model calls; Generate fails with ``failures`` first."""

    def __init__(self, *failures: grpc.RpcError, lease_refusal: grpc.RpcError | None = None) -> None:
        self.failures = list(failures)
        self.lease_refusal = lease_refusal
        self.leases: list[LeaseCall] = []
        self.streams: list[Stream] = []
        self.generated = 0

    def LeaseModel(self, request: pb.LeaseModelRequest, *, metadata: Any) -> LeaseCall:
        assert request.model.spec.json == SPEC.to_string()
        assert metadata == (("clemserve-model", SPEC["model_name"]),)  # where a gateway routes the lease
        self.leases.append(LeaseCall(self.lease_refusal))
        return self.leases[-1]

    def Generate(self, request: pb.GenerateRequest, *, timeout: float | None, metadata: Any) -> pb.GenerateResponse:
        self.generated += 1
        if self.failures:
            raise self.failures.pop(0)
        return REPLY

    def GenerateStream(self, request: pb.GenerateStreamRequest, *, timeout: float | None, metadata: Any) -> Stream:
        self.streams.append(Stream(EVENTS))
        return self.streams[-1]


class AsyncStub(Stub):
    async def Generate(  # type: ignore[override]
        self, request: pb.GenerateRequest, *, timeout: float | None, metadata: Any
    ) -> pb.GenerateResponse:
        await asyncio.sleep(0)
        return super().Generate(request, timeout=timeout, metadata=metadata)


def model_on(stub: Stub, lease: bool = True, address: str = "model:1") -> Model:
    model = Model(SPEC, address=address, lease=lease)
    model._sync_stub, model._channel_key = stub, (address, None, None)  # type: ignore[assignment]
    return model


def test_a_model_takes_its_lease_once_and_releases_it_on_close() -> None:
    stub = Stub()
    with model_on(stub) as model:
        assert model.generate_response(MESSAGES) == ({"p": 1}, {}, "hello")
        model.generate_response(MESSAGES)
        assert len(stub.leases) == 1 and not stub.leases[0].cancelled
    assert stub.leases[0].cancelled


def test_a_lease_whose_call_ended_is_taken_again() -> None:
    stub = Stub()
    model = model_on(stub)
    model.generate_response(MESSAGES)
    stub.leases[0].cancelled = True  # the server restarted
    model.generate_response(MESSAGES)
    assert len(stub.leases) == 2
    model.close()


def test_a_server_without_leases_is_not_asked_again() -> None:
    stub = Stub(lease_refusal=bare(grpc.StatusCode.UNIMPLEMENTED))
    model = model_on(stub)
    assert model.generate_response(MESSAGES)[2] == "hello"
    assert not model.lease
    model.generate_response(MESSAGES)
    assert len(stub.leases) == 1
    assert model.as_async().lease is False


def test_no_lease_without_asking_for_one() -> None:
    stub = Stub()
    model_on(stub, lease=False).generate_response(MESSAGES)
    assert stub.leases == []


def test_a_generation_is_sent_again_while_the_server_is_away() -> None:
    stub = Stub(REFUSED, REFUSED)
    model = model_on(stub, lease=False)
    retry._reached.add(model._channel_key)
    assert model.generate_response(MESSAGES)[2] == "hello" and stub.generated == 3
    with pytest.raises(errors.UnavailableError):
        model_on(Stub(REFUSED), False, "model:never").generate_response(MESSAGES)  # never reached: fails at once
    with pytest.raises(errors.InvalidArgumentError):
        model_on(Stub(bare(grpc.StatusCode.INVALID_ARGUMENT, "bad")), lease=False).generate_response(MESSAGES)


def test_a_model_counts_the_tokens_its_replies_generated() -> None:
    stub = Stub()
    stub.Generate = lambda request, **_: pb.GenerateResponse(  # type: ignore[method-assign]
        prompt_json="{}", response_json="{}", usage=pb.Usage(prompt_tokens=9, completion_tokens=7)
    )
    model = model_on(stub, lease=False)
    model.generate_response(MESSAGES)
    model.generate_response(MESSAGES)
    assert model.tokens_generated == 14


def test_a_stream_left_early_is_cancelled_and_a_whole_one_ends_with_the_reply() -> None:
    stub = Stub()
    model = model_on(stub, lease=False)
    assert "".join(model.stream_text(MESSAGES)) == "hello"
    events = model.generate_stream(MESSAGES)
    assert isinstance(next(events), StreamState)
    assert stub.leases == [] and len(stub.streams) == 2
    events.close()
    assert stub.streams[-1].cancelled


def test_asyncio_models_share_one_lease_between_concurrent_first_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    stub = AsyncStub()
    monkeypatch.setattr(AsyncModel, "_stub", lambda self: stub)

    async def play() -> list[Any]:
        async with AsyncModel(SPEC, address="model:2") as model:
            return await asyncio.gather(*(model.generate_response(MESSAGES) for _ in range(3)))

    assert [reply[2] for reply in asyncio.run(play())] == ["hello"] * 3
    assert len(stub.leases) == 1 and stub.leases[0].cancelled


def test_an_asyncio_stream_left_early_is_cancelled_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    stub = AsyncStub()
    monkeypatch.setattr(AsyncModel, "_stub", lambda self: stub)

    async def play() -> tuple[list[object], bool]:
        model = AsyncModel(SPEC, address="model:3", lease=False)
        whole = [event async for event in model.generate_stream(MESSAGES)]
        events = model.generate_stream(MESSAGES)
        async for event in events:
            if isinstance(event, TextDelta):
                break
        await events.aclose()  # type: ignore[attr-defined]
        return whole, stub.streams[-1].cancelled

    whole, cancelled = asyncio.run(play())
    assert len(whole) == 4 and cancelled and stub.streams[0].cancelled
