"""``clemserve run``'s progress display: episodes done, failed and left, the rate of calls and tokens and an
ETA on stderr, the server's outages as they happen, and the summary at the end.

The workers count into :class:`RunCounters`, shared memory the coordinator reads twice a second: their calls,
the tokens those generated, and the outage each worker waits through (``retry.Outage``). While a worker waits
for the server, the progress line says the server is away and for how long; when the server is back, stderr
and the run's log (clembench.log) say after how long, and how long the first call then took.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .retry import Outage
from .run_episodes import Episode, Outcome

log = logging.getLogger(__name__)


class RunCounters:
    """What each worker slot counts, in shared memory: its calls, the tokens they generated, and its current
    or last outage. Each slot has one writer, its worker, so there is no lock a killed worker could leave held.
    Times are ``time.monotonic()``, which every process on the machine shares; 0 means none."""

    def __init__(self, context: Any, jobs: int, servers: Sequence[str] = ()) -> None:
        """``context``: the multiprocessing context the workers are started from; ``servers``: the addresses the
        run's models play on (an outage of one of them is shown with its address)."""
        self.servers = tuple(servers)
        #: which of ``servers`` the slot's worker found away: its index + 1 (0: another, or none)
        self.away_server = context.RawArray("i", jobs)
        self.calls = context.RawArray("q", jobs)
        self.tokens = context.RawArray("q", jobs)
        #: when the slot's worker found the server away
        self.away_since = context.RawArray("d", jobs)
        #: when the server took that worker's calls again (0 while it is away)
        self.back_at = context.RawArray("d", jobs)
        #: when the first call sent to it again was answered (0 while it is away)
        self.answered_at = context.RawArray("d", jobs)

    # -- written by the slot's worker

    def started(self, slot: int) -> None:
        """A (new) worker takes the slot: the outage of one that died there is not its own."""
        self.away_since[slot] = self.back_at[slot] = self.answered_at[slot] = 0.0

    def counted(self, slot: int, tokens: int) -> None:
        self.tokens[slot] += tokens
        self.calls[slot] += 1

    def outage(self, slot: int, outage: Outage) -> None:
        """The worker's process found the server away, or back (an ``outage`` watcher)."""
        if outage.reconnected_s is None:
            self.back_at[slot] = self.answered_at[slot] = 0.0
            self.away_since[slot] = outage.since
            self.away_server[slot] = self.servers.index(outage.address) + 1 if outage.address in self.servers else 0
        else:
            back = outage.since + outage.reconnected_s
            self.back_at[slot], self.answered_at[slot] = back, back + outage.call_s

    # -- read by the coordinator

    def total_calls(self) -> int:
        return sum(self.calls)

    def total_tokens(self) -> int:
        return sum(self.tokens)

    def waiting(self, slot: int) -> bool:
        """Whether the slot's worker waits for a server now."""
        return bool(self.away_since[slot] and not self.answered_at[slot])

    def servers_away(self) -> list[str]:
        """The servers the waiting workers found away (those of ``servers``), in that order."""
        away = {self.away_server[slot] for slot in range(len(self.away_since)) if self.waiting(slot)}
        return [server for number, server in enumerate(self.servers, 1) if number in away]

    def away_since_earliest(self) -> float | None:
        """When the earliest worker still waiting found the server away; None when none waits."""
        slots = zip(self.away_since, self.answered_at, strict=True)
        waiting = [since for since, answered in slots if since and not answered]
        return min(waiting) if waiting else None

    def back_after(self, since: float) -> tuple[float, float] | None:
        """For an outage that began at ``since``: how long until the server took calls again (the earliest
        worker it answered) and how long that worker's first call then took; None if no worker got through."""
        back = [
            (back_at, answered)
            for back_at, answered in zip(self.back_at, self.answered_at, strict=True)
            if back_at and back_at >= since
        ]
        if not back:
            return None
        back_at, answered = min(back)
        return back_at - since, answered - back_at


