"""The model cache: loading a model once on demand, serving calls on it, unloading it.

``ModelManager`` is what the servicer calls, one method per RPC. It resolves selectors with a
:class:`~.resolver.Resolver`, keeps one :class:`~.loaded.LoadedModel` per cache key, and leaves the memory
budget, eviction, idle unloading and leases to :class:`~.residency.Residency`. What it reports (ListModels,
the metrics) is a frozen :class:`~.domain.CacheSnapshot`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta

from clemserve.registry import ModelRegistry, ModelSpec, ensure_alternating_roles
from clemserve.registry.errors import ClemserveError, ResourceExhaustedError, UnavailableError

from .availability import Machine, availability, hub_offline
from .backends import Backend, BackendContext, BackendDeadError, backend_for
from .domain import (
    Availability,
    CacheSnapshot,
    GenArgs,
    Generation,
    LeaseEvent,
    MemoryFigures,
    Message,
    ModelSnapshot,
    ModelState,
    TokenCount,
)
from .loaded import LoadedModel
from .memory import ResidencyPolicy, free_memory, measure, reading
from .metrics import MetricsSink, NoMetrics
from .residency import Residency
from .resolver import Resolver, Selector, cache_key
from .scheduler import Scheduler, SchedulingPolicy
from .streaming import StreamObserver
from .validation import validate_messages

log = logging.getLogger(__name__)


class LoadTimeoutError(UnavailableError):
    """A load ran past --load-timeout. UNAVAILABLE: the caller's own deadline did not pass, and a later
    try may well succeed (a warm disk cache, a free GPU)."""

    reason = "LOAD_TIMEOUT"


class ModelManager:
    def __init__(
        self,
        registry: ModelRegistry,
        context: BackendContext,
        *,
        allow_client_specs: bool = False,
        policy: SchedulingPolicy | None = None,
        metrics: MetricsSink | None = None,
        residency: ResidencyPolicy | None = None,
    ) -> None:
        self.resolver = Resolver(registry, allow_client_specs=allow_client_specs)
        self.context = context
        self.policy = policy or SchedulingPolicy()
        self._models: dict[str, LoadedModel] = {}
        self.residency = Residency(
            residency or ResidencyPolicy(),
            self._models,
            self._unload,
            cache_dir=context.cache_dir,
            max_batch=self.policy.max_batch,
        )
        #: told (model name, serving?) when a model becomes ready, dies or is unloaded (the health service)
        self.on_health: Callable[[str, bool], Awaitable[None]] | None = None
        #: told when a load fails because the process itself can no longer use its GPU (a CUDA error while
        #: loading: the CUDA context stays broken, so no load in this process can succeed until it restarts)
        self.on_process_unusable: Callable[[str], Awaitable[None]] | None = None
        self.metrics = metrics or NoMetrics()
        self.metrics.watch(self.snapshot)
        self._background: set[asyncio.Task[None]] = set()

    @property
    def registry(self) -> ModelRegistry:
        return self.resolver.registry

    def resolve(self, selector: Selector) -> ModelSpec:
        return self.resolver.resolve(selector)

    # -- loading ------------------------------------------------------------------------------

    async def load(self, selector: Selector) -> ModelSnapshot:
        """Load the selector's model unless it is ready; its status once it is."""
        spec, key = self.resolver.servable(selector)
        model = await self._ready(spec, key)
        return model.snapshot(self.residency.leases_on(key))

    async def _ready(self, spec: ModelSpec, key: str, observer: StreamObserver | None = None) -> LoadedModel:
        while True:
            model = self._models.get(key)
            if model is None:
                model = self._models[key] = LoadedModel(spec)
            if model.ready:
                return model
            if model.load_task is None or model.load_task.done():
                model.load_task = asyncio.create_task(self._load(key, model), name=f"load {spec['model_name']}")
            await _wait_for_load(model, observer)
            if self._models.get(key) is model and model.backend is not None:
                return model
            # evicted or unloaded between the load and this caller's turn: load it again

    async def _load(self, key: str, model: LoadedModel) -> Backend:
        model.state, model.reason, model.progress = ModelState.LOADING, "waiting for a load slot", 0.0
        self.residency.start_idle_unloader()
        async with self.residency.load_slots:
            try:
                await self.residency.admit(key, model)
            except BaseException as exc:
                model.state, model.reason = ModelState.FAILED, _reason(exc)
                raise
            return await self._load_admitted(key, model)

    async def _load_admitted(self, key: str, model: LoadedModel) -> Backend:
        name = model.name
        model.reason = "starting"
        model.loads += 1
        loop = asyncio.get_running_loop()

        def tell(line: str, fraction: float) -> None:
            for observer in model.load_observers:
                observer.loading(fraction, line)

        def progress(line: str, fraction: float | None = None) -> None:
            """Backends report from their load thread or the event loop; observers are told on the loop."""
            model.reason = line
            if fraction is not None:
                model.progress = max(model.progress, min(1.0, fraction))
            log.info("loading %s: %s", name, line)
            loop.call_soon_threadsafe(tell, line, model.progress)

        started = time.perf_counter()
        before = reading()
        backend: Backend | None = None
        timeout = self.residency.policy.load_timeout_s
        try:
            backend = backend_for(model.spec)(model.spec, self.context)
            await asyncio.wait_for(backend.load(progress), timeout if timeout > 0 else None)
        except BaseException as exc:
            if isinstance(exc, asyncio.TimeoutError):  # Python 3.10: not yet the builtin
                exc = LoadTimeoutError(
                    f"loading {name} took longer than --load-timeout ({timeout:g} s); it is unloaded, the next "
                    "request tries again"
                )
            model.state, model.reason = ModelState.FAILED, _reason(exc)
            log.warning("loading %s failed: %s", name, model.reason)
            self.metrics.load(name, exc)
            discarding = self._discard(model, backend)
            if not isinstance(exc, LoadTimeoutError):
                await discarding
            if isinstance(exc, BackendDeadError) and self.on_process_unusable is not None:
                await self.on_process_unusable(f"loading {name}: {exc}")
            if isinstance(exc, MemoryError):
                raise ResourceExhaustedError(f"out of memory while loading {name}") from exc
            if isinstance(exc, LoadTimeoutError):
                raise exc from None
            raise
        model.measured_bytes, model.memory = measure(before, backend, self.residency.estimate_parts(key, model.spec))
        model.charged_bytes = max(model.estimated_bytes, model.measured_bytes)
        self.residency.attach(key, model, backend)
        model.backend = backend
        model.scheduler = Scheduler(
            name,
            self.policy,
            concurrency=backend.concurrency,
            run_one=backend.generate,
            run_batch=backend.generate_rows if backend.batches else None,
            metrics=self.metrics,
        )
        model.load_seconds = time.perf_counter() - started
        model.state, model.reason, model.progress = ModelState.READY, "", 1.0
        model.last_used = time.monotonic()
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
        await self._health(name, True)
        return backend

    def _discard(self, model: LoadedModel, backend: Backend | None) -> asyncio.Task[None]:
        """A failed load's backend is unloaded and its memory freed; its bytes stay counted until then. A
        timed-out load's thread may still run, so that unloading goes on in the background."""
        held = self.residency.drain(model)

        async def unload() -> None:
            try:
                if backend is not None:
                    await _quietly_unload(backend)
                free_memory()
            finally:
                self.residency.drained(held)

        task = asyncio.create_task(unload(), name=f"discard {model.name}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _health(self, name: str, serving: bool) -> None:
        if self.on_health is not None:
            await self.on_health(name, serving)

    async def _dead(self, key: str, model: LoadedModel, exc: BackendDeadError) -> None:
        """A dead engine is dropped at once; the next request loads the model again."""
        log.error("%s: %s; dropping it, the next request reloads it", model.name, exc)
        if self._models.get(key) is model:
            del self._models[key]
        model.state, model.reason = ModelState.FAILED, str(exc)
        await self._health(model.name, False)
        backend, model.backend = model.backend, None
        scheduler, model.scheduler = model.scheduler, None
        if scheduler is not None:
            await scheduler.close()
        if backend is not None:
            await _let_go(model, backend, cuda=False)

    # -- unloading ----------------------------------------------------------------------------

    async def unload(self, selector: Selector) -> bool:
        """Free a model after the calls running on it finish. False if it was not loaded."""
        return await self._unload(self.resolver.servable(selector)[1])

    async def _unload(self, key: str) -> bool:
        model = self._models.pop(key, None)
        if model is None:
            return False
        if model.load_task is not None and not model.load_task.done():
            model.load_task.cancel()
        await model.idle.wait()
        was_loaded = model.backend is not None
        # its bytes stay counted until the backend has let them go
        held = self.residency.drain(model)
        try:
            if model.scheduler is not None:
                await model.scheduler.close()
                model.scheduler = None
            if model.backend is not None:
                await _let_go(model, model.backend)
                log.info("unloaded %s", model.name)
                await self._health(model.name, False)
        finally:
            self.residency.drained(held)
        model.backend, model.state = None, ModelState.NOT_LOADED
        return was_loaded

    def end_leases(self) -> None:
        """The server is stopping: leases end now, so that they do not hold the drain for its grace period."""
        self.residency.end_leases()

    async def shutdown(self) -> None:
        self.residency.stop_idle_unloader()
        for key in list(self._models):
            await self._unload(key)

    # -- serving ------------------------------------------------------------------------------

    async def generate(
        self,
        selector: Selector,
        messages: Sequence[Message],
        args: GenArgs,
        caller: str = "",
        observer: StreamObserver | None = None,
    ) -> tuple[ModelSpec, Generation]:
        """One reply; ``caller`` (a game process) gets its fair turn among the model's waiting callers.
        ``observer`` (a streamed request) is told of the load, the queue and the text as they happen; a
        backend that streams nothing has its whole text sent as one piece when it arrives."""
        spec, key = self.resolver.servable(selector)
        validate_messages(messages)
        merged = _alternating(messages)
        model = await self._ready(spec, key, observer)
        scheduler = model.scheduler
        assert model.backend is not None and scheduler is not None
        model.in_flight += 1
        model.idle.clear()
        try:
            call_start = datetime.now()
            started = time.perf_counter()
            generation = await scheduler.submit(merged, args, caller, observer)
            duration = timedelta(seconds=time.perf_counter() - started)
            if observer is not None:
                if not observer.texted:
                    observer.text(generation.text)
                self.metrics.first_token(scheduler.name, observer.first_text_at - observer.created)
        except BackendDeadError as exc:
            await self._dead(key, model, exc)
            raise
        except asyncio.CancelledError:
            log.info("generation on %s cancelled: the caller went away or its deadline passed", spec["model_name"])
            raise
        finally:
            model.in_flight -= 1
            model.last_used = time.monotonic()
            if model.in_flight == 0:
                model.idle.set()
        self.metrics.tokens(spec["model_name"], generation.prompt_tokens, generation.completion_tokens)
        generation.response["clem_player"] = {
            "call_start": str(call_start),
            "call_duration": str(duration),
            "response": generation.text,
            "model_name": spec["model_name"],
        }
        return spec, generation

    async def count_tokens(self, selector: Selector, messages: Sequence[Message]) -> TokenCount:
        spec, key = self.resolver.servable(selector)
        validate_messages(messages)
        model = await self._ready(spec, key)
        assert model.backend is not None
        return await model.backend.count_tokens(ensure_alternating_roles(list(messages)))

    async def lease(
        self, selector: Selector, caller: str, ttl_s: float, load: bool
    ) -> AsyncGenerator[LeaseEvent, None]:
        """Hold the selector's model resident for ``caller`` (loading it first when ``load``): the lease
        granted, then, unless the caller leaves or the server stops first, its expiry after ``ttl_s``."""
        spec, key = self.resolver.servable(selector)
        lease = self.residency.grant(key, caller, ttl_s)
        log.info("lease %s on %s granted to %s for %.0f s", lease.id, spec["model_name"], caller, ttl_s)
        try:
            model = await self._ready(spec, key) if load else self._models.get(key) or LoadedModel(spec)
            leases = self.residency.leases_on(key)
            yield LeaseEvent(lease.id, model.snapshot(leases), lease.seconds_left)
            if not await self.residency.hold(lease):
                log.info("lease %s of %s ended: the server is stopping", lease.id, caller)
                return
            log.info("lease %s of %s expired after %.0f s", lease.id, caller, ttl_s)
            model = self._models.get(key) or LoadedModel(spec)
            yield LeaseEvent(lease.id, model.snapshot(leases), expired=True)
        finally:
            self.residency.release(lease)
            log.info("lease %s released by %s", lease.id, caller)

    # -- what is loaded -----------------------------------------------------------------------

    def snapshot(self) -> CacheSnapshot:
        """The models in the cache (loading, ready or failed) now; the budget where it is known already."""
        budget = self.residency.known_budget
        return CacheSnapshot(
            tuple(model.snapshot(self.residency.leases_on(key)) for key, model in self._models.items()),
            budget_bytes=budget.total if budget else 0,
            used_bytes=self.residency.used(),
            memory_kind=budget.kind if budget else "",
            devices=budget.devices if budget else (),
            memory_source=budget.source if budget else "",
            kv_cache_tokens=self.residency.policy.kv_cache_tokens,
        )

    def engine_of(self, spec: ModelSpec) -> Backend | None:
        """The loaded backend serving ``spec``, or None while it is not loaded and ready."""
        model = self._models.get(cache_key(spec))
        return model.backend if model is not None and model.ready else None

    def loaded_names(self) -> list[str]:
        """The names of the models in the cache (loading, ready or failed)."""
        return [model.name for model in self._models.values()]

    async def list_models(self) -> CacheSnapshot:
        """Every registry entry (with its cache state when loaded, its estimate always), then loaded models
        no entry names, and the budget."""
        budget = await self.residency.find_budget()
        await asyncio.to_thread(self.residency.estimate_all, self.registry)
        found = await asyncio.to_thread(self._availability, budget.kind == "gpu")
        listed: list[ModelSnapshot] = []
        seen: set[str] = set()
        for entry, (available, detail) in zip(self.registry, found, strict=True):
            key = cache_key(entry)
            loaded, leases = self._models.get(key), self.residency.leases_on(key)
            # a copy that several selectors share (ENGINE_FIELDS) is listed as the entry itself
            if loaded is not None:
                snapshot = loaded.snapshot(leases, spec=entry)
            else:
                parts = self.residency.estimate_parts(key, entry)
                memory = MemoryFigures(parts.weights, parts.kv_cache, parts.source if parts.total else "")
                snapshot = ModelSnapshot(entry, leases=leases, estimated_bytes=parts.total, memory=memory)
            listed.append(_available(snapshot, available, detail))
            seen.add(key)
        listed.extend(
            _available(m.snapshot(self.residency.leases_on(k)), None, "")
            for k, m in self._models.items()
            if k not in seen
        )
        return CacheSnapshot(
            tuple(listed),
            budget.total,
            self.residency.used(),
            budget.kind,
            devices=await self.residency.devices(),
            memory_source=budget.source,
            kv_cache_tokens=self.residency.policy.kv_cache_tokens,
        )

    def _availability(self, has_gpu: bool) -> list[tuple[Availability, str]]:
        """Each registry entry's availability (reads installed packages and the Hugging Face cache)."""
        machine = Machine(keys=self.context.keys, has_gpu=has_gpu, offline=hub_offline())
        return [availability(entry, machine) for entry in self.registry]


def _available(snapshot: ModelSnapshot, found: Availability | None, detail: str) -> ModelSnapshot:
    """``snapshot`` with what was found of its availability (None: nothing); a loaded model is ready."""
    if snapshot.state is ModelState.READY:
        found, detail = Availability.READY, ""
    return replace(snapshot, availability=found, availability_detail=detail)


def _reason(exc: BaseException) -> str:
    """A failed load's reason as ListModels shows it."""
    return str(exc) if isinstance(exc, ClemserveError) else f"{type(exc).__name__}: {exc}"


async def _wait_for_load(model: LoadedModel, observer: StreamObserver | None) -> None:
    """Wait for the model's load; shielded, since a caller that gives up must not cancel the load that others
    wait on. A streamed caller is told where the load stands now and how it goes on."""
    assert model.load_task is not None
    if observer is None:
        await asyncio.shield(model.load_task)
        return
    if model.state is ModelState.LOADING:  # a load already running
        observer.loading(model.progress, model.reason)
    else:  # the load just started (the model's reason may still be a failed load's)
        observer.loading(0.0, "starting")
    model.load_observers.add(observer)
    try:
        await asyncio.shield(model.load_task)
    finally:
        model.load_observers.discard(observer)


def _alternating(messages: Sequence[Message]) -> list[Message]:
    """``ensure_alternating_roles(messages)``: a copy in which no two neighbours share a role. Clients merge
    before they send (clembench's format), so there is mostly nothing to merge or cull: then a copy of each
    message does, without the deep copy that merging needs (a request's messages are its own)."""
    first = messages[0]
    if first["role"] == "system" and not first["content"]:
        return ensure_alternating_roles(list(messages))
    for i in range(1, len(messages)):
        if messages[i - 1]["role"] == messages[i]["role"]:
            return ensure_alternating_roles(list(messages))
    return [dict(message) for message in messages]


async def _let_go(model: LoadedModel, backend: Backend, *, cuda: bool = True) -> None:
    """Unload ``backend`` and hand back what it held; a full collection takes up to a second, so only where
    the model held memory. ``cuda=False``: a dead engine's CUDA state is not touched."""
    await _quietly_unload(backend)
    if model.charged_bytes or model.measured_bytes:
        free_memory(cuda=cuda)


async def _quietly_unload(backend: Backend) -> None:
    try:
        await backend.unload()
    except Exception:
        log.exception("unloading %s failed", backend.model_name)
