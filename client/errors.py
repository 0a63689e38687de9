"""gRPC statuses back into clemserve's exceptions, with the server's structured details."""

from __future__ import annotations

import grpc
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
    UnavailableError,
)
from clemserve.v1 import clemserve_pb2

_DETAILS_KEY = "grpc-status-details-bin"


def _status_details(exc: grpc.RpcError) -> list[object]:
    trailing = exc.trailing_metadata() or ()
    for key, value in trailing:
        if key == _DETAILS_KEY:
            status = status_pb2.Status.FromString(value)
            unpacked: list[object] = []
            for detail in status.details:
                for cls in (
                    error_details_pb2.ErrorInfo,
                    error_details_pb2.RequestInfo,
                    error_details_pb2.BadRequest,
                    error_details_pb2.ResourceInfo,
                    error_details_pb2.PreconditionFailure,
                    error_details_pb2.RetryInfo,
                    clemserve_pb2.ContextLimit,
                ):
                    if detail.Is(cls.DESCRIPTOR):
                        message = cls()
                        detail.Unpack(message)
                        unpacked.append(message)
            return unpacked
    return []


def error_from_rpc(exc: grpc.RpcError, address: str = "") -> ClemserveError:
    """The exception for a failed call; ``raise error_from_rpc(e) from e`` keeps the gRPC cause."""
    code: grpc.StatusCode = exc.code()
    message: str = exc.details() or code.name
    details = _status_details(exc)

    def first(cls: type) -> object | None:
        return next((d for d in details if isinstance(d, cls)), None)

    request_info = first(error_details_pb2.RequestInfo)
    request_id = request_info.request_id if isinstance(request_info, error_details_pb2.RequestInfo) else ""
    error_info = first(error_details_pb2.ErrorInfo)
    reason = error_info.reason if isinstance(error_info, error_details_pb2.ErrorInfo) else ""

    limit = first(clemserve_pb2.ContextLimit)
    if isinstance(limit, clemserve_pb2.ContextLimit):
        return ContextExceededError(
            limit.info, limit.tokens_used, limit.tokens_left, limit.context_size, request_id=request_id
        )
    bad_request = first(error_details_pb2.BadRequest)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        if isinstance(bad_request, error_details_pb2.BadRequest) and bad_request.field_violations:
            violation = bad_request.field_violations[0]
            return InvalidArgumentError(violation.field, violation.description, request_id=request_id)
        return InvalidArgumentError("", message, request_id=request_id)
    if code == grpc.StatusCode.NOT_FOUND:
        resource = first(error_details_pb2.ResourceInfo)
        selector = resource.resource_name if isinstance(resource, error_details_pb2.ResourceInfo) else ""
        return ModelNotFoundError(message, selector=selector, request_id=request_id)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        failure = first(error_details_pb2.PreconditionFailure)
        subject = (
            failure.violations[0].subject
            if isinstance(failure, error_details_pb2.PreconditionFailure) and failure.violations
            else ""
        )
        return FailedPreconditionError(message, subject=subject, request_id=request_id)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        meta = dict(error_info.metadata) if isinstance(error_info, error_details_pb2.ErrorInfo) else {}
        retry = first(error_details_pb2.RetryInfo)
        delay = (
            retry.retry_delay.ToNanoseconds() / 1e9 if isinstance(retry, error_details_pb2.RetryInfo) else 0.0
        )
        return ResourceExhaustedError(
            message,
            required_bytes=int(meta.get("required_bytes", 0) or 0),
            available_bytes=int(meta.get("available_bytes", 0) or 0),
            retry_after_s=delay,
            request_id=request_id,
        )
    if code == grpc.StatusCode.UNAVAILABLE and not details and address:
        return UnavailableError(f"cannot reach clemserve at {address}: {message}", request_id=request_id)
    cls = ERRORS_BY_CODE.get(code.name)
    if cls is not None and cls not in (ContextExceededError,):
        return cls(message, request_id=request_id)
    return ServerError(code.name, message, reason=reason, request_id=request_id)
