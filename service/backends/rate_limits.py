"""Rate limits per provider key, held by the server: calls wait in a queue here instead of meeting 429s.

Each limited name (a key.json entry such as ``openai``, or a backend name such as ``azure`` for all of its
entries; ``--rate-limit NAME=concurrency:8,rpm:500,tpm:200000``) has one :class:`Limiter`. A remote call
takes a :class:`Permit` from it before each try and gives it back when the try ends. A permit is granted
when every configured limit allows it:

- concurrency: fewer tries in flight than the current limit, which adapts (AIMD). It starts at the configured
  cap (without one, at 8). A 429 answer lowers it to 3/4 of the tries then in flight (floor 1), once per
  congestion: a 429 to a try sent before the last lowering does not lower it again. After twice as many
  successes in a row as the limit (two round trips at it), it grows by one, up to the cap. Not TCP's
  halving: a key's limiter is usually the only sender on that key, and halving left a quarter of the
  provider's capacity unused where 3/4 leaves an eighth (bench/rate_limits.py's setting, 160 episodes and a
  cap of 10: the provider busy 1.48x against 1.31x of the ideal time, with 2.4% and 3.0% of calls answered 429).
- rpm: fewer requests sent in the last minute than ``rpm``.
- tpm: the tokens of the last minute's requests, plus this one's estimate (prompt characters / 4 plus
  ``max_tokens``), within ``tpm``; a request's estimate is replaced by its real usage when it is known.
  A request alone in the window is always allowed, so that one larger than ``tpm`` is not held forever.
- a pause: a 429 pauses the whole key for its ``Retry-After`` (or the retry policy's backoff).

Waiting callers are served first come, first served, and a caller whose gRPC deadline passes while it waits
leaves the queue with DEADLINE_EXCEEDED naming the limiter (the ``rate_limit`` entry of its metadata).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from clemserve.registry.errors import DeadlineExceededError

log = logging.getLogger(__name__)

#: the window of rpm and tpm, in seconds
WINDOW_S = 60.0
#: what a rate limit may say
FIELDS = ("concurrency", "rpm", "tpm")
#: characters per token, for a prompt's estimate before the provider has counted it
CHARS_PER_TOKEN = 4
#: what a 429 multiplies the concurrency limit by (AIMD's multiplicative decrease)
DECREASE = 0.75
#: the concurrency limit at the start where no cap is configured
INITIAL_CONCURRENCY = 8
#: successes in a row, in multiples of the limit (round trips at it), before the limit grows by one
RAISE_AFTER = 2


@dataclass(frozen=True)
class RateLimit:
    """One name's configured limits (None: no limit of that kind)."""

    concurrency: int | None = None
    rpm: int | None = None
    tpm: int | None = None


def parse_rate_limit(text: str) -> tuple[str, RateLimit]:
    """``NAME=concurrency:8,rpm:500,tpm:200000`` (any of the three fields, at least one) as (NAME, limits);
    ValueError naming the part that is wrong."""
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ValueError(f"{text!r} is not NAME=FIELD:NUMBER,... (for example openai=concurrency:8,rpm:500)")
    values: dict[str, int] = {}
    for part in rest.split(","):
        field_name, colon, value = part.strip().partition(":")
        field_name = field_name.strip()
        if field_name not in FIELDS:
            said = f"unknown field {field_name!r}" if field_name else "an empty field"
            raise ValueError(f"{name}: {said}; the fields are {', '.join(FIELDS)}")
        if field_name in values:
            raise ValueError(f"{name}: {field_name} is given twice")
        try:
            number = int(value.strip()) if colon else 0
        except ValueError:
            number = 0
        if number <= 0:
            raise ValueError(f"{name}: {field_name} must be a whole number above 0, got {value.strip()!r}")
        values[field_name] = number
    return name, RateLimit(**values)


def estimate_tokens(characters: int, max_tokens: int) -> int:
    """A request's tokens before the provider has counted them: its prompt's characters / 4 plus max_tokens."""
    return math.ceil(characters / CHARS_PER_TOKEN) + max(0, max_tokens)


