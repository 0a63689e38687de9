"""One channel per address, shared by every Model in the process (sync) or event loop (asyncio)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import weakref

import grpc

from .credentials import ConnectionSettings, Tls, aio_channel, remember, sync_channel, tls_for, token_for
from .routes import route_for

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

_lock = threading.Lock()
_default_address: str | None = None
#: channels by address, token and TLS files: one per way of calling a server
Key = tuple[str, str | None, Tls | None]
_channels: dict[Key, grpc.Channel] = {}
_aio_channels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Key, grpc.aio.Channel]] = (
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
    use(ConnectionSettings(address, token, tls, _path(tls_ca), _path(tls_cert), _path(tls_key)))


def use(settings: ConnectionSettings) -> None:
    """:func:`connect` with its settings in one object."""
    global _default_address
    remember(settings)
    with _lock:
        _default_address = settings.address


def _path(value: str | os.PathLike[str] | None) -> str | None:
    return None if value is None else os.fspath(value)


def default_address() -> str:
    return _default_address or os.environ.get("CLEMSERVE_ADDRESS") or DEFAULT_ADDRESS


def address_for(model_name: str | None) -> str:
    """The server for the model named ``model_name``: its route (``CLEMSERVE_ROUTES``, ``CLEMSERVE_ROUTES_FILE``;
    see :mod:`clemserve.client.routes`), else :func:`default_address`."""
    return route_for(model_name) or default_address()


def _key(address: str, token: str | None) -> Key:
    return (address, token_for(address, token), tls_for(address))


def channel_key(address: str, token: str | None = None) -> Key:
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
