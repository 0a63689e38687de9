"""The model on the wire where proxies read it: every call that names a model carries ``clemserve-model``
metadata, ASCII-safe, for every way the client makes it (blocking and asyncio models, leases, admin calls).

The client talks to an in-process gRPC stand-in that records each call's metadata, so that what is checked is
what gRPC put on the wire (a header value gRPC refuses would fail the call)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from clemserve.client import admin, calls, channel
from clemserve.registry import ModelSpec
from clemserve.v1 import clemserve_pb2 as pb
from clemserve.v1 import clemserve_pb2_grpc as pb_grpc

#: printable ASCII travels as it is; "%", space and what is not ASCII are percent-encoded (UTF-8)
NAMES = {
    "tiny-llama": "tiny-llama",
    "org/Model-7B_v0.1:q4~x": "org/Model-7B_v0.1:q4~x",
    "Löwe 7b 100%": "L%C3%B6we%207b%20100%25",
}
REPLY = pb.GenerateResponse(prompt_json="{}", response_json="{}", response_text="hi")
MESSAGES = [{"role": "user", "content": "hello"}]


class Recorder(pb_grpc.ModelServiceServicer):
    """Answers every RPC with a canned reply and records (method, clemserve-model value or None)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def _seen(self, method: str, context: grpc.ServicerContext) -> None:
        self.calls.append((method, dict(context.invocation_metadata()).get(calls.MODEL_HEADER)))

    def ResolveModel(self, request: pb.ResolveModelRequest, context: grpc.ServicerContext) -> Any:
        self._seen("ResolveModel", context)
        spec = ModelSpec(model_name=request.model.name, backend="echo")
        return pb.ResolveModelResponse(model_spec=pb.ModelSpec(json=spec.to_string()))

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Any:
        self._seen("Generate", context)
        return REPLY

    def GenerateBatch(self, request: pb.GenerateBatchRequest, context: grpc.ServicerContext) -> Any:
        self._seen("GenerateBatch", context)
        return pb.GenerateBatchResponse(results=[pb.BatchResult(response=REPLY) for _ in request.conversations])

    def GenerateStream(self, request: pb.GenerateStreamRequest, context: grpc.ServicerContext) -> Any:
        self._seen("GenerateStream", context)
        yield pb.GenerateStreamResponse(reply=REPLY)

    def CountTokens(self, request: pb.CountTokensRequest, context: grpc.ServicerContext) -> Any:
        self._seen("CountTokens", context)
        return pb.CountTokensResponse(prompt_tokens=3, context_size=64)

    def LeaseModel(self, request: pb.LeaseModelRequest, context: grpc.ServicerContext) -> Any:
        self._seen("LeaseModel", context)
        yield pb.LeaseModelResponse(lease_id="l1", expires_in_seconds=300)
        while context.is_active():
            time.sleep(0.01)

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> Any:
        self._seen("ListModels", context)
        return pb.ListModelsResponse()

    def LoadModel(self, request: pb.LoadModelRequest, context: grpc.ServicerContext) -> Any:
        self._seen("LoadModel", context)
        spec = ModelSpec(model_name=request.model.name, backend="echo")
        return pb.LoadModelResponse(status=pb.ModelStatus(model_spec=pb.ModelSpec(json=spec.to_string())))

    def UnloadModel(self, request: pb.UnloadModelRequest, context: grpc.ServicerContext) -> Any:
        self._seen("UnloadModel", context)
        return pb.UnloadModelResponse(was_loaded=True)


@pytest.fixture(scope="module")
def stand_in() -> Iterator[tuple[Recorder, str]]:
    recorder = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_ModelServiceServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel.close_all()  # a cached channel to an earlier module's server on this port would be backing off
    yield recorder, f"127.0.0.1:{port}"
    server.stop(0)
    channel.close_all()


def test_the_header_is_the_name_ascii_safe() -> None:
    assert {name: calls.encode_model_name(name) for name in NAMES} == NAMES
    spec = ModelSpec(model_name="Löwe 7b 100%", backend="echo")
    request = pb.GenerateRequest(model=pb.ModelSelector(spec=pb.ModelSpec(json=spec.to_string())))
    assert calls.model_metadata(request) == ((calls.MODEL_HEADER, NAMES["Löwe 7b 100%"]),)
    assert calls.model_metadata(pb.GenerateRequest(model=pb.ModelSelector(name="m"))) == ((calls.MODEL_HEADER, "m"),)
    # no model named, a spec without a name or one that is not JSON: no header (the server answers the body)
    assert calls.model_metadata(pb.ListModelsRequest()) == ()
    assert calls.model_metadata(pb.GenerateRequest()) == ()
    assert calls.model_metadata(pb.GenerateRequest(model=pb.ModelSelector(spec=pb.ModelSpec(json="{")))) == ()
    assert calls.model_metadata(pb.LoadModelRequest(model=pb.ModelSelector(spec=pb.ModelSpec(json="[]")))) == ()


@pytest.mark.parametrize("name", sorted(NAMES))
def test_every_call_that_names_a_model_carries_it(stand_in: tuple[Recorder, str], name: str) -> None:
    import clemserve.client as backends

    recorder, address = stand_in
    recorder.calls.clear()
    with backends.get_model_for(name, address=address, timeout=10) as model:
        model.generate_response(MESSAGES)
        list(model.generate_stream(MESSAGES))
        model.generate_batch_response([MESSAGES, MESSAGES])
        model.count_tokens(MESSAGES)

    async def play() -> None:
        async with await backends.get_async_model_for(name, address=address, timeout=10) as model:
            await model.generate_response(MESSAGES)
            [event async for event in model.generate_stream(MESSAGES)]
            await model.generate_batch_response([MESSAGES])
            await model.count_tokens(MESSAGES)

    asyncio.run(play())
    admin.preload(name, address=address, timeout=10)
    admin.unload(name, address=address, timeout=10)
    admin.list_models(address=address, timeout=10)
    named = ["ResolveModel", "LeaseModel", "Generate", "GenerateStream", "GenerateBatch", "CountTokens"]
    assert recorder.calls == [
        *((method, NAMES[name]) for method in named * 2),
        ("LoadModel", NAMES[name]),
        ("UnloadModel", NAMES[name]),
        ("ListModels", None),  # it names no model: a gateway sends it to its default route
    ]
