"""Concurrent calls for one huggingface_local model are merged into batched generate calls, with the
same greedy answers as one by one; a caller that leaves stops its row between tokens."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.serving import ServerProcess, hf_entry, start_server
from tests.tiny_model import build_tiny_llama

CONVERSATIONS = [
    [{"role": "user", "content": text}]
    for text in (
        "What is the capital of France?",
        "Hello!",
        "Tell me the name of the capital of Australia.",
        "You are playing a game. Guess the word.",
        "My guess is: apple.",
        "Numbers 0 1 2 3 4 5 6 7 8 9.",
        "The quick brown fox jumps over the lazy dog.",
        "user assistant system turn response prompt",
    )
]


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory: pytest.TempPathFactory, test_registry: Path) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("batching")
    # a model slow enough that a generation is still running when its caller gives up
    slow = build_tiny_llama(folder / "slow-llama", max_positions=4096, hidden=256, layers=6)
    registry = folder / "registry.json"
    registry.write_text(json.dumps([hf_entry("slow-llama", slow), *json.loads(test_registry.read_text())]))
    flags = ("--registry", str(registry), "--log-level", "DEBUG", "--max-wait-ms", "20")
    flags += ("--preload", "tiny-llama", "--preload", "slow-llama")
    proc = start_server(folder, *flags)
    yield proc
    assert proc.stop() == 0, proc.log()


def model(server: ServerProcess, name: str = "tiny-llama", **gen_args: Any) -> Any:
    import clemserve.client as backends

    m = backends.get_model_for(name, address=server.address, timeout=120)
    m.set_gen_args(**{"temperature": 0.0, "max_tokens": 24, **gen_args})
    return m


def concurrently(m: Any, conversations: list[list[dict[str, str]]]) -> list[Any]:
    results: list[Any] = [None] * len(conversations)
    barrier = threading.Barrier(len(conversations))

    def call(i: int) -> None:
        barrier.wait()
        results[i] = m.generate_response(conversations[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(conversations))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_concurrent_calls_are_batched_with_the_same_greedy_answers(batching_server: ServerProcess) -> None:
    m = model(batching_server)
    one_by_one = [m.generate_response(c) for c in CONVERSATIONS]
    batched = concurrently(m, CONVERSATIONS)
    assert [b[2] for b in batched] == [o[2] for o in one_by_one]
    assert [b[0] for b in batched] == [o[0] for o in one_by_one]  # prompts as if alone: no padding
    assert [b[1]["response"] for b in batched] == [o[1]["response"] for o in one_by_one]
    sizes = [int(n) for n in re.findall(r"tiny-llama: a batch of (\d+) requests", batching_server.log())]
    assert sizes and max(sizes) > 1, "no batch was formed"


def test_one_context_error_fails_only_its_own_row(batching_server: ServerProcess) -> None:
    import clemserve.client as backends

    m = model(batching_server)
    long = [{"role": "user", "content": "word " * 600}]
    results: list[Any] = [None, None]

    def call(i: int, conversation: list[dict[str, str]]) -> None:
        try:
            results[i] = m.generate_response(conversation)[2]
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=call, args=(0, long)), threading.Thread(target=call, args=(1, CONVERSATIONS[0]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert isinstance(results[0], backends.ContextExceededError)
    assert results[1] == m.generate_response(CONVERSATIONS[0])[2]


def test_a_caller_that_leaves_stops_its_row(batching_server: ServerProcess) -> None:
    import clemserve.client as backends

    leaving = model(batching_server, "slow-llama", max_tokens=4000)
    leaving.timeout = 1.0
    with pytest.raises(backends.ClemserveError) as caught:
        leaving.generate_response([{"role": "user", "content": "Hello!"}])
    assert caught.value.code == "DEADLINE_EXCEEDED"
    deadline = time.monotonic() + 30
    while "stopped 1 row(s) early" not in batching_server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "slow-llama: stopped 1 row(s) early: their callers went away" in batching_server.log()
    assert model(batching_server, max_tokens=4).generate_response(CONVERSATIONS[1])[2] is not None


def test_generate_batch_gives_each_row_its_own_status(batching_server: ServerProcess) -> None:
    import clemserve.client as backends

    m = model(batching_server)
    long = [{"role": "user", "content": "word " * 600}]
    outcomes = m.generate_batch([CONVERSATIONS[0], long, CONVERSATIONS[1]])
    assert isinstance(outcomes[1], backends.ContextExceededError)
    assert outcomes[1].context_size == 512 and outcomes[1].request_id.endswith("/1")
    assert [o[2] for o in (outcomes[0], outcomes[2])] == [m.generate_response(c)[2] for c in CONVERSATIONS[:2]]
    with pytest.raises(backends.ContextExceededError):  # clembench's contract: a failing row fails the call
        m.generate_batch_response([CONVERSATIONS[0], long])
    rows = m.generate_batch_response(CONVERSATIONS)
    assert [r[2] for r in rows] == [m.generate_response(c)[2] for c in CONVERSATIONS]


def test_generate_batch_on_the_wire(batching_server: ServerProcess) -> None:
    import grpc

    from clemserve.v1 import clemserve_pb2 as pb
    from clemserve.v1 import clemserve_pb2_grpc as pb_grpc

    with grpc.insecure_channel(batching_server.address) as channel:
        reply = pb_grpc.ModelServiceStub(channel).GenerateBatch(
            pb.GenerateBatchRequest(
                model=pb.ModelSelector(name="tiny-llama"),
                conversations=[
                    pb.Conversation(messages=[pb.Message(role="user", content="Hello!")]),
                    pb.Conversation(messages=[pb.Message(role="robot", content="x")]),
                ],
                args=pb.GenerationArgs(max_tokens=4),
                request_id="batch-1",
            )
        )
    assert reply.request_id == "batch-1" and len(reply.results) == 2
    assert reply.results[0].WhichOneof("result") == "response"
    assert reply.results[0].response.request_id == "batch-1/0"
    error = reply.results[1].error
    assert (
        error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "conversations[1].messages[0].role" in error.message
    )


def test_a_full_queue_refuses_at_once_and_every_accepted_call_completes(tmp_path: Path, test_registry: Path) -> None:
    import clemserve.client as backends

    flags = ("--registry", str(test_registry), "--max-queue", "2", "--max-batch", "1", "--preload", "tiny-llama")
    proc = start_server(tmp_path, *flags)
    try:
        m = model(proc, max_tokens=400)
        m.generate_response([{"role": "user", "content": "warm up"}])  # torch's first call is slow
        outcomes: list[tuple[float, Any]] = [(0.0, None)] * 8
        barrier = threading.Barrier(8)

        def call(i: int) -> None:
            barrier.wait()
            started = time.monotonic()
            try:
                result: Any = m.generate_response([{"role": "user", "content": f"question {i}"}])[2]
            except backends.ResourceExhaustedError as exc:
                result = exc
            outcomes[i] = (time.monotonic() - started, result)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        refused = [(s, r) for s, r in outcomes if isinstance(r, backends.ResourceExhaustedError)]
        served = [r for _, r in outcomes if isinstance(r, str)]
        # all eight arrive together: one runs and two wait, or two wait before the first is taken
        assert refused and len(served) + len(refused) == 8 and len(served) >= 2
        assert all(seconds < 0.2 for seconds, _ in refused), refused  # at once, not after waiting
        assert all(r.retry_after_s > 0 and "queue" in str(r) for _, r in refused)
    finally:
        assert proc.stop() == 0


def thread_nice_values(pid: int) -> dict[int, int]:
    """Each thread's nice value, from /proc (field 19 of a task's stat; the name may hold spaces)."""
    values = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        values[int(task.name)] = int(fields[16])
    return values


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads thread priorities from /proc (Linux)")
def test_generation_runs_below_the_request_path(batching_server: ServerProcess) -> None:
    """--compute-nice (default 5): the generation worker of a model on the CPU and the torch threads it starts
    yield the CPU to the threads that take requests, so a refusal is not held up behind a running batch; a
    model on a GPU keeps the server's priority (its thread only launches kernels)."""
    import torch

    model(batching_server).generate_response(CONVERSATIONS[0])
    pid = batching_server.process.pid
    nice = thread_nice_values(pid)
    # the server starts at the priority it inherits from this test (a CI may run the suite under nice)
    started = os.getpriority(os.PRIO_PROCESS, 0)
    assert nice[pid] == started  # the event loop's thread keeps the server's priority
    if torch.cuda.is_available():
        assert set(nice.values()) == {started}, nice
    elif started + 5 <= 19:  # at the bottom already, nothing can run lower
        assert started + 5 in nice.values(), nice
