"""The ``clemserve-model`` metadata must name the model of the request body; calls without it pass."""

from __future__ import annotations

import pytest

from clemserve.client.calls import MODEL_HEADER, encode_model_name
from clemserve.registry import ModelSpec
from clemserve.registry.errors import InvalidArgumentError
from clemserve.service.model_header import HEADER, check_model_header
from clemserve.service.validation import DEFAULT_LIMITS
from clemserve.v1 import clemserve_pb2 as pb


def by_name(name: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(model=pb.ModelSelector(name=name))


def by_spec(name: str) -> pb.LeaseModelRequest:
    spec = ModelSpec(model_name=name, backend="echo")
    return pb.LeaseModelRequest(model=pb.ModelSelector(spec=pb.ModelSpec(json=spec.to_string())))


def check(request: object, *metadata: tuple[str, str]) -> None:
    check_model_header(request, (("x-request-id", "r1"), *metadata), DEFAULT_LIMITS)


def test_client_and_server_agree_on_the_header() -> None:
    assert HEADER == MODEL_HEADER


@pytest.mark.parametrize("name", ["tiny-llama", "org/Model-7B:q4", "Löwe 7b 100%"])
def test_a_header_naming_the_body_s_model_passes(name: str) -> None:
    check(by_name(name), (HEADER, encode_model_name(name)))
    check(by_spec(name), (HEADER, encode_model_name(name)))


def test_a_call_without_the_header_passes() -> None:
    check(by_name("tiny-llama"))
    check(by_spec("tiny-llama"))


def test_a_header_naming_another_model_is_refused_naming_both() -> None:
    with pytest.raises(InvalidArgumentError) as raised:
        check(by_spec("model-b"), (HEADER, "model-a"))
    assert raised.value.field == HEADER
    assert "'model-a'" in str(raised.value) and "'model-b'" in str(raised.value) and "model field" in str(raised.value)
    with pytest.raises(InvalidArgumentError):
        check(by_name("Löwe"), (HEADER, "L%C3%B6we%20"))  # decoded, it is "Löwe ": not the same name


def test_a_header_that_does_not_decode_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="percent-encoded UTF-8"):
        check(by_name("x"), (HEADER, "%FF"))


def test_requests_that_name_no_model_ignore_it() -> None:
    check(pb.ListModelsRequest(), (HEADER, "anything"))


def test_the_body_is_checked_as_the_rpc_would_check_it() -> None:
    """A header beside a body without a model: the body's own error, as the RPC would give it."""
    with pytest.raises(InvalidArgumentError) as raised:
        check(pb.GenerateRequest(), (HEADER, "m"))
    assert raised.value.field == "model"
