"""When a failed call is sent again, and after how long: the plan that the blocking and the asyncio drivers
(``calls``) follow, and a model's lease. It decides and keeps time; it makes no call and never sleeps.

A call is sent again only while the server is away: the connection failed, or the server is shutting down
(``SHUTTING_DOWN``), as a restart does. The pauses double from 0.1 s to 1 s, for up to
``CLEMSERVE_WAIT_FOR_SERVER`` seconds and never past the call's deadline. A stream is not sent again once
text or its reply reached the caller.

What the process saw of a server's absence is one :class:`Outage`, however many calls and threads waited
through it: logged once when the first call finds the server gone and once when the first call is answered
again, and told to whoever watches (:func:`watch_outages`: ``clem run``'s stderr, ``clemserve run``'s
progress line).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from clemserve.registry.errors import ClemserveError
from clemserve.v1 import clemserve_pb2 as pb

from .channel import Key, channel_key
from .errors import error_from_rpc, server_away
from .streaming import StreamEvent, StreamState, event_from_proto

#: how long a call waits for a server that went away (a restart) when CLEMSERVE_WAIT_FOR_SERVER is not set
WAIT_FOR_SERVER_S = 60.0
#: the pauses between tries while it is away: they double from the first to the last
_FIRST_PAUSE_S, _LAST_PAUSE_S = 0.1, 1.0
#: after a lease could not be taken, generation goes on without one and tries again this much later
LEASE_RETRY_S = 60.0
#: ... or this much later when the server was away
LEASE_AWAY_RETRY_S = 1.0

log = logging.getLogger(__name__)
#: the ways of calling a server that it has answered: only a server seen before is waited for, so that a
#: wrong address or TLS setting fails at once
_reached: set[Key] = set()


def wait_for_server_s() -> float:
    """``CLEMSERVE_WAIT_FOR_SERVER`` in seconds (0: fail at once), else ``WAIT_FOR_SERVER_S``; read per call."""
    value = os.environ.get("CLEMSERVE_WAIT_FOR_SERVER", "").strip()
    if not value:
        return WAIT_FOR_SERVER_S
    try:
        return max(0.0, float(value))
    except ValueError:
        raise ValueError(f"CLEMSERVE_WAIT_FOR_SERVER must be a number of seconds, got {value!r}") from None


@dataclass
class Outage:
    """A server's time away as this process saw it: from the first call that found it gone to the first call
    it answered again. The time it took calls again (the start of that call's last try) is told apart from
    how long that call then took (a model load and the generation, which say nothing about the outage)."""

    address: str
    #: what the first failed call was told (the connection refused, the server shutting down)
    cause: str
    #: how long each call waits for the server (CLEMSERVE_WAIT_FOR_SERVER)
    patience_s: float
    #: when the first call found it away (time.monotonic, which every process on the machine shares)
    since: float
    #: seconds from ``since`` until the server took a call again; None while it is away
    reconnected_s: float | None = None
    #: how long that first call answered again then took
    call_s: float = 0.0

    @property
    def away(self) -> bool:
        return self.reconnected_s is None

    def message(self) -> str:
        """The line for the log and the terminal: that it is away, or back and after how long."""
        if self.reconnected_s is None:
            return (
                f"clemserve at {self.address} is away ({self.cause}); waiting up to {self.patience_s:.0f} s "
                "for it (CLEMSERVE_WAIT_FOR_SERVER)"
            )
        return (
            f"clemserve at {self.address} is back after {self.reconnected_s:.1f} s away "
            f"(the first call sent to it again then took {self.call_s:.1f} s)"
        )


#: the outage of each server address that is away now
_outages: dict[str, Outage] = {}
_outages_lock = threading.Lock()
#: told each outage when it begins and when it ends (watch_outages)
_watchers: list[Callable[[Outage], None]] = []


def watch_outages(watcher: Callable[[Outage], None]) -> None:
    """Have ``watcher`` told every outage of every server this process calls, once when it begins and once
    when it ends (``outage.away`` says which), in the thread of the call that found it."""
    with _outages_lock:
        if watcher not in _watchers:
            _watchers.append(watcher)


def unwatch_outages(watcher: Callable[[Outage], None]) -> None:
    with _outages_lock:
        if watcher in _watchers:
            _watchers.remove(watcher)


def print_outage(outage: Outage) -> None:
    """A watcher for a command run in a terminal (``clem run``): each outage's lines on stderr, where the
    user looks, as well as in the log."""
    print(outage.message(), file=sys.stderr, flush=True)


def _away(address: str, cause: str, patience_s: float) -> Outage:
    """The address's outage: the one under way, or a new one (logged and told, once)."""
    with _outages_lock:
        outage = _outages.get(address)
        if outage is not None:
            return outage
        outage = _outages[address] = Outage(address, cause, patience_s, time.monotonic())
    _tell(outage)
    return outage


def found_away(address: str, exc: grpc.RpcError, key: Key) -> None:
    """A call without retries of its own (a lease) found a server that answered before away: the process's
    outage of it begins, as a retried call's would, and ends at the next call the server answers."""
    if server_away(exc) and key in _reached:
        _away(address, exc.details() or exc.code().name, wait_for_server_s())


def _back(outage: Outage, try_sent: float) -> None:
    """A call sent at ``try_sent`` was answered: the outage ends, unless another call ended it first."""
    with _outages_lock:
        if not outage.away:
            return
        now = time.monotonic()
        outage.reconnected_s = max(0.0, try_sent - outage.since)
        outage.call_s = now - max(try_sent, outage.since)
        if _outages.get(outage.address) is outage:
            del _outages[outage.address]
    _tell(outage)


def _tell(outage: Outage) -> None:
    log.warning("%s", outage.message())
    for watcher in list(_watchers):
        try:
            watcher(outage)
        except Exception:  # a watcher's failure must not fail the call that found the outage
            log.exception("an outage watcher failed")


#: whether a request message type has a request_id field, by type
_request_id_field: dict[type, bool] = {}


def _carries_request_id(message_type: type) -> bool:
    found = _request_id_field.get(message_type)
    if found is None:
        descriptor = getattr(message_type, "DESCRIPTOR", None)
        found = _request_id_field[message_type] = descriptor is not None and "request_id" in descriptor.fields_by_name
    return found


class ServerWait:
    """One call's patience with a server that is briefly away (restarting, or stopping and refusing calls).

    A call that fails at the connection (refused, reset, the server shutting down) is tried again after a
    pause, for up to ``CLEMSERVE_WAIT_FOR_SERVER`` seconds from the first failure and never past the call's
    deadline; a status the server decided is never tried again. The request id stays the same across tries,
    so the server log shows one request.
    """

    def __init__(
        self, address: str, timeout: float | None, token: str | None = None, *, key: Key | None = None
    ) -> None:
        """``key``: the :func:`channel_key` of the channel the call goes on, where the caller holds it (else
        it is read now, from the address, the token and the environment)."""
        self.address = address
        self._key = key if key is not None else channel_key(address, token)
        # 32 random hex digits, as uuid4().hex but without building a UUID on every call
        self.request_id = os.urandom(16).hex()
        self._deadline = None if timeout is None else time.monotonic() + timeout
        #: CLEMSERVE_WAIT_FOR_SERVER, read at the call's first failure (most calls have none)
        self._patience: float | None = None
        self._away_since: float | None = None
        self._away: grpc.RpcError | None = None
        self._pause = _FIRST_PAUSE_S
        #: the process's outage of the server this call waited through (None: it found the server there)
        self._outage: Outage | None = None
        #: when the call's latest try was sent
        self._try_sent = 0.0

    @property
    def metadata(self) -> tuple[tuple[str, str]]:
        return (("x-request-id", self.request_id),)

    def metadata_for(self, request: Any) -> tuple[tuple[str, str]] | None:
        """The call's metadata: none where ``request`` has a ``request_id`` field of its own (the id goes
        there, so there is no header for gRPC to encode and the server to parse on every call), else the id
        as ``x-request-id``."""
        if _carries_request_id(type(request)):
            request.request_id = self.request_id
            return None
        return self.metadata

    def timeout(self) -> float | None:
        """What is left of the call's deadline, for the try being sent now (noted: a try answered after an
        outage tells when the server took calls again)."""
        now = self._try_sent = time.monotonic()
        return None if self._deadline is None else max(0.0, self._deadline - now)

    @property
    def waited_s(self) -> float:
        return 0.0 if self._away_since is None else time.monotonic() - self._away_since

    def answered(self) -> None:
        """The server answered (a reply, or a status it decided)."""
        _reached.add(self._key)
        outage = self._outage or _outages.get(self.address)  # its own, or one a lease found
        if outage is not None:
            _back(outage, self._try_sent)
            self._outage = None
        self._away_since = None

    def pause_after(self, exc: grpc.RpcError) -> float | None:
        """How long to wait before trying ``exc``'s call again, or None: raise :meth:`error` for it."""
        if not server_away(exc):
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                _reached.add(self._key)  # a status the server decided
            return None
        if self._patience is None:
            self._patience = wait_for_server_s()
        if self._key not in _reached or self._patience <= 0:
            return None
        now, self._away = time.monotonic(), exc
        if self._away_since is None:
            self._away_since = now
        if self._outage is None or not self._outage.away:
            self._outage = _away(self.address, exc.details() or exc.code().name, self._patience)
        pause, self._pause = self._pause, min(2 * self._pause, _LAST_PAUSE_S)
        if now + pause > self._away_since + self._patience:
            return None
        if self._deadline is not None and now + pause >= self._deadline:
            return None
        return pause

    def retry_after(self, exc: grpc.RpcError) -> float:
        """The pause before the call's next try; where there is none, raises the call's :meth:`error`."""
        pause = self.pause_after(exc)
        if pause is None:
            raise self.error(exc) from exc
        return pause

    def error(self, exc: grpc.RpcError) -> ClemserveError:
        """The error for the call's last try: a deadline that ran out while the server was away is the
        server being away."""
        if self._away is not None and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            exc = self._away
        return error_from_rpc(exc, self.address, self.waited_s if server_away(exc) else 0.0)


class StreamWait(ServerWait):
    """A streamed call's patience: a unary call's, until text or the reply reached the caller; a stream cut
    after that cannot be sent again (the state events of a request that waits may repeat)."""

    delivered = False

    def event(self, message: pb.GenerateStreamResponse) -> StreamEvent:
        """The event for the caller; notes whether it is one that ends the call's retries."""
        event = event_from_proto(message)
        if self._outage is not None:  # the server is back: its first event tells, not the stream's end
            self.answered()
        if not isinstance(event, StreamState):
            self.delivered = True
        return event

    def retry_after(self, exc: grpc.RpcError) -> float:
        if self.delivered:
            raise self.error(exc) from exc
        return super().retry_after(exc)


class Lease:
    """A model's lease (LeaseModel), which keeps the model loaded on the server from its first generation on:
    when to take or renew it, and what a refusal means. The models make the call; this keeps its state."""

    def __init__(self, wanted: bool) -> None:
        #: take a lease before generating (a server without LeaseModel turns this off)
        self.wanted = wanted
        #: when the lease runs out (time.monotonic); until then a call checks nothing else
        self.until = 0.0
        #: the LeaseModel call that holds it, kept open
        self.call: Any = None

    def due(self) -> bool:
        """Whether to take a lease before the next generation: none yet, it ran out, or its call ended (the
        server restarted)."""
        call = self.call
        return self.wanted and (time.monotonic() >= self.until or (call is not None and call.done()))

    def taken(self, call: Any, first: pb.LeaseModelResponse, name: str) -> None:
        self.call = call
        self.until = time.monotonic() + first.expires_in_seconds
        log.debug("lease %s on %s for %.0f s", first.lease_id, name, first.expires_in_seconds)

    def refused(self, exc: grpc.RpcError, name: str) -> None:
        """Generation goes on without a lease: a server without LeaseModel is never asked again, others after
        ``LEASE_RETRY_S``, or ``LEASE_AWAY_RETRY_S`` when the server was away (restarting)."""
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            self.wanted = False
        log.warning("%s: no lease (%s); generating without one", name, exc.details())
        retry_s = LEASE_AWAY_RETRY_S if server_away(exc) else LEASE_RETRY_S
        self.call, self.until = None, time.monotonic() + retry_s

    def drop(self) -> None:
        """Cancel the lease's call: the server releases the lease at once."""
        call, self.call, self.until = self.call, None, 0.0
        if call is not None:
            call.cancel()
