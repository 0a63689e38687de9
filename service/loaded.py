"""A model's entry in the cache: its state, its backend once ready, the calls running on it, its memory."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from clemserve.registry import ModelSpec

from .backends import Backend
from .domain import MemoryFigures, ModelSnapshot, ModelState, PrefixReuse
from .scheduler import Scheduler
from .streaming import StreamObserver


@dataclass(frozen=True)
class Resident:
    """What residency needs to know of a model in the cache to pick one to evict or unload: plain data."""

    key: str
    name: str
    last_used: float
    ready: bool
    #: calls submitted and not yet answered: queued and running
    in_flight: int
    state: ModelState

    @property
    def idle_s(self) -> float:
        return time.monotonic() - self.last_used


@dataclass
class LoadedModel:
    """A spec's place in the cache: its state, its backend once ready, the calls running on it. The cache
    owns it; its state changes only through its methods."""

    spec: ModelSpec
    state: ModelState = ModelState.NOT_LOADED
    reason: str = ""
    backend: Backend | None = None
    load_task: asyncio.Task[Backend] | None = None
    load_seconds: float = 0.0
    loads: int = 0
    #: calls submitted and not yet answered: queued and running
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    #: orders and batches the model's requests once it is ready
    scheduler: Scheduler | None = None
    #: the load's fraction done, 0 to 1, where the backend tells
    progress: float = 0.0
    #: streamed requests waiting for this load, told of its progress
    load_observers: set[StreamObserver] = field(default_factory=set)
    #: expected footprint in bytes (the backend's estimate), found before the load
    estimated_bytes: int = 0
    #: what the load took, measured when it finished
    measured_bytes: int = 0
    #: the other memory figures (the estimate's parts, how the measurement was made, RSS, devices)
    memory: MemoryFigures = field(default_factory=MemoryFigures)
    #: when it last finished a request or a load (time.monotonic), for idle unloading and eviction order
    last_used: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def name(self) -> str:
        return str(self.spec["model_name"])

    @property
    def queued(self) -> int:
        """Requests waiting in the model's queue (none before it is ready)."""
        return self.scheduler.queued if self.scheduler is not None else 0

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY

    def resident(self, key: str) -> Resident:
        return Resident(key, self.name, self.last_used, self.ready, self.in_flight, self.state)

    # -- the load -------------------------------------------------------------------------------------

    def loading(self, task: asyncio.Task[Backend]) -> None:
        """A load starts (or waits for its slot)."""
        self.load_task = task
        self.state, self.reason, self.progress = ModelState.LOADING, "waiting for a load slot", 0.0

    def admitted(self, estimated_bytes: int) -> None:
        """Its estimate is found (and, once admission passes, reserved in the budget)."""
        self.estimated_bytes = estimated_bytes

    def starting(self) -> None:
        self.reason = "starting"
        self.loads += 1

    def report(self, line: str, fraction: float | None) -> None:
        """The backend's word on its load (from its load thread or the event loop)."""
        self.reason = line
        if fraction is not None:
            self.progress = max(self.progress, min(1.0, fraction))

    def failed(self, reason: str) -> None:
        self.state, self.reason = ModelState.FAILED, reason

    def loaded(
        self, backend: Backend, scheduler: Scheduler, measured_bytes: int, memory: MemoryFigures, seconds: float
    ) -> None:
        self.backend, self.scheduler = backend, scheduler
        self.measured_bytes, self.memory, self.load_seconds = measured_bytes, memory, seconds
        self.state, self.reason, self.progress = ModelState.READY, "", 1.0
        self.last_used = time.monotonic()

    def dropped(self, reason: str) -> tuple[Backend | None, Scheduler | None]:
        """Its engine died: it fails with ``reason`` and lets go of its backend and scheduler (returned)."""
        self.failed(reason)
        backend, scheduler = self.backend, self.scheduler
        self.backend = self.scheduler = None
        return backend, scheduler

    def unloaded(self) -> None:
        self.backend, self.scheduler, self.state = None, None, ModelState.NOT_LOADED

    # -- calls ----------------------------------------------------------------------------------------

    def call_started(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def call_ended(self) -> None:
        self.in_flight -= 1
        self.last_used = time.monotonic()
        if self.in_flight == 0:
            self.idle.set()

    def snapshot(self, leases: int = 0, spec: ModelSpec | None = None, charged_bytes: int = 0) -> ModelSnapshot:
        """The entry as it stands now; ``spec``: the registry entry to list it under (a copy that several
        selectors share is listed under each entry that names it); ``charged_bytes``: what it holds in the
        memory budget (residency's ledger)."""
        queued = self.queued
        return ModelSnapshot(
            spec=spec or self.spec,
            state=self.state,
            reason=self.reason,
            load_seconds=self.load_seconds,
            # counted from its submission: the scheduler knows which still wait
            running=max(0, self.in_flight - queued),
            queued=queued,
            leases=leases,
            estimated_bytes=self.estimated_bytes,
            measured_bytes=self.measured_bytes if self.ready else 0,
            charged_bytes=charged_bytes,
            memory=self.memory,
            progress=self.progress,
            idle_seconds=time.monotonic() - self.last_used if self.ready and not self.in_flight else 0.0,
            prefix=self.backend.prefix_reuse() if self.ready and self.backend is not None else PrefixReuse(),
        )
