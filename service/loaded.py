"""A model's entry in the cache: its state, its backend once ready, the calls running on it, its memory."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from clemserve.registry import ModelSpec

from .backends import Backend
from .domain import MemoryFigures, ModelSnapshot, ModelState
from .scheduler import Scheduler
from .streaming import StreamObserver


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
    #: calls submitted and not yet answered: queued and running
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

    def snapshot(self, leases: int = 0, spec: ModelSpec | None = None) -> ModelSnapshot:
        """The entry as it stands now; ``spec``: the registry entry to list it under (a copy that several
        selectors share is listed under each entry that names it)."""
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
            charged_bytes=self.charged_bytes,
            memory=self.memory,
            progress=self.progress,
            idle_seconds=time.monotonic() - self.last_used if self.ready and not self.in_flight else 0.0,
        )
