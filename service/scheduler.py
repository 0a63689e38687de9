"""Admission and order for one loaded model: a bounded queue, fair turns across callers, batches.

Requests wait in one queue per caller; the dispatcher takes them round-robin across callers, so a game
process with 100 queued requests cannot starve one with a single request. A full queue refuses at once
(RESOURCE_EXHAUSTED with a retry delay) instead of letting callers pile up. For a backend that batches
(``huggingface_local``), the dispatcher merges waiting requests with the same generation arguments into
one batched call. Before a batch starts, the dispatcher waits (at most ``max_wait_s``) for the callers in
play to come back: a caller that submitted or got a reply in the last second and is not running now.
Games call in turn, so when a batch ends its callers all send their next request within milliseconds;
starting at the first one would split them into two half-size batches for the rest of the run. Other
backends get up to ``concurrency`` calls at a time and batch (vLLM) or fan out (remote APIs) themselves.

A caller that cancels or passes its deadline leaves the queue at once; a running one is told through
its ``cancel`` event, which a batching backend checks between tokens.

A streamed request's ticket carries its observer: told how many requests are ahead when it queues, when
it starts, and its text, through the sink the scheduler hands the backend with the request (a batching
backend gets it in the request's :class:`Row`, the others as ``generate``'s ``sink``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from clemserve.registry.errors import ResourceExhaustedError

from .domain import GenArgs, Generation, Message, Outcome, Row, TextSink
from .metrics import MetricsSink, NoMetrics
from .streaming import StreamObserver

log = logging.getLogger(__name__)

#: how long after its last submission or reply a caller counts as still playing
IN_PLAY_S = 1.0


#: runs one request: its messages, its arguments and its text sink (None: not streamed) -> its result
RunOne = Callable[[Sequence[Message], GenArgs, TextSink | None], Awaitable[Generation]]
#: runs one batch: its rows, their shared arguments and ``done``, which it may tell a row's outcome (by the
#: row's index) as soon as that row has ended -> a result or an error per row
RunBatch = Callable[[list[Row], GenArgs, Callable[[int, Outcome], None]], Awaitable[list[Outcome]]]


@dataclass(frozen=True)
class SchedulingPolicy:
    #: requests that may wait per model; more are refused at once
    max_queue: int = 256
    #: most requests merged into one batched call (batching backends)
    max_batch: int = 8
    #: how long the first waiting request waits for others to join its batch
    max_wait_s: float = 0.005


@dataclass(frozen=True)
class CallsInFlight:
    """A model's running generations at one moment, and how far they likely got: the server's drain reports
    them while it stops. Backends do not say how many tokens a running call has made, so its progress is
    estimated from the model's token rate, measured on the calls that finished lately."""

    model: str
    #: each running generation's max_tokens and the seconds since it started
    calls: tuple[tuple[int, float], ...]
    #: tokens one call generates per second (0: no call has finished yet, so nothing is estimated)
    tokens_per_s: float = 0.0

    def generated(self) -> list[int]:
        """Each call's tokens so far, about (its running time at the token rate, at most its max_tokens)."""
        return [min(most, round(seconds * self.tokens_per_s)) for most, seconds in self.calls]

    @property
    def max_tokens(self) -> int:
        return sum(most for most, _ in self.calls)

    def tokens_left(self) -> int:
        """At most this many tokens are still to come (a call may end sooner, at its end of turn)."""
        return self.max_tokens - sum(self.generated())

    def seconds_left(self) -> float | None:
        """When the last call ends if each runs to its max_tokens at the token rate (they run side by side);
        None when the rate is not known yet."""
        if not self.tokens_per_s:
            return None
        left = [most - made for (most, _), made in zip(self.calls, self.generated(), strict=True)]
        return max(left, default=0) / self.tokens_per_s


