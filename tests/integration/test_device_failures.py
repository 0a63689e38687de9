"""A failure of the GPU under a real ``huggingface_local`` model, through the real server and client.

A CUDA error (a device-side assert, an illegal memory access) poisons the CUDA context: the model is
dropped (NOT_SERVING, unloaded), the call gets UNAVAILABLE and the next request loads it again. Out of
memory fails only its call. Neither can be caused on a CPU, so the server process is started with a
``sitecustomize`` that makes the backend's generation raise torch's own errors when a message asks for
one; the translation above it (service/backends/placement.py, the model cache) is the server's own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import clemserve.client as backends
from tests.serving import ServerProcess, hf_entry, start_server

NAME = "tiny-llama-gpu-faults"
HELLO = [{"role": "user", "content": "Hello! How can I help you?"}]

#: runs at the server's start; wraps the backend's generation to raise torch's errors on request
INJECT = """
import torch

from clemserve.service.backends import huggingface_local

_generate = huggingface_local.HuggingfaceLocalBackend._generate_blocking


def _failing(self, rows, args, ended):
    text = " ".join(str(m["content"]) for row in rows for m in row.messages)
    if "INJECT-CUDA-ERROR" in text:
        raise torch.AcceleratorError(
            "CUDA error: an illegal memory access was encountered\\n"
            "CUDA kernel errors might be asynchronously reported at some other API call"
        )
    if "INJECT-OOM" in text:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    return _generate(self, rows, args, ended)


huggingface_local.HuggingfaceLocalBackend._generate_blocking = _failing

_load = huggingface_local.HuggingfaceLocalBackend._load_blocking


def _failing_load(self, config, progress):
    import os

    if os.path.exists(os.environ["INJECT_LOAD_FAILURE"]):  # the CUDA context stays broken: loads fail too
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    return _load(self, config, progress)


huggingface_local.HuggingfaceLocalBackend._load_blocking = _failing_load
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("device-failures")
    inject = folder / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(INJECT)
    registry = folder / "registry.json"
    registry.write_text(json.dumps([hf_entry(NAME, tiny_model_dir)]))
    path = os.pathsep.join(p for p in (str(inject), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path, "INJECT_LOAD_FAILURE": str(folder / "broken")}
    proc = start_server(folder, "--registry", str(registry), env=env)
    yield proc
    assert proc.stop() == 0, proc.log()


def health(server: ServerProcess, service: str = f"clemserve.v1.ModelService/{NAME}") -> int:
    with grpc.insecure_channel(server.address) as channel:
        return int(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service)).status)


def model(server: ServerProcess) -> backends.Model:
    found = backends.get_model_for(NAME, address=server.address, lease=False)
    found.set_gen_args(temperature=0.0, max_tokens=8)
    return found


def test_a_cuda_error_drops_the_model_and_the_next_request_loads_it_again(server: ServerProcess) -> None:
    tiny = model(server)
    before = tiny.generate_response(HELLO)[2]
    assert health(server) == health_pb2.HealthCheckResponse.SERVING

    with pytest.raises(backends.UnavailableError) as caught:
        tiny.generate_response([{"role": "user", "content": "INJECT-CUDA-ERROR"}])
    assert caught.value.code == "UNAVAILABLE"
    assert "illegal memory access" in str(caught.value) and "loads it again" in str(caught.value)
    assert health(server) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert "dropping it, the next request reloads it" in server.log()

    # the next request loads it again and answers as before
    assert tiny.generate_response(HELLO)[2] == before
    assert health(server) == health_pb2.HealthCheckResponse.SERVING
    assert server.log().count(f"loaded {NAME} in") == 2


def test_out_of_memory_fails_only_its_call(server: ServerProcess) -> None:
    tiny = model(server)
    answer = tiny.generate_response(HELLO)[2]
    loads = server.log().count(f"loaded {NAME} in")
    with pytest.raises(backends.ResourceExhaustedError) as caught:
        tiny.generate_response([{"role": "user", "content": "INJECT-OOM"}])
    assert str(caught.value) == f"out of memory while generating with {NAME}"
    assert health(server) == health_pb2.HealthCheckResponse.SERVING
    assert tiny.generate_response(HELLO)[2] == answer
    assert server.log().count(f"loaded {NAME} in") == loads  # not reloaded


def test_a_cuda_error_while_loading_marks_the_whole_server_not_serving(server: ServerProcess) -> None:
    # last in this module: the server stays NOT_SERVING. A CUDA error leaves the process's CUDA context broken,
    # so the reload after it fails too: only a restart helps, and the server's own health says so.
    tiny = model(server)
    assert health(server, "") == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(backends.UnavailableError):
        tiny.generate_response([{"role": "user", "content": "INJECT-CUDA-ERROR"}])
    (server.log_path.parent / "broken").touch()
    with pytest.raises(backends.UnavailableError) as caught:
        tiny.generate_response(HELLO)
    assert "while loading" in str(caught.value)
    assert health(server, "") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert health(server, "clemserve.v1.ModelService") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert "cannot use its GPU until it restarts" in server.log()
    # calls are still answered meanwhile (here, once the injected failure is gone)
    (server.log_path.parent / "broken").unlink()
    assert tiny.generate_response(HELLO)[2]