def rate(count: float, seconds: float, unit: str) -> str:
    """A rate that reads at every speed: per second, or per minute below one a second."""
    per_s = count / max(seconds, 1e-9)
    if per_s >= 1:
        return f"{per_s:.1f} {unit}/s"
    return f"{per_s * 60:.1f} {unit}/min"


@dataclass
class Progress:
    """Episodes done/failed/total, calls and tokens per second (or minute) and an ETA on stderr (tqdm, which
    clemcore brings); while the server is away, that it is and for how long."""

    episodes: list[Episode]
    failed: int = 0
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    calls: int = 0
    tokens: int = 0
    #: the workers' counters (None until the pool starts, and in tests of the display alone)
    counters: RunCounters | None = None
    #: when the outage shown began (None: the server is there)
    away_since: float | None = None
    #: the failures' causes said so far (each is said once)
    causes: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        from tqdm import tqdm

        self.skipped = sum(episode.complete for episode in self.episodes)
        self.done = self.skipped
        self.bar = tqdm(
            total=len(self.episodes), initial=self.skipped, desc="episodes", unit="ep", mininterval=0.5, file=sys.stderr
        )
        self._postfix()

    @property
    def todo(self) -> int:
        return len(self.episodes) - self.skipped

    def watch(self, counters: RunCounters) -> None:
        """Read the workers' tokens and outages from ``counters`` at every :meth:`show`."""
        self.counters = counters

    def show(self, calls: int) -> None:
        self.calls = calls
        if self.counters is not None:
            self.tokens = self.counters.total_tokens()
            self._follow_outage(self.counters)
        self._postfix()

    def _follow_outage(self, counters: RunCounters) -> None:
        since = counters.away_since_earliest()
        if since is not None:
            self.away_since = since if self.away_since is None else min(self.away_since, since)
            return
        if self.away_since is None:
            return
        back = counters.back_after(self.away_since)
        self.away_since = None
        if back is not None:
            reconnected_s, call_s = back
            line = (
                f"clemserve back after {reconnected_s:.1f} s away "
                f"(the first call sent to it again then took {call_s:.1f} s)"
            )
        else:  # the workers gave up waiting (CLEMSERVE_WAIT_FOR_SERVER): their episodes say so
            line = "clemserve: no worker waits for the server any more"
        log.warning("%s", line)
        self.bar.write(line, file=sys.stderr)

    def finished(self, outcome: Outcome) -> None:
        if outcome.error is None:
            self.done += 1
        else:
            self.failed += 1
            # each cause once (the summary counts them): a missing key fails every episode the same way
            if outcome.error not in self.causes:
                self.causes.add(outcome.error)
                self.bar.write(f"failed: {outcome.episode}: {outcome.error}", file=sys.stderr)
        self.bar.update(1)
        self._postfix()

    def not_played(self, episodes: int) -> None:
        """Episodes failed without being played (their game cannot be loaded; the run says why once)."""
        self.failed += episodes
        self.bar.update(episodes)
        self._postfix()

    def calls_per_second(self) -> float:
        return self.calls / max(time.monotonic() - self.started, 1e-9)

    def rates(self) -> str:
        """Calls and tokens per second (per minute where slower), over the run so far."""
        seconds = time.monotonic() - self.started
        return f"{rate(self.calls, seconds, 'calls')}, {rate(self.tokens, seconds, 'tokens')}"

    def _postfix(self) -> None:
        state = f"done={self.done} failed={self.failed} {self.rates()}"
        if self.away_since is not None:
            away = self.counters.servers_away() if self.counters is not None else []
            which = f"server{'s' if len(away) > 1 else ''} {', '.join(away)}" if away else "server"
            state += f" | {which} away {time.monotonic() - self.away_since:.0f} s"
        self.bar.set_postfix_str(state, refresh=True)

    def close(self) -> None:
        self.bar.close()

    def summary(self, run_dir: Path) -> str:
        seconds = time.monotonic() - self.started
        return (
            f"{len(self.episodes)} episodes: {self.done - self.skipped} played, {self.failed} failed, "
            f"{self.skipped} complete before; {self.calls} calls ({self.tokens} tokens) in {seconds:.1f} s "
            f"({self.rates()}); results in {run_dir}"
        )
