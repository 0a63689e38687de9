"""One channel per address, shared by every Model in the process (sync) or event loop (asyncio)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import weakref
from typing import Any

import grpc

from clemserve.registry.errors import ClemserveError

from .credentials import Tls, aio_channel, remember, sync_channel, tls_for, token_for
from .errors import error_from_rpc, server_away

DEFAULT_ADDRESS = "localhost:50051"
# Several replicas behind one target ("ipv4:127.0.0.1:P1,127.0.0.1:P2" or "dns:///name:port", whose DNS
# name lists every replica) share the calls round-robin, and a call that meets a replica going away
# (UNAVAILABLE) is tried again on another: gRPC's own load balancing, no router in between. Statuses the
# server decides itself carry a "do not retry" pushback, so only lost connections and draining replicas
# are retried.
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": "clemserve.v1.ModelService"}],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}
_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
    ("grpc.enable_retries", 1),
    # A channel kept across a server restart (games hold theirs for hours) would otherwise back off up to
    # 120 s between reconnect tries and fail calls meanwhile; a restarted server is found within a second.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

#: how long a call waits for a server that went away (a restart) when CLEMSERVE_WAIT_FOR_SERVER is not set
WAIT_FOR_SERVER_S = 60.0
#: the pauses between tries while it is away: they double from the first to the last
_FIRST_PAUSE_S, _LAST_PAUSE_S = 0.1, 1.0

log = logging.getLogger(__name__)
_lock = threading.Lock()
_default_address: str | None = None
#: channels by address, token and TLS files: one per way of calling a server
_Key = tuple[str, str | None, Tls | None]
_channels: dict[_Key, grpc.Channel] = {}
#: the ways of calling a server that it has answered: only a server seen before is waited for, so that a
#: wrong address or TLS setting fails at once
_reached: set[_Key] = set()
_aio_channels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[_Key, grpc.aio.Channel]] = (
    weakref.WeakKeyDictionary()
)


def connect(
    address: str,
    *,
    token: str | None = None,
    tls: bool | None = None,
    tls_ca: str | os.PathLike[str] | None = None,
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
) -> None:
    """Use ``address`` (host:port) for models created without an explicit address.

    ``token`` goes with every call to it (else ``CLEMSERVE_TOKEN``). ``tls=True`` or a ``tls_ca`` file
    speaks TLS to it (else ``CLEMSERVE_TLS_CA``/``CLEMSERVE_TLS``); ``tls_cert`` and ``tls_key`` show a
    client certificate (mutual TLS; else ``CLEMSERVE_TLS_CERT``/``CLEMSERVE_TLS_KEY``).
    """
    global _default_address
    remember(address, token=token, tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
    with _lock:
        _default_address = address


def default_address() -> str:
    return _default_address or os.environ.get("CLEMSERVE_ADDRESS") or DEFAULT_ADDRESS


def _key(address: str, token: str | None) -> _Key:
    return (address, token_for(address, token), tls_for(address))


def channel_key(address: str, token: str | None = None) -> _Key:
    """What tells one way of calling a server from another: its address, token and TLS files (read now)."""
    return _key(address, token)


def channel_for(address: str, token: str | None = None) -> grpc.Channel:
    key = _key(address, token)
    with _lock:
        channel = _channels.get(key)
        if channel is None:
            channel = _channels[key] = sync_channel(*key, _OPTIONS)
        return channel


def aio_channel_for(address: str, token: str | None = None) -> grpc.aio.Channel:
    """The asyncio channel for ``address`` on the running event loop (channels are bound to a loop)."""
    loop = asyncio.get_running_loop()
    key = _key(address, token)
    with _lock:
        per_loop = _aio_channels.setdefault(loop, {})
        channel = per_loop.get(key)
        if channel is None:
            channel = per_loop[key] = aio_channel(*key, _OPTIONS)
        return channel


def close_all() -> None:
    """Close the sync channels (tests and long-lived processes switching servers)."""
    with _lock:
        for channel in _channels.values():
            channel.close()
        _channels.clear()


def wait_for_server_s() -> float:
    """``CLEMSERVE_WAIT_FOR_SERVER`` in seconds (0: fail at once), else ``WAIT_FOR_SERVER_S``; read per call."""
    value = os.environ.get("CLEMSERVE_WAIT_FOR_SERVER", "").strip()
    if not value:
        return WAIT_FOR_SERVER_S
    try:
        return max(0.0, float(value))
    except ValueError:
        raise ValueError(f"CLEMSERVE_WAIT_FOR_SERVER must be a number of seconds, got {value!r}") from None


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
        self, address: str, timeout: float | None, token: str | None = None, *, key: _Key | None = None
    ) -> None:
        """``key``: the :func:`channel_key` of the channel the call goes on, where the caller holds it (else
        it is read now, from the address, the token and the environment)."""
        self.address = address
        self._key = key if key is not None else _key(address, token)
        # 32 random hex digits, as uuid4().hex but without building a UUID on every call
        self.request_id = os.urandom(16).hex()
        self._deadline = None if timeout is None else time.monotonic() + timeout
        #: CLEMSERVE_WAIT_FOR_SERVER, read at the call's first failure (most calls have none)
        self._patience: float | None = None
        self._away_since: float | None = None
        self._away: grpc.RpcError | None = None
        self._pause = _FIRST_PAUSE_S

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
        """What is left of the call's deadline, for the next try."""
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    @property
    def waited_s(self) -> float:
        return 0.0 if self._away_since is None else time.monotonic() - self._away_since

    def answered(self) -> None:
        """The server answered (a reply, or a status it decided)."""
        _reached.add(self._key)
        if self._away_since is not None:
            log.warning("clemserve at %s is back after %.1f s", self.address, self.waited_s)
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
            log.warning(
                "clemserve at %s is away (%s); waiting up to %.0f s for it (CLEMSERVE_WAIT_FOR_SERVER)",
                self.address,
                exc.details(),
                self._patience,
            )
        pause, self._pause = self._pause, min(2 * self._pause, _LAST_PAUSE_S)
        if now + pause > self._away_since + self._patience:
            return None
        if self._deadline is not None and now + pause >= self._deadline:
            return None
        return pause

    def error(self, exc: grpc.RpcError) -> ClemserveError:
        """The error for the call's last try: a deadline that ran out while the server was away is the
        server being away."""
        if self._away is not None and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            exc = self._away
        return error_from_rpc(exc, self.address, self.waited_s if server_away(exc) else 0.0)
