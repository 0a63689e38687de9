"""The one place where clemserve's errors become gRPC statuses with structured details."""

from __future__ import annotations

import logging
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from clemserve.registry.errors import (
    ClemserveError,
    ContextExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    ModelNotFoundError,
    ResourceExhaustedError,
)
from clemserve.v1 import clemserve_pb2

from .security.redaction import Redactor

DOMAIN = "clemserve.dev"
_DETAIL_TYPES = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.ResourceInfo,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.RequestInfo,
    clemserve_pb2.ContextLimit,
)

log = logging.getLogger(__name__)


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _details(err: ClemserveError, request_id: str) -> list[object]:
    metadata: dict[str, str] = dict(err.metadata)
    details: list[object] = []
    if isinstance(err, InvalidArgumentError):
        metadata["field"] = err.field
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=err.field, description=err.description)
                ]
            )
        )
    elif isinstance(err, ModelNotFoundError):
        metadata["selector"] = err.selector
        details.append(
            error_details_pb2.ResourceInfo(resource_type="model", resource_name=err.selector, description=err.message)
        )
    elif isinstance(err, ContextExceededError):
        metadata.update(
            tokens_used=str(err.tokens_used),
            tokens_left=str(err.tokens_left),
            context_size=str(err.context_size),
        )
        details.append(
            clemserve_pb2.ContextLimit(
                tokens_used=err.tokens_used,
                tokens_left=err.tokens_left,
                context_size=err.context_size,
                info=err.info_str,
            )
        )
    elif isinstance(err, FailedPreconditionError):
        metadata["subject"] = err.subject
        details.append(
            error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(
                        type="SETUP", subject=err.subject, description=err.message
                    )
                ]
            )
        )
    elif isinstance(err, ResourceExhaustedError) and err.required_bytes:
        metadata.update(required_bytes=str(err.required_bytes), available_bytes=str(err.available_bytes))
    if err.retry_after_s > 0:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(err.retry_after_s * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    details.insert(0, error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=metadata))
    details.append(error_details_pb2.RequestInfo(request_id=request_id))
    return details


def to_status_message(err: ClemserveError, request_id: str, redactor: Redactor | None = None) -> status_pb2.Status:
    """``err`` as a google.rpc.Status: its code, its message and details, with secrets scrubbed."""
    message = err.message
    if isinstance(err, InternalError):
        message = f"internal error (request id {request_id}); the server log has the detail"
    status = status_pb2.Status(
        code=getattr(code_pb2, err.code),
        message=message,
        details=[_pack(d) for d in _details(err, request_id)],
    )
    if redactor:
        _redact_status(status, redactor)
    return status


def to_row_error(err: ClemserveError, request_id: str, redactor: Redactor | None = None) -> clemserve_pb2.RowError:
    """A GenerateBatch row's error: the same status a Generate call would have failed with."""
    status = to_status_message(err, request_id, redactor)
    return clemserve_pb2.RowError(code=status.code, message=status.message, details=status.details)


def to_grpc_status(err: ClemserveError, request_id: str, redactor: Redactor | None = None) -> grpc.Status:
    """A gRPC status for ``err``: its code, its message and google.rpc details, with secrets scrubbed."""
    grpc_status = rpc_status.to_status(to_status_message(err, request_id, redactor))
    # the server decided this status: a client retry policy must not send the call again (gRPC pushback)
    return _Status(grpc_status.code, grpc_status.details, (*grpc_status.trailing_metadata, (_PUSHBACK, "-1")))


_PUSHBACK = "grpc-retry-pushback-ms"


class _Status(grpc.Status):  # type: ignore[misc]  # grpc ships no type hints
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple[tuple[str, Any], ...]) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


def _redact_status(status: status_pb2.Status, redactor: Redactor) -> None:
    """Every text an error carries, its details included, passes through the redactor."""
    status.message = redactor.redact(status.message)
    for packed in status.details:
        for cls in _DETAIL_TYPES:
            if packed.Is(cls.DESCRIPTOR):
                detail = cls()
                packed.Unpack(detail)
                _redact_strings(detail, redactor)
                packed.Pack(detail)


def _redact_strings(message: Any, redactor: Redactor) -> None:
    for descriptor, value in message.ListFields():
        if descriptor.type == descriptor.TYPE_STRING and not _is_repeated(descriptor):
            setattr(message, descriptor.name, redactor.redact(value))
        elif descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            for k in list(value):
                if isinstance(value[k], str):
                    value[k] = redactor.redact(value[k])
        elif descriptor.type == descriptor.TYPE_MESSAGE:
            for item in value if _is_repeated(descriptor) else [value]:
                _redact_strings(item, redactor)


def _is_repeated(descriptor: Any) -> bool:
    return bool(descriptor.is_repeated)


def as_clemserve_error(exc: BaseException, request_id: str) -> ClemserveError:
    """Known errors pass through; anything else is logged with its traceback and becomes INTERNAL."""
    if isinstance(exc, ClemserveError):
        return exc
    if isinstance(exc, MemoryError):
        return ResourceExhaustedError("out of memory while serving this request", request_id=request_id)
    log.error("unexpected failure", exc_info=exc)
    return InternalError("internal error", request_id=request_id)
