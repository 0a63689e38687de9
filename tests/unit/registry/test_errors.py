"""clemserve's error types: the code each travels as, clembench's ValueError compatibility, the messages and the
facts each carries."""

from __future__ import annotations

import grpc
import pytest

from clemserve.registry import errors


def test_every_code_names_a_grpc_status_and_maps_back_to_its_class() -> None:
    grpc_codes = {code.name for code in grpc.StatusCode}
    for code, cls in errors.ERRORS_BY_CODE.items():
        assert cls.code == code and code in grpc_codes, cls
        assert issubclass(cls, errors.ClemserveError)
    # the shutdown twin travels as UNAVAILABLE and is told apart by its reason, not by its code
    assert errors.ERRORS_BY_CODE["UNAVAILABLE"] is errors.UnavailableError
    assert issubclass(errors.ShuttingDownError, errors.UnavailableError)
    assert errors.ShuttingDownError.reason == "SHUTTING_DOWN" != errors.UnavailableError.reason


def test_the_errors_clembench_raises_as_value_error_are_value_errors() -> None:
    assert isinstance(errors.ModelNotFoundError("no such model"), ValueError)
    assert isinstance(errors.InvalidArgumentError("temperature", "must be >= 0"), ValueError)
    for cls in (errors.FailedPreconditionError, errors.ResourceExhaustedError, errors.UnavailableError):
        assert not isinstance(cls("x"), ValueError), cls


def test_the_base_keeps_its_facts_as_given_and_copies_the_metadata() -> None:
    facts = {"upstream_status": "503"}
    err = errors.UnavailableError("provider down", request_id="rid-3", metadata=facts, retry_after_s=2.5)
    facts["upstream_status"] = "changed"
    assert (str(err), err.message, err.request_id) == ("provider down", "provider down", "rid-3")
    assert err.retry_after_s == 2.5
    assert err.metadata == {"upstream_status": "503"}
    assert errors.UnavailableError("x").metadata == {} and errors.UnavailableError("x").retry_after_s == 0.0


def test_invalid_argument_names_the_field_before_the_description() -> None:
    err = errors.InvalidArgumentError("messages[2].role", "must be user, assistant or system")
    assert str(err) == "messages[2].role: must be user, assistant or system"
    assert (err.field, err.description) == ("messages[2].role", "must be user, assistant or system")
    assert str(errors.InvalidArgumentError("", "no field to name")) == "no field to name"


def test_context_exceeded_reads_as_clembenchs() -> None:
    err = errors.ContextExceededError("Context token limit for m exceeded", 612, -100, 512, request_id="r")
    assert str(err) == "Context token limit for m exceeded 612/512"
    assert (err.info_str, err.tokens_used, err.tokens_left, err.context_size) == (
        "Context token limit for m exceeded", 612, -100, 512,
    )  # fmt: skip
    assert (err.code, err.reason, err.request_id) == ("OUT_OF_RANGE", "CONTEXT_EXCEEDED", "r")
    assert str(errors.ContextExceededError()) == "Context limit exceeded 0/0"


def test_resource_exhausted_carries_the_bytes_and_the_retry_delay() -> None:
    err = errors.ResourceExhaustedError("too big", required_bytes=10, available_bytes=4, retry_after_s=1.5)
    assert (err.required_bytes, err.available_bytes, err.retry_after_s) == (10, 4, 1.5)
    assert err.metadata == {}


@pytest.mark.parametrize(
    ("err", "attr", "value"),
    [
        (errors.ModelNotFoundError("none", selector='{"model_name":"x"}'), "selector", '{"model_name":"x"}'),
        (errors.FailedPreconditionError("install it", subject="pip install x"), "subject", "pip install x"),
    ],
)
def test_the_fact_each_error_names(err: errors.ClemserveError, attr: str, value: str) -> None:
    assert getattr(err, attr) == value
    assert str(err) == err.message


def test_a_server_error_takes_the_code_it_came_with() -> None:
    err = errors.ServerError("UNIMPLEMENTED", "no such method", request_id="r9")
    assert (err.code, err.reason, err.request_id) == ("UNIMPLEMENTED", "UNIMPLEMENTED", "r9")
    assert str(err) == "no such method"
    assert errors.ServerError("UNKNOWN", "m", reason="WHY").reason == "WHY"
    assert errors.ClemserveError.code == "UNKNOWN"  # the class attribute is left alone
