"""Which failed calls the client sends again while a server is away, for how long (no server needed)."""

from __future__ import annotations

import grpc
import pytest

from clemserve.client import channel
from clemserve.client.channel import ServerWait, wait_for_server_s
from clemserve.client.errors import server_away
from clemserve.registry import errors
from clemserve.service.status import to_grpc_status
from tests.unit.test_error_mapping import FakeRpcError


class _Refused(grpc.Status):  # type: ignore[misc]
    """What grpc itself fails a call with when nothing listens at the address."""

    code = grpc.StatusCode.UNAVAILABLE
    details = "failed to connect to all addresses; last error: UNKNOWN: Connection refused"
    trailing_metadata = ()


REFUSED = FakeRpcError(_Refused())


def decided(err: errors.ClemserveError) -> FakeRpcError:
    return FakeRpcError(to_grpc_status(err, "rid-1"))


def test_only_connection_failures_and_shutting_down_mean_the_server_is_away() -> None:
    assert server_away(REFUSED)
    assert server_away(decided(errors.ShuttingDownError("clemserve is shutting down")))
    # statuses the server decided: a provider that is down, a deadline, a full queue
    assert not server_away(decided(errors.UnavailableError("OpenAI failed 4 time(s)")))
    assert not server_away(decided(errors.DeadlineExceededError("too slow")))
    assert not server_away(decided(errors.ResourceExhaustedError("queue full")))


def test_shutting_down_comes_back_as_its_own_error() -> None:
    from clemserve.client.errors import error_from_rpc

    back = error_from_rpc(decided(errors.ShuttingDownError("clemserve is shutting down")), "h:1")
    assert isinstance(back, errors.ShuttingDownError) and isinstance(back, errors.UnavailableError)
    assert (back.reason, str(back), back.request_id) == (
        "SHUTTING_DOWN",
        "clemserve is shutting down (at h:1)",
        "rid-1",
    )


def test_wait_for_server_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLEMSERVE_WAIT_FOR_SERVER", raising=False)
    assert wait_for_server_s() == 60
    monkeypatch.setenv("CLEMSERVE_WAIT_FOR_SERVER", "2.5")
    assert wait_for_server_s() == 2.5
    monkeypatch.setenv("CLEMSERVE_WAIT_FOR_SERVER", "soon")
    with pytest.raises(ValueError, match="CLEMSERVE_WAIT_FOR_SERVER must be a number of seconds, got 'soon'"):
        wait_for_server_s()


def test_pauses_grow_and_stop_at_the_wait_limit_and_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLEMSERVE_WAIT_FOR_SERVER", "3")
    assert ServerWait("never-seen:1", None).pause_after(REFUSED) is None  # a wrong address fails at once
    seen = ServerWait("seen:1", None)
    seen.answered()
    assert [seen.pause_after(REFUSED) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert ServerWait("seen:1", 0.25).pause_after(REFUSED) == 0.1
    short = ServerWait("seen:1", 0.05)
    assert short.pause_after(REFUSED) is None  # the pause would pass the call's deadline
    assert short.pause_after(decided(errors.ContextExceededError("x", 1, 0, 1))) is None
    monkeypatch.setenv("CLEMSERVE_WAIT_FOR_SERVER", "0")
    assert ServerWait("seen:1", None).pause_after(REFUSED) is None
    channel._reached.clear()


def test_the_request_id_travels_in_the_request_where_it_has_a_field() -> None:
    """No x-request-id header to encode and parse per call where the message carries the id itself; the same
    id on every try, so that the server log shows one request."""
    from clemserve.v1 import clemserve_pb2 as pb

    wait = ServerWait("127.0.0.1:1", None)
    for message_type in (pb.GenerateRequest, pb.GenerateStreamRequest, pb.GenerateBatchRequest):
        request = message_type()
        assert wait.metadata_for(request) is None
        assert wait.metadata_for(request) is None  # a second try
        assert request.request_id == wait.request_id
    counted = pb.CountTokensRequest()
    assert wait.metadata_for(counted) == (("x-request-id", wait.request_id),)
    assert len(wait.request_id) == 32 and ServerWait("127.0.0.1:1", None).request_id != wait.request_id
