"""Which models exist, which are loaded, and loading them once on demand."""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from clemserve.registry import ModelRegistry, ModelSpec, ensure_alternating_roles
from clemserve.registry.errors import ClemserveError, InvalidArgumentError, ResourceExhaustedError, UnavailableError

from .backends import Backend, BackendContext, BackendDeadError, backend_class
from .domain import GenArgs, Generation, Message, TokenCount
from .memory import Budget, ResidencyPolicy, budget_from_setting, estimate, free_memory, memory_in_use
from .metrics import NoMetrics
from .safety import check_selector
from .scheduler import Scheduler, SchedulingPolicy
from .streaming import StreamObserver, text_sink
from .validation import validate_messages

log = logging.getLogger(__name__)

_PLAYER_BACKENDS = ("_player_human", "_player_programmed")
RESOLVE_CACHE_SIZE = 4096
#: the spec fields that decide what a load produces (weights, engine, context); others, such as
#: temperature or lookup_source, do not, so selectors differing only there share one loaded copy
ENGINE_FIELDS = ("model_name", "backend", "huggingface_id", "model_id", "model_config", "context_size")


class ModelState(enum.Enum):
    NOT_LOADED = 1
    LOADING = 2
    READY = 3
    FAILED = 4


@dataclass
class LoadedModel:
    """A spec's place in the cache: its state, its backend once ready, the calls running on it."""

    spec: ModelSpec
    state: ModelState = ModelState.NOT_LOADED
    reason: str = ""
    backend: Backend | None = None
    load_task: asyncio.Task[Backend] | None = None
    load_seconds: float = 0.0
    loads: int = 0
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    #: orders and batches the model's requests once it is ready
    scheduler: Scheduler | None = None
    #: the load's fraction done, 0 to 1, where the backend tells
    progress: float = 0.0
    #: streamed requests waiting for this load, told of its progress
    load_observers: set[StreamObserver] = field(default_factory=set)
    #: expected footprint in bytes (service/memory.py), found before the load
    estimated_bytes: int = 0
    #: what the load took, measured when it finished
    measured_bytes: int = 0
    #: what this model holds in the memory budget: its estimate while loading, then the larger of the two
    charged_bytes: int = 0
    #: when it last finished a request or a load (time.monotonic), for idle unloading and eviction order
    last_used: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def queued(self) -> int:
        """Requests waiting in the model's queue (none before it is ready)."""
        return self.scheduler.queued if self.scheduler is not None else 0


class LoadTimeoutError(UnavailableError):
    """A load ran past --load-timeout. UNAVAILABLE: the caller's own deadline did not pass, and a later
    try may well succeed (a warm disk cache, a free GPU)."""

    reason = "LOAD_TIMEOUT"


def cache_key(spec: ModelSpec) -> str:
    """Loaded models are cached by their ``ENGINE_FIELDS`` (content, not key order)."""
    engine = {name: value for name, value in spec.to_dict().items() if name in ENGINE_FIELDS}
    return json.dumps(engine, sort_keys=True, separators=(",", ":"))


