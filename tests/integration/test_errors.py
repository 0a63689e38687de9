"""Each error through the real channel: status code, structured details, the field named, and the
server still serving afterwards."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from clemserve.v1 import clemserve_pb2 as pb
from clemserve.v1 import clemserve_pb2_grpc as pb_grpc

USER = [{"role": "user", "content": "hi"}]
DETAIL_TYPES = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.RequestInfo,
    error_details_pb2.ResourceInfo,
    error_details_pb2.PreconditionFailure,
    pb.ContextLimit,
)


def raw_error(address: str, request: pb.GenerateRequest) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.ModelServiceStub(channel).Generate(request)
    return caught.value


def details(err: grpc.RpcError) -> list[Any]:
    blob = dict(err.trailing_metadata())["grpc-status-details-bin"]
    found = []
    for detail in status_pb2.Status.FromString(blob).details:
        for cls in DETAIL_TYPES:
            if detail.Is(cls.DESCRIPTOR):
                message = cls()
                detail.Unpack(message)
                found.append(message)
    return found


@pytest.mark.parametrize(
    ("messages", "args", "field"),
    [
        ([], {}, "messages"),
        ([{"role": "robot", "content": "x"}], {}, "messages[0].role"),
        ([{"role": "user", "content": 42}], {}, "messages[0].content"),
        ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], {}, "messages[1].role"),
        (USER, {"max_tokens": -1}, "args.max_tokens"),
        (USER, {"max_tokens": 0}, "args.max_tokens"),
        (USER, {"temperature": -0.1}, "args.temperature"),
        (USER, {"temperature": 2.5}, "args.temperature"),
        (USER, {"temperature": float("nan")}, "args.temperature"),
        (USER, {"top_p": 0.9}, "args.top_p"),
    ],
)
def test_invalid_argument_names_the_field(client: Any, messages: Any, args: Any, field: str) -> None:
    model = client.get_model_for("tiny-llama")
    model.set_gen_args(**{"temperature": 0.0, "max_tokens": 8, **args})
    with pytest.raises(client.InvalidArgumentError) as caught:
        model.generate_response(messages)
    assert isinstance(caught.value, ValueError)  # clembench raises ValueError here
    assert caught.value.field == field
    assert caught.value.code == "INVALID_ARGUMENT"
    # and the server goes on serving
    model.set_gen_args(temperature=0.0, max_tokens=4)
    assert isinstance(model.generate_response(USER)[2], str)


def test_invalid_argument_status_details_on_the_wire(server: Any) -> None:
    err = raw_error(
        server.address,
        pb.GenerateRequest(model=pb.ModelSelector(name="echo"), messages=[pb.Message(role="bot", content="x")]),
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = details(err)
    bad = next(d for d in found if isinstance(d, error_details_pb2.BadRequest))
    assert bad.field_violations[0].field == "messages[0].role"
    info = next(d for d in found if isinstance(d, error_details_pb2.ErrorInfo))
    assert info.domain == "clemserve.dev" and info.metadata["field"] == "messages[0].role"
    assert next(d for d in found if isinstance(d, error_details_pb2.RequestInfo)).request_id


def test_missing_selector_and_bad_spec_json(server: Any) -> None:
    err = raw_error(server.address, pb.GenerateRequest(messages=[pb.Message(role="user", content="x")]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "model" in err.details()
    err = raw_error(
        server.address,
        pb.GenerateRequest(
            model=pb.ModelSelector(spec=pb.ModelSpec(json="{not json")),
            messages=[pb.Message(role="user", content="x")],
        ),
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "model.spec.json" in err.details()


def test_context_limit_detail_on_the_wire(server: Any) -> None:
    err = raw_error(
        server.address,
        pb.GenerateRequest(
            model=pb.ModelSelector(name="echo-small"),
            messages=[pb.Message(role="user", content="one two three")],
            args=pb.GenerationArgs(max_tokens=100),
        ),
    )
    assert err.code() == grpc.StatusCode.OUT_OF_RANGE
    limit = next(d for d in details(err) if isinstance(d, pb.ContextLimit))
    assert (limit.tokens_used, limit.context_size) == (104, 64)
    assert limit.tokens_left == 64 - 104
    assert limit.info == "Context token limit for echo-small exceeded"


def test_not_found_is_a_value_error_with_the_selector(client: Any) -> None:
    with pytest.raises(client.ModelNotFoundError) as caught:
        client.get_model_for("no-such-model")
    assert isinstance(caught.value, ValueError)
    assert str(caught.value) == (
        'No model spec unifies with model selector={"model_name":"no-such-model"} (see `clemserve models`)'
    )
    assert caught.value.selector == '{"model_name":"no-such-model"}'
    # a narrowing selector that contradicts every entry is NOT_FOUND too
    with pytest.raises(client.ModelNotFoundError):
        client.get_model_for({"model_name": "echo", "backend": "huggingface_local"})


def test_missing_weights_is_failed_precondition_and_nothing_stays_loaded(client: Any) -> None:
    model = client.get_model_for("tiny-llama-no-weights")
    with pytest.raises(client.FailedPreconditionError) as caught:
        model.generate_response(USER)
    assert "tiny-llama-no-weights" in str(caught.value)
    status = next(s for s in client.list_models() if s.name == "tiny-llama-no-weights")
    assert status.state == "failed" and "cannot load" in status.state_reason


def test_model_larger_than_memory_is_resource_exhausted(client: Any) -> None:
    model = client.get_model_for("tiny-llama-too-big")
    with pytest.raises(client.ResourceExhaustedError) as caught:
        model.generate_response(USER)
    err = caught.value
    assert err.required_bytes > 2**40 > err.available_bytes > 0
    assert "GiB" in str(err) and "available" in str(err)
    assert model.model_spec["model_name"] in str(err)


def test_backend_not_served_here_is_failed_precondition(client: Any) -> None:
    model = client.get_model_for("gpt-3.5-turbo-0125")
    with pytest.raises(client.FailedPreconditionError) as caught:
        model.generate_response(USER)
    assert "openai" in str(caught.value)


def test_human_players_are_not_served(server: Any) -> None:
    err = raw_error(
        server.address,
        pb.GenerateRequest(model=pb.ModelSelector(name="human"), messages=[pb.Message(role="user", content="x")]),
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "human" in err.details()


def test_unreachable_server_is_unavailable(client: Any) -> None:
    from tests.serving import free_port

    with pytest.raises(client.UnavailableError) as caught:
        client.get_model_for("echo", address=f"127.0.0.1:{free_port()}", timeout=5)
    assert "cannot reach clemserve" in str(caught.value)
