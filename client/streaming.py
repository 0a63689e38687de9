"""The events of a streamed reply (``Model.generate_stream``), as plain typed values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clemserve.v1 import clemserve_pb2 as pb

from .convert import Triple, triple_from_proto
from .spend import Spend


@dataclass(frozen=True)
class StreamState:
    """Where the request stands: ``phase`` is "loading" (``progress`` 0..1 and ``detail`` say how far),
    "queued" (behind ``requests_ahead`` requests) or "ready" (generation started, text follows)."""

    phase: str
    progress: float = 0.0
    detail: str = ""
    requests_ahead: int = 0


@dataclass(frozen=True)
class TextDelta:
    """Newly generated text; the deltas concatenated are the text before clembench's cleaning."""

    text: str


@dataclass(frozen=True)
class StreamReply:
    """The full reply, always the last event: exactly what ``generate_response`` returns."""

    prompt: Any
    response: Any
    response_text: str
    #: what the call used and cost (beside the triple, which stays clemcore's)
    spend: Spend = field(default_factory=Spend, compare=False)

    @property
    def triple(self) -> Triple:
        return self.prompt, self.response, self.response_text


StreamEvent = StreamState | TextDelta | StreamReply


def event_from_proto(message: pb.GenerateStreamResponse) -> StreamEvent:
    kind = message.WhichOneof("event")
    if kind == "delta":
        return TextDelta(message.delta.text)
    if kind == "reply":
        return StreamReply(*triple_from_proto(message.reply), Spend.of_reply(message.reply))
    state = message.state
    phase = pb.StreamPhase.Name(state.phase).removeprefix("STREAM_PHASE_").lower()
    return StreamState(phase, state.progress, state.detail, state.requests_ahead)