class TokenCharge:
    """A request's tokens as the tpm window counts them: the estimate until ``settle`` gives the real usage."""

    def __init__(self, estimate: int) -> None:
        self.count = max(0, estimate)

    def settle(self, used: int) -> None:
        self.count = max(0, used)


@dataclass(frozen=True)
class LimiterState:
    """What metrics show of one limiter."""

    name: str
    #: the current (adaptive) concurrency limit
    concurrency: int
    in_flight: int
    waiting: int
    #: 429 answers seen since the start
    rate_limited: int
    #: requests and tokens (real usage where known, else the estimate) within the rpm and tpm window
    window_requests: int = 0
    window_tokens: int = 0


class _Sent:
    """A request in the rpm and tpm window."""

    __slots__ = ("at", "tokens")

    def __init__(self, at: float, tokens: TokenCharge) -> None:
        self.at = at
        self.tokens = tokens


class Permit:
    """One try's place under the limits; given back exactly once, through one of its methods."""

    def __init__(self, limiter: Limiter, sent: _Sent) -> None:
        self._limiter = limiter
        self._sent = sent
        self._open = True

    def __enter__(self) -> Permit:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """A try that ended without saying how (an exception on its way out) ends as ``failed``."""
        self.failed()

    def succeeded(self) -> None:
        if self._close():
            self._limiter._succeeded()

    def rate_limited(self, pause_s: float) -> None:
        """The provider answered 429: the limit is lowered and the key pauses ``pause_s`` seconds; a refused
        request used no tokens."""
        if self._close():
            self._sent.tokens = TokenCharge(0)
            self._limiter._rate_limited(self._sent.at, pause_s)

    def failed(self) -> None:
        """Any other end of the try (an error, a cancellation): the limit stays as it is."""
        if self._close():
            self._limiter._done()

    def _close(self) -> bool:
        was_open, self._open = self._open, False
        return was_open


