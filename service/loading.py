"""Loading one admitted model: weights the load would fetch from the hub downloaded first (bounded by
--download-stall-timeout, not by --load-timeout), its backend built and loaded (bounded by --load-timeout,
counted from the end of the download), its memory measured, its scheduler started; a failed load's backend
unloaded and its memory handed back.

The model cache (service/model_cache.py) admits a load with residency first, then hands it here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable

from clemserve.registry.errors import ClemserveError, ResourceExhaustedError, UnavailableError

from .backends import Backend, BackendContext, BackendDeadError, backend_for, locate_weights
from .backends.download import fetch, hub_token
from .backends.hub import offline
from .loaded import LoadedModel
from .memory import free_memory, measure, reading
from .metrics import MetricsSink
from .residency import Residency
from .scheduler import Scheduler, SchedulingPolicy

log = logging.getLogger(__name__)


class LoadTimeoutError(UnavailableError):
    """A load ran past --load-timeout. UNAVAILABLE: the caller's own deadline did not pass, and a later
    try may well succeed (a warm disk cache, a free GPU)."""

    reason = "LOAD_TIMEOUT"


class Loader:
    def __init__(
        self, residency: Residency, context: BackendContext, policy: SchedulingPolicy, metrics: MetricsSink
    ) -> None:
        self.residency = residency
        self.context = context
        self.policy = policy
        self.metrics = metrics
        #: failed loads whose backend is still being let go of (a timed-out load's thread may still run)
        self._background: set[asyncio.Task[None]] = set()

    async def load(self, key: str, model: LoadedModel) -> Backend:
        """Load ``model`` (admitted under ``key``); the model is READY when this returns. A failure leaves it
        FAILED with the reason and raises: a timeout as LoadTimeoutError, running out of memory as
        RESOURCE_EXHAUSTED, a dead engine as BackendDeadError."""
        name = model.name
        model.starting()
        loop = asyncio.get_running_loop()

        def tell(line: str, fraction: float) -> None:
            for observer in model.load_observers:
                observer.loading(fraction, line)

        def show(line: str, fraction: float | None = None) -> None:
            """Backends report from their load thread or the event loop; observers are told on the loop."""
            model.report(line, fraction)
            loop.call_soon_threadsafe(tell, line, model.progress)

        def progress(line: str, fraction: float | None = None) -> None:
            show(line, fraction)
            log.info("loading %s: %s", name, line)

        started = time.perf_counter()
        before = reading()
        backend: Backend | None = None
        timeout = self.residency.policy.load_timeout_s
        try:
            await self._download(model, show)  # logs at its own pace
            context = dataclasses.replace(self.context, grant=self.residency.granted(key))
            backend = backend_for(model.spec)(model.spec, context)
            await asyncio.wait_for(backend.load(progress), timeout if timeout > 0 else None)
        except BaseException as exc:
            if isinstance(exc, asyncio.TimeoutError):  # Python 3.10: not yet the builtin
                exc = LoadTimeoutError(
                    f"loading {name} took longer than --load-timeout ({timeout:g} s); it is unloaded, the next "
                    "request tries again"
                )
            model.failed(reason(exc))
            log.warning("loading %s failed: %s", name, model.reason)
            self.metrics.load(name, exc)
            # after a CUDA error every CUDA call fails: the discarded backend's memory is not handed back to CUDA
            discarding = self._discard(key, model, backend, cuda=not isinstance(exc, BackendDeadError))
            if not isinstance(exc, LoadTimeoutError):
                await discarding
            if isinstance(exc, MemoryError):
                raise ResourceExhaustedError(f"out of memory while loading {name}") from exc
            if isinstance(exc, LoadTimeoutError):
                raise exc from None
            raise
        measured, memory = measure(before, backend, self.residency.estimate_parts(key, model.spec))
        self.residency.charge(key, max(model.estimated_bytes, measured))
        self.residency.attach(key, name, backend)
        scheduler = Scheduler(
            name,
            self.policy,
            concurrency=backend.concurrency,
            run_one=backend.generate,
            run_batch=backend.generate_rows if backend.batches else None,
            metrics=self.metrics,
        )
        model.loaded(backend, scheduler, measured, memory, time.perf_counter() - started)
        log.info(
            "loaded %s in %.2f s: estimated %.1f MiB, measured %.1f MiB (%s), process RSS grew %.1f MiB",
            name,
            model.load_seconds,
            model.estimated_bytes / 2**20,
            model.measured_bytes / 2**20,
            model.memory.measured_by or "nothing to measure",
            model.memory.rss_delta_bytes / 2**20,
        )
        self.metrics.load(name, None)
        return backend

    async def _download(self, model: LoadedModel, show: Callable[[str, float], None]) -> None:
        """Weights that the backend would fetch from the hub as it loads, fetched first (where the server is
        online and the backend's catalog entry says which files), so that --load-timeout counts from here."""
        found = await asyncio.to_thread(locate_weights, model.spec)
        if found is None or not found.download or found.fetch is None or offline():
            return
        token = hub_token(model.spec, self.context.keys)
        await fetch(found.source, found.fetch, show, stall_s=self.residency.policy.download_stall_s, token=token)

    def _discard(self, key: str, model: LoadedModel, backend: Backend | None, *, cuda: bool) -> asyncio.Task[None]:
        """A failed load's backend is unloaded and its memory freed (``cuda``: torch's cached CUDA blocks too);
        its bytes stay counted until then. A timed-out load's thread may still run, so that unloading goes on in
        the background."""
        held = self.residency.drain(key)

        async def unload() -> None:
            try:
                if backend is not None:
                    await quietly_unload(backend)
                free_memory(cuda=cuda)
            finally:
                self.residency.drained(held)

        task = asyncio.create_task(unload(), name=f"discard {model.name}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task


def reason(exc: BaseException) -> str:
    """A failed load's reason as ListModels shows it."""
    return str(exc) if isinstance(exc, ClemserveError) else f"{type(exc).__name__}: {exc}"


async def quietly_unload(backend: Backend) -> None:
    try:
        await backend.unload()
    except Exception:
        log.exception("unloading %s failed", backend.model_name)