class ModelManager:
    def __init__(
        self,
        registry: ModelRegistry,
        context: BackendContext,
        *,
        allow_client_specs: bool = False,
        policy: SchedulingPolicy | None = None,
        metrics: NoMetrics | None = None,
        residency: ResidencyPolicy | None = None,
    ) -> None:
        self.registry = registry
        self.context = context
        self.policy = policy or SchedulingPolicy()
        #: let selectors add fields that choose what is loaded or called (service/safety.py); off by default
        self.allow_client_specs = allow_client_specs
        self._models: dict[str, LoadedModel] = {}
        # The registry does not change while serving, so a selector resolves the same way every time;
        # game processes send the same few selectors on every turn.
        self._resolved: OrderedDict[str, tuple[ModelSpec, str]] = OrderedDict()
        #: told (model name, serving?) when a model becomes ready, dies or is unloaded (the health service)
        self.on_health: Callable[[str, bool], Awaitable[None]] | None = None
        self.metrics = metrics or NoMetrics()
        self.metrics.watch(self)
        self.residency = residency or ResidencyPolicy()
        self._budget: Budget | None = None
        self._estimates: dict[str, int] = {}
        #: active leases by cache key: lease id -> caller; kept apart from the cache entry, which a reload replaces
        self._leases: dict[str, dict[str, str]] = {}
        #: set when the server stops: leases end then, so that they do not hold the drain for its grace period
        self.closing = asyncio.Event()
        self._load_slots = asyncio.Semaphore(max(1, self.residency.max_concurrent_loads))
        #: one admission (evict, then reserve) at a time, so two loads never count the same free bytes
        self._admission = asyncio.Lock()
        #: bytes still held by failed loads whose backend is being unloaded
        self._draining = 0
        self._background: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None

    # -- resolution ---------------------------------------------------------------------------

    def resolve(self, selector: str | Mapping[str, Any]) -> ModelSpec:
        return self._resolve(selector)[0]

    def _resolve(self, selector: str | Mapping[str, Any]) -> tuple[ModelSpec, str]:
        """The unified spec and its cache key."""
        # key order matters (it orders the result's keys), so the lookup key keeps it
        lookup = selector if isinstance(selector, str) else "\0" + json.dumps(selector, default=repr)
        found = self._resolved.get(lookup)
        if found is None:
            spec = self.registry.resolve(selector)
            if not self.allow_client_specs:
                check_selector(selector, self.registry)
            found = self._resolved[lookup] = (spec, cache_key(spec))
            if len(self._resolved) > RESOLVE_CACHE_SIZE:
                self._resolved.popitem(last=False)
        return found

    def _servable(self, selector: str | Mapping[str, Any]) -> tuple[ModelSpec, str]:
        spec, key = self._resolve(selector)
        if spec["backend"] in _PLAYER_BACKENDS:
            raise InvalidArgumentError(
                "model",
                f"{spec['model_name']!r} is a {spec['backend'][len('_player_') :]} player: the game answers "
                "for it, no server does",
            )
        return spec, key

    # -- loading ------------------------------------------------------------------------------

    async def load(self, selector: str | Mapping[str, Any]) -> LoadedModel:
        return await self._ready(*self._servable(selector))

    async def _ready(self, spec: ModelSpec, key: str, observer: StreamObserver | None = None) -> LoadedModel:
        while True:
            model = self._models.get(key)
            if model is None:
                model = self._models[key] = LoadedModel(spec)
            if model.state is ModelState.READY:
                return model
            if model.load_task is None or model.load_task.done():
                model.load_task = asyncio.create_task(self._load(key, model), name=f"load {spec['model_name']}")
            await _wait_for_load(model, observer)
            if self._models.get(key) is model and model.backend is not None:
                return model
            # evicted or unloaded between the load and this caller's turn: load it again

    @property
    def budget(self) -> Budget:
        """Found on first use, so that a server that never loads a local model never asks a GPU."""
        if self._budget is None:
            self._budget = budget_from_setting(self.residency.memory_budget)
            log.info("memory budget: %.2f GiB of %s", self._budget.total / 2**30, self._budget.kind)
        return self._budget

    def estimate(self, key: str, spec: ModelSpec) -> int:
        """The model's expected bytes, found once per cache key (reading file headers; run it off the loop)."""
        found = self._estimates.get(key)
        if found is None:
            found = self._estimates[key] = estimate(spec, self.context.cache_dir, max_batch=self.policy.max_batch).total
        return found

    def estimate_registry(self) -> None:
        """Estimate every registry entry not estimated yet (file headers: run it off the event loop)."""
        for entry in self.registry:
            self.estimate(cache_key(entry), entry)

    def memory_used(self) -> int:
        """What loaded and loading models hold in the budget, failed loads still unloading included."""
        return sum(m.charged_bytes for m in self._models.values()) + self._draining

    async def _load(self, key: str, model: LoadedModel) -> Backend:
        name = model.spec["model_name"]
        model.state, model.reason, model.progress = ModelState.LOADING, "waiting for a load slot", 0.0
        self._start_reaper()
        async with self._load_slots:
            try:
                model.estimated_bytes = await asyncio.to_thread(self.estimate, key, model.spec)
                await self._admit(key, model)
            except BaseException as exc:
                model.state, model.reason = ModelState.FAILED, _reason(exc)
                raise
            return await self._load_admitted(model, name)

    async def _load_admitted(self, model: LoadedModel, name: str) -> Backend:
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
        before = memory_in_use(self.budget.kind)
        backend: Backend | None = None
        timeout = self.residency.load_timeout_s
        try:
            backend = backend_class(model.spec["backend"])(model.spec, self.context)
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
            if isinstance(exc, MemoryError):
                raise ResourceExhaustedError(f"out of memory while loading {name}") from exc
            if isinstance(exc, LoadTimeoutError):
                raise exc from None
            raise
        model.measured_bytes = max(0, memory_in_use(self.budget.kind) - before)
        model.charged_bytes = max(model.estimated_bytes, model.measured_bytes)
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
            "loaded %s in %.2f s: estimated %.1f MiB, measured %.1f MiB",
            name,
            model.load_seconds,
            model.estimated_bytes / 2**20,
            model.measured_bytes / 2**20,
        )
        self.metrics.load(name, None)
        await self._health(name, True)
        return backend

    def _discard(self, model: LoadedModel, backend: Backend | None) -> asyncio.Task[None]:
        """A failed load's backend is unloaded and its memory freed; its bytes stay counted until then. A
        timed-out load's thread may still run, so that unloading goes on in the background."""
        held, model.charged_bytes = model.charged_bytes, 0
        self._draining += held

        async def unload() -> None:
            try:
                if backend is not None:
                    await _quietly_unload(backend)
                free_memory()
            finally:
                self._draining -= held

        task = asyncio.create_task(unload(), name=f"discard {model.spec['model_name']}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- residency ----------------------------------------------------------------------------

    async def _admit(self, key: str, model: LoadedModel) -> None:
        """Reserve the model's estimate in the budget, evicting least recently used idle models as needed."""
        need, budget = model.estimated_bytes, self.budget
        async with self._admission:
            if need > budget.total:
                raise self._exhausted(model, "it is larger than the whole budget")
            while budget.total - self.memory_used() < need:
                victim = self._least_recently_used(exclude=key)
                if victim is None:
                    raise self._exhausted(model, "no loaded model can be evicted")
                evicted = self._models[victim]
                log.info(
                    "evicting %s (idle %.0f s) to make room for %s",
                    evicted.spec["model_name"],
                    time.monotonic() - evicted.last_used,
                    model.spec["model_name"],
                )
                await self._unload(victim)
            model.charged_bytes = need

    def evictable(self, key: str, model: LoadedModel) -> bool:
        """Loaded, with no request in flight or queued and no lease."""
        return model.state is ModelState.READY and model.in_flight == 0 and not self._leases.get(key)

    def _least_recently_used(self, exclude: str) -> str | None:
        idle = [(m.last_used, key) for key, m in self._models.items() if key != exclude and self.evictable(key, m)]
        return min(idle)[1] if idle else None

    def _exhausted(self, model: LoadedModel, why: str) -> ResourceExhaustedError:
        budget, free = self.budget, max(0, self.budget.total - self.memory_used())
        holders = [
            f"{m.spec['model_name']} ({m.charged_bytes / 2**20:.0f} MiB, {self._pinned_by(key, m)})"
            for key, m in self._models.items()
            if m.charged_bytes
        ]
        return ResourceExhaustedError(
            f"cannot load {model.spec['model_name']}: it needs about {model.estimated_bytes / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB of the {budget.total / 2**20:.0f} MiB {budget.kind} budget is free and {why}"
            + (f"; held by {', '.join(holders)}" if holders else ""),
            required_bytes=model.estimated_bytes,
            available_bytes=free,
            metadata={"budget_bytes": str(budget.total), "memory_kind": budget.kind, "held_by": "; ".join(holders)},
        )

    def _pinned_by(self, key: str, model: LoadedModel) -> str:
        """Why a model holding memory cannot be evicted now."""
        reasons = []
        if self._leases.get(key):
            reasons.append(f"{len(self._leases[key])} lease(s)")
        if model.in_flight:
            reasons.append(f"{model.in_flight} request(s) in flight or queued")
        if model.state is not ModelState.READY:
            reasons.append(model.state.name.lower().replace("_", " "))
        return ", ".join(reasons) or "idle"

    def _start_reaper(self) -> None:
        if self.residency.keep_alive_s > 0 and (self._reaper is None or self._reaper.done()):
            self._reaper = asyncio.create_task(self._unload_idle(), name="idle unloader")

    async def _unload_idle(self) -> None:
        """Every few seconds, unload models idle past the keep-alive (never a leased or busy one)."""
        keep_alive = self.residency.keep_alive_s
        while True:
            await asyncio.sleep(min(max(keep_alive / 4, 0.05), 30.0))
            now = time.monotonic()
            for key, model in list(self._models.items()):
                if self.evictable(key, model) and now - model.last_used >= keep_alive:
                    log.info(
                        "unloading %s: idle for %.0f s (--keep-alive %g s)",
                        model.spec["model_name"],
                        now - model.last_used,
                        keep_alive,
                    )
                    await self._unload(key)

    def lease(self, selector: str | Mapping[str, Any], caller: str) -> tuple[str, str]:
        """Hold the selector's model resident for ``caller``; returns the lease id and the model's cache key."""
        key = self._servable(selector)[1]
        lease_id = uuid.uuid4().hex[:16]
        self._leases.setdefault(key, {})[lease_id] = caller
        return lease_id, key

    def release(self, key: str, lease_id: str) -> None:
        leases = self._leases.get(key, {})
        leases.pop(lease_id, None)
        if not leases:
            self._leases.pop(key, None)

    def leases_on(self, spec: ModelSpec) -> int:
        return len(self._leases.get(cache_key(spec), ()))

    async def _health(self, name: str, serving: bool) -> None:
        if self.on_health is not None:
            await self.on_health(name, serving)

    async def _dead(self, key: str, model: LoadedModel, exc: BackendDeadError) -> None:
        """A dead engine is dropped at once; the next request loads the model again."""
        log.error("%s: %s; dropping it, the next request reloads it", model.spec["model_name"], exc)
        if self._models.get(key) is model:
            del self._models[key]
        model.state, model.reason = ModelState.FAILED, str(exc)
        await self._health(model.spec["model_name"], False)
        backend, model.backend = model.backend, None
        scheduler, model.scheduler = model.scheduler, None
        if scheduler is not None:
            await scheduler.close()
        if backend is not None:
            await _quietly_unload(backend)

    async def unload(self, selector: str | Mapping[str, Any]) -> bool:
        """Free a model after the calls running on it finish. False if it was not loaded."""
        return await self._unload(self._servable(selector)[1])

    async def _unload(self, key: str) -> bool:
        model = self._models.pop(key, None)
        if model is None:
            return False
        if model.load_task is not None and not model.load_task.done():
            model.load_task.cancel()
        await model.idle.wait()
        was_loaded = model.backend is not None
        # its bytes stay counted until the backend has let them go
        held, model.charged_bytes = model.charged_bytes, 0
        self._draining += held
        try:
            if model.scheduler is not None:
                await model.scheduler.close()
                model.scheduler = None
            if model.backend is not None:
                await _quietly_unload(model.backend)
                free_memory()
                log.info("unloaded %s", model.spec["model_name"])
                await self._health(model.spec["model_name"], False)
        finally:
            self._draining -= held
        model.backend, model.state = None, ModelState.NOT_LOADED
        return was_loaded

    async def shutdown(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for key in list(self._models):
            await self._unload(key)

    # -- serving ------------------------------------------------------------------------------

    async def generate(
        self,
        selector: str | Mapping[str, Any],
        messages: Sequence[Message],
        args: GenArgs,
        caller: str = "",
        observer: StreamObserver | None = None,
    ) -> tuple[ModelSpec, Generation]:
        """One reply; ``caller`` (a game process) gets its fair turn among the model's waiting callers.
        ``observer`` (a streamed request) is told of the load, the queue and the text as they happen."""
        spec, key = self._servable(selector)
        validate_messages(messages)
        merged = ensure_alternating_roles(list(messages))
        model = await self._ready(spec, key, observer)
        assert model.backend is not None
        model.in_flight += 1
        model.idle.clear()
        try:
            call_start = datetime.now()
            started = time.perf_counter()
            assert model.scheduler is not None
            if observer is None:
                generation = await model.scheduler.submit(merged, args, caller)
            else:
                generation = await self._observed(model.scheduler, merged, args, caller, observer)
            duration = timedelta(seconds=time.perf_counter() - started)
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
        self.metrics.tokens(spec["model_name"], generation)
        generation.response["clem_player"] = {
            "call_start": str(call_start),
            "call_duration": str(duration),
            "response": generation.text,
            "model_name": spec["model_name"],
        }
        return spec, generation

    async def _observed(
        self, scheduler: Scheduler, messages: Sequence[Message], args: GenArgs, caller: str, observer: StreamObserver
    ) -> Generation:
        """A streamed request's submit: its backend finds the observer's text sink; a backend that streams
        nothing (remote APIs) has its whole text sent as one piece when the reply arrives."""
        token = text_sink.set(observer.text)
        try:
            generation = await scheduler.submit(messages, args, caller, observer)
        finally:
            text_sink.reset(token)
        if not observer.texted:
            observer.text(generation.text)
        self.metrics.first_token(scheduler.name, observer.first_text_at - observer.created)
        return generation

    async def count_tokens(self, selector: str | Mapping[str, Any], messages: Sequence[Message]) -> TokenCount:
        spec, key = self._servable(selector)
        validate_messages(messages)
        model = await self._ready(spec, key)
        assert model.backend is not None
        return await model.backend.count_tokens(ensure_alternating_roles(list(messages)))

    def statuses(self) -> list[LoadedModel]:
        """Every registry entry (with its cache state when loaded, its estimate always), then loaded models
        no entry names. Reads file headers for entries not estimated yet (``estimate_registry`` first avoids it)."""
        listed: list[LoadedModel] = []
        seen: set[str] = set()
        for entry in self.registry:
            key = cache_key(entry)
            loaded = self._models.get(key)
            # a copy that several selectors share (ENGINE_FIELDS) is listed as the entry itself
            listed.append(
                replace(loaded, spec=entry) if loaded else LoadedModel(entry, estimated_bytes=self.estimate(key, entry))
            )
            seen.add(key)
        listed.extend(model for key, model in self._models.items() if key not in seen)
        return listed

    def loaded(self) -> list[LoadedModel]:
        """The models in the cache: loading, ready or failed."""
        return list(self._models.values())

    def status_of(self, spec: ModelSpec) -> LoadedModel:
        return self._models.get(cache_key(spec)) or LoadedModel(spec)


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


async def _quietly_unload(backend: Backend) -> None:
    try:
        await backend.unload()
    except Exception:
        log.exception("unloading %s failed", backend.model_name)
