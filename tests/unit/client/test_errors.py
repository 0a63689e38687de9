"""Server errors -> gRPC status with details -> the client's exceptions, without a network in between."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from clemserve.client.errors import error_from_rpc
from clemserve.registry import errors
from clemserve.service.status import as_clemserve_error, to_grpc_status
from tests.unit.client.rpc import FakeRpcError


def round_trip(err: errors.ClemserveError, request_id: str = "rid-1") -> errors.ClemserveError:
    return error_from_rpc(FakeRpcError(to_grpc_status(err, request_id)))


def test_context_error_keeps_clembench_message_and_numbers() -> None:
    back = round_trip(errors.ContextExceededError("Context token limit for m exceeded", 612, -100, 512))
    assert isinstance(back, errors.ContextExceededError)
    assert (back.tokens_used, back.tokens_left, back.context_size) == (612, -100, 512)
    assert str(back) == "Context token limit for m exceeded 612/512"
    assert back.request_id == "rid-1"


@pytest.mark.parametrize(
    ("err", "attrs"),
    [
        (errors.InvalidArgumentError("messages[0].role", "bad role"), {"field": "messages[0].role"}),
        (
            errors.ModelNotFoundError("no model", selector='{"model_name":"x"}'),
            {"selector": '{"model_name":"x"}'},
        ),
        (errors.FailedPreconditionError("install it", subject="pip install x"), {"subject": "pip install x"}),
        (
            errors.ResourceExhaustedError("too big", required_bytes=10, available_bytes=5, retry_after_s=1.5),
            {"required_bytes": 10, "available_bytes": 5, "retry_after_s": 1.5},
        ),
        (errors.UnavailableError("down"), {}),
        (errors.PermissionDeniedError("no"), {}),
    ],
)
def test_each_error_comes_back_as_its_class(err: errors.ClemserveError, attrs: dict[str, Any]) -> None:
    back = round_trip(err)
    assert type(back) is type(err) and back.code == err.code
    assert str(back) == str(err)
    for name, value in attrs.items():
        assert getattr(back, name) == value


def test_value_error_compatibility() -> None:
    assert isinstance(round_trip(errors.ModelNotFoundError("x")), ValueError)
    assert isinstance(round_trip(errors.InvalidArgumentError("f", "x")), ValueError)


def test_unexpected_failures_become_internal_without_detail(caplog: pytest.LogCaptureFixture) -> None:
    err = as_clemserve_error(RuntimeError("secret detail sk-abcdef"), "rid-9")
    status = to_grpc_status(err, "rid-9")
    assert status.code == grpc.StatusCode.INTERNAL
    assert "secret" not in status.details and "rid-9" in status.details
    assert "secret detail" in caplog.text  # the detail goes to the server log
    back = error_from_rpc(FakeRpcError(status))
    assert isinstance(back, errors.InternalError) and back.request_id == "rid-9"


def test_status_without_details_still_maps() -> None:
    plain = grpc.Status()  # type: ignore[call-arg]
    plain.code, plain.details, plain.trailing_metadata = grpc.StatusCode.UNIMPLEMENTED, "nope", ()
    back = error_from_rpc(FakeRpcError(plain))
    assert isinstance(back, errors.ServerError) and back.code == "UNIMPLEMENTED"
