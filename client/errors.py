"""gRPC statuses back into clemserve's exceptions, with the server's structured details."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from clemserve.registry.errors import (
    ERRORS_BY_CODE,
    ClemserveError,
    ContextExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    ModelNotFoundError,
    ResourceExhaustedError,
    ServerError,
    ShuttingDownError,
    UnavailableError,
)
from clemserve.v1 import clemserve_pb2

_DETAILS_KEY = "grpc-status-details-bin"
_DETAIL_TYPES = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.RequestInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.ResourceInfo,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.RetryInfo,
    clemserve_pb2.ContextLimit,
)


@dataclass
class _Details:
    """The google.rpc details of one status, unpacked."""

    request_id: str = ""
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    retry_after_s: float = 0.0
    field: str = ""
    field_description: str = ""
    selector: str = ""
    subject: str = ""
    limit: clemserve_pb2.ContextLimit | None = None
    any_found: bool = False


def _details(exc: grpc.RpcError) -> _Details:
    blob = next((v for k, v in (exc.trailing_metadata() or ()) if k == _DETAILS_KEY), None)
    return _unpack(status_pb2.Status.FromString(blob).details if blob is not None else [])


def _unpack(details: Iterable[any_pb2.Any]) -> _Details:
    found = _Details()
    for packed in details:
        for cls in _DETAIL_TYPES:
            if not packed.Is(cls.DESCRIPTOR):
                continue
            detail = cls()
            packed.Unpack(detail)
            found.any_found = True
            if isinstance(detail, error_details_pb2.ErrorInfo):
                found.reason, found.metadata = detail.reason, dict(detail.metadata)
            elif isinstance(detail, error_details_pb2.RequestInfo):
                found.request_id = detail.request_id
            elif isinstance(detail, error_details_pb2.BadRequest) and detail.field_violations:
                found.field = detail.field_violations[0].field
                found.field_description = detail.field_violations[0].description
            elif isinstance(detail, error_details_pb2.ResourceInfo):
                found.selector = detail.resource_name
            elif isinstance(detail, error_details_pb2.PreconditionFailure) and detail.violations:
                found.subject = detail.violations[0].subject
            elif isinstance(detail, error_details_pb2.RetryInfo):
                found.retry_after_s = detail.retry_delay.ToNanoseconds() / 1e9
            elif isinstance(detail, clemserve_pb2.ContextLimit):
                found.limit = detail
    return found


def error_from_rpc(exc: grpc.RpcError, address: str = "", waited_s: float = 0.0) -> ClemserveError:
    """The exception for a failed call; ``raise error_from_rpc(e) from e`` keeps the gRPC cause.
    ``waited_s``: how long the call waited for the server to come back before giving up."""
    code: grpc.StatusCode = exc.code()
    found = _details(exc)
    err = _with_details(_error(code, exc.details() or code.name, found, address), found)
    if waited_s > 0:
        err.message = f"{err.message} (waited {waited_s:.1f} s for it to come back; CLEMSERVE_WAIT_FOR_SERVER)"
        err.args = (err.message,)
    return err


def server_away(exc: grpc.RpcError) -> bool:
    """Whether the call failed at the connection (refused, reset, or the server shutting down), where the
    server may be back soon; a status the server decided itself (it carries details) is not."""
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    found = _details(exc)
    return not found.any_found or found.reason == ShuttingDownError.reason


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def error_from_row(row: clemserve_pb2.RowError) -> ClemserveError:
    """The exception for one failed row of a GenerateBatch call."""
    code = _CODES.get(row.code, grpc.StatusCode.UNKNOWN)
    found = _unpack(row.details)
    return _with_details(_error(code, row.message or code.name, found, ""), found)


def _with_details(err: ClemserveError, found: _Details) -> ClemserveError:
    if found.reason:  # the server's own reason, more precise than its class's (REPLAY_MISS, QUOTA_EXCEEDED)
        err.reason = found.reason
    err.request_id = found.request_id
    err.metadata = found.metadata
    err.retry_after_s = found.retry_after_s
    return err


def _error(code: grpc.StatusCode, message: str, found: _Details, address: str) -> ClemserveError:
    if found.limit is not None:
        limit = found.limit
        return ContextExceededError(limit.info, limit.tokens_used, limit.tokens_left, limit.context_size)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        if found.field:
            return InvalidArgumentError(found.field, found.field_description)
        return InvalidArgumentError("", message)
    if code == grpc.StatusCode.NOT_FOUND:
        return ModelNotFoundError(message, selector=found.selector)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPreconditionError(message, subject=found.subject)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhaustedError(
            message,
            required_bytes=int(found.metadata.get("required_bytes", 0) or 0),
            available_bytes=int(found.metadata.get("available_bytes", 0) or 0),
        )
    if code == grpc.StatusCode.UNAVAILABLE and not found.any_found and address:
        return UnavailableError(f"cannot reach clemserve at {address}: {message}")
    if code == grpc.StatusCode.UNAVAILABLE and found.reason == ShuttingDownError.reason:
        return ShuttingDownError(f"{message} (at {address})" if address else message)
    cls = ERRORS_BY_CODE.get(code.name)
    if cls is not None and cls is not ContextExceededError:
        return cls(message)
    return ServerError(code.name, message, reason=found.reason)
