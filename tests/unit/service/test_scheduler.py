"""The scheduler without a server: fair turns, a bounded queue, batches of like requests, cancellation."""

from __future__ import annotations

import asyncio
import threading
import types
from collections.abc import Callable, Sequence

import pytest

from clemserve.registry.errors import ResourceExhaustedError
from clemserve.service import scheduler as scheduler_module
from clemserve.service.domain import GenArgs, Generation, Message, Outcome, Row
from clemserve.service.scheduler import CallsInFlight, Scheduler, SchedulingPolicy
from clemserve.service.streaming import Phase, StreamObserver, StreamState, TextDelta, TextSink


def msg(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


class Recorder:
    """A backend stand-in: records every call, answers with the message text, can be held."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.cancels: list[threading.Event] = []

    async def run_batch(
        self, rows: list[Row], args: GenArgs, done: Callable[[int, Outcome], None] | None = None
    ) -> list[Outcome]:
        self.batches.append([row.messages[-1]["content"] for row in rows])
        self.cancels.extend(row.cancel for row in rows)
        answers = [Generation(prompt={}, response={}, text=row.messages[-1]["content"]) for row in rows]
        for i, answer in enumerate(answers):
            if answer.text.startswith("short") and done is not None:
                done(i, answer)  # a row that ends before its batch: told at once
        await self.gate.wait()
        return list(answers)

    async def run_one(self, messages: Sequence[Message], args: GenArgs, sink: TextSink | None = None) -> Generation:
        return (await self.run_batch([Row(messages, sink=sink)], args))[0]  # type: ignore[return-value]


def scheduler(rec: Recorder, *, batch: bool = True, **policy: float) -> Scheduler:
    return Scheduler(
        "m",
        SchedulingPolicy(**policy),  # type: ignore[arg-type]
        concurrency=1,
        run_one=rec.run_one,
        run_batch=rec.run_batch if batch else None,
    )


def test_waiting_requests_are_merged_into_batches() -> None:
    async def run() -> list[list[str]]:
        rec = Recorder()
        s = scheduler(rec, max_batch=4, max_wait_s=0.05)
        results = await asyncio.gather(*(s.submit(msg(str(i)), GenArgs(), f"c{i}") for i in range(6)))
        assert [r.text for r in results] == [str(i) for i in range(6)]
        await s.close()
        return rec.batches

    batches = asyncio.run(run())
    assert [len(b) for b in batches] == [4, 2]


def test_callers_coming_back_from_a_batch_are_waited_for_but_not_for_the_whole_wait() -> None:
    """Games call in turn: when a batch ends, its callers' next requests arrive a few milliseconds apart.
    The next batch waits for all of them (not only the first), and starts as soon as the last is in."""

    async def run() -> tuple[list[list[str]], float]:
        rec = Recorder()
        s = scheduler(rec, max_batch=8, max_wait_s=2.0)
        await asyncio.gather(*(s.submit(msg(f"{c}1"), GenArgs(), c) for c in "abc"))

        async def late(caller: str, delay: float) -> Generation:
            await asyncio.sleep(delay)
            return await s.submit(msg(f"{caller}2"), GenArgs(), caller)

        started = asyncio.get_running_loop().time()
        await asyncio.gather(late("a", 0.0), late("b", 0.05), late("c", 0.1))
        took = asyncio.get_running_loop().time() - started
        await s.close()
        return rec.batches, took

    batches, took = asyncio.run(run())
    assert [sorted(b) for b in batches] == [["a1", "b1", "c1"], ["a2", "b2", "c2"]]
    assert took < 1.0  # the last caller ended the wait, not the 2 s limit


def test_a_caller_alone_does_not_wait_and_one_that_left_is_waited_for_at_most_max_wait() -> None:
    async def run() -> tuple[float, float, list[list[str]]]:
        rec = Recorder()
        s = scheduler(rec, max_batch=8, max_wait_s=0.3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        for i in range(5):
            await s.submit(msg(f"alone{i}"), GenArgs(), "a")
        alone = loop.time() - started
        await asyncio.gather(s.submit(msg("a"), GenArgs(), "a"), s.submit(msg("b"), GenArgs(), "b"))
        started = loop.time()
        await s.submit(msg("a again"), GenArgs(), "a")  # b has left: a waits for it once, then goes
        left = loop.time() - started
        await s.close()
        return alone, left, rec.batches

    alone, left, batches = asyncio.run(run())
    assert alone < 0.25  # five calls without the 0.3 s wait each
    assert 0.25 < left < 1.0 and batches[-1] == ["a again"]


def test_a_row_that_ends_early_is_answered_before_its_batch_ends() -> None:
    async def run() -> tuple[bool, bool, list[str]]:
        rec = Recorder()
        rec.gate.clear()  # the batch's longest row is still running
        s = scheduler(rec, max_batch=4, max_wait_s=0.05)
        short = asyncio.ensure_future(s.submit(msg("short answer"), GenArgs(), "a"))
        long = asyncio.ensure_future(s.submit(msg("a long answer"), GenArgs(), "b"))
        await asyncio.sleep(0.2)
        early = short.done() and not long.done()
        rec.gate.set()
        answers = await asyncio.gather(short, long)
        await s.close()
        return early, len(rec.batches) == 1, [a.text for a in answers]

    early, one_batch, texts = asyncio.run(run())
    assert one_batch and early and texts == ["short answer", "a long answer"]


def test_one_busy_caller_cannot_starve_another() -> None:
    async def run() -> list[list[str]]:
        rec = Recorder()
        rec.gate.clear()
        s = scheduler(rec, max_batch=2, max_wait_s=0)
        first = asyncio.ensure_future(s.submit(msg("warm"), GenArgs(), "busy"))
        await asyncio.sleep(0.01)  # the first call holds the model
        flood = [asyncio.ensure_future(s.submit(msg(f"busy{i}"), GenArgs(), "busy")) for i in range(10)]
        await asyncio.sleep(0.01)
        single = asyncio.ensure_future(s.submit(msg("other"), GenArgs(), "other"))
        await asyncio.sleep(0.01)
        rec.gate.set()
        await asyncio.gather(first, single, *flood)
        await s.close()
        return rec.batches

    batches = asyncio.run(run())
    assert "other" in batches[1], batches  # served in the very next batch, not after the ten


def test_different_arguments_are_not_merged() -> None:
    async def run() -> list[list[str]]:
        rec = Recorder()
        s = scheduler(rec, max_batch=8, max_wait_s=0.05)
        calls = [s.submit(msg(f"t{i}"), GenArgs(temperature=0.0 if i % 2 else 0.5), f"c{i}") for i in range(4)]
        await asyncio.gather(*calls)
        await s.close()
        return rec.batches

    batches = asyncio.run(run())
    assert sorted(map(sorted, batches)) == [["t0", "t2"], ["t1", "t3"]]


def test_a_full_queue_refuses_at_once_with_a_retry_delay() -> None:
    async def run() -> ResourceExhaustedError:
        rec = Recorder()
        rec.gate.clear()
        s = scheduler(rec, max_batch=1, max_wait_s=0, max_queue=2)
        running = asyncio.ensure_future(s.submit(msg("a"), GenArgs(), "c"))
        await asyncio.sleep(0.01)
        queued = [asyncio.ensure_future(s.submit(msg(x), GenArgs(), "c")) for x in "bc"]
        await asyncio.sleep(0.01)
        with pytest.raises(ResourceExhaustedError) as caught:
            await asyncio.wait_for(s.submit(msg("d"), GenArgs(), "c"), timeout=0.05)
        rec.gate.set()
        await asyncio.gather(running, *queued)
        await s.close()
        return caught.value

    err = asyncio.run(run())
    assert err.retry_after_s > 0 and "2 requests waiting" in str(err)


def test_a_cancelled_caller_leaves_the_queue_and_its_running_row_is_told() -> None:
    async def run() -> tuple[list[list[str]], bool]:
        rec = Recorder()
        rec.gate.clear()
        s = scheduler(rec, max_batch=1, max_wait_s=0)
        running = asyncio.ensure_future(s.submit(msg("running"), GenArgs(), "a"))
        await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(s.submit(msg("queued"), GenArgs(), "b"))
        await asyncio.sleep(0.01)
        queued.cancel()
        running.cancel()
        await asyncio.sleep(0.01)
        told = rec.cancels[0].is_set()
        after = asyncio.ensure_future(s.submit(msg("after"), GenArgs(), "c"))
        rec.gate.set()
        await after
        await s.close()
        return rec.batches, told

    batches, told = asyncio.run(run())
    assert told  # the backend sees the running row's cancel event between tokens
    assert ["queued"] not in batches and batches[-1] == ["after"]


class Streamer(Recorder):
    """A batching backend stand-in that streams each row's text to its sink (rows of streamed requests)."""

    def __init__(self) -> None:
        super().__init__()
        self.sinks: list[list[object]] = []

    async def run_batch(
        self, rows: list[Row], args: GenArgs, done: Callable[[int, Outcome], None] | None = None
    ) -> list[Outcome]:
        self.sinks.append([row.sink for row in rows])
        for row in rows:
            if row.sink is not None:
                row.sink(row.messages[-1]["content"])
        return await super().run_batch(rows, args, done)


def test_a_streamed_request_is_told_its_place_its_start_and_its_text() -> None:
    async def run() -> tuple[list[object], Streamer]:
        rec = Streamer()
        rec.gate.clear()
        s = scheduler(rec, max_batch=1, max_wait_s=0)
        first = asyncio.ensure_future(s.submit(msg("first"), GenArgs(), "a"))
        second = asyncio.ensure_future(s.submit(msg("second"), GenArgs(), "b"))
        await asyncio.sleep(0.01)  # "first" runs and holds the only slot; "second" waits
        observer = StreamObserver()
        third = asyncio.ensure_future(s.submit(msg("third"), GenArgs(), "c", observer))
        await asyncio.sleep(0.01)
        rec.gate.set()
        await asyncio.gather(first, second, third)
        await s.close()
        return [event async for event in observer.events_until(third)], rec

    events, rec = asyncio.run(run())
    assert events == [
        StreamState(Phase.QUEUED, requests_ahead=2),  # one running, one queued ahead
        StreamState(Phase.READY, 1.0),
        TextDelta("third"),
    ]
    assert rec.sinks[:2] == [[None], [None]]  # the unary requests got no sinks: their batches ran as before
    assert len(rec.sinks[2]) == 1 and rec.sinks[2][0] is not None


def test_without_batching_a_streamed_request_hands_its_sink_to_the_backend() -> None:
    """Both ways a request runs on a backend without batching, at once or after a wait, pass its sink."""

    async def run() -> tuple[list[object], list[object], Streamer]:
        rec = Streamer()
        s = scheduler(rec, batch=False)
        alone = StreamObserver()
        at_once = asyncio.ensure_future(s.submit(msg("at once"), GenArgs(), "a", alone))  # a free slot: no queue
        await at_once
        rec.gate.clear()
        unary = asyncio.ensure_future(s.submit(msg("unary"), GenArgs(), "a"))
        await asyncio.sleep(0.01)  # it holds the only slot
        waiting = StreamObserver()
        after = asyncio.ensure_future(s.submit(msg("after a wait"), GenArgs(), "b", waiting))
        await asyncio.sleep(0.01)
        rec.gate.set()
        await asyncio.gather(unary, after)
        await s.close()
        return [e async for e in alone.events_until(at_once)], [e async for e in waiting.events_until(after)], rec

    alone, waited, rec = asyncio.run(run())
    assert alone == [StreamState(Phase.READY, 1.0), TextDelta("at once")]
    assert waited == [
        StreamState(Phase.QUEUED, requests_ahead=1),
        StreamState(Phase.READY, 1.0),
        TextDelta("after a wait"),
    ]
    assert [[sink is not None for sink in sinks] for sinks in rec.sinks] == [[True], [False], [True]]


def test_without_batching_a_call_that_fails_or_is_cancelled_gives_its_slot_back() -> None:
    """The fast path (no queue, a free slot) takes its slot without the queue: a failure or a caller that
    leaves must hand it back, or the next request would queue behind a slot nobody holds."""

    async def run() -> list[str]:
        gate = asyncio.Event()

        async def run_one(messages: Sequence[Message], args: GenArgs, sink: TextSink | None = None) -> Generation:
            text = messages[-1]["content"]
            if text == "fail":
                raise ValueError("backend failed")
            if text == "hold":
                await gate.wait()
            return Generation(prompt={}, response={}, text=text)

        s = Scheduler("m", SchedulingPolicy(), concurrency=1, run_one=run_one)
        with pytest.raises(ValueError, match="backend failed"):
            await s.submit(msg("fail"), GenArgs(), "a")
        held = asyncio.create_task(s.submit(msg("hold"), GenArgs(), "a"))
        await asyncio.sleep(0)
        assert s.running == 1
        queued = asyncio.create_task(s.submit(msg("queued"), GenArgs(), "b"))  # no slot free: it waits
        await asyncio.sleep(0.01)
        assert not queued.done() and s.queued == 1
        held.cancel()
        texts = [(await asyncio.wait_for(queued, 5)).text]
        assert held.cancelled() and s.running == 0
        texts.append((await s.submit(msg("after"), GenArgs(), "a")).text)  # the fast path again
        await s.close()
        return texts

    assert asyncio.run(run()) == ["queued", "after"]


def test_the_calls_in_flight_and_their_progress_at_the_models_token_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the drain reports while the server stops: running generations, tokens made and left, time needed."""
    clock = [1000.0]
    monkeypatch.setattr(scheduler_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))

    async def run() -> tuple[CallsInFlight, CallsInFlight, CallsInFlight]:
        gate = asyncio.Event()

        async def run_batch(rows: list[Row], args: GenArgs, done: Callable[[int, Outcome], None]) -> list[Outcome]:
            await gate.wait()
            clock[0] += 3.0  # each batch takes 3 s and makes 30 tokens a row: 10 tokens/s per call
            return [Generation(prompt={}, response={}, text="", completion_tokens=30) for _ in rows]

        s = Scheduler("m", SchedulingPolicy(max_wait_s=0), concurrency=1, run_one=None, run_batch=run_batch)  # type: ignore[arg-type]
        before = s.in_flight()
        gate.set()
        await s.submit(msg("warm"), GenArgs(max_tokens=30), "c0")  # times the token rate
        gate.clear()
        running = [asyncio.ensure_future(s.submit(msg(str(i)), GenArgs(max_tokens=30), f"c{i}")) for i in (1, 2)]
        await asyncio.sleep(0.01)
        clock[0] += 1.8
        during = s.in_flight()
        gate.set()
        await asyncio.gather(*running)
        after = s.in_flight()
        await s.close()
        return before, during, after

    before, during, after = asyncio.run(run())
    assert before.calls == () and before.seconds_left() is None  # nothing timed yet
    assert during.tokens_per_s == pytest.approx(10.0)
    assert len(during.calls) == 2 and during.generated() == [18, 18]  # 1.8 s at 10 tokens/s
    assert (during.max_tokens, during.tokens_left()) == (60, 24)
    assert during.seconds_left() == pytest.approx(1.2)
    assert after.calls == ()
