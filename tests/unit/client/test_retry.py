"""The retry plan's decisions, without a server: which failed calls are sent again, after how long, until when;
when a stream stops retrying; when a model takes its lease and what a refusal means."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest

from clemserve.client import retry
from clemserve.client.errors import error_from_rpc, server_away
from clemserve.client.retry import Lease, ServerWait, StreamWait, wait_for_server_s
from clemserve.registry import errors
from clemserve.v1 import clemserve_pb2 as pb
from tests.unit.client.rpc import REFUSED, bare, decided

SHUTTING_DOWN = decided(errors.ShuttingDownError("clemserve is shutting down"))


@pytest.fixture(autouse=True)
def _forget_servers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("CLEMSERVE_WAIT_FOR_SERVER", raising=False)
    yield
    retry._reached.clear()
    retry._outages.clear()


def seen(address: str, timeout: float | None = None) -> ServerWait:
    """A call to a server that answered before."""
    wait = ServerWait(address, timeout)
    wait.answered()
    return wait


def test_only_connection_failures_and_shutting_down_mean_the_server_is_away() -> None:
    assert server_away(REFUSED)
    assert server_away(SHUTTING_DOWN)
    # statuses the server decided: a provider that is down, a deadline, a full queue
    assert not server_away(decided(errors.UnavailableError("OpenAI failed 4 time(s)")))
    assert not server_away(decided(errors.DeadlineExceededError("too slow")))
    assert not server_away(decided(errors.ResourceExhaustedError("queue full")))
    assert not server_away(bare(grpc.StatusCode.DEADLINE_EXCEEDED))


def test_shutting_down_comes_back_as_its_own_error() -> None:
    back = error_from_rpc(SHUTTING_DOWN, "h:1")
    assert isinstance(back, errors.ShuttingDownError) and isinstance(back, errors.UnavailableError)
    assert (back.reason, str(back), back.request_id) == (
        "SHUTTING_DOWN",
        "clemserve is shutting down (at h:1)",
        "rid-1",
    )


def test_wait_for_server_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert wait_for_server_s() == retry.WAIT_FOR_SERVER_S == 60
    monkeypatch.setenv("CLEMSERVE_WAIT_FOR_SERVER", "2.5")
    assert wait_for_server_s() == 2.5
    monkeypatch.setenv("CLEMSERVE_WAIT_FOR_SERVER", "-1")
    assert wait_for_server_s() == 0
    monkeypatch.setenv("CLEMSERVE_WAIT_FOR_SERVER", "soon")
    with pytest.raises(ValueError, match="CLEMSERVE_WAIT_FOR_SERVER must be a number of seconds, got 'soon'"):
        wait_for_server_s()


def test_pauses_grow_and_stop_at_the_wait_limit_and_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLEMSERVE_WAIT_FOR_SERVER", "3")
    assert ServerWait("never-seen:1", None).pause_after(REFUSED) is None  # a wrong address fails at once
    wait = seen("seen:1")
    assert [wait.pause_after(REFUSED) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert ServerWait("seen:1", 0.25).pause_after(REFUSED) == 0.1
    short = ServerWait("seen:1", 0.05)
    assert short.pause_after(REFUSED) is None  # the pause would pass the call's deadline
    assert short.pause_after(decided(errors.ContextExceededError("x", 1, 0, 1))) is None
    monkeypatch.setenv("CLEMSERVE_WAIT_FOR_SERVER", "0")
    assert ServerWait("seen:1", None).pause_after(REFUSED) is None


def test_the_wait_limit_counts_from_the_first_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLEMSERVE_WAIT_FOR_SERVER", "0.5")
    wait = seen("seen:2")
    now = time.monotonic()
    monkeypatch.setattr(retry.time, "monotonic", lambda: now)
    assert wait.pause_after(REFUSED) == 0.1
    now += 0.3
    assert wait.pause_after(REFUSED) == 0.2  # 0.3 + 0.2 is within 0.5 of the first failure
    now += 0.2
    assert wait.pause_after(REFUSED) is None  # 0.5 + 0.4 is not
    assert wait.waited_s == pytest.approx(0.5)


def test_a_server_shutting_down_is_waited_for_like_a_refused_connection() -> None:
    wait = seen("seen:3")
    assert wait.pause_after(SHUTTING_DOWN) == 0.1
    assert wait.pause_after(decided(errors.UnavailableError("OpenAI failed 4 time(s)"))) is None


def test_a_decided_status_marks_the_server_reached_but_a_deadline_does_not() -> None:
    ServerWait("decided:1", None).pause_after(decided(errors.ModelNotFoundError("no such model")))
    assert ServerWait("decided:1", None).pause_after(REFUSED) == 0.1
    ServerWait("deadline:1", None).pause_after(bare(grpc.StatusCode.DEADLINE_EXCEEDED))
    assert ServerWait("deadline:1", None).pause_after(REFUSED) is None


def test_retry_after_names_the_pause_or_raises_the_calls_error() -> None:
    wait = seen("seen:4")
    assert wait.retry_after(REFUSED) == 0.1
    not_found = decided(errors.ModelNotFoundError("no such model"))
    with pytest.raises(errors.ModelNotFoundError) as raised:
        wait.retry_after(not_found)
    assert raised.value.__cause__ is not_found
    assert (str(raised.value), raised.value.request_id) == ("no such model", "rid-1")


def test_a_deadline_while_the_server_was_away_is_the_server_being_away() -> None:
    wait = seen("seen:5", timeout=30)
    assert wait.retry_after(REFUSED) == 0.1
    with pytest.raises(errors.UnavailableError) as raised:
        wait.retry_after(bare(grpc.StatusCode.DEADLINE_EXCEEDED))
    assert "Connection refused" in str(raised.value)
    # the same deadline on a call that never met the server away is a deadline
    with pytest.raises(errors.DeadlineExceededError):
        seen("seen:5", timeout=30).retry_after(bare(grpc.StatusCode.DEADLINE_EXCEEDED))


def test_an_outage_is_told_once_however_many_calls_wait_through_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    told: list[tuple[bool, float | None]] = []

    def watcher(outage: retry.Outage) -> None:
        told.append((outage.away, outage.reconnected_s))

    retry.watch_outages(watcher)
    try:
        first, second = seen("out:1"), seen("out:1")
        now = 100.0
        monkeypatch.setattr(retry.time, "monotonic", lambda: now)
        first.timeout(), second.timeout()
        assert first.pause_after(REFUSED) == second.pause_after(REFUSED) == 0.1
        assert first.pause_after(REFUSED) == 0.2  # a second failure of the same call: the same outage
        now += 21.0
        first.timeout()  # the try the server takes
        now += 28.0  # it loads the model and generates
        first.answered()
        second.timeout()
        second.answered()  # the outage is over already: nothing more is told
    finally:
        retry.unwatch_outages(watcher)
    assert told == [(True, None), (False, 21.0)]
    lines = [r.getMessage() for r in caplog.records if r.name == retry.__name__]
    assert lines == [
        f"clemserve at out:1 is away ({REFUSED.details()}); waiting up to 60 s for it (CLEMSERVE_WAIT_FOR_SERVER)",
        "clemserve at out:1 is back after 21.0 s away (the first call sent to it again then took 28.0 s)",
    ]


def test_a_call_that_fails_again_after_the_outage_ended_starts_a_new_one() -> None:
    wait, other = seen("out:2"), seen("out:2")
    wait.pause_after(REFUSED)
    other.pause_after(REFUSED)
    first = retry._outages["out:2"]
    other.timeout()
    other.answered()  # the other call got through: this outage is over
    assert not first.away and "out:2" not in retry._outages
    wait.pause_after(REFUSED)  # this call's next try is refused again: the server went again
    assert retry._outages["out:2"] is not first and retry._outages["out:2"].away


def test_a_failing_watcher_does_not_fail_the_call() -> None:
    def broken(outage: retry.Outage) -> None:
        raise RuntimeError("watcher bug")

    retry.watch_outages(broken)
    try:
        assert seen("out:3").pause_after(REFUSED) == 0.1
    finally:
        retry.unwatch_outages(broken)


def test_a_stream_ends_the_outage_at_its_first_event() -> None:
    wait = StreamWait("out:4", None)
    wait.answered()
    wait.timeout()
    wait.pause_after(REFUSED)
    assert retry._outages["out:4"].away
    wait.timeout()
    wait.event(pb.GenerateStreamResponse(state=pb.StreamState(detail="loading")))
    assert "out:4" not in retry._outages


def test_the_timeout_left_shrinks_and_none_means_no_deadline() -> None:
    assert ServerWait("a:1", None).timeout() is None
    wait = ServerWait("a:1", 10)
    first = wait.timeout()
    assert first is not None and 9 < first <= 10
    time.sleep(0.01)
    second = wait.timeout()
    assert second is not None and second < first
    assert ServerWait("a:1", 0).timeout() == 0


def test_the_request_id_travels_in_the_request_where_it_has_a_field() -> None:
    """No x-request-id header to encode and parse per call where the message carries the id itself; the same
    id on every try, so that the server log shows one request."""
    wait = ServerWait("127.0.0.1:1", None)
    for message_type in (pb.GenerateRequest, pb.GenerateStreamRequest, pb.GenerateBatchRequest):
        request = message_type()
        assert wait.metadata_for(request) is None
        assert wait.metadata_for(request) is None  # a second try
        assert request.request_id == wait.request_id
    counted = pb.CountTokensRequest()
    assert wait.metadata_for(counted) == (("x-request-id", wait.request_id),)
    assert len(wait.request_id) == 32 and ServerWait("127.0.0.1:1", None).request_id != wait.request_id


def _state() -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(state=pb.StreamState(phase=pb.STREAM_PHASE_QUEUED, requests_ahead=2))


def test_a_stream_is_sent_again_only_until_text_reached_the_caller() -> None:
    wait = StreamWait("seen:6", None)
    wait.answered()
    wait.event(_state())
    assert not wait.delivered and wait.retry_after(REFUSED) == 0.1  # state events may repeat
    text = wait.event(pb.GenerateStreamResponse(delta=pb.TextDelta(text="Hel")))
    assert getattr(text, "text", None) == "Hel" and wait.delivered
    with pytest.raises(errors.UnavailableError) as raised:
        wait.retry_after(REFUSED)
    assert raised.value.__cause__ is REFUSED


def test_a_stream_after_its_reply_is_not_sent_again() -> None:
    wait = StreamWait("seen:7", None)
    wait.answered()
    reply = pb.GenerateResponse(prompt_json="{}", response_json="{}", response_text="hi")
    wait.event(pb.GenerateStreamResponse(reply=reply))
    with pytest.raises(errors.UnavailableError):
        wait.retry_after(SHUTTING_DOWN)


class _LeaseCall:
    def __init__(self) -> None:
        self.cancelled = False
        self.ended = False

    def done(self) -> bool:
        return self.ended

    def cancel(self) -> bool:
        self.cancelled = True
        return True


def test_a_lease_is_due_at_first_and_again_when_it_runs_out_or_its_call_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    now = 1000.0
    monkeypatch.setattr(retry.time, "monotonic", lambda: now)
    assert not Lease(False).due()
    lease = Lease(True)
    assert lease.due()
    call = _LeaseCall()
    lease.taken(call, pb.LeaseModelResponse(lease_id="l1", expires_in_seconds=30), "m")
    assert (lease.call, lease.until, lease.due()) == (call, 1030.0, False)
    now += 29.9
    assert not lease.due()
    now += 0.1
    assert lease.due()  # it ran out
    now = 1000.0
    call.ended = True  # the server restarted
    assert lease.due()


def test_dropping_a_lease_cancels_its_call_and_makes_it_due() -> None:
    lease, call = Lease(True), _LeaseCall()
    lease.taken(call, pb.LeaseModelResponse(expires_in_seconds=300), "m")
    lease.drop()
    assert call.cancelled and lease.call is None and lease.due()
    lease.drop()  # nothing held: nothing to cancel


@pytest.mark.parametrize(
    ("refusal", "retry_s", "wanted"),
    [
        (bare(grpc.StatusCode.UNIMPLEMENTED), retry.LEASE_RETRY_S, False),  # a server without LeaseModel
        (decided(errors.ResourceExhaustedError("no room")), retry.LEASE_RETRY_S, True),
        (REFUSED, retry.LEASE_AWAY_RETRY_S, True),
        (SHUTTING_DOWN, retry.LEASE_AWAY_RETRY_S, True),
    ],
)
def test_a_refused_lease_is_tried_again_later_or_never(
    monkeypatch: pytest.MonkeyPatch, refusal: grpc.RpcError, retry_s: float, wanted: bool
) -> None:
    now = 50.0
    monkeypatch.setattr(retry.time, "monotonic", lambda: now)
    lease = Lease(True)
    lease.refused(refusal, "m")
    assert (lease.wanted, lease.call, lease.until) == (wanted, None, 50.0 + retry_s)
    now += retry_s
    assert lease.due() is wanted


def test_a_lease_that_finds_the_server_away_starts_the_outage_the_next_answered_call_ends() -> None:
    """A lease is taken before a generation without retries of its own: when it finds the server away, the
    outage is told all the same (the generation after it may get through at once)."""
    told: list[bool] = []

    def watcher(outage: retry.Outage) -> None:
        told.append(outage.away)

    retry.watch_outages(watcher)
    try:
        never = ServerWait("out:6", None)  # a server never answered: its refusal is no outage
        retry.found_away("out:6", REFUSED, never._key)
        assert told == []
        wait = seen("out:5")
        not_found = decided(errors.ModelNotFoundError("no such model"))
        retry.found_away("out:5", not_found, wait._key)  # a status the server decided: no outage
        assert told == []
        retry.found_away("out:5", REFUSED, wait._key)
        retry.found_away("out:5", REFUSED, wait._key)  # still the same outage
        assert told == [True]
        wait.timeout()
        wait.answered()
        assert told == [True, False]
    finally:
        retry.unwatch_outages(watcher)
