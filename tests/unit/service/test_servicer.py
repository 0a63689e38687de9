"""The servicer's shape: every RPC of the proto is implemented, and served through the shared wrapper."""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
import json
from pathlib import Path

import grpc
import pytest

from clemserve.registry import KeyRegistry, ModelRegistry, ModelSpec
from clemserve.service.backends import BackendContext
from clemserve.service.model_cache import ModelCache
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
    servicer = ModelServicer(ModelCache(registry, context))

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


class _Aborted(Exception):
    pass


class _Context:
    """What the servicer reads of a grpc.aio context; abort raises, as grpc's does."""

    def __init__(self, *metadata: tuple[str, str]) -> None:
        self.metadata = metadata
        self.aborted: tuple[object, str] | None = None

    def time_remaining(self) -> None:
        return None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    async def abort(self, code: object, details: str, trailing_metadata: object = None) -> None:
        self.aborted = (code, details)
        raise _Aborted(details)


def test_every_call_gets_its_request_id_and_leaves_the_drain_whether_it_succeeds_or_fails(tmp_path: Path) -> None:
    """The serving path every RPC shares: the request id from the metadata (its last value) on the reply, an
    invalid one refused naming request_id, and the drain's count of calls in flight back at zero each time."""
    from clemserve.service.draining import Drain
    from clemserve.service.draining import current as current_drain

    registry = ModelRegistry([ModelSpec.from_dict({"model_name": "e", "backend": "echo", "model_config": {}})])
    context = BackendContext(keys=KeyRegistry(tmp_path / "key.json"), cache_dir=tmp_path)
    manager = ModelCache(registry, context)
    servicer = ModelServicer(manager)
    request = pb.GenerateRequest(
        model=pb.ModelSelector(name="e"), messages=[pb.Message(role="user", content="hello there")]
    )

    async def run() -> tuple[pb.GenerateResponse, _Context, _Context, int]:
        drain = Drain()
        current_drain.set(drain)
        given = _Context(("x-request-id", "first"), ("x-request-id", "rid-7"))
        ok = await servicer.Generate(request, given)  # type: ignore[arg-type]
        refused = _Context(("x-request-id", "bad\nid"))
        with pytest.raises(_Aborted):
            await servicer.Generate(request, refused)  # type: ignore[arg-type]
        empty = _Context()
        no_messages = pb.GenerateRequest(model=pb.ModelSelector(name="e"))
        with pytest.raises(_Aborted):
            await servicer.Generate(no_messages, empty)  # type: ignore[arg-type]
        await manager.shutdown()
        return ok, refused, empty, len(drain)

    ok, refused, empty, in_flight = asyncio.run(run())
    assert (ok.response_text, ok.request_id) == ("hello there", "rid-7")
    assert refused.aborted is not None and refused.aborted[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in refused.aborted[1]
    assert empty.aborted is not None and empty.aborted[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages" in empty.aborted[1]
    assert in_flight == 0