@dataclass
class Ticket:
    messages: Sequence[Message]
    args: GenArgs
    caller: str
    future: asyncio.Future[Generation]
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)
    #: the task running this ticket alone (backends without batching), cancelled with its caller
    task: asyncio.Task[None] | None = None
    #: told when the request starts and what text it produces (streamed requests)
    observer: StreamObserver | None = None
    #: when it left the queue (its generation seconds count from here)
    started: float = 0.0

    @property
    def batch_key(self) -> str:
        return json.dumps([self.args.temperature, self.args.max_tokens, self.args.extra], sort_keys=True, default=repr)


class Scheduler:
    def __init__(
        self,
        name: str,
        policy: SchedulingPolicy,
        *,
        concurrency: int,
        run_one: RunOne,
        run_batch: RunBatch | None = None,
        metrics: MetricsSink | None = None,
    ) -> None:
        self.name = name
        self.metrics: MetricsSink = metrics or NoMetrics()
        self.policy = policy
        self.run_one = run_one
        self.run_batch = run_batch
        self._slots = _Slots(concurrency)
        self._callers: dict[str, deque[Ticket]] = {}
        self._turns: deque[str] = deque()
        self._arrived = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._dispatcher = asyncio.create_task(self._dispatch(), name=f"schedule {name}")
        #: seconds the last finished requests took, for the retry delay a full queue suggests
        self._recent_s: deque[float] = deque(maxlen=32)
        #: when each caller last submitted or got a reply: the callers a batch waits for
        self._last_seen: dict[str, float] = {}
        #: callers with requests running now (they cannot join the next batch yet)
        self._running_callers: Counter[str] = Counter()
        self.running = 0
        #: the generations running now: their max_tokens and start, by a number of their own
        self._flights: dict[int, tuple[int, float]] = {}
        self._flight_numbers = itertools.count()
        #: tokens and seconds of the rows that finished lately, for the token rate
        self._recent_tokens: deque[tuple[int, float]] = deque(maxlen=32)

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._callers.values())

    async def submit(
        self, messages: Sequence[Message], args: GenArgs, caller: str, observer: StreamObserver | None = None
    ) -> Generation:
        queued = self.queued if self._callers else 0
        if queued >= self.policy.max_queue:
            raise ResourceExhaustedError(
                f"{self.name} has {self.queued} requests waiting, its queue's limit; try again shortly",
                retry_after_s=self._retry_after(),
            )
        self._last_seen[caller] = time.monotonic()
        if self.run_batch is None and not self._callers and not self._slots.locked():
            return await self._run_now(messages, args, observer)  # nobody waits and a slot is free: no queue trip
        ticket = Ticket(messages, args, caller, asyncio.get_running_loop().create_future(), observer=observer)
        if observer is not None and (ahead := self.queued + (self.running if self._slots.locked() else 0)):
            observer.queued(ahead)
        if caller not in self._callers:
            self._callers[caller] = deque()
            self._turns.append(caller)
        self._callers[caller].append(ticket)
        self._arrived.set()
        try:
            return await asyncio.shield(ticket.future)
        except asyncio.CancelledError:
            ticket.cancel.set()  # queued: it is skipped; running in a batch: stopped between tokens
            if ticket.task is not None:
                ticket.task.cancel()  # running alone: the backend call itself is cancelled (vLLM aborts)
            self._forget(ticket)
            ticket.future.add_done_callback(_consume)
            raise

    async def _run_now(self, messages: Sequence[Message], args: GenArgs, observer: StreamObserver | None) -> Generation:
        """Run in the caller's own task (backends without batching) on a slot that is free now (nothing awaited
        since the caller looked); cancelling the caller cancels it."""
        self._slots.take_now()
        self.running += 1
        started = time.monotonic()
        flights = self._take_off([args.max_tokens], started)
        try:
            if observer is not None:
                observer.ready()
            self.metrics.queued(self.name, 0.0)  # the fast path: no queue, no batch
            generation = await self.run_one(messages, args, _sink(observer))
            generation.generation_seconds = time.monotonic() - started
            self._measure([generation], generation.generation_seconds)
            return generation
        finally:
            self._land(flights)
            self.running -= 1
            self._recent_s.append(time.monotonic() - started)
            self._slots.give()

    def _in_play(self) -> int:
        """Callers seen in the last second (a submission or a reply) with nothing running now."""
        horizon = time.monotonic() - IN_PLAY_S
        for caller in [c for c, seen in self._last_seen.items() if seen < horizon]:
            del self._last_seen[caller]
        return sum(1 for caller in self._last_seen if not self._running_callers[caller])

    async def _fill(self, limit: int) -> None:
        """Wait up to ``max_wait_s`` until every caller in play has a request waiting (or the batch is full);
        a caller alone, or one that left, costs no wait or at most ``max_wait_s``."""
        deadline = time.monotonic() + self.policy.max_wait_s
        while self.queued < limit and len(self._callers) < self._in_play():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return

    def _retry_after(self) -> float:
        per_request = sum(self._recent_s) / len(self._recent_s) if self._recent_s else 1.0
        return round(min(60.0, max(0.1, per_request * self.queued / max(1, self.policy.max_batch))), 2)

    def _forget(self, ticket: Ticket) -> None:
        queue = self._callers.get(ticket.caller)
        if queue is not None and ticket in queue:
            queue.remove(ticket)
            self._drop_if_empty(ticket.caller)

    def _drop_if_empty(self, caller: str) -> None:
        if caller in self._callers and not self._callers[caller]:
            del self._callers[caller]
            self._turns.remove(caller)

    def _take(self, limit: int) -> list[Ticket]:
        """Up to ``limit`` tickets with the first one's arguments, one per caller per round, in turn order."""
        batch: list[Ticket] = []
        key: str | None = None
        progress = True
        while len(batch) < limit and progress:
            progress = False
            for _ in range(len(self._turns)):
                if len(batch) >= limit:
                    break
                caller = self._turns[0]
                self._turns.rotate(-1)
                queue = self._callers[caller]
                while queue and queue[0].cancel.is_set():
                    queue.popleft()
                if queue and (key is None or queue[0].batch_key == key):
                    ticket = queue.popleft()
                    key = ticket.batch_key
                    batch.append(ticket)
                    progress = True
            for caller in list(self._callers):
                self._drop_if_empty(caller)
        return batch

    async def _dispatch(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            while self.queued:
                await self._slots.take()
                limit = self.policy.max_batch if self.run_batch is not None else 1
                if self.run_batch is not None and self.policy.max_wait_s > 0:
                    await self._fill(limit)
                batch = self._take(limit)
                if not batch:
                    self._slots.give()
                    break
                task = asyncio.create_task(self._run(batch))
                if self.run_batch is None:
                    batch[0].task = task
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[Ticket]) -> None:
        if len(batch) > 1:
            log.debug(
                "%s: a batch of %d requests from %d caller(s)", self.name, len(batch), len({t.caller for t in batch})
            )
        self.running += len(batch)
        self._running_callers.update(t.caller for t in batch)
        started = time.monotonic()
        flights = self._take_off([t.args.max_tokens for t in batch], started)
        for ticket in batch:
            ticket.started = started
            self.metrics.queued(self.name, started - ticket.enqueued)
        if self.run_batch is not None:
            self.metrics.batch(self.name, len(batch))
        for ticket in batch:
            if ticket.observer is not None:
                ticket.observer.ready()
        try:
            if self.run_batch is not None:
                rows = [Row(t.messages, t.cancel, _sink(t.observer)) for t in batch]

                def done(row: int, outcome: Outcome) -> None:  # a row that ended before its batch
                    _settle(batch[row], outcome)

                results = await self.run_batch(rows, batch[0].args, done)
            else:
                alone = batch[0]
                results = [await _outcome(self.run_one(alone.messages, alone.args, _sink(alone.observer)))]
            self._measure(results, time.monotonic() - started)
            for ticket, result in zip(batch, results, strict=True):
                _settle(ticket, result)
        except BaseException as exc:  # the whole call failed: every row gets the error
            for ticket in batch:
                if ticket.future.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    ticket.future.cancel()
                else:
                    ticket.future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self._land(flights)
            self.running -= len(batch)
            self._running_callers.subtract(t.caller for t in batch)
            ended = time.monotonic()
            for ticket in batch:
                self._last_seen[ticket.caller] = ended  # in play: its next request likely comes soon
                if not self._running_callers[ticket.caller]:
                    del self._running_callers[ticket.caller]
            self._recent_s.append((ended - started) / len(batch))
            self._slots.give()

    def _take_off(self, max_tokens: list[int], started: float) -> list[int]:
        numbers = [next(self._flight_numbers) for _ in max_tokens]
        self._flights.update(zip(numbers, ((most, started) for most in max_tokens), strict=True))
        return numbers

    def _land(self, numbers: list[int]) -> None:
        for number in numbers:
            self._flights.pop(number, None)

    def _measure(self, outcomes: Sequence[Outcome], seconds: float) -> None:
        """The token rate's latest samples: each generated row, over the time its call ran."""
        for outcome in outcomes:
            if isinstance(outcome, Generation) and outcome.completion_tokens:
                self._recent_tokens.append((outcome.completion_tokens, seconds))

    def in_flight(self) -> CallsInFlight:
        """The generations running now (for the drain's report)."""
        now = time.monotonic()
        tokens, seconds = sum(t for t, _ in self._recent_tokens), sum(s for _, s in self._recent_tokens)
        return CallsInFlight(
            self.name,
            tuple((most, now - started) for most, started in self._flights.values()),
            tokens / seconds if seconds > 0 else 0.0,
        )

    async def close(self) -> None:
        self._dispatcher.cancel()
        for caller in list(self._callers):
            for ticket in self._callers.pop(caller):
                if not ticket.future.done():
                    ticket.future.cancel()
        self._turns.clear()
        await asyncio.gather(self._dispatcher, *self._tasks, return_exceptions=True)


