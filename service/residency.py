"""Which models stay loaded: the memory budget, admission, eviction, the idle unloader and leases.

A load is admitted when its estimate fits the budget beside what loaded and loading models hold; room is
made by unloading the least recently used idle models (loaded, nothing in flight or queued, no lease).
Models idle past the keep-alive are unloaded in the background. A lease holds a model resident for its
holder until the holder leaves, the lease expires, or the server stops.

The cache (service/model_cache.py) owns the models; residency reads them and asks the cache to unload.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from clemserve.registry import ModelSpec
from clemserve.registry.errors import ResourceExhaustedError

from .loaded import LoadedModel
from .memory import (
    Budget,
    Estimate,
    ResidencyPolicy,
    available_ram,
    budget_from_setting,
    estimate,
    weight_files_bytes,
)
from .resolver import cache_key

log = logging.getLogger(__name__)

#: what loading weights takes beyond their own size (buffers, the loader's copies), for the RAM check
LOAD_OVERHEAD = 1.2
#: the backends whose loader reads the weights through this process's memory (transformers)
RAM_CHECKED_BACKENDS = frozenset({"huggingface_local"})


@dataclass(frozen=True)
class Lease:
    """A holder's claim on a loaded copy (by cache key), until ``expires`` (time.monotonic)."""

    id: str
    key: str
    caller: str
    expires: float

    @property
    def seconds_left(self) -> float:
        return max(0.0, self.expires - time.monotonic())


