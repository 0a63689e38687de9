"""GenerateStream through the real server and client: the request's state while it waits (loading with
progress, queued, ready), its text as it is generated, and last the reply Generate would give; errors end
the stream with Generate's status; a caller that leaves stops its generation and frees its batch slot."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import clemserve.client as backends
from clemserve.client import StreamReply, StreamState, TextDelta
from tests.serving import ServerProcess, hf_entry, start_server
from tests.tiny_model import build_tiny_llama

HELLO = [{"role": "user", "content": "What is the capital of France?"}]
SLOW_TOKENS = 400
TOKEN_DELAY_S = 0.05


@pytest.fixture(scope="module")
def stream_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ServerProcess]:
    """One request per batch (``--max-batch 1``), so a waiting request needs the running one's slot."""
    folder = tmp_path_factory.mktemp("streaming")
    slow = build_tiny_llama(folder / "slow-llama", max_positions=4096, hidden=256, layers=6)
    entries = [
        hf_entry("cold-llama", tiny_model_dir),
        hf_entry("cold-llama-shared", tiny_model_dir),
        hf_entry("slow-llama", slow),
        {"model_name": "echo-small", "backend": "echo", "model_id": "echo", "context_size": "64", "model_config": {}},
        {
            "model_name": "fault-slow",
            "backend": "fault",
            "model_id": "fault-slow",
            "model_config": {"stream_tokens": SLOW_TOKENS, "token_delay_s": TOKEN_DELAY_S},
        },
    ]
    registry = folder / "registry.json"
    registry.write_text(json.dumps(entries))
    flags = ("--registry", str(registry), "--max-batch", "1", "--log-level", "DEBUG", "--preload", "slow-llama")
    proc = start_server(folder, *flags)
    yield proc
    assert proc.stop() == 0, proc.log()


def model(server: ServerProcess, name: str, timeout: float = 120, **gen_args: Any) -> backends.Model:
    m = backends.get_model_for(name, address=server.address, timeout=timeout)
    m.set_gen_args(**{"temperature": 0.0, "max_tokens": 24, **gen_args})
    return m


def in_flight(server: ServerProcess, name: str) -> int:
    return next(s.requests_in_flight for s in backends.list_models(address=server.address) if s.name == name)


def steps_of_stopped_batches(server: ServerProcess) -> list[int]:
    """How many tokens each slow-llama batch with a departed caller ran for, from the server's log."""
    return [int(n) for n in re.findall(r"slow-llama: stopped 1 row\(s\) early: .* \((\d+) steps\)", server.log())]


def wait_for(condition: Any, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(condition())


def test_a_cold_model_streams_loading_ready_text_and_the_unary_reply(stream_server: ServerProcess) -> None:
    m = model(stream_server, "cold-llama")
    events = list(m.generate_stream(HELLO))

    states = [e for e in events if isinstance(e, StreamState)]
    loading = [s for s in states if s.phase == "loading"]
    assert loading and any(s.progress > 0 for s in loading), states
    progress = [s.progress for s in loading]
    assert progress == sorted(progress) and all(0 <= p <= 1 for p in progress), progress
    assert any("weights" in s.detail for s in loading), loading
    first_ready = next(i for i, e in enumerate(events) if isinstance(e, StreamState) and e.phase == "ready")
    first_delta = next(i for i, e in enumerate(events) if isinstance(e, TextDelta))
    assert events.index(loading[-1]) < first_ready < first_delta
    assert all(not isinstance(e, StreamState) for e in events[first_delta:])
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert len(deltas) > 1  # token by token, not the whole text at once

    reply = events[-1]
    assert isinstance(reply, StreamReply)
    assert sum(isinstance(e, StreamReply) for e in events) == 1
    # the deltas are the generated text as decoded, before clembench's cleaning (special tokens kept)
    assert reply.response["response"] == reply.prompt["inputs"] + "".join(deltas)
    assert reply.response_text.strip() and reply.response_text in "".join(deltas)

    prompt, response, text = m.generate_response(HELLO)
    for timed in (response, reply.response):
        timed.pop("clem_player")
    assert (prompt, response, text) == (reply.prompt, reply.response, reply.response_text)


def test_streams_that_join_a_running_load_see_its_progress_too(stream_server: ServerProcess) -> None:
    results: list[list[Any]] = [[], [], []]

    def stream(i: int) -> None:
        results[i].extend(model(stream_server, "cold-llama-shared", max_tokens=4).generate_stream(HELLO))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for events in results:
        loading = [e for e in events if isinstance(e, StreamState) and e.phase == "loading"]
        assert loading and loading[-1].progress > 0, events
        assert isinstance(events[-1], StreamReply)
    assert len({e[-1].response_text for e in results}) == 1
    assert stream_server.log().count("loaded cold-llama-shared in") == 1


def test_a_waiting_request_is_queued_then_takes_the_slot_a_leaving_stream_frees(stream_server: ServerProcess) -> None:
    """slow-llama would need far longer for 4000 tokens than the whole test may take."""
    stopped_before = len(steps_of_stopped_batches(stream_server))
    long = model(stream_server, "slow-llama", max_tokens=4000).generate_stream(HELLO)
    assert any(isinstance(e, TextDelta) for e in long)  # the long one runs and streams its first token
    waiting: list[Any] = []
    done = threading.Event()

    def second() -> None:
        waiting.extend(model(stream_server, "slow-llama", max_tokens=4).generate_stream(HELLO))
        done.set()

    thread = threading.Thread(target=second)
    thread.start()
    assert wait_for(lambda: bool(waiting), 30), "the second request never reported its state"
    time.sleep(1.0)
    assert not done.is_set(), "the second request finished while the long one held the only slot"
    long.close()  # leaving the loop: the server stops the long generation between tokens
    left = time.monotonic()
    thread.join(timeout=60)
    assert done.is_set()
    assert time.monotonic() - left < 15, "the freed slot was not reused promptly"

    queued = [e for e in waiting if isinstance(e, StreamState) and e.phase == "queued"]
    assert queued and queued[0].requests_ahead >= 1, waiting
    assert isinstance(waiting[-1], StreamReply) and waiting[-1].response_text is not None
    assert wait_for(lambda: len(steps_of_stopped_batches(stream_server)) > stopped_before)
    assert steps_of_stopped_batches(stream_server)[stopped_before] < 2000  # stopped, not run to 4000 tokens
    assert wait_for(lambda: in_flight(stream_server, "slow-llama") == 0)


def test_a_unary_call_past_its_deadline_frees_its_batch_slot_for_a_waiting_one(stream_server: ServerProcess) -> None:
    stopped_before = len(steps_of_stopped_batches(stream_server))
    outcome: list[Any] = []

    def leaving() -> None:
        try:
            model(stream_server, "slow-llama", timeout=3.0, max_tokens=4000).generate_response(HELLO)
        except backends.ClemserveError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=leaving)
    started = time.monotonic()
    thread.start()
    time.sleep(1.0)
    answer = model(stream_server, "slow-llama", max_tokens=4).generate_response(HELLO)
    waited = time.monotonic() - started
    thread.join(timeout=60)
    assert answer[2] is not None
    assert outcome and outcome[0].code == "DEADLINE_EXCEEDED"
    assert 3.0 <= waited < 15, waited  # after the deadline freed the slot, long before 4000 tokens
    assert wait_for(lambda: len(steps_of_stopped_batches(stream_server)) > stopped_before)
    assert steps_of_stopped_batches(stream_server)[stopped_before] < 2000  # stopped, not run to 4000 tokens


