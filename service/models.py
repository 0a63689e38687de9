"""Which models exist, which are loaded, and loading them once on demand."""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from clemserve.registry import ModelRegistry, ModelSpec, ensure_alternating_roles
from clemserve.registry.errors import ClemserveError, InvalidArgumentError, ResourceExhaustedError

from .backends import Backend, BackendContext, BackendDeadError, backend_class
from .domain import GenArgs, Generation, Message, TokenCount
from .metrics import NoMetrics
from .safety import check_selector
from .scheduler import Scheduler, SchedulingPolicy
from .streaming import StreamObserver, text_sink
from .validation import validate_messages

log = logging.getLogger(__name__)

_PLAYER_BACKENDS = ("_player_human", "_player_programmed")
RESOLVE_CACHE_SIZE = 4096


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
    #: how far the current or last load got, 0 to 1 (as far as the backend can tell; 1 once ready)
    progress: float = 0.0
    #: streamed requests waiting for this load, told of its progress
    load_observers: set[StreamObserver] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.idle.set()


def cache_key(spec: ModelSpec) -> str:
    """Loaded models are cached by their whole resolved spec (content, not key order)."""
    return json.dumps(spec.to_dict(), sort_keys=True, separators=(",", ":"))


class ModelManager:
    def __init__(
        self,
        registry: ModelRegistry,
        context: BackendContext,
        *,
        allow_client_specs: bool = False,
        policy: SchedulingPolicy | None = None,
        metrics: NoMetrics | None = None,
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
        model = self._models.get(key)
        if model is None:
            model = self._models[key] = LoadedModel(spec)
        if model.state is ModelState.READY:
            return model
        if model.load_task is None or model.load_task.done():
            model.load_task = asyncio.create_task(self._load(model), name=f"load {spec['model_name']}")
        if observer is None:
            # shield: a caller that gives up must not cancel the load that others wait on
            await asyncio.shield(model.load_task)
            return model
        if model.state is ModelState.LOADING:  # a load already running: where it stands now
            observer.loading(model.progress, model.reason)
        else:  # the load just started (the model's reason may still be a failed load's)
            observer.loading(0.0, "starting")
        model.load_observers.add(observer)
        try:
            await asyncio.shield(model.load_task)
        finally:
            model.load_observers.discard(observer)
        return model

    async def _load(self, model: LoadedModel) -> Backend:
        name = model.spec["model_name"]
        model.state, model.reason, model.progress = ModelState.LOADING, "starting", 0.0
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
        backend: Backend | None = None
        try:
            backend = backend_class(model.spec["backend"])(model.spec, self.context)
            await backend.load(progress)
        except BaseException as exc:
            model.state = ModelState.FAILED
            model.reason = str(exc) if isinstance(exc, ClemserveError) else f"{type(exc).__name__}: {exc}"
            log.warning("loading %s failed: %s", name, model.reason)
            self.metrics.load(name, exc)
            if backend is not None:
                await _quietly_unload(backend)
            if isinstance(exc, MemoryError):
                raise ResourceExhaustedError(f"out of memory while loading {name}") from exc
            raise
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
        log.info("loaded %s in %.2f s", name, model.load_seconds)
        self.metrics.load(name, None)
        await self._health(name, True)
        return backend

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
        if model.scheduler is not None:
            await model.scheduler.close()
            model.scheduler = None
        if model.backend is not None:
            await _quietly_unload(model.backend)
            log.info("unloaded %s", model.spec["model_name"])
            await self._health(model.spec["model_name"], False)
        model.backend, model.state = None, ModelState.NOT_LOADED
        return was_loaded

    async def shutdown(self) -> None:
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
        """Every registry entry (with its cache state when loaded), then loaded models no entry names."""
        listed: list[LoadedModel] = []
        seen: set[str] = set()
        for entry in self.registry:
            key = cache_key(entry)
            listed.append(self._models.get(key) or LoadedModel(entry))
            seen.add(key)
        listed.extend(model for key, model in self._models.items() if key not in seen)
        return listed

    def loaded(self) -> list[LoadedModel]:
        """The models in the cache: loading, ready or failed."""
        return list(self._models.values())

    def status_of(self, spec: ModelSpec) -> LoadedModel:
        return self._models.get(cache_key(spec)) or LoadedModel(spec)


async def _quietly_unload(backend: Backend) -> None:
    try:
        await backend.unload()
    except Exception:
        log.exception("unloading %s failed", backend.model_name)
