"""Stopping without looking like a network fault.

From SIGTERM on, a call that reaches the server is refused with UNAVAILABLE, reason SHUTTING_DOWN; calls in
flight get the grace period to finish, and those still running when it ends are ended with the same status
(grpc alone would cut them with a bare "Cancelling all calls"). A client that sees SHUTTING_DOWN knows the
server is restarting, not lost, and waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars

from clemserve.registry.errors import ShuttingDownError


class Drain:
    """The calls a server has in flight, and whether it is stopping."""

    def __init__(self) -> None:
        self.stopping = False
        #: set when the grace period is over and the calls still running are being ended
        self.cutting = False
        self.grace_period_s = 0.0
        self._calls: set[asyncio.Task[object]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return len(self._calls)

    def enter(self) -> asyncio.Task[object] | None:
        """A call starts (its handler's task, returned for :meth:`leave`); refused once the server is stopping.
        Outside a task (nothing to end later) it is not counted."""
        if self.stopping:
            raise ShuttingDownError("clemserve is shutting down (stopped or restarting) and takes no new calls")
        task = asyncio.current_task()
        if task is not None:
            self._calls.add(task)
            self._idle.clear()
        return task

    def leave(self, task: asyncio.Task[object] | None) -> None:
        """The call that :meth:`enter` returned ``task`` for has ended."""
        if task is not None:
            self._calls.discard(task)
            if not self._calls:
                self._idle.set()

    def stop(self, grace_period_s: float) -> None:
        """Refuse new calls from now on."""
        self.stopping, self.grace_period_s = True, grace_period_s

    async def finished(self, timeout_s: float) -> bool:
        """Whether every call in flight ended within ``timeout_s``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        return not self._calls

    def cut(self) -> int:
        """End the calls still running (each with :meth:`cut_error`); how many there were."""
        self.cutting = True
        for task in self._calls:
            task.cancel()
        return len(self._calls)

    def cut_error(self) -> ShuttingDownError:
        return ShuttingDownError(
            f"clemserve is shutting down (stopped or restarting): this call did not finish within its "
            f"{self.grace_period_s:g} s grace period"
        )


#: the Drain of the server whose event loop serves this call; handler tasks inherit it from the context
#: the server was started in (None where no server set one, as in tests that call a servicer directly)
current: contextvars.ContextVar[Drain | None] = contextvars.ContextVar("clemserve_drain", default=None)
