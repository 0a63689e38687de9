"""The servicer's shape: every RPC of the proto is implemented, and served through the shared wrapper."""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
import json
from pathlib import Path

from clemserve.registry import KeyRegistry, ModelRegistry, ModelSpec
from clemserve.service.backends import BackendContext
from clemserve.service.model_cache import ModelManager
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


def test_resolve_tells_provenance_only_when_asked(tmp_path: Path) -> None:
    """A game's every start resolves its model: that must not wait for weights to be hashed."""
    registry = ModelRegistry([ModelSpec.from_dict({"model_name": "e", "backend": "echo", "model_config": {}})])
    context = BackendContext(keys=KeyRegistry(tmp_path / "key.json"), cache_dir=tmp_path)
    servicer = ModelServicer(ModelManager(registry, context))

    class Context:
        def time_remaining(self) -> None:
            return None

        def invocation_metadata(self) -> tuple[()]:
            return ()

    async def resolve(describe: bool) -> pb.ResolveModelResponse:
        request = pb.ResolveModelRequest(model=pb.ModelSelector(name="e"), describe=describe)
        return await servicer.ResolveModel(request, Context())  # type: ignore[arg-type]

    plain, described = asyncio.run(resolve(False)), asyncio.run(resolve(True))
    assert json.loads(plain.model_spec.json)["model_name"] == "e" and plain.server_version == ""
    assert described.model_spec == plain.model_spec
    assert described.server_version == importlib.metadata.version("clemserve")
