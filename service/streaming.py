"""What a streamed request is told while it runs: load progress, its place in the queue, text.

The manager, the scheduler and the backends report to a :class:`StreamObserver`; a unary request has
none, so it pays nothing. The scheduler hands a streamed request's text sink (its observer's ``text``) to
the backend with the request; backends that produce text piece by piece send each piece there, the others
say nothing and the manager sends their whole text as one piece when the reply arrives.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from .domain import TextSink

__all__ = ["Phase", "StreamEvent", "StreamObserver", "StreamState", "TextDelta", "TextSink"]


class Phase(enum.Enum):
    LOADING = 1
    QUEUED = 2
    READY = 3


@dataclass(frozen=True)
class StreamState:
    phase: Phase
    progress: float = 0.0
    detail: str = ""
    requests_ahead: int = 0


@dataclass(frozen=True)
class TextDelta:
    text: str


StreamEvent = StreamState | TextDelta
_DONE: Any = object()


class StreamObserver:
    """Collects one request's events in order, for the RPC that streams them (event loop thread only)."""

    def __init__(self) -> None:
        self._events: asyncio.Queue[StreamEvent] = asyncio.Queue()
        #: whether any text has been reported, so the manager knows to send the whole reply as one piece
        self.texted = False
        #: when the request arrived and when its first text did (time to first token, for the metrics)
        self.created = time.monotonic()
        self.first_text_at = 0.0

    def loading(self, progress: float, detail: str) -> None:
        self._events.put_nowait(StreamState(Phase.LOADING, progress, detail))

    def queued(self, requests_ahead: int) -> None:
        self._events.put_nowait(StreamState(Phase.QUEUED, requests_ahead=requests_ahead))

    def ready(self) -> None:
        self._events.put_nowait(StreamState(Phase.READY, 1.0))

    def text(self, piece: str) -> None:
        if piece:
            if not self.texted:
                self.first_text_at = time.monotonic()
            self.texted = True
            self._events.put_nowait(TextDelta(piece))

    async def events_until(self, task: asyncio.Future[Any]) -> AsyncIterator[StreamEvent]:
        """The events reported until ``task`` finishes (its result or error is the caller's to take)."""
        task.add_done_callback(lambda _: self._events.put_nowait(_DONE))
        while (event := await self._events.get()) is not _DONE:
            yield event
