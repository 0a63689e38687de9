"""What the client shows the server: a bearer token and TLS, per address, from ``connect()`` or the environment.

The token travels as ``authorization: Bearer <token>`` metadata on every call, added by a client
interceptor rather than gRPC call credentials, which gRPC refuses on plain-text channels: a server on
this machine (loopback) needs no TLS to check a token. Over a network, use TLS, or the token travels in
clear text.

Where each setting comes from, first found wins: the call's own argument (``get_model_for(...,
token=...)``), ``connect(address, ...)`` for that address, the environment (``CLEMSERVE_TOKEN``;
``CLEMSERVE_TLS_CA``, ``CLEMSERVE_TLS_CERT``, ``CLEMSERVE_TLS_KEY``, or ``CLEMSERVE_TLS=1`` for TLS with the
system's CA certificates).
"""

from __future__ import annotations

import collections
import os
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import grpc


@dataclass(frozen=True)
class Tls:
    """TLS with these PEM files: ``ca`` to check the server (None: the system's CAs), ``cert`` and ``key``
    to show a client certificate (mutual TLS)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs both its certificate and its key file")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "CA"),
            private_key=_read(self.key, "key"),
            certificate_chain=_read(self.cert, "certificate"),
        )


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise OSError(f"cannot read the TLS {what} file {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class ConnectionSettings:
    """How to call one server: its address, the token sent with every call, and TLS.

    ``tls=True`` or a TLS file speaks TLS (with the system's CAs unless ``tls_ca``); ``tls=False`` plain text;
    ``tls=None`` and no file: as the environment says. ``tls_cert`` and ``tls_key`` show a client certificate.
    """

    address: str
    token: str | None = field(default=None, repr=False)
    tls: bool | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @property
    def files(self) -> Tls:
        return Tls(self.tls_ca, self.tls_cert, self.tls_key)

    @cached_property
    def channel_tls(self) -> Tls | bool | None:
        """What the channel speaks: TLS with these files, False for plain text, None for the environment's."""
        files = self.files
        if files != Tls() or self.tls is True:
            return files
        return self.tls


_lock = threading.Lock()
_settings: dict[str, ConnectionSettings] = {}


def remember(settings: ConnectionSettings) -> None:
    """Use ``settings`` for calls to their address (see ``connect``)."""
    with _lock:
        _settings[settings.address] = settings


def token_for(address: str, token: str | None = None) -> str | None:
    if token:
        return token
    with _lock:
        remembered = _settings.get(address)
    return (remembered.token if remembered else None) or os.environ.get("CLEMSERVE_TOKEN") or None


def tls_for(address: str) -> Tls | None:
    with _lock:
        remembered = _settings.get(address)
    chosen = None if remembered is None else remembered.channel_tls
    if chosen is not None:
        return chosen if isinstance(chosen, Tls) else None
    env = os.environ
    files = Tls(
        env.get("CLEMSERVE_TLS_CA") or None, env.get("CLEMSERVE_TLS_CERT") or None, env.get("CLEMSERVE_TLS_KEY") or None
    )
    if files != Tls() or env.get("CLEMSERVE_TLS", "").strip().lower() in ("1", "true", "yes", "on"):
        return files
    return None


def sync_channel(address: str, token: str | None, tls: Tls | None, options: list[tuple[str, Any]]) -> grpc.Channel:
    if tls is not None:
        channel = grpc.secure_channel(address, tls.credentials(), options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(channel, BearerToken(token)) if token else channel


def aio_channel(address: str, token: str | None, tls: Tls | None, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
    interceptors = [AioBearerToken(token)] if token else None
    if tls is not None:
        return grpc.aio.secure_channel(address, tls.credentials(), options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,  # type: ignore[misc]
):
    pass


def _with_token(metadata: Any, token: str) -> list[tuple[str, str]]:
    return [*(metadata or ()), ("authorization", f"Bearer {token}")]


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds the token to every call of a blocking channel."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __repr__(self) -> str:
        return "BearerToken(...)"

    def _details(self, details: Any) -> _CallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            _with_token(details.metadata, self._token),
            details.credentials,
            details.wait_for_ready,
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)


class AioBearerToken(
    grpc.aio.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.aio.UnaryStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds the token to every call of an asyncio channel (clemserve's RPCs send one request each)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __repr__(self) -> str:
        return "AioBearerToken(...)"

    def _details(self, details: Any) -> Any:
        metadata = grpc.aio.Metadata(*_with_token(details.metadata, self._token))
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)
