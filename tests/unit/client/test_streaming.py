"""A streamed reply's events as the client hands them to a game: state, text deltas and the full reply."""

from __future__ import annotations

import json

import pytest

from clemserve.client.streaming import StreamReply, StreamState, TextDelta, event_from_proto
from clemserve.v1 import clemserve_pb2 as pb


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (
            pb.StreamState(phase=pb.STREAM_PHASE_LOADING, progress=0.25, detail="reading weights"),
            StreamState("loading", 0.25, "reading weights"),
        ),
        (pb.StreamState(phase=pb.STREAM_PHASE_QUEUED, requests_ahead=3), StreamState("queued", requests_ahead=3)),
        (pb.StreamState(phase=pb.STREAM_PHASE_READY, progress=1.0), StreamState("ready", 1.0)),
        (pb.StreamState(), StreamState("unspecified")),
    ],
)
def test_a_state_names_its_phase_in_lower_case(state: pb.StreamState, event: StreamState) -> None:
    assert event_from_proto(pb.GenerateStreamResponse(state=state)) == event


def test_a_delta_is_its_text() -> None:
    assert event_from_proto(pb.GenerateStreamResponse(delta=pb.TextDelta(text=" wor"))) == TextDelta(" wor")


def test_the_reply_is_generate_responses_triple() -> None:
    prompt = [{"role": "user", "content": "hi"}]
    response = {"response": "hello", "clem_player": {"model_name": "echo"}}
    reply = pb.GenerateResponse(
        prompt_json=json.dumps(prompt), response_json=json.dumps(response), response_text="hello"
    )
    event = event_from_proto(pb.GenerateStreamResponse(reply=reply))
    assert isinstance(event, StreamReply)
    assert event.triple == (prompt, response, "hello")
    assert (event.prompt, event.response, event.response_text) == event.triple


def test_the_reply_carries_its_calls_spend_beside_the_triple() -> None:
    reply = pb.GenerateResponse(
        prompt_json="{}", response_json="{}", response_text="Hi", usage=pb.Usage(prompt_tokens=9, completion_tokens=2),
        cost=pb.Cost(usd=0.5),
    )  # fmt: skip
    event = event_from_proto(pb.GenerateStreamResponse(reply=reply))
    assert isinstance(event, StreamReply) and event.triple == ({}, {}, "Hi")
    assert (event.spend.calls, event.spend.prompt_tokens, event.spend.cost_usd) == (1, 9, 0.5)