class Residency:
    def __init__(
        self,
        policy: ResidencyPolicy,
        models: Mapping[str, LoadedModel],
        unload: Callable[[str], Awaitable[bool]],
        *,
        cache_dir: Path,
        max_batch: int = 1,
    ) -> None:
        self.policy = policy
        #: the cache's models (read only here) and how to unload one of them
        self._models = models
        self._unload = unload
        self._cache_dir = cache_dir
        self._max_batch = max_batch
        self._budget: Budget | None = None
        self._estimates: dict[str, Estimate] = {}
        #: active leases by cache key: lease id -> lease; kept apart from the cache entry, which a reload replaces
        self._leases: dict[str, dict[str, Lease]] = {}
        #: set when the server stops: leases end then, so that they do not hold the drain for its grace period
        self.closing = asyncio.Event()
        #: loads running at once; more wait their turn
        self.load_slots = asyncio.Semaphore(max(1, policy.max_concurrent_loads))
        #: one admission (evict, then reserve) at a time, so two loads never count the same free bytes
        self._admission = asyncio.Lock()
        #: bytes still held by models whose backend is being unloaded
        self._draining = 0
        self._reaper: asyncio.Task[None] | None = None

    # -- the budget and the estimates ---------------------------------------------------------------

    @property
    def budget(self) -> Budget:
        """Found on first use, so that a server that never loads a local model never asks a GPU."""
        if self._budget is None:
            self._budget = budget_from_setting(self.policy.memory_budget)
            log.info("memory budget: %.2f GiB of %s", self._budget.total / 2**30, self._budget.kind)
        return self._budget

    @property
    def known_budget(self) -> Budget | None:
        """The budget if something has asked for it already (reading it may ask a GPU)."""
        return self._budget

    def estimate(self, key: str, spec: ModelSpec) -> int:
        """The model's expected bytes, found once per cache key (reading file headers; run it off the loop)."""
        return self._estimate(key, spec).total

    def _estimate(self, key: str, spec: ModelSpec) -> Estimate:
        found = self._estimates.get(key)
        if found is None:
            found = self._estimates[key] = estimate(spec, self._cache_dir, max_batch=self._max_batch)
        return found

    def estimate_all(self, specs: Iterable[ModelSpec]) -> None:
        """Estimate every spec not estimated yet (file headers: run it off the event loop)."""
        for spec in specs:
            self.estimate(cache_key(spec), spec)

    def used(self) -> int:
        """What loaded and loading models hold in the budget, models still unloading included."""
        return sum(m.charged_bytes for m in self._models.values()) + self._draining

    def drain(self, model: LoadedModel) -> int:
        """``model`` is being unloaded: its bytes move from its charge to the draining count, where they stay
        counted until ``drained`` is told they are free. Returns them."""
        held, model.charged_bytes = model.charged_bytes, 0
        self._draining += held
        return held

    def drained(self, held: int) -> None:
        self._draining -= held

    # -- admission and eviction ---------------------------------------------------------------------

    async def admit(self, key: str, model: LoadedModel) -> None:
        """Reserve the model's estimate in the budget, evicting least recently used idle models as needed;
        refuse a model whose weights the machine's memory cannot take now, whatever the budget says."""
        need, budget = model.estimated_bytes, self.budget
        async with self._admission:
            self._check_available(key, model)
            if need > budget.total:
                raise self._exhausted(model, "it is larger than the whole budget")
            while budget.total - self.used() < need:
                victim = self.least_recently_used(exclude=key)
                if victim is None:
                    raise self._exhausted(model, "no loaded model can be evicted")
                evicted = self._models[victim]
                log.info(
                    "evicting %s (idle %.0f s) to make room for %s",
                    evicted.name,
                    time.monotonic() - evicted.last_used,
                    model.name,
                )
                await self._unload(victim)
            model.charged_bytes = need

    def _check_available(self, key: str, model: LoadedModel) -> None:
        """The weights (with the loader's overhead) against the memory available now: a first, coarse check
        that catches a machine whose memory other processes hold. A local folder's weights are the size of
        its weight files; others' (a hub id, a GGUF file) the estimate's."""
        if model.spec["backend"] not in RAM_CHECKED_BACKENDS:
            return
        source, found = str(model.spec.get("huggingface_id") or ""), self._estimates.get(key)
        if source and Path(source).is_dir():
            weights = int(weight_files_bytes(Path(source)) * LOAD_OVERHEAD)
        else:
            weights = int(found.weights * LOAD_OVERHEAD) if found is not None else 0
        available = available_ram() if weights else 0
        if weights and available and weights > available:
            raise ResourceExhaustedError(
                f"{model.name} needs about {weights / 2**30:.1f} GiB to load; {available / 2**30:.1f} GiB is available",
                required_bytes=weights,
                available_bytes=available,
            )

    def evictable(self, key: str, model: LoadedModel) -> bool:
        """Loaded, with no request in flight or queued and no lease."""
        return model.ready and model.in_flight == 0 and not self._leases.get(key)

    def least_recently_used(self, exclude: str = "") -> str | None:
        """The cache key of the idle model used longest ago, other than ``exclude``; None if none is idle."""
        idle = [(m.last_used, key) for key, m in self._models.items() if key != exclude and self.evictable(key, m)]
        return min(idle)[1] if idle else None

    def _exhausted(self, model: LoadedModel, why: str) -> ResourceExhaustedError:
        budget, free = self.budget, max(0, self.budget.total - self.used())
        holders = [
            f"{m.name} ({m.charged_bytes / 2**20:.0f} MiB, {self._pinned_by(key, m)})"
            for key, m in self._models.items()
            if m.charged_bytes
        ]
        return ResourceExhaustedError(
            f"cannot load {model.name}: it needs about {model.estimated_bytes / 2**20:.0f} MiB, "
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
        if not model.ready:
            reasons.append(model.state.name.lower().replace("_", " "))
        return ", ".join(reasons) or "idle"

    # -- the idle unloader --------------------------------------------------------------------------

    def start_idle_unloader(self) -> None:
        if self.policy.keep_alive_s > 0 and (self._reaper is None or self._reaper.done()):
            self._reaper = asyncio.create_task(self._unload_idle(), name="idle unloader")

    async def _unload_idle(self) -> None:
        """Every few seconds, unload models idle past the keep-alive (never a leased or busy one)."""
        keep_alive = self.policy.keep_alive_s
        while True:
            await asyncio.sleep(min(max(keep_alive / 4, 0.05), 30.0))
            now = time.monotonic()
            for key, model in list(self._models.items()):
                if self.evictable(key, model) and now - model.last_used >= keep_alive:
                    log.info(
                        "unloading %s: idle for %.0f s (--keep-alive %g s)",
                        model.name,
                        now - model.last_used,
                        keep_alive,
                    )
                    await self._unload(key)

    def stop_idle_unloader(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()

    # -- leases -------------------------------------------------------------------------------------

    def grant(self, key: str, caller: str, ttl_s: float) -> Lease:
        """Hold the model cached under ``key`` resident for ``caller``, for ``ttl_s`` seconds at most."""
        lease = Lease(uuid.uuid4().hex[:16], key, caller, time.monotonic() + ttl_s)
        self._leases.setdefault(key, {})[lease.id] = lease
        return lease

    def release(self, lease: Lease) -> None:
        leases = self._leases.get(lease.key, {})
        leases.pop(lease.id, None)
        if not leases:
            self._leases.pop(lease.key, None)

    def end_leases(self) -> None:
        """The server is stopping: every lease ends now (a lease is no work in flight to drain)."""
        self.closing.set()

    def leases_on(self, key: str) -> int:
        return len(self._leases.get(key, ()))

    async def hold(self, lease: Lease) -> bool:
        """Wait until the lease expires (True) or the server stops (False)."""
        try:
            await asyncio.wait_for(self.closing.wait(), lease.seconds_left)
            return False
        except asyncio.TimeoutError:  # Python 3.10: not yet the builtin
            return True
