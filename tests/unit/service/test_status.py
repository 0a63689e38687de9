"""Errors as gRPC statuses: the details each carries, rows' errors, redaction, and unexpected failures as INTERNAL."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

from clemserve.registry import errors
from clemserve.service.security.redaction import Redactor
from clemserve.service.status import DOMAIN, as_clemserve_error, to_grpc_status, to_row_error, to_status_message
from clemserve.v1 import clemserve_pb2

KEY = "sk-test-4f9a2b7c1d8e6f0a"


def test_error_statuses_are_scrubbed() -> None:
    err = errors.FailedPreconditionError(f"refused key {KEY}", subject=f"key.json: {KEY}")
    err.metadata["upstream"] = KEY
    status = to_grpc_status(err, "rid", Redactor([KEY]))
    assert KEY[:8] not in status.details
    for _, value in status.trailing_metadata:
        assert KEY[:8].encode() not in (value if isinstance(value, bytes) else value.encode())


def unpacked(status: status_pb2.Status) -> dict[str, Any]:
    """The status's details by their message type's name."""
    found: dict[str, Any] = {}
    for packed in status.details:
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.ResourceInfo,
            error_details_pb2.PreconditionFailure,
            error_details_pb2.RetryInfo,
            error_details_pb2.RequestInfo,
            clemserve_pb2.ContextLimit,
        ):
            if packed.Is(kind.DESCRIPTOR):
                message = kind()
                packed.Unpack(message)
                found[kind.DESCRIPTOR.name] = message
    assert len(found) == len(status.details), "a detail of an unexpected type"
    return found


def test_every_status_carries_its_reason_and_the_request_id_first_and_last() -> None:
    status = to_status_message(errors.UnavailableError("down", metadata={"provider": "X"}), "rid-7")
    assert (status.code, status.message) == (code_pb2.UNAVAILABLE, "down")
    details = unpacked(status)
    info = details["ErrorInfo"]
    assert (info.reason, info.domain, dict(info.metadata)) == ("UNAVAILABLE", DOMAIN, {"provider": "X"})
    assert details["RequestInfo"].request_id == "rid-7"
    assert status.details[0].Is(error_details_pb2.ErrorInfo.DESCRIPTOR)
    assert status.details[-1].Is(error_details_pb2.RequestInfo.DESCRIPTOR)
    assert "RetryInfo" not in details


def test_each_error_carries_the_detail_that_names_its_cause() -> None:
    bad = unpacked(to_status_message(errors.InvalidArgumentError("messages[1].role", "bad role"), "r"))
    (violation,) = bad["BadRequest"].field_violations
    assert (violation.field, violation.description) == ("messages[1].role", "bad role")
    assert bad["ErrorInfo"].metadata["field"] == "messages[1].role"

    missing = unpacked(to_status_message(errors.ModelNotFoundError("no model x", selector="x"), "r"))
    assert (missing["ResourceInfo"].resource_type, missing["ResourceInfo"].resource_name) == ("model", "x")

    context = unpacked(to_status_message(errors.ContextExceededError("too long", 600, -88, 512), "r"))
    limit = context["ContextLimit"]
    assert (limit.tokens_used, limit.tokens_left, limit.context_size, limit.info) == (600, -88, 512, "too long")
    assert context["ErrorInfo"].metadata["context_size"] == "512"

    setup = unpacked(to_status_message(errors.FailedPreconditionError("install", subject="pip install x"), "r"))
    assert setup["PreconditionFailure"].violations[0].subject == "pip install x"

    memory = errors.ResourceExhaustedError("too big", required_bytes=10, available_bytes=4, retry_after_s=1.5)
    full = unpacked(to_status_message(memory, "r"))
    assert dict(full["ErrorInfo"].metadata) == {"required_bytes": "10", "available_bytes": "4"}
    assert full["RetryInfo"].retry_delay.ToNanoseconds() == 1_500_000_000


def test_an_internal_error_says_only_where_the_detail_is() -> None:
    status = to_status_message(errors.InternalError("KeyError: 'secret' in line 3"), "rid-9")
    assert status.code == code_pb2.INTERNAL
    assert status.message == "internal error (request id rid-9); the server log has the detail"


def test_a_rows_error_is_the_status_generate_would_have_failed_with() -> None:
    err = errors.InvalidArgumentError("max_tokens", f"not with {KEY}")
    row = to_row_error(err, "rid-2", Redactor([KEY]))
    status = to_status_message(err, "rid-2", Redactor([KEY]))
    assert (row.code, row.message, list(row.details)) == (status.code, status.message, list(status.details))
    assert row.code == code_pb2.INVALID_ARGUMENT and KEY[:8] not in row.message


def test_the_grpc_status_tells_client_retry_policies_not_to_retry() -> None:
    status = to_grpc_status(errors.UnavailableError("down"), "r")
    assert status.code == grpc.StatusCode.UNAVAILABLE and status.details == "down"
    assert ("grpc-retry-pushback-ms", "-1") in status.trailing_metadata


def test_unknown_failures_become_internal_and_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    known = errors.ModelNotFoundError("x")
    assert as_clemserve_error(known, "r") is known
    memory = as_clemserve_error(MemoryError(), "r1")
    assert isinstance(memory, errors.ResourceExhaustedError) and memory.request_id == "r1"
    with caplog.at_level(logging.ERROR):
        internal = as_clemserve_error(ZeroDivisionError("division by zero"), "r2")
    assert isinstance(internal, errors.InternalError) and internal.request_id == "r2"
    assert "ZeroDivisionError" in caplog.text  # the traceback goes to the server log