class _Slots:
    """How many requests may run at once. A request that finds the queue empty takes a free slot at once,
    without a trip through the event loop (the fast path, most calls); the dispatcher, the only one that
    waits, waits for one to be given back."""

    def __init__(self, size: int) -> None:
        self.free = size
        self._given = asyncio.Event()

    def locked(self) -> bool:
        return self.free <= 0

    def take_now(self) -> None:
        """Take a slot that is free (the caller made sure)."""
        assert self.free > 0, "no slot free"
        self.free -= 1

    async def take(self) -> None:
        while self.free <= 0:
            self._given.clear()
            await self._given.wait()
        self.free -= 1

    def give(self) -> None:
        self.free += 1
        self._given.set()


def _sink(observer: StreamObserver | None) -> TextSink | None:
    """Where a request's text goes: its observer's (a streamed request), else nowhere."""
    return observer.text if observer is not None else None


def _settle(ticket: Ticket, outcome: Outcome) -> None:
    """Give the caller its outcome, unless it has one already (a row that ended early) or has gone."""
    if ticket.future.done():
        return
    if isinstance(outcome, BaseException):
        ticket.future.set_exception(outcome)
    else:
        outcome.generation_seconds = time.monotonic() - ticket.started
        ticket.future.set_result(outcome)


def _consume(future: asyncio.Future[Generation]) -> None:
    """Nobody waits for a cancelled caller's result any more; take its error so asyncio does not warn."""
    if not future.cancelled():
        future.exception()


async def _outcome(call: Awaitable[Generation]) -> Outcome:
    try:
        return await call
    except Exception as exc:
        return exc
