"""The servicer's shape: every RPC of the proto is implemented, and served through the shared wrapper."""

from __future__ import annotations

import inspect

from clemserve.service.servicer import SERVED, ModelServicer
from clemserve.v1 import clemserve_pb2 as pb
from clemserve.v1 import clemserve_pb2_grpc as pb_grpc

RPCS = [method.name for method in pb.DESCRIPTOR.services_by_name["ModelService"].methods]


def test_every_rpc_is_implemented_and_served_through_the_shared_wrapper() -> None:
    assert "Generate" in RPCS and "LeaseModel" in RPCS
    for name in RPCS:
        handler = getattr(ModelServicer, name)
        assert handler is not getattr(pb_grpc.ModelServiceServicer, name), f"{name} is not implemented"
        assert getattr(handler, SERVED, False), f"{name} is not wrapped by rpc or stream_rpc"


def test_streaming_rpcs_have_the_streaming_wrapper() -> None:
    """A server-streaming RPC needs stream_rpc (an async generator); a unary one needs rpc."""
    for method in pb.DESCRIPTOR.services_by_name["ModelService"].methods:
        handler = getattr(ModelServicer, method.name)
        streaming = method.server_streaming
        assert inspect.isasyncgenfunction(handler) == streaming, method.name
        assert inspect.iscoroutinefunction(handler) == (not streaming), method.name


def test_the_servicer_has_no_public_method_beyond_the_rpcs() -> None:
    """What the servicer does beyond an RPC belongs to the model cache or the conversions."""
    public = {name for name, _ in inspect.getmembers(ModelServicer, inspect.isfunction) if not name.startswith("_")}
    assert public <= set(RPCS), sorted(public - set(RPCS))
