"""Metrics without a server: the do-nothing twin, registries of their own, prometheus_client imported only when on, and
the scheduler's hooks."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
from collections.abc import Sequence

from clemserve.service.domain import Cost, GenArgs, Generation, Message, Outcome, Row
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
    assert off.spent("m", Generation(prompt={}, response={}, text="")) is None


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


def test_spent_counts_tokens_cost_and_compute_seconds_by_model() -> None:
    metrics = Metrics(process=False)
    paid = Generation({}, {}, "", 100, 20, cached_prompt_tokens=40, reasoning_tokens=5, cost=Cost(usd=0.25))
    metrics.spent("paid", paid)
    metrics.spent("paid", Generation({}, {}, "", 10, 2, cost=Cost(unpriced="unknown model")))
    metrics.spent("local", Generation({}, {}, "", 7, 3, cost=Cost(source="local", compute_seconds=1.5)))
    paid_label, local_label = frozenset({("model", "paid")}), frozenset({("model", "local")})
    assert samples(metrics, "clemserve_prompt_tokens_total") == {paid_label: 110, local_label: 7}
    assert samples(metrics, "clemserve_cached_prompt_tokens_total")[paid_label] == 40
    # what the model computed (or the provider billed uncached): the prompt less what a cache served
    assert samples(metrics, "clemserve_computed_prompt_tokens_total") == {paid_label: 70, local_label: 7}
    assert samples(metrics, "clemserve_reasoning_tokens_total")[paid_label] == 5
    assert samples(metrics, "clemserve_cost_usd_total") == {paid_label: 0.25, local_label: 0}
    assert samples(metrics, "clemserve_compute_seconds_total") == {paid_label: 0, local_label: 1.5}
    assert samples(metrics, "clemserve_unpriced_generations_total") == {paid_label: 1}


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


def test_rate_limiters_show_their_concurrency_calls_in_flight_and_waiting_and_429s_at_scrape_time() -> None:
    from clemserve.service.backends.rate_limits import LimiterState

    metrics = Metrics(process=False)
    states = [LimiterState("openai", 4, 4, 12, 3), LimiterState("anthropic", 8, 2, 0, 0)]
    metrics.watch_limits(lambda: states)
    assert samples(metrics, "clemserve_rate_limit_concurrency") == {
        frozenset({("limit", "openai")}): 4,
        frozenset({("limit", "anthropic")}): 8,
    }
    assert samples(metrics, "clemserve_rate_limit_waiting")[frozenset({("limit", "openai")})] == 12
    assert samples(metrics, "clemserve_rate_limit_in_flight")[frozenset({("limit", "anthropic")})] == 2
    assert samples(metrics, "clemserve_rate_limit_upstream_429_total")[frozenset({("limit", "openai")})] == 3
