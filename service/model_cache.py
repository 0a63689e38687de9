"""The model cache: loading a model once on demand, serving calls on it, unloading it.

``ModelCache`` is what the servicer calls, one method per RPC. It resolves selectors with a
:class:`~.resolver.Resolver`, keeps one :class:`~.loaded.LoadedModel` per cache key, and leaves the memory
budget, eviction, idle unloading and leases to :class:`~.residency.Residency`. What it reports (ListModels,
the metrics) is a frozen :class:`~.domain.CacheSnapshot`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from datetime import datetime, timedelta

from clemserve.registry import ModelRegistry, ModelSpec, ensure_alternating_roles

from . import listing
from .availability import HubProbe
from .backends import Backend, BackendContext, BackendDeadError
from .domain import (
    CacheSnapshot,
    GenArgs,
    Generation,
    LeaseEvent,
    Message,
    ModelSnapshot,
    ModelState,
    TokenCount,
)
from .loaded import LoadedModel, Resident
from .loading import Loader, quietly_unload, reason
from .memory import ResidencyPolicy, free_memory
from .metrics import MetricsSink, NoMetrics
from .pricing import Pricing
from .provenance import Provenance, described
from .residency import Residency
from .resolver import Resolver, Selector, cache_key
from .scheduler import CallsInFlight, SchedulingPolicy
from .spend import SpendGuard, SpendLedger
from .streaming import StreamEvent, StreamObserver
from .validation import validate_messages

log = logging.getLogger(__name__)


class ModelCache:
    def __init__(
        self,
        registry: ModelRegistry,
        context: BackendContext,
        *,
        allow_client_specs: bool = False,
        policy: SchedulingPolicy | None = None,
        metrics: MetricsSink | None = None,
        residency: ResidencyPolicy | None = None,
        pricing: Pricing | None = None,
        spend: SpendLedger | None = None,
    ) -> None:
        self.resolver = Resolver(registry, allow_client_specs=allow_client_specs)
        self.context = context
        self.policy = policy or SchedulingPolicy()
        self._models: dict[str, LoadedModel] = {}
        self.residency = Residency(
            residency or ResidencyPolicy(), cache_dir=context.cache_dir, max_batch=self.policy.max_batch
        )
        #: told (model name, serving?) when a model becomes ready, dies or is unloaded (the health service)
        self.on_health: Callable[[str, bool], Awaitable[None]] | None = None
        #: told when a load fails because the process itself can no longer use its GPU (a CUDA error while
        #: loading: the CUDA context stays broken, so no load in this process can succeed until it restarts)
        self.on_process_unusable: Callable[[str], Awaitable[None]] | None = None
        self.metrics = metrics or NoMetrics()
        self.metrics.watch(self.snapshot)
        self.pricing = pricing or Pricing()  # each model's totals (ListModels)
        self.spend = SpendGuard(spend, self.pricing)  # prices each call; reserves and settles under --spend-limit
        self.loader = Loader(self.residency, context, self.policy, self.metrics)
        self._reaper = IdleUnloader(self.residency, self._residents, self._unload)
        #: what an online server's hub said of weights not cached, kept for the process (ListModels)
        self.hub = HubProbe()

    @property
    def registry(self) -> ModelRegistry:
        return self.resolver.registry

    def resolve(self, selector: Selector) -> ModelSpec:
        return self.resolver.resolve(selector)

    def _residents(self) -> list[Resident]:
        return [model.resident(key) for key, model in self._models.items()]

    def _snapshot(self, key: str, model: LoadedModel, spec: ModelSpec | None = None) -> ModelSnapshot:
        return model.snapshot(self.residency.leases_on(key), spec, self.residency.charged(key))

    # -- loading ------------------------------------------------------------------------------

    async def load(self, selector: Selector) -> ModelSnapshot:
        """Load the selector's model unless it is ready; its status once it is."""
        spec, key = self.resolver.servable(selector)
        return self._snapshot(key, await self._ready(spec, key))

    async def _ready(self, spec: ModelSpec, key: str, observer: StreamObserver | None = None) -> LoadedModel:
        while True:
            model = self._models.get(key)
            if model is None:
                model = self._models[key] = LoadedModel(spec)
            if model.ready:
                return model
            if model.load_task is None or model.load_task.done():
                model.loading(asyncio.create_task(self._load(key, model), name=f"load {spec['model_name']}"))
            await _wait_for_load(model, observer)
            if self._models.get(key) is model and model.backend is not None:
                return model
            # evicted or unloaded between the load and this caller's turn: load it again

    async def _load(self, key: str, model: LoadedModel) -> Backend:
        """Admit the load with residency (unloading the models it names to make room), then load."""
        self._reaper.start()
        async with self.residency.load_slots:
            try:
                model.admitted(await self.residency.load_estimate(key, model.spec))
                async with contextlib.aclosing(self.residency.admit(key, model.spec, self._residents())) as victims:
                    async for victim in victims:
                        await self._unload(victim)
            except BaseException as exc:
                model.failed(reason(exc))
                raise
            try:
                backend = await self.loader.load(key, model)
            except BackendDeadError as exc:
                if self.on_process_unusable is not None:
                    await self.on_process_unusable(f"loading {model.name}: {exc}")
                raise
            await self._health(model.name, True)
            return backend

    async def _health(self, name: str, serving: bool) -> None:
        if self.on_health is not None:
            await self.on_health(name, serving)

    async def _dead(self, key: str, model: LoadedModel, exc: BackendDeadError) -> None:
        """A dead engine is dropped at once; the next request loads the model again."""
        log.error("%s: %s; dropping it, the next request reloads it", model.name, exc)
        if self._models.get(key) is model:
            del self._models[key]
        backend, scheduler = model.dropped(str(exc))
        await self._health(model.name, False)
        if scheduler is not None:
            await scheduler.close()
        held = self.residency.drain(key)
        try:
            if backend is not None:
                await _let_go(model, backend, held, cuda=False)
        finally:
            self.residency.drained(held)

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
        held = self.residency.drain(key)
        try:
            if model.scheduler is not None:
                await model.scheduler.close()
            if model.backend is not None:
                await _let_go(model, model.backend, held)
                log.info("unloaded %s", model.name)
                await self._health(model.name, False)
        finally:
            self.residency.drained(held)
        model.unloaded()
        return was_loaded

    def end_leases(self) -> None:
        """The server is stopping: leases end now, so that they do not hold the drain for its grace period."""
        self.residency.end_leases()

    async def shutdown(self) -> None:
        self._reaper.stop()
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
        model.backend.check_args(args)
        model.call_started()
        try:
            call_start = datetime.now()
            started = time.perf_counter()
            submit = functools.partial(scheduler.submit, merged, args, caller, observer)
            generation = await self.spend.call(spec, merged, args, submit)
            generation.call_start = call_start
            generation.call_duration = timedelta(seconds=time.perf_counter() - started)
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
            model.call_ended()
        self.metrics.spent(spec["model_name"], generation)
        return spec, generation

    async def generate_stream(
        self, selector: Selector, messages: Sequence[Message], args: GenArgs, caller: str = ""
    ) -> AsyncGenerator[StreamEvent | tuple[ModelSpec, Generation], None]:
        """``generate`` with its load, queue and text told as they happen, then its reply. The generation runs
        in a task of its own, cancelled (its slot freed) when the stream is closed early: the caller left."""
        observer = StreamObserver()
        task = asyncio.create_task(self.generate(selector, messages, args, caller, observer))
        try:
            async for event in observer.events_until(task):
                yield event
            reply = task.result()
        finally:
            task.cancel()
        yield reply

    async def generate_batch(
        self, selector: Selector, rows: Sequence[Sequence[Message] | Exception], args: GenArgs, caller: str = ""
    ) -> list[tuple[ModelSpec, Generation] | BaseException]:
        """Every row a ``generate`` of its own, submitted at once: the scheduler batches them, and a row's
        error (malformed messages, a context overflow) is that row's alone, named by its own field."""

        async def row(i: int, messages: Sequence[Message] | Exception) -> tuple[ModelSpec, Generation] | BaseException:
            if isinstance(messages, Exception):
                return messages
            try:
                validate_messages(messages, f"conversations[{i}].messages")
                return await self.generate(selector, messages, args, caller)
            except Exception as exc:
                return exc

        return list(await asyncio.gather(*(row(i, messages) for i, messages in enumerate(rows))))

    async def describe(self, selector: Selector, provenance: bool) -> tuple[ModelSpec, Provenance | None]:
        """The selector's registry entry and, when asked, where its answers come from (the loaded engine's
        dtype and device where it is loaded; weights hashed once, off the event loop)."""
        spec = self.resolver.resolve(selector)
        if not provenance:
            return spec, None
        return spec, await asyncio.to_thread(described, spec, self.engine_of(spec), self.pricing)

    async def count_tokens(self, selector: Selector, messages: Sequence[Message]) -> TokenCount:
        spec, key = self.resolver.servable(selector)
        validate_messages(messages)
        model = await self._ready(spec, key)
        assert model.backend is not None
        return await model.backend.count_tokens(ensure_alternating_roles(list(messages)))

    async def lease(
        self, selector: Selector, caller: str, requested_s: float, load: bool
    ) -> AsyncGenerator[LeaseEvent, None]:
        """Hold the selector's model resident for ``caller`` (loading it first when ``load``): the lease
        granted, then, unless the caller leaves or the server stops first, its expiry after the requested
        seconds (0: the server's lease timeout, which also bounds a request)."""
        spec, key = self.resolver.servable(selector)
        ttl_s = self.residency.lease_ttl(requested_s)
        lease = self.residency.grant(key, caller, ttl_s)
        log.info("lease %s on %s granted to %s for %.0f s", lease.id, spec["model_name"], caller, ttl_s)
        try:
            model = await self._ready(spec, key) if load else self._models.get(key) or LoadedModel(spec)
            yield LeaseEvent(lease.id, self._snapshot(key, model), lease.seconds_left)
            if not await self.residency.hold(lease):
                log.info("lease %s of %s ended: the server is stopping", lease.id, caller)
                return
            log.info("lease %s of %s expired after %.0f s", lease.id, caller, ttl_s)
            model = self._models.get(key) or LoadedModel(spec)
            yield LeaseEvent(lease.id, self._snapshot(key, model), expired=True)
        finally:
            self.residency.release(lease)
            log.info("lease %s released by %s", lease.id, caller)

    # -- what is loaded -----------------------------------------------------------------------

    def snapshot(self) -> CacheSnapshot:
        """The models in the cache (loading, ready or failed) now; the budget where it is known already."""
        budget = self.residency.known_budget
        return CacheSnapshot(
            tuple(self._snapshot(key, model) for key, model in self._models.items()),
            budget_bytes=budget.total if budget else 0,
            used_bytes=self.residency.used(),
            memory_kind=budget.kind if budget else "",
            devices=budget.devices if budget else (),
            memory_source=budget.source if budget else "",
            kv_cache_tokens=self.residency.policy.kv_cache_tokens,
        )

    def calls_in_flight(self) -> list[CallsInFlight]:
        """Each model's generations running now (the drain's report while the server stops)."""
        return [f for m in self._models.values() if m.scheduler and (f := m.scheduler.in_flight()).calls]

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
        return await listing.list_models(
            self.registry, self.residency, self.context.keys, self._snapshots(), self.hub, self.pricing.totals()
        )

    def _snapshots(self) -> dict[str, Callable[[ModelSpec | None], ModelSnapshot]]:
        """Each model in the cache, by key: its snapshot, listed under a given registry entry."""
        return {key: functools.partial(self._snapshot, key, model) for key, model in self._models.items()}


