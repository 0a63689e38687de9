"""Residency through the real server and client: the memory budget and eviction, leases, idle unloading,
bounded and timed loads, and what ListModels says about it all.

``fault`` entries declare their footprint (``model_config.memory_bytes``) so that a budget of 1500 bytes
fits exactly one of the two 1000-byte models, and hold their calls while their gate file exists
(``model_config.gate``); the tiny Llama shows real estimates and measurements.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

import clemserve.client as backends
from clemserve.client.channel import channel_for
from clemserve.registry.errors import ResourceExhaustedError, UnavailableError
from clemserve.v1 import clemserve_pb2 as pb
from clemserve.v1 import clemserve_pb2_grpc as pb_grpc
from tests.serving import ServerProcess, hf_entry, start_server

USER = [{"role": "user", "content": "hello there"}]


def fault(name: str, **config: Any) -> dict[str, Any]:
    return {"model_name": name, "backend": "fault", "model_id": name, "model_config": config}


def gated(folder: Path, name: str, **config: Any) -> dict[str, Any]:
    """A fault entry whose calls wait while its gate file exists, in ``folder`` (the server's)."""
    return fault(name, gate=str(folder / f"{name}.gate"), **config)


def gate(server: ServerProcess, name: str) -> Path:
    """The gate file of the :func:`gated` model ``name``."""
    return server.log_path.parent / f"{name}.gate"


@contextmanager
def held(gate_file: Path) -> Iterator[None]:
    """Calls to the gate's model wait inside, until the block ends."""
    gate_file.touch()
    try:
        yield
    finally:
        gate_file.unlink()


def _server(tmp: Path, entries: list[dict[str, Any]], *flags: str) -> ServerProcess:
    registry = tmp / "registry.json"
    registry.write_text(json.dumps(entries))
    # the budget in RAM on every machine (these tests check its rules); tests/gpu checks a GPU's budget
    return start_server(tmp, "--registry", str(registry), *flags, env={"CUDA_VISIBLE_DEVICES": ""})


def _status(address: str, name: str) -> backends.ModelStatus:
    return next(s for s in backends.list_models(address=address) if s.name == name)


def _eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def budget_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A budget that holds one of fault-a and fault-b."""
    folder = tmp_path_factory.mktemp("budget")
    entries = [gated(folder, "fault-a", memory_bytes=1000), fault("fault-b", memory_bytes=1000)]
    proc = _server(folder, entries, "--memory-budget", "1500", "--keep-alive", "0")
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture
def only_a(budget_server: ServerProcess) -> str:
    """fault-a loaded and idle, fault-b not loaded."""
    address = budget_server.address
    backends.unload("fault-b", address=address)
    backends.preload("fault-a", address=address)
    return address


def test_loading_b_evicts_idle_a(only_a: str) -> None:
    assert backends.preload("fault-b", address=only_a).state == "ready"
    assert _status(only_a, "fault-a").state == "not_loaded"


def test_a_request_in_flight_protects_a(only_a: str, budget_server: ServerProcess) -> None:
    model = backends.get_model_for("fault-a", address=only_a, lease=False)
    answer = threading.Thread(target=model.generate_response, args=(USER,))
    with held(gate(budget_server, "fault-a")):  # the call stays in flight until the block ends
        answer.start()
        _eventually(lambda: _status(only_a, "fault-a").requests_in_flight == 1)
        with pytest.raises(ResourceExhaustedError) as caught:
            backends.preload("fault-b", address=only_a)
        assert caught.value.metadata["required_bytes"] == "1000"
        assert caught.value.metadata["available_bytes"] == "500"
        assert "fault-a" in caught.value.metadata["held_by"] and "in flight" in str(caught.value)
        assert _status(only_a, "fault-a").state == "ready"
    answer.join()


def test_a_lease_protects_a_until_the_model_is_closed(only_a: str) -> None:
    with backends.get_model_for("fault-a", address=only_a) as model:
        model.generate_response(USER)
        assert _status(only_a, "fault-a").leases == 1
        with pytest.raises(ResourceExhaustedError, match="lease"):
            backends.preload("fault-b", address=only_a)
    _eventually(lambda: _status(only_a, "fault-a").leases == 0)
    assert backends.preload("fault-b", address=only_a).state == "ready"


def test_a_held_lease_does_not_hold_up_a_stop(tmp_path: Path) -> None:
    proc = _server(tmp_path, [fault("kept")], "--grace-period", "30")
    model = backends.get_model_for("kept", address=proc.address)
    model.generate_response(USER)
    assert _status(proc.address, "kept").leases == 1
    started = time.monotonic()
    assert proc.stop() == 0
    assert time.monotonic() - started < 10, "the open lease held the drain for its grace period"
    assert "ended: the server is stopping" in proc.log()
    model.close()


_HOLDER = """
import sys, time
import clemserve.client as backends
model = backends.get_model_for("fault-a", address=sys.argv[1])
model.generate_response([{"role": "user", "content": "hi"}])
print("leased", flush=True)
time.sleep(120)
"""


def test_a_killed_client_releases_its_lease(only_a: str) -> None:
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, only_a], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "leased"
        assert _status(only_a, "fault-a").leases == 1
        with pytest.raises(ResourceExhaustedError, match="lease"):
            backends.preload("fault-b", address=only_a)
        holder.kill()
        holder.wait(10)
        _eventually(lambda: _status(only_a, "fault-a").leases == 0)
        assert backends.preload("fault-b", address=only_a).state == "ready"
    finally:
        holder.kill()
        holder.wait(10)


def test_a_lease_with_a_ttl_expires(budget_server: ServerProcess) -> None:
    stub = pb_grpc.ModelServiceStub(channel_for(budget_server.address, None))
    request = pb.LeaseModelRequest(model=pb.ModelSelector(name="fault-b"), ttl_seconds=1, load=True)
    started = time.monotonic()
    call = stub.LeaseModel(request, timeout=30)
    first = next(call)
    assert first.lease_id and not first.expired and 0 < first.expires_in_seconds <= 1
    assert first.status.state == pb.MODEL_STATE_READY and first.status.leases == 1
    last = next(call)
    assert last.expired and last.lease_id == first.lease_id
    assert 0.9 <= time.monotonic() - started < 10
    assert list(call) == []
    _eventually(lambda: _status(budget_server.address, "fault-b").leases == 0)


def test_a_lease_refuses_a_negative_ttl(budget_server: ServerProcess) -> None:
    stub = pb_grpc.ModelServiceStub(channel_for(budget_server.address, None))
    call = stub.LeaseModel(pb.LeaseModelRequest(model=pb.ModelSelector(name="fault-b"), ttl_seconds=-1))
    with pytest.raises(grpc.RpcError) as caught:
        next(call)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ttl_seconds" in caught.value.details()


def test_a_model_larger_than_the_budget_evicts_nothing(tmp_path: Path) -> None:
    entries = [fault("small", memory_bytes=100), fault("huge", memory_bytes=10_000)]
    proc = _server(tmp_path, entries, "--memory-budget", "1KiB")
    try:
        backends.preload("small", address=proc.address)
        with pytest.raises(ResourceExhaustedError, match="larger than the whole budget") as caught:
            backends.preload("huge", address=proc.address)
        assert caught.value.metadata["budget_bytes"] == "1024"
        assert _status(proc.address, "small").state == "ready"
        assert _status(proc.address, "huge").state == "failed"
    finally:
        assert proc.stop() == 0, proc.log()


def test_keep_alive_unloads_an_idle_model_but_not_a_leased_one(tmp_path: Path) -> None:
    proc = _server(tmp_path, [fault("idle"), fault("leased")], "--keep-alive", "1")
    try:
        backends.preload("idle", address=proc.address)
        with backends.get_model_for("leased", address=proc.address) as model:
            model.generate_response(USER)
            _eventually(lambda: _status(proc.address, "idle").state == "not_loaded", timeout=10)
            time.sleep(1.5)
            assert _status(proc.address, "leased").state == "ready"
        _eventually(lambda: _status(proc.address, "leased").state == "not_loaded", timeout=10)
    finally:
        assert proc.stop() == 0, proc.log()


def test_loads_are_bounded_and_timed(tmp_path: Path) -> None:
    entries = [fault("slow-1", load_delay_s=1), fault("slow-2", load_delay_s=1), fault("stuck", load_delay_s=30)]
    flags = ("--max-concurrent-loads", "1", "--load-timeout", "2")
    proc = _server(tmp_path, entries, *flags)
    try:
        started = time.monotonic()
        loads = [
            threading.Thread(target=backends.preload, args=(n,), kwargs={"address": proc.address})
            for n in ("slow-1", "slow-2")
        ]
        for load in loads:
            load.start()
        for load in loads:
            load.join()
        assert time.monotonic() - started >= 2.0  # one after the other
        assert {_status(proc.address, n).state for n in ("slow-1", "slow-2")} == {"ready"}

        with pytest.raises(UnavailableError, match="--load-timeout"):
            backends.preload("stuck", address=proc.address)
        stuck = _status(proc.address, "stuck")
        assert stuck.state == "failed" and "load-timeout" in stuck.state_reason
        backends.unload("slow-1", address=proc.address)
        assert backends.preload("slow-1", address=proc.address).state == "ready"
    finally:
        assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ServerProcess]:
    """Two tiny Llamas (about 4 MiB each by their estimates) and a fault model, in a 10 MiB budget."""
    folder = tmp_path_factory.mktemp("tiny")
    entries = [hf_entry("tiny-a", tiny_model_dir), hf_entry("tiny-b", tiny_model_dir), gated(folder, "busy")]
    proc = _server(folder, entries, "--memory-budget", "10MiB", "--keep-alive", "0")
    yield proc
    assert proc.stop() == 0, proc.log()


def test_list_models_reports_memory_and_activity(tiny_server: ServerProcess) -> None:
    address = tiny_server.address
    for name in ("tiny-a", "tiny-b"):
        backends.unload(name, address=address)
    stub = pb_grpc.ModelServiceStub(channel_for(address, None))
    before = stub.ListModels(pb.ListModelsRequest())
    assert before.memory_kind == "ram" and before.memory_budget_bytes > 0 and before.memory_used_bytes == 0
    tiny = _status(address, "tiny-a")
    assert tiny.state == "not_loaded" and tiny.estimated_memory_bytes > 0 and tiny.measured_memory_bytes == 0
    assert tiny.measured_by == "" and tiny.rss_delta_bytes == 0 and tiny.estimated_kv_cache_bytes > 0

    loaded = backends.preload("tiny-a", address=address)
    assert loaded.measured_memory_bytes > 0 and loaded.load_progress == 1.0
    after = stub.ListModels(pb.ListModelsRequest())
    assert after.memory_used_bytes >= loaded.estimated_memory_bytes

    model = backends.get_model_for("busy", address=address)
    model.generate_response(USER)  # takes the lease
    answers = [threading.Thread(target=model.generate_response, args=(USER,)) for _ in range(2)]
    with held(gate(tiny_server, "busy")):
        for answer in answers:
            answer.start()
        _eventually(lambda: _status(address, "busy").requests_in_flight == 2)
        assert _status(address, "busy").leases == 1
    for answer in answers:
        answer.join()
    model.close()
    busy = _status(address, "busy")
    assert busy.requests_in_flight == 0 and busy.idle_seconds >= 0


def test_harmless_selector_keys_reuse_the_loaded_copy(tmp_path: Path) -> None:
    proc = _server(tmp_path, [fault("shared")])
    try:
        backends.preload({"model_name": "shared", "temperature": 0.5}, address=proc.address)
        backends.preload("shared", address=proc.address)
        listed = [s for s in backends.list_models(address=proc.address) if s.name == "shared"]
        assert len(listed) == 1 and listed[0].state == "ready"
        assert "temperature" not in listed[0].model_spec  # the registry entry, not the selector that loaded it
        assert proc.log().count("loaded shared") == 1
    finally:
        assert proc.stop() == 0, proc.log()


def test_an_async_model_holds_and_releases_a_lease(budget_server: ServerProcess) -> None:
    import asyncio

    address = budget_server.address

    async def game() -> None:
        async with await backends.get_async_model_for("fault-b", address=address) as model:
            await model.generate_response(USER)
            assert _status(address, "fault-b").leases == 1
        _eventually(lambda: _status(address, "fault-b").leases == 0)

    asyncio.run(game())


def test_list_models_counts_queued_requests(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The tiny Llama runs one call at a time (--max-batch 1): of four long calls, the others wait."""
    proc = _server(tmp_path, [hf_entry("tiny", tiny_model_dir)], "--max-batch", "1")
    try:
        model = backends.get_model_for("tiny", address=proc.address)
        model.set_gen_args(temperature=0.0, max_tokens=400)
        model.generate_response(USER)
        calls = [threading.Thread(target=model.generate_response, args=(USER,)) for _ in range(4)]
        for call in calls:
            call.start()
        seen: list[tuple[int, int]] = []
        while any(call.is_alive() for call in calls):
            status = _status(proc.address, "tiny")
            seen.append((status.requests_in_flight, status.requests_queued))
            time.sleep(0.02)  # a look every 20 ms: enough to see the queue, not so many that they slow it
        for call in calls:
            call.join()
        assert (1, 3) in seen or (1, 2) in seen, seen
        assert max(queued for _, queued in seen) <= 3 and max(running for running, _ in seen) <= 1
        model.close()
    finally:
        assert proc.stop() == 0, proc.log()


def test_concurrent_loads_do_not_share_the_same_free_memory(tmp_path: Path) -> None:
    entries = [fault(name, memory_bytes=1000, load_delay_s=1) for name in ("slow-a", "slow-b")]
    proc = _server(tmp_path, entries, "--memory-budget", "1500", "--max-concurrent-loads", "2")
    outcomes: dict[str, object] = {}

    def load(name: str) -> None:
        try:
            outcomes[name] = backends.preload(name, address=proc.address).state
        except ResourceExhaustedError as exc:
            outcomes[name] = exc

    try:
        loads = [threading.Thread(target=load, args=(name,)) for name in ("slow-a", "slow-b")]
        for thread in loads:
            thread.start()
        for thread in loads:
            thread.join()
        refused = [o for o in outcomes.values() if isinstance(o, ResourceExhaustedError)]
        assert sorted(map(str, outcomes.values())).count("ready") == 1 and len(refused) == 1, outcomes
        assert "loading" in refused[0].metadata["held_by"]
    finally:
        assert proc.stop() == 0, proc.log()


def test_two_tiny_models_that_fit_the_budget_together_both_stay_loaded_whichever_loads_first(
    tiny_server: ServerProcess,
) -> None:
    """Each tiny Llama is estimated at about 4 MiB (its weights and a 4096-token KV allowance) and holds its
    tensors' bytes once loaded; the process grows by far more on the first load (it imports torch), which is
    reported as RSS, never charged, so the second load evicts nothing."""
    proc = tiny_server
    for first, second in (("tiny-a", "tiny-b"), ("tiny-b", "tiny-a")):
        backends.unload(first, address=proc.address)
        backends.unload(second, address=proc.address)
        backends.preload(first, address=proc.address)
        backends.preload(second, address=proc.address)
        a, b = _status(proc.address, first), _status(proc.address, second)
        assert (a.state, b.state) == ("ready", "ready"), proc.log()
        for status in (a, b):
            assert status.measured_by == "parameters and buffers"
            assert 0 < status.measured_memory_bytes < status.estimated_weights_bytes * 1.05
            assert status.charged_memory_bytes == max(status.estimated_memory_bytes, status.measured_memory_bytes)
            assert status.estimated_memory_bytes == status.estimated_weights_bytes + status.estimated_kv_cache_bytes
            assert status.estimate_source == "safetensors headers" and status.devices == ()
    assert "evicting" not in proc.log()
    first_load = next(line for line in proc.log().splitlines() if "loaded tiny-" in line)
    rss = float(first_load.rsplit("process RSS grew ", 1)[1].split()[0])
    assert rss > 50, first_load  # torch's import, reported beside the model, never charged to it

    stub = pb_grpc.ModelServiceStub(channel_for(proc.address, None))
    listed = stub.ListModels(pb.ListModelsRequest())
    assert listed.memory_kind == "ram" and listed.memory_source == "--memory-budget"
    assert listed.memory_budget_bytes == 10 * 2**20 and listed.kv_cache_tokens == 32768
    assert listed.memory_used_bytes == sum(s.charged_memory_bytes for s in listed.models)

    table = subprocess.run(
        [sys.executable, "-m", "clemserve.client.cli", "models", "--memory", "--address", proc.address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert "ESTIMATE MIB  MEASURED MIB  RSS MIB" in header
    tiny = next(row.split() for row in rows if row.startswith("tiny-a "))
    assert tiny[9].endswith("/params"), tiny
    assert rows[-1].startswith("memory budget: ") and "10 MiB ram used (--memory-budget)" in rows[-1]
