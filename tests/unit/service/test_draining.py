"""Stopping without looking like a network fault: calls counted while in flight, refused once the server stops,
waited for through the grace period, then ended with SHUTTING_DOWN."""

from __future__ import annotations

import asyncio

import pytest

from clemserve.registry.errors import ShuttingDownError, UnavailableError
from clemserve.service.draining import Drain


def test_calls_are_counted_while_in_flight_and_idle_after() -> None:
    async def check() -> None:
        drain = Drain()
        release = asyncio.Event()

        async def call() -> None:
            task = drain.enter()
            try:
                await release.wait()
            finally:
                drain.leave(task)

        calls = [asyncio.create_task(call()) for _ in range(3)]
        await asyncio.sleep(0)
        assert len(drain) == 3
        assert not await drain.finished(0.01)  # still running: not finished within the timeout
        release.set()
        await asyncio.gather(*calls)
        assert len(drain) == 0
        assert await drain.finished(0.01)

    asyncio.run(check())


def test_outside_a_task_a_call_is_not_counted() -> None:
    async def check() -> None:
        drain = Drain()
        entered = asyncio.get_running_loop().create_future()
        # a callback the loop runs is in no task: nothing to end later
        asyncio.get_running_loop().call_soon(lambda: entered.set_result(drain.enter()))
        assert await entered is None and len(drain) == 0
        drain.leave(None)
        assert len(drain) == 0 and await drain.finished(0)

    asyncio.run(check())


def test_once_stopping_new_calls_are_refused_as_shutting_down() -> None:
    drain = Drain()
    drain.stop(grace_period_s=7.5)
    assert drain.stopping and drain.grace_period_s == 7.5
    with pytest.raises(ShuttingDownError) as caught:
        drain.enter()
    assert isinstance(caught.value, UnavailableError) and caught.value.reason == "SHUTTING_DOWN"
    assert "takes no new calls" in str(caught.value)


def test_calls_still_running_after_the_grace_period_are_cut() -> None:
    async def check() -> None:
        drain = Drain()
        ended: list[str] = []

        async def call(name: str, seconds: float) -> None:
            task = drain.enter()
            try:
                await asyncio.sleep(seconds)
                ended.append(name)
            except asyncio.CancelledError:
                ended.append(f"{name} cut")
                raise
            finally:
                drain.leave(task)

        quick = asyncio.create_task(call("quick", 0))
        slow = asyncio.create_task(call("slow", 60))
        await asyncio.sleep(0)
        drain.stop(grace_period_s=0.05)
        assert not await drain.finished(0.05)
        assert drain.cut() == 1 and drain.cutting
        await asyncio.gather(quick, slow, return_exceptions=True)
        assert ended == ["quick", "slow cut"] and len(drain) == 0

    asyncio.run(check())


def test_the_cut_error_names_the_grace_period() -> None:
    drain = Drain()
    drain.stop(2.0)
    err = drain.cut_error()
    assert isinstance(err, ShuttingDownError) and "within its 2 s grace period" in str(err)
