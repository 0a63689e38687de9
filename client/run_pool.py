"""``clemserve run``'s worker pool: JOBS long-lived processes, each playing the episodes it is sent one at a
time (``run_worker``). A worker that dies (SIGKILL, the OOM killer, a crash) fails only the episode it was
playing, and a fresh worker takes its place."""

from __future__ import annotations

import contextlib
import multiprocessing
import shutil
import signal
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .run_episodes import Episode, Outcome, WorkerConfig
from .run_progress import RunCounters


@dataclass
class _Slot:
    """One worker process, its pipe, and the episode it is playing (None while idle or setting up)."""

    process: Any
    connection: Any
    episode: Episode | None = None


class WorkerPool:
    """JOBS long-lived worker processes (``run_worker.serve``), fed one episode at a time through a pipe each.

    A worker's death is seen on its process sentinel: the episode it held fails with the signal, and a new
    worker takes the slot if episodes are left. Ctrl-C reaches the workers only through ``cancel``.
    """

    def __init__(
        self,
        config: WorkerConfig,
        jobs: int,
        serve: Callable[..., None] | None = None,
        servers: Sequence[str] = (),
    ) -> None:
        """``serve``: a worker's life, ``serve(connection, config, slot, calls)`` (None: ``run_worker.serve``,
        which plays with clemcore); ``servers``: the addresses the models play on, for the progress line."""
        self.config = config
        self.jobs = jobs
        self.servers = tuple(servers)
        self.slots: list[_Slot | None] = [None] * jobs
        self._serve = serve
        self.stopped = False  # set by stop_starting

    def __enter__(self) -> WorkerPool:
        self.context = multiprocessing.get_context("forkserver")  # started early by start_fork_server
        # calls, tokens and outages per slot: each written by its worker alone
        self.calls = RunCounters(self.context, self.jobs, self.servers)
        for index in range(self.jobs):
            self._start(index)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop_all()

    def _start(self, index: int) -> _Slot:
        if self._serve is None:
            from .run_worker import serve

            self._serve = serve
        mine, theirs = self.context.Pipe()
        process = self.context.Process(
            target=self._serve,
            args=(theirs, self.config, index, self.calls),
            name=f"clemserve-run-{index}",
            daemon=True,
        )
        process.start()
        theirs.close()
        slot = self.slots[index] = _Slot(process, mine)
        return slot

    def stop_starting(self) -> None:
        """Start no more episodes; those in flight finish (a --max-cost cap was reached)."""
        self.stopped = True

    def calls_made(self) -> int:
        return self.calls.total_calls()

    def play(
        self, episodes: Sequence[Episode], finished: Callable[[Outcome], None], show: Callable[[int], None]
    ) -> list[Episode]:
        """Every episode played; ``finished`` is told each outcome as it comes, ``show`` the calls made so far
        at least twice a second. Returns when all are done; after ``stop_starting``, when those started are
        done, with the episodes not started.

        While a worker waits for a server that went away, no episode is started: every episode of a run plays
        all its models, so it would wait too, after spending calls on the other servers' models. The waiting
        episodes go on when the server is back, or fail when they give up (``CLEMSERVE_WAIT_FOR_SERVER``);
        then the next ones start."""
        from multiprocessing.connection import wait

        todo = deque(episodes)
        for episode in todo:
            _discard(episode.folder)  # what an interrupted or failed earlier try left
        while True:
            held = any(
                self.calls.waiting(index) for index, slot in enumerate(self.slots) if slot and slot.episode is not None
            )
            for index, slot in enumerate(self.slots):
                if todo and not held and not self.stopped and (slot is None or slot.episode is None):
                    if slot is None or not slot.process.is_alive():
                        slot = self._start(index)
                    slot.episode = todo.popleft()
                    slot.connection.send(slot.episode)
            busy = [slot for slot in self.slots if slot is not None and slot.episode is not None]
            if not busy:
                return list(todo)
            ready = wait([s.connection for s in busy] + [s.process.sentinel for s in busy], timeout=0.5)
            show(self.calls_made())
            for slot in busy:
                if slot.connection in ready or slot.process.sentinel in ready:
                    outcome = self._outcome(slot)
                    if outcome is not None:
                        finished(outcome)

    def _outcome(self, slot: _Slot) -> Outcome | None:
        """The outcome of the slot's episode when there is one now: the worker's answer, or its death."""
        episode = slot.episode
        assert episode is not None
        try:
            if slot.connection.poll():
                outcome: Outcome = slot.connection.recv()
                slot.episode = None
                return outcome
        except (EOFError, OSError):  # the pipe closed: the worker is gone
            pass
        if slot.process.is_alive():
            return None
        slot.process.join()
        slot.episode = None
        _discard(episode.folder)  # whatever it wrote was cut short
        slot.connection.close()
        return Outcome(episode, _death(slot.process.exitcode))

    def cancel(self) -> list[Episode]:
        """Stop every worker now; remove the folders of the episodes they had not completed."""
        in_flight = [slot.episode for slot in self.slots if slot is not None and slot.episode is not None]
        for slot in self.slots:
            if slot is not None:
                slot.process.terminate()
        self._stop_all()
        cancelled = [episode for episode in in_flight if not episode.complete]
        for episode in cancelled:
            _discard(episode.folder)
        return cancelled

    def _stop_all(self) -> None:
        for slot in self.slots:
            if slot is not None and slot.process.is_alive():
                with contextlib.suppress(OSError):
                    slot.connection.send(None)  # idle: it returns
        for slot in self.slots:
            if slot is not None:
                slot.process.join(timeout=5)
                if slot.process.is_alive():
                    slot.process.kill()
                    slot.process.join()
                slot.connection.close()
        self.slots = [None] * self.jobs


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        why = " (the out-of-memory killer sends it, as does kill -9)" if name == "SIGKILL" else ""
        return f"worker process killed by {name}{why}"
    return f"worker process exited with code {exitcode} while playing it"


def _discard(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
