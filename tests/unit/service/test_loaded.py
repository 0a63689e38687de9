"""A cache entry's state changes, through its methods."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

from clemserve.registry import ModelSpec
from clemserve.service.domain import MemoryFigures, ModelState, PrefixReuse
from clemserve.service.loaded import LoadedModel


def entry() -> LoadedModel:
    return LoadedModel(ModelSpec(model_name="m", backend="echo", model_config={}))


def test_a_load_goes_from_waiting_to_ready_with_its_progress_and_memory() -> None:
    async def run() -> None:
        model = entry()
        task: asyncio.Task[Any] = asyncio.create_task(asyncio.sleep(0))
        model.loading(task)
        assert (model.state, model.reason, model.progress, model.load_task) == (
            ModelState.LOADING, "waiting for a load slot", 0.0, task,
        )  # fmt: skip
        model.admitted(123)
        model.starting()
        model.report("reading weights", 0.4)
        model.report("still reading", None)
        model.report("older news", 0.2)  # progress never goes back
        assert (model.reason, model.progress, model.loads, model.estimated_bytes) == ("older news", 0.4, 1, 123)
        backend, scheduler = SimpleNamespace(prefix_reuse=lambda: PrefixReuse("reuse", 5)), SimpleNamespace(queued=0)
        model.loaded(backend, scheduler, 456, MemoryFigures(measured_by="parameters and buffers"), 1.5)  # type: ignore[arg-type]
        assert model.ready and (model.backend, model.scheduler) == (backend, scheduler)
        snapshot = model.snapshot(leases=2, charged_bytes=789)
        assert (snapshot.state, snapshot.progress, snapshot.measured_bytes, snapshot.charged_bytes) == (
            ModelState.READY, 1.0, 456, 789,
        )  # fmt: skip
        assert (snapshot.leases, snapshot.load_seconds, snapshot.reason) == (2, 1.5, "")
        assert snapshot.prefix == PrefixReuse("reuse", 5)  # what its backend reuses, while it is loaded
        await task

    asyncio.run(run())


def test_calls_in_flight_keep_it_busy_and_the_last_one_marks_it_used() -> None:
    async def run() -> None:
        model = entry()
        model.call_started()
        model.call_started()
        assert model.in_flight == 2 and not model.idle.is_set()
        before = time.monotonic()
        model.call_ended()
        assert not model.idle.is_set()
        model.call_ended()
        assert model.idle.is_set() and model.last_used >= before
        resident = model.resident("key")
        assert (resident.key, resident.name, resident.in_flight, resident.ready) == ("key", "m", 0, False)

    asyncio.run(run())


def test_a_dead_engine_hands_back_its_backend_and_scheduler_and_fails() -> None:
    model = entry()
    backend, scheduler = object(), object()
    model.loaded(backend, scheduler, 0, MemoryFigures(), 0.1)  # type: ignore[arg-type]
    assert model.dropped("CUDA error") == (backend, scheduler)
    assert (model.state, model.reason, model.backend, model.scheduler) == (ModelState.FAILED, "CUDA error", None, None)
    model.unloaded()
    assert model.state is ModelState.NOT_LOADED
