"""One channel per address, shared by every Model in the process (sync) or event loop (asyncio)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import weakref

import grpc

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
]

_lock = threading.Lock()
_default_address: str | None = None
_channels: dict[str, grpc.Channel] = {}
_aio_channels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, grpc.aio.Channel]] = (
    weakref.WeakKeyDictionary()
)


def connect(address: str) -> None:
    """Use ``address`` (host:port) for models created without an explicit address."""
    global _default_address
    with _lock:
        _default_address = address


def default_address() -> str:
    return _default_address or os.environ.get("CLEMSERVE_ADDRESS") or DEFAULT_ADDRESS


def channel_for(address: str) -> grpc.Channel:
    with _lock:
        channel = _channels.get(address)
        if channel is None:
            channel = _channels[address] = grpc.insecure_channel(address, options=_OPTIONS)
        return channel


def aio_channel_for(address: str) -> grpc.aio.Channel:
    """The asyncio channel for ``address`` on the running event loop (channels are bound to a loop)."""
    loop = asyncio.get_running_loop()
    with _lock:
        per_loop = _aio_channels.setdefault(loop, {})
        channel = per_loop.get(address)
        if channel is None:
            channel = per_loop[address] = grpc.aio.insecure_channel(address, options=_OPTIONS)
        return channel


def close_all() -> None:
    """Close the sync channels (tests and long-lived processes switching servers)."""
    with _lock:
        for channel in _channels.values():
            channel.close()
        _channels.clear()
