"""What a streamed request is told while it runs: its events in order, text only when there is some, and the end
of the stream when its task ends."""

from __future__ import annotations

import asyncio

from clemserve.service.streaming import Phase, StreamEvent, StreamObserver, StreamState, TextDelta


def test_events_come_in_the_order_they_were_reported_until_the_task_ends() -> None:
    async def check() -> tuple[list[StreamEvent], StreamObserver]:
        observer = StreamObserver()

        async def request() -> str:
            observer.loading(0.5, "reading weights")
            observer.queued(2)
            await asyncio.sleep(0)
            observer.ready()
            observer.text("")  # nothing to say: no event
            observer.text("Hel")
            observer.text("lo")
            return "Hello"

        task = asyncio.ensure_future(request())
        events = [event async for event in observer.events_until(task)]
        assert task.result() == "Hello"
        return events, observer

    events, observer = asyncio.run(check())
    assert events == [
        StreamState(Phase.LOADING, 0.5, "reading weights"),
        StreamState(Phase.QUEUED, requests_ahead=2),
        StreamState(Phase.READY, 1.0),
        TextDelta("Hel"),
        TextDelta("lo"),
    ]
    assert observer.texted and observer.first_text_at >= observer.created


def test_a_request_without_text_is_not_texted() -> None:
    async def check() -> StreamObserver:
        observer = StreamObserver()

        async def request() -> None:
            observer.ready()
            observer.text("")

        task = asyncio.ensure_future(request())
        assert [event async for event in observer.events_until(task)] == [StreamState(Phase.READY, 1.0)]
        return observer

    observer = asyncio.run(check())
    assert not observer.texted and observer.first_text_at == 0.0


def test_a_failed_task_ends_the_stream_and_keeps_its_error_for_the_caller() -> None:
    async def check() -> None:
        observer = StreamObserver()

        async def request() -> None:
            observer.queued(0)
            raise RuntimeError("backend failed")

        task = asyncio.ensure_future(request())
        events = [event async for event in observer.events_until(task)]
        assert events == [StreamState(Phase.QUEUED, requests_ahead=0)]
        assert isinstance(task.exception(), RuntimeError)

    asyncio.run(check())
