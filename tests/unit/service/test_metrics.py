"""Metrics without a server: the do-nothing twin, registries of their own, prometheus_client imported only when on, and
the scheduler's hooks."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
from collections.abc import Sequence

from clemserve.service.domain import GenArgs, Generation, Message, Outcome, Row
from clemserve.service.metrics import Metrics, NoMetrics, create
from clemserve.service.scheduler import Scheduler, SchedulingPolicy

HI = [{"role": "user", "content": "hi"}]


def samples(metrics: Metrics, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {
        frozenset(s.labels.items()): s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == name
    }


def test_no_metrics_has_every_hook_of_metrics() -> None:
    hooks = {name for name, _ in inspect.getmembers(Metrics, inspect.isfunction) if not name.startswith("_")}
    assert hooks == {name for name, _ in inspect.getmembers(NoMetrics, inspect.isfunction) if not name.startswith("_")}
    for name in hooks:
        assert inspect.signature(getattr(Metrics, name)) == inspect.signature(getattr(NoMetrics, name)), name


def test_create_is_off_for_port_0() -> None:
    assert type(create(0)) is NoMetrics and not create(0).enabled
    assert type(create(9100)) is Metrics and create(9100).enabled
    off = NoMetrics()
    assert off.serve("127.0.0.1", 9100) == 0
    assert off.tokens("m", 3, 0) is None


def test_metrics_off_never_imports_prometheus_client() -> None:
    code = (
        "import sys\n"
        "from clemserve.service import cli, server\n"
        "from clemserve.service.metrics import create\n"
        "create(0).request('Generate', '', '', 'OK', 0.0)\n"
        "assert 'prometheus_client' not in sys.modules, 'imported'\n"
        "create(1)\n"
        "assert 'prometheus_client' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_each_metrics_has_its_own_registry() -> None:
    first, second = Metrics(process=False), Metrics(process=False)  # the same family names, no clash
    first.queued("m", 0.5)
    assert samples(first, "clemserve_queue_wait_seconds_count") == {frozenset({("model", "m")}): 1}
    assert samples(second, "clemserve_queue_wait_seconds_count") == {}


# -- scheduler hooks ---------------------------------------------------------------------------------


def test_scheduler_records_batch_sizes_and_queue_waits() -> None:
    metrics = Metrics(process=False)
    gate: asyncio.Event

    async def run_batch(rows: list[Row], args: GenArgs, *_: object) -> list[Outcome]:
        await gate.wait()
        return [Generation(prompt={}, response={}, text="") for _ in rows]

    async def run_one(messages: Sequence[Message], args: GenArgs, *_: object) -> Generation:
        return Generation(prompt={}, response={}, text="")

    async def check() -> None:
        nonlocal gate
        gate = asyncio.Event()
        policy = SchedulingPolicy(max_batch=4, max_wait_s=0)
        batching = Scheduler("b", policy, concurrency=1, run_one=run_one, run_batch=run_batch, metrics=metrics)
        first = asyncio.create_task(batching.submit(HI, GenArgs(), "a"))
        await asyncio.sleep(0.01)  # the first runs alone and holds the only slot
        rest = [asyncio.create_task(batching.submit(HI, GenArgs(), f"c{i}")) for i in range(3)]
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(first, *rest)
        await batching.close()
        alone = Scheduler("one", policy, concurrency=1, run_one=run_one, metrics=metrics)
        await alone.submit(HI, GenArgs(), "a")  # the fast path
        await alone.close()

    asyncio.run(check())
    sizes = samples(metrics, "clemserve_batch_size_bucket")
    assert sizes[frozenset({("model", "b"), ("le", "1.0")})] == 1
    assert sizes[frozenset({("model", "b"), ("le", "4.0")})] == 2  # one batch of 1, one of 3
    assert samples(metrics, "clemserve_batch_size_sum") == {frozenset({("model", "b")}): 4}
    waits = samples(metrics, "clemserve_queue_wait_seconds_count")
    assert waits == {frozenset({("model", "b")}): 4, frozenset({("model", "one")}): 1}
    assert samples(metrics, "clemserve_queue_wait_seconds_sum")[frozenset({("model", "one")})] == 0
    assert samples(metrics, "clemserve_queue_wait_seconds_sum")[frozenset({("model", "b")})] > 0