def test_leaving_a_stream_stops_the_generation_on_the_server(stream_server: ServerProcess) -> None:
    stream = model(stream_server, "fault-slow", max_tokens=SLOW_TOKENS).generate_stream(HELLO)
    pieces = []
    for event in stream:
        if isinstance(event, TextDelta):
            pieces.append(event.text)
            if len(pieces) == 3:
                break
    stream.close()
    assert "".join(pieces) == "t0 t1 t2"
    assert wait_for(lambda: "fault backend fault-slow: generation stopped after" in stream_server.log())
    line = next(x for x in stream_server.log().splitlines() if "fault-slow: generation stopped after" in x)
    assert int(line.split("stopped after ")[1].split()[0]) < SLOW_TOKENS / 2, line
    assert wait_for(lambda: in_flight(stream_server, "fault-slow") == 0)


def test_echo_streams_word_by_word(stream_server: ServerProcess) -> None:
    events = list(model(stream_server, "echo-small").generate_stream([{"role": "user", "content": "a bb  ccc"}]))
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert deltas == ["a", " bb", "  ccc"]
    assert isinstance(events[-1], StreamReply) and events[-1].response_text == "a bb  ccc"
    assert isinstance(events[0], StreamState) and events[0].phase in ("loading", "ready")


def test_bad_input_names_the_field_and_the_server_keeps_serving(stream_server: ServerProcess) -> None:
    with pytest.raises(backends.InvalidArgumentError) as caught:
        list(model(stream_server, "echo-small").generate_stream([{"role": "wizard", "content": "hi"}]))
    assert caught.value.field.startswith("messages[0]")
    with pytest.raises(backends.InvalidArgumentError) as bad_args:
        list(model(stream_server, "echo-small", temperature=7.0).generate_stream(HELLO))
    assert "temperature" in bad_args.value.field
    unknown = backends.Model(backends.ModelSpec.from_name("no-such-model"), address=stream_server.address)
    with pytest.raises(backends.ModelNotFoundError):
        list(unknown.generate_stream(HELLO))
    assert list(model(stream_server, "echo-small").stream_text([{"role": "user", "content": "still here"}])) == [
        "still",
        " here",
    ]


def test_a_context_overflow_raises_the_context_error(stream_server: ServerProcess) -> None:
    long = [{"role": "user", "content": " ".join(["word"] * 80)}]
    with pytest.raises(backends.ContextExceededError) as caught:
        list(model(stream_server, "echo-small").generate_stream(long))
    assert caught.value.context_size == 64


def test_the_async_iterator_streams_the_same_reply(stream_server: ServerProcess) -> None:
    sync = model(stream_server, "echo-small")

    async def collect() -> list[Any]:
        return [event async for event in sync.as_async().generate_stream(HELLO)]

    events = asyncio.run(collect())
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == HELLO[0]["content"]
    assert isinstance(events[-1], StreamReply)
    assert events[-1].response_text == sync.generate_response(HELLO)[2]
