"""Faults the server survives, each through the real server and client: a backend that raises or runs out
of memory (the diagnostic ``fault`` backend), a provider that refuses connections or never answers, a
caller that disconnects mid-generation, SIGTERM with 16 calls in flight.

A corrupt registry or key file at start is in test_lifecycle.py, a model folder without weights in
test_errors.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import clemserve.client as backends
from tests.providers import FAKE_KEYS
from tests.serving import ServerProcess, free_port, start_server
from tests.standin import Reply, StandIn

USER = [{"role": "user", "content": "hello there"}]
SLOW_TOKENS = 200


def fault(name: str, **config: Any) -> dict[str, Any]:
    return {"model_name": name, "backend": "fault", "model_id": name, "model_config": config}


ENTRIES = [
    fault("fault-raise", raise_on="boom", oom_on="huge"),
    fault("fault-oom-load", oom_on_load=1),
    fault("fault-slow", stream_tokens=SLOW_TOKENS, token_delay_s=0.05),
    # calls wait while the file "gate" exists in the server's folder (its working directory)
    fault("fault-gated", gate="gate"),
    {"model_name": "refused-openai", "backend": "openai", "model_id": "gpt-x", "model_config": {}},
    {"model_name": "silent-compatible", "backend": "openai_compatible", "model_id": "m", "model_config": {}},
]


@pytest.fixture(scope="module")
def standin() -> Iterator[StandIn]:
    with StandIn() as server:
        yield server


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, standin: StandIn) -> tuple[Path, list[str]]:
    """The registry and key file, and the flags that serve them (fast remote retries, 0.5 s per try)."""
    folder = tmp_path_factory.mktemp("faults")
    registry = folder / "registry.json"
    registry.write_text(json.dumps(ENTRIES))
    keys = folder / "key.json"
    closed = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: connections are refused
    keys.write_text(
        json.dumps(
            {
                "openai": {"api_key": FAKE_KEYS["openai"], "base_url": closed},
                "openai_compatible": {"api_key": FAKE_KEYS["openai_compatible"], "base_url": standin.url},
            }
        )
    )
    flags = ["--registry", str(registry), "--key-file", str(keys)]
    flags += ["--remote-retry-delay", "0.01", "--remote-max-delay", "0.05", "--remote-timeout", "0.5"]
    return folder, flags


@pytest.fixture(scope="module")
def server(setup: tuple[Path, list[str]]) -> Iterator[ServerProcess]:
    folder, flags = setup
    proc = start_server(folder, *flags)
    yield proc
    assert proc.stop() == 0, proc.log()


def model(server: ServerProcess, name: str, **gen_args: Any) -> backends.Model:
    found = backends.get_model_for(name, address=server.address)
    found.set_gen_args(**{"temperature": 0.0, "max_tokens": 20, **gen_args})
    return found


def status(server: ServerProcess, name: str) -> backends.ModelStatus:
    return next(s for s in backends.list_models(address=server.address) if s.name == name)


def health(server: ServerProcess, service: str = "") -> int:
    """The health status of ``service``; SERVICE_UNKNOWN (3) for a service never reported."""
    with grpc.insecure_channel(server.address) as channel:
        try:
            return int(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service)).status)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
            return int(health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def still_serving(server: ServerProcess) -> None:
    assert health(server) == health_pb2.HealthCheckResponse.SERVING
    assert model(server, "echo").generate_response(USER)[2] == "hello there"


# -- a failing backend -------------------------------------------------------------------------------


def test_backend_raising_is_internal_with_the_request_id(server: ServerProcess) -> None:
    faulty = model(server, "fault-raise")
    with pytest.raises(backends.InternalError) as caught:
        faulty.generate_response([{"role": "user", "content": "boom now"}])
    err = caught.value
    assert err.code == "INTERNAL" and re.fullmatch(r"[0-9a-f]{32}", err.request_id)
    assert err.request_id in str(err) and "boom" not in str(err)  # the detail stays in the server log
    logged = [line for line in server.log().splitlines() if f"[{err.request_id}]" in line]
    assert any("unexpected failure" in line for line in logged), logged
    assert "RuntimeError: fault backend: 'boom' in the message" in server.log()
    # the next request on the same model is fine
    assert faulty.generate_response(USER)[2] == "hello there"
    still_serving(server)


def test_out_of_memory_while_generating_is_resource_exhausted(server: ServerProcess) -> None:
    faulty = model(server, "fault-raise")
    with pytest.raises(backends.ResourceExhaustedError) as caught:
        faulty.generate_response([{"role": "user", "content": "a huge prompt"}])
    assert caught.value.code == "RESOURCE_EXHAUSTED" and "out of memory" in str(caught.value)
    # the model stays loaded (what ran out was this call's memory) and serves the next request
    assert status(server, "fault-raise").state == "ready"
    assert faulty.generate_response(USER)[2] == "hello there"


def test_out_of_memory_while_loading_unloads_and_loads_again(server: ServerProcess) -> None:
    name = "fault-oom-load"
    service = f"clemserve.v1.ModelService/{name}"
    with pytest.raises(backends.ResourceExhaustedError) as caught:
        model(server, name).generate_response(USER)
    assert str(caught.value) == f"out of memory while loading {name}"
    failed = status(server, name)
    assert failed.state == "failed" and failed.state_reason.startswith("MemoryError")
    assert f"fault backend {name}: unloaded" in server.log()  # what the failed load took is released
    assert health(server, service) == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    # the next request loads it again, and it serves
    assert model(server, name).generate_response(USER)[2] == "hello there"
    assert status(server, name).state == "ready"
    assert health(server, service) == health_pb2.HealthCheckResponse.SERVING


# -- a failing provider ------------------------------------------------------------------------------


def test_provider_refusing_connections_is_unavailable_after_retries(server: ServerProcess) -> None:
    with pytest.raises(backends.UnavailableError) as caught:
        model(server, "refused-openai").generate_response(USER)
    err = caught.value
    assert "OpenAI failed 4 time(s), last with no answer: Connection error" in str(err), err
    assert err.metadata["upstream_status"] == "0"
    assert server.log().count("OpenAI answered nothing: Connection error") >= 3  # the retries
    still_serving(server)


def test_provider_not_answering_in_time_is_unavailable_after_retries(server: ServerProcess, standin: StandIn) -> None:
    standin.reset()
    standin.script("POST", r"/chat/completions$", Reply(200, {}, delay_s=3))
    started = time.monotonic()
    with pytest.raises(backends.UnavailableError) as caught:
        model(server, "silent-compatible").generate_response(USER)
    assert "failed 4 time(s), last with no answer: no answer within 0.5 s" in str(caught.value)
    assert len(list(standin.matching(r"/chat/completions$"))) == 4
    assert time.monotonic() - started < 2.5 + 1  # 4 tries of 0.5 s and short pauses, not 4 x 3 s
    still_serving(server)


# -- a caller that goes away -------------------------------------------------------------------------

CALLER = """
import sys
import clemserve.client as backends
model = backends.get_model_for("fault-slow", address=sys.argv[1])
model.set_gen_args(temperature=0.0, max_tokens=500)
model.generate_response([{"role": "user", "content": "go"}])
"""


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_caller_disconnecting_mid_generation_cancels_the_work(server: ServerProcess) -> None:
    pid = server.process.pid
    assert model(server, "fault-slow", max_tokens=1).count_tokens(USER).prompt_tokens  # loaded, connected
    fds = open_fds(pid)
    for round_ in range(1, 4):
        caller = subprocess.Popen([sys.executable, "-c", CALLER, server.address])
        try:
            wait_for(lambda: status(server, "fault-slow").requests_in_flight == 1, 30, "the call reaching the server")
            time.sleep(0.3)  # a few tokens in
        finally:
            caller.kill()  # the process dies; its connection closes under the call
            caller.wait(timeout=10)
        wait_for(lambda: status(server, "fault-slow").requests_in_flight == 0, 5, "the call to end on the server")
        stopped = re.findall(rf"generation stopped after (\d+) of {SLOW_TOKENS} tokens", server.log())
        assert len(stopped) == round_ and 0 < int(stopped[-1]) < SLOW_TOKENS
        assert server.log().count("generation on fault-slow cancelled: the caller went away") == round_
    # the connections the callers opened are closed again: no descriptor kept per abandoned call
    wait_for(lambda: open_fds(pid) <= fds, 5, f"open descriptors back to {fds} (now {open_fds(pid)})")
    still_serving(server)


# -- SIGTERM with calls in flight --------------------------------------------------------------------


def test_sigterm_with_16_calls_in_flight(
    setup: tuple[Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLEMSERVE_WAIT_FOR_SERVER", "0")  # the late call fails at once instead of waiting
    proc = start_server(tmp_path, *setup[1], "--preload", "fault-gated")
    results: list[str] = []
    errors: list[BaseException] = []

    gate = tmp_path / "gate"
    gate.touch()  # the 16 calls stay in flight until it goes
    sleepers = [model(proc, "fault-gated") for _ in range(16)]
    late = model(proc, "echo")

    def call(i: int) -> None:
        try:
            results.append(sleepers[i].generate_response([{"role": "user", "content": f"call {i}"}])[2])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: status(proc, "fault-gated").requests_in_flight == 16, 30, "16 calls in flight")
    finally:
        proc.process.send_signal(signal.SIGTERM)
    try:
        wait_for(lambda: "stopping: refusing new calls" in proc.log(), 30, "the server to start draining")
        with pytest.raises(backends.UnavailableError):
            late.generate_response(USER)
        assert not results, "the calls in flight finished before the gate opened"
    finally:
        gate.unlink()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    assert sorted(results) == sorted(f"call {i}" for i in range(16))
    assert proc.process.wait(timeout=30) == 0
    assert "unloaded" in proc.log() and "stopped" in proc.log()
