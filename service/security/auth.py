"""Token authentication and TLS credentials for the gRPC server.

Callers send ``authorization: Bearer <token>`` metadata. The interceptor decides before any handler runs
(and before the request is even parsed): no token or a wrong one is UNAUTHENTICATED; a caller without the
admin token calling an RPC that changes the server's state is PERMISSION_DENIED. The health service and
server reflection stay open, so load balancers, Kubernetes probes and ``buf curl --list-methods`` work
without a token; they tell nothing but whether the server serves and what its API looks like.
"""

from __future__ import annotations

import enum
import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from clemserve.registry.errors import ClemserveError, PermissionDeniedError, UnauthenticatedError

from ..logs import request_id_var
from ..status import to_grpc_status
from .redaction import Redactor
from .settings import Security

log = logging.getLogger(__name__)

#: services any caller may use without a token
OPEN_SERVICES = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)
_MODEL_SERVICE = "/clemserve.v1.ModelService/"
#: what the ordinary token allows. Every other RPC, those added later included, needs the admin token:
#: a new state-changing RPC is gated until someone decides otherwise (a unit test makes them decide).
USER_METHODS = frozenset(
    _MODEL_SERVICE + name
    for name in (
        "Generate",
        "GenerateBatch",
        "GenerateStream",
        "ResolveModel",
        "ListModels",
        "CountTokens",
        "LeaseModel",
    )
)
#: the RPCs that change what the server holds
ADMIN_METHODS = frozenset(_MODEL_SERVICE + name for name in ("LoadModel", "UnloadModel"))


class Role(enum.Enum):
    USER = 1
    ADMIN = 2


def _same(presented: bytes, expected: str) -> bool:
    """Constant time in the token's content: a wrong guess takes as long however much of it is right."""
    return bool(expected) and hmac.compare_digest(presented, expected.encode("utf-8"))


def bearer_token(metadata: Any) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry, or None."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class TokenAuth(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, auth_token: str, admin_token: str, redactor: Redactor | None = None) -> None:
        self.auth_token = auth_token
        self.admin_token = admin_token
        self.redactor = redactor

    def role(self, token: str | None) -> Role | None:
        """The caller's role, or None when the server wants a token and this is not one of its tokens."""
        presented = (token or "").encode("utf-8")
        is_admin = _same(presented, self.admin_token)
        is_user = _same(presented, self.auth_token)
        if is_admin:
            return Role.ADMIN
        if self.auth_token and not is_user:
            return None
        return Role.USER if self.admin_token else Role.ADMIN

    def refusal(self, method: str, metadata: Any) -> ClemserveError | None:
        service = method.strip("/").partition("/")[0]
        if service in OPEN_SERVICES:
            return None
        role = self.role(bearer_token(metadata))
        if role is None:
            return UnauthenticatedError(
                "missing or wrong token: send the metadata 'authorization: Bearer <token>' "
                "(clemserve.client: connect(address, token=...) or CLEMSERVE_TOKEN)"
            )
        if role is Role.USER and method not in USER_METHODS:
            return PermissionDeniedError(
                f"{method.rsplit('/', 1)[-1]} changes the server's state: it needs the admin token"
            )
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        metadata = handler_call_details.invocation_metadata
        error = self.refusal(method, metadata)
        handler = await continuation(handler_call_details)
        if error is None or handler is None:
            return handler
        return _refusing_handler(handler, method, error, _request_id(metadata), self.redactor)


def _request_id(metadata: Any) -> str:
    given = next((str(v) for k, v in metadata or () if k == "x-request-id"), "")
    return given if given and len(given) <= 128 and given.isprintable() else uuid.uuid4().hex


def _refusing_handler(
    handler: grpc.RpcMethodHandler, method: str, error: ClemserveError, request_id: str, redactor: Redactor | None
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers ``error`` without reading the request."""

    async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
        token = request_id_var.set(request_id)
        try:
            log.info("%s refused: %s", method, error.code)
            status = to_grpc_status(error, request_id, redactor)
            await context.abort(status.code, status.details, status.trailing_metadata)
        finally:
            request_id_var.reset(token)

    kind = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(bool(handler.request_streaming), bool(handler.response_streaming))]
    # no request deserializer: the refused request stays bytes, never parsed
    return kind(refuse, request_deserializer=None, response_serializer=handler.response_serializer)


def _pem(path: Path, flag: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot read the file: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{flag} {path}: not a PEM file (expected '-----BEGIN ...')")
    return data


def server_credentials(security: Security) -> grpc.ServerCredentials | None:
    """TLS credentials from the certificate files (mutual TLS with a client CA), or None for plain text."""
    if security.tls_cert is None or security.tls_key is None:
        return None
    cert = _pem(security.tls_cert, "--tls-cert")
    key = _pem(security.tls_key, "--tls-key")
    client_ca = _pem(security.tls_client_ca, "--tls-client-ca") if security.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def interceptors(security: Security, redactor: Redactor | None) -> list[grpc.aio.ServerInterceptor]:
    if not security.tokens:
        return []
    return [TokenAuth(security.auth_token, security.admin_token, redactor)]