class Limiter:
    """One name's limits, its tries in flight and its queue of waiting callers (FIFO). One owner of its
    state: callers take permits and give them back; nothing else changes it."""

    def __init__(
        self, name: str, limit: RateLimit, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.name = name
        self.configured = limit
        self.window_s = window_s
        self._clock = clock
        #: the current concurrency limit
        self.concurrency = limit.concurrency or INITIAL_CONCURRENCY
        self.in_flight = 0
        self.rate_limited_count = 0
        self._successes = 0
        self._lowered_at = -math.inf
        self._paused_until = -math.inf
        #: requests sent within the window
        self._sent: deque[_Sent] = deque()
        self._waiting: deque[tuple[TokenCharge, asyncio.Future[Permit]]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def state(self) -> LimiterState:
        self._forget(self._clock())
        return LimiterState(
            self.name,
            self.concurrency,
            self.in_flight,
            len(self._waiting),
            self.rate_limited_count,
            len(self._sent),
            self._tokens_sent(),
        )

    async def acquire(self, tokens: TokenCharge, deadline: float | None = None) -> Permit:
        """A permit for one try, once the limits allow it and every earlier caller has had its turn.
        DeadlineExceededError when ``deadline`` (a time.monotonic() value) passes first."""
        if not self._waiting and self._blocked_until(tokens) is None:
            return self._grant(tokens)
        future: asyncio.Future[Permit] = asyncio.get_running_loop().create_future()
        entry = (tokens, future)
        self._waiting.append(entry)
        self._admit()
        started = self._clock()
        try:
            timeout = None if deadline is None else max(0.0, deadline - self._clock())
            return await asyncio.wait_for(future, timeout)
        except BaseException as exc:
            if future.done() and not future.cancelled():
                future.result().failed()  # granted as the caller left: given back
            if isinstance(exc, TimeoutError):
                raise self._deadline_error(self._clock() - started) from None
            raise
        finally:
            if entry in self._waiting:
                self._waiting.remove(entry)
                self._admit()

    def _deadline_error(self, waited_s: float) -> DeadlineExceededError:
        return DeadlineExceededError(
            f"the caller's deadline passed after {waited_s:.1f} s waiting in the rate limiter of '{self.name}' "
            f"(concurrency {self.concurrency}, {self.in_flight} in flight, {len(self._waiting)} waiting)",
            metadata={"rate_limit": self.name},
        )

    # -- granting ---------------------------------------------------------------------------------

    def _grant(self, tokens: TokenCharge) -> Permit:
        sent = _Sent(self._clock(), tokens)
        self._sent.append(sent)
        self.in_flight += 1
        return Permit(self, sent)

    def _blocked_until(self, tokens: TokenCharge) -> float | None:
        """None when a try may start now; else when the limits may allow it (inf: when a try ends)."""
        now = self._clock()
        self._forget(now)
        if now < self._paused_until:
            return self._paused_until
        if self.in_flight >= self.concurrency:
            return math.inf
        limit = self.configured
        if limit.rpm is not None and len(self._sent) >= limit.rpm:
            return self._sent[0].at + self.window_s
        if limit.tpm is not None and self._sent and self._tokens_sent() + tokens.count > limit.tpm:
            return self._tokens_free_at(limit.tpm - tokens.count)
        return None

    def _tokens_free_at(self, room: int) -> float:
        """When the window's tokens fall to ``room`` or less (the window empties at the latest)."""
        used = self._tokens_sent()
        for sent in self._sent:
            used -= sent.tokens.count
            if used <= room:
                return sent.at + self.window_s
        return self._sent[-1].at + self.window_s

    def _tokens_sent(self) -> int:
        return sum(sent.tokens.count for sent in self._sent)

    def _forget(self, now: float) -> None:
        while self._sent and self._sent[0].at + self.window_s <= now:
            self._sent.popleft()

    def _admit(self) -> None:
        """Grant the waiting callers, first come first served, while the limits allow; else wake up when
        they may allow the first one."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiting:
            tokens, future = self._waiting[0]
            if future.done():  # its caller left
                self._waiting.popleft()
                continue
            until = self._blocked_until(tokens)
            if until is not None:
                if until != math.inf:
                    delay = max(0.0, until - self._clock())
                    self._timer = asyncio.get_running_loop().call_later(delay, self._admit)
                return
            self._waiting.popleft()
            future.set_result(self._grant(tokens))

    # -- what permits report ----------------------------------------------------------------------

    def _done(self) -> None:
        self.in_flight -= 1
        self._admit()

    def _succeeded(self) -> None:
        self._successes += 1
        cap = self.configured.concurrency
        if self._successes >= RAISE_AFTER * self.concurrency and (cap is None or self.concurrency < cap):
            self.concurrency += 1
            self._successes = 0
        self._done()

    def _rate_limited(self, sent_at: float, pause_s: float) -> None:
        self.rate_limited_count += 1
        now = self._clock()
        if sent_at >= self._lowered_at:  # a 429 to a try sent under the current limit
            # from what was in flight: a limit above it says nothing of what the provider takes
            before = min(self.concurrency, self.in_flight)
            self.concurrency = max(1, int(before * DECREASE))
            self._lowered_at = now
            self._successes = 0
            log.info(
                "rate limit %s: the provider answered 429; concurrency %d -> %d, paused %.2f s",
                self.name,
                before,
                self.concurrency,
                pause_s,
            )
        self._paused_until = max(self._paused_until, now + max(0.0, pause_s))
        self._done()


class RateLimits:
    """The server's limiters, one per configured name."""

    def __init__(self, configured: Iterable[tuple[str, RateLimit]] = (), window_s: float = WINDOW_S) -> None:
        self._limiters = {name: Limiter(name, limit, window_s) for name, limit in configured}

    def limiter(self, *names: str) -> Limiter | None:
        """The limiter of the first of ``names`` that has one (a key entry, then its backend), else None."""
        return next((self._limiters[name] for name in names if name in self._limiters), None)

    def states(self) -> list[LimiterState]:
        return [limiter.state() for limiter in self._limiters.values()]

    def names(self) -> Mapping[str, RateLimit]:
        return {name: limiter.configured for name, limiter in self._limiters.items()}