class IdleUnloader:
    """Every few seconds, unloads the models that residency finds idle past the keep-alive."""

    def __init__(
        self,
        residency: Residency,
        residents: Callable[[], list[Resident]],
        unload: Callable[[str], Awaitable[bool]],
    ) -> None:
        self.residency, self._residents, self._unload = residency, residents, unload
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        every = self.residency.idle_check_every()
        if every and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._run(every), name="idle unloader")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            for resident in self.residency.idle_past_keep_alive(self._residents()):
                # a call may have come in while another model was unloaded: asked again, one at a time
                now = {r.key: r for r in self._residents()}.get(resident.key)
                if now is None or not self.residency.evictable(now):
                    continue
                log.info(
                    "unloading %s: idle for %.0f s (--keep-alive %g s)",
                    now.name,
                    now.idle_s,
                    self.residency.policy.keep_alive_s,
                )
                await self._unload(resident.key)


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


async def _let_go(model: LoadedModel, backend: Backend, held: int, *, cuda: bool = True) -> None:
    """Unload ``backend`` and hand back what it held; a full collection takes up to a second, so only where
    the model held memory (``held``: its charge in the budget). ``cuda=False``: a dead engine's CUDA state is
    not touched."""
    await quietly_unload(backend)
    if held or model.measured_bytes:
        free_memory(cuda=cuda)
