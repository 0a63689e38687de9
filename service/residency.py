"""Which models stay loaded: the memory budget, admission, eviction, the idle unloader and leases.

A load is admitted when its estimate fits the budget beside what loaded and loading models hold; room is
made by unloading the least recently used idle models (loaded, nothing in flight or queued, no lease).
The budget is found (GPUs read through NVML or torch, see service/gpus.py) off the event loop, at the first
load or listing. A model that goes to the GPUs is placed on GPUs with room for it (service/devices.py): each
GPU's part of the budget and its free memory are counted, not only the pool. Each batch of a model is
admitted again against its KV-cache room (memory.KvRoom).
Models idle past the keep-alive are unloaded in the background. A lease holds a model resident for its
holder until the holder leaves, the lease expires, or the server stops.

Residency is a bookkeeper: it owns the budget's ledger (what each cache key holds), the estimates and the
leases, and no model. The cache (service/model_cache.py) owns the models: it tells residency what it holds
(plain :class:`~.loaded.Resident` records), and does what residency names (the keys to evict or unload).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clemserve.registry import ModelSpec
from clemserve.registry.errors import ResourceExhaustedError

from .backends import Memory, estimate, locate_weights, memory_of
from .devices import DeviceLedger, Grant, choose, gpu_count, shortfall
from .domain import GpuMemory
from .loaded import Resident
from .memory import Budget, Estimate, KvRoom, ResidencyPolicy, Sizing, available_ram, budget_from_setting, read_devices
from .resolver import cache_key

log = logging.getLogger(__name__)

#: what loading weights takes beyond their own size (buffers, the loader's copies), for the RAM check
LOAD_OVERHEAD = 1.2


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
        *,
        cache_dir: Path,
        max_batch: int = 1,
    ) -> None:
        self.policy = policy
        #: what each cache key holds in the budget: its estimate while loading, then the larger of its estimate
        #: and its measurement, plus what its running batches borrow
        self._charges: dict[str, int] = {}
        self._cache_dir = cache_dir
        self._max_batch = max_batch
        self._budget: Budget | None = None
        #: whether torch was allowed to look for GPUs when the budget was found (a GPU backend loading)
        self._torch_asked = False
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
        #: the GPUs each admitted model was placed on
        self._devices = DeviceLedger()

    # -- the budget and the estimates ---------------------------------------------------------------

    @property
    def budget(self) -> Budget:
        """The budget found already (``find_budget``), else found now, on the calling thread."""
        if self._budget is None:
            self._set_budget(budget_from_setting(self.policy.memory_budget))
        assert self._budget is not None
        return self._budget

    async def find_budget(self, loading: ModelSpec | None = None) -> Budget:
        """The budget, found off the event loop on first use, so that a server that never loads a local
        model never asks a GPU. A GPU backend's load (``loading``) may ask torch when nothing else found a
        GPU (no NVML, no driver entries in /proc): once."""
        gpu_load = loading is not None and memory_of(loading).on_gpus
        if self._budget is None or (gpu_load and not self._torch_asked and self._budget.kind != "gpu"):
            self._torch_asked = gpu_load
            found = await asyncio.to_thread(
                budget_from_setting, self.policy.memory_budget, may_import_torch=gpu_load, engines=self._engines()
            )
            if self._budget is None or found != self._budget:
                self._set_budget(found)
        return self.budget

    def _set_budget(self, budget: Budget) -> None:
        if self._budget is not None and budget.kind != self._budget.kind:
            self._estimates.clear()  # vLLM's estimate depends on the GPUs
        self._budget = budget
        where = ", ".join(f"cuda:{d.index} {d.budget_bytes / 2**30:.2f} GiB" for d in budget.devices)
        log.info(
            "memory budget: %.2f GiB of %s (%s)%s",
            budget.total / 2**30,
            budget.kind,
            budget.source,
            f": {where}" if where else "",
        )

    async def devices(self) -> tuple[GpuMemory, ...]:
        """The budget's GPUs as they stand now (read off the event loop); none for a RAM budget."""
        budget = self._budget
        if budget is None or budget.kind != "gpu":
            return ()
        return await asyncio.to_thread(read_devices, budget, self._engines())

    def _engines(self) -> dict[int, int]:
        """What the engines this server started hold on each GPU: their charges (the server's own memory)."""
        return self._devices.held(self._charges, engines_only=True)

    def granted(self, key: str) -> Grant:
        """What admission granted ``key``'s load: its GPUs and the bytes on each (none: not placed on GPUs)."""
        return self._devices.grant(key)

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
            budget = self._budget
            gpu = budget.devices[0].total_bytes if budget is not None and budget.devices else 0
            sizing = Sizing(self._cache_dir, self._max_batch, self.policy.kv_cache_tokens, gpu)
            found = self._estimates[key] = estimate(spec, sizing)
        return found

    async def load_estimate(self, key: str, spec: ModelSpec) -> int:
        """A load's estimate, after the budget is found (vLLM's estimate depends on the GPUs), off the loop."""
        await self.find_budget(spec)
        return await asyncio.to_thread(self.estimate, key, spec)

    def estimate_parts(self, key: str, spec: ModelSpec) -> Estimate:
        """The estimate with its parts (weights, KV allowance, source)."""
        return self._estimate(key, spec)

    def estimate_all(self, specs: Iterable[ModelSpec]) -> None:
        """Estimate every spec not estimated yet (file headers: run it off the event loop)."""
        for spec in specs:
            self.estimate(cache_key(spec), spec)

    def used(self) -> int:
        """What loaded and loading models hold in the budget, models still unloading included."""
        # a copy first: a model's generation thread asks too (KvRoom), while the loop may add a model
        return sum(list(self._charges.values())) + self._draining

    def charge(self, key: str, held: int) -> None:
        """``key`` holds ``held`` bytes from now on."""
        self._charges[key] = max(0, held)

    def charged(self, key: str) -> int:
        return self._charges.get(key, 0)

    def drain(self, key: str) -> int:
        """``key``'s model is being unloaded: its bytes move from its charge to the draining count, where they
        stay counted until ``drained`` is told they are free. Returns them."""
        held = self._charges.pop(key, 0)
        self._devices.forget(key)
        self._draining += held
        return held

    def drained(self, held: int) -> None:
        self._draining -= held

    # -- admission and eviction ---------------------------------------------------------------------

    async def admit(self, key: str, spec: ModelSpec, residents: Sequence[Resident]) -> AsyncGenerator[str, None]:
        """Admit a load of ``spec``: name the cache keys to evict, least recently used first, one at a time
        (the caller unloads each before asking for the next), then reserve the estimate. Refuses a model that
        the budget cannot take, and one whose weights the memory they go to cannot take now, whatever the
        budget says. A model that goes to the GPUs is placed on GPUs with room (service/devices.py; evicting
        only where no set of GPUs has room): ``granted`` says which. ``residents``: the models in the cache
        now. Iterate it to the end, inside ``contextlib.aclosing``: admissions run one at a time, so two
        loads never count the same free bytes."""
        name = str(spec["model_name"])
        need = await self.load_estimate(key, spec)
        budget, found = self.budget, self._estimate(key, spec)
        count = gpu_count(spec.get("model_config"), found)
        placing = budget.kind == "gpu" and memory_of(spec).on_gpus and count <= len(budget.devices)
        async with self._admission:
            await _check_available(spec, self._estimates.get(key), budget)
            if need > budget.total:
                raise self._exhausted(key, name, need, residents, "it is larger than the whole budget")
            devices = await self.devices() if placing else ()
            if placing and not choose(devices, {}, need, count, found.gpu_share, empty=True):
                raise shortfall(name, need, count, found, devices, {}, "not even with no model of this server loaded")
            evicted: set[str] = set()
            # evict while the budget is short or no set of GPUs has room (an engine that takes a share of each
            # GPU at start: that share): least recently used idle models first, then refuse
            while True:
                left = [r for r in residents if r.key not in evicted]
                short: ResourceExhaustedError | None = None
                chosen: tuple[GpuMemory, ...] = ()
                if budget.total - self.used() < need:
                    making_room_for = name
                elif placing and not (chosen := choose(devices, self._held(), need, count, found.gpu_share)):
                    why = "no loaded model that can be evicted holds memory there"
                    short, making_room_for = shortfall(name, need, count, found, devices, self._held(), why), name
                else:
                    break
                victim = self.least_recently_used([r for r in left if not short or self._devices.placed(r.key)], key)
                if victim is None:
                    raise short or self._exhausted(key, name, need, left, "no loaded model can be evicted")
                log.info("evicting %s (idle %.0f s) to make room for %s", victim.name, victim.idle_s, making_room_for)
                evicted.add(victim.key)
                yield victim.key
                devices = await self.devices() if placing else ()
            self.charge(key, need)
            self._devices.place(key, name, chosen, need, found, engine=memory_of(spec) is Memory.ENGINE)

    def _held(self) -> dict[int, int]:
        return self._devices.held(self._charges)

    # -- the KV cache of running batches --------------------------------------------------------------

    def attach(self, key: str, name: str, backend: Any) -> None:
        """Hand a loaded backend that checks its batches' KV cache (one with a ``kv`` attribute) its room: the
        free budget it may borrow, charged to ``key`` while a batch holds it."""
        found = self._estimates.get(key)
        if found is None or not found.kv_per_token or not hasattr(backend, "kv"):
            return

        def free() -> int:
            return self.budget.total - self.used()

        def charge(delta: int) -> None:
            self._charges[key] = max(0, self._charges.get(key, 0) + delta)

        backend.kv = KvRoom(name, found, free, charge)

    def evictable(self, resident: Resident) -> bool:
        """Loaded, with no request in flight or queued and no lease."""
        return resident.ready and resident.in_flight == 0 and not self._leases.get(resident.key)

    def least_recently_used(self, residents: Iterable[Resident], exclude: str = "") -> Resident | None:
        """The idle model used longest ago, other than ``exclude``; None if none is idle."""
        idle = [r for r in residents if r.key != exclude and self.evictable(r)]
        return min(idle, key=lambda r: r.last_used) if idle else None

    def idle_past_keep_alive(self, residents: Iterable[Resident]) -> list[Resident]:
        """The models idle past the keep-alive (never a leased or busy one), to unload."""
        now, keep_alive = time.monotonic(), self.policy.keep_alive_s
        return [r for r in residents if self.evictable(r) and now - r.last_used >= keep_alive]

    def _exhausted(
        self, key: str, name: str, need: int, residents: Sequence[Resident], why: str
    ) -> ResourceExhaustedError:
        budget, free = self.budget, max(0, self.budget.total - self.used())
        parts = self._estimates.get(key)
        split = (
            f" ({parts.weights / 2**20:.0f} MiB of weights, {parts.kv_cache / 2**20:.0f} MiB of KV-cache allowance)"
            if parts is not None and parts.kv_cache
            else ""
        )
        holders = [
            f"{r.name} ({self.charged(r.key) / 2**20:.0f} MiB, {self._pinned_by(r)})"
            for r in residents
            if self.charged(r.key)
        ]
        return ResourceExhaustedError(
            f"cannot load {name}: it needs about {need / 2**20:.0f} MiB{split}, "
            f"{free / 2**20:.0f} MiB of the {budget.total / 2**20:.0f} MiB {budget.kind} budget is free and {why}"
            + (f"; held by {', '.join(holders)}" if holders else ""),
            required_bytes=need,
            available_bytes=free,
            metadata={"budget_bytes": str(budget.total), "memory_kind": budget.kind, "held_by": "; ".join(holders)},
        )

    def _pinned_by(self, resident: Resident) -> str:
        """Why a model holding memory cannot be evicted now."""
        reasons = []
        if self._leases.get(resident.key):
            reasons.append(f"{len(self._leases[resident.key])} lease(s)")
        if resident.in_flight:
            reasons.append(f"{resident.in_flight} request(s) in flight or queued")
        if not resident.ready:
            reasons.append(resident.state.name.lower().replace("_", " "))
        return ", ".join(reasons) or "idle"

    def idle_check_every(self) -> float:
        """How often the cache looks for models idle past the keep-alive (0: never)."""
        keep_alive = self.policy.keep_alive_s
        return min(max(keep_alive / 4, 0.05), 30.0) if keep_alive > 0 else 0.0

    # -- leases -------------------------------------------------------------------------------------

    def lease_ttl(self, requested_s: float) -> float:
        """How long a lease lasts: the server's lease timeout, shortened by the request (0: the timeout)."""
        limit = self.policy.lease_timeout_s
        return min(requested_s, limit) if requested_s > 0 else limit

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


async def _check_available(spec: ModelSpec, found: Estimate | None, budget: Budget) -> None:
    """The weights (with the loader's overhead) against the machine's available RAM now, where the model
    is read into it and stays there (a RAM budget; on GPUs, each GPU's free memory is counted where the
    model is placed, after idle models are evicted). A first, coarse check that catches memory other
    processes hold. A local folder's weights are the size of its weight files; others' (a hub id, a GGUF
    file), and quantised ones, the estimate's."""
    if not memory_of(spec).read_through_ram or budget.kind == "gpu":
        return
    config = spec.get("model_config", {})
    quantised = isinstance(config, dict) and (config.get("load_in_4bit") or config.get("load_in_8bit"))
    located = None if quantised else await asyncio.to_thread(locate_weights, spec)
    on_disk = located.bytes_on_disk() if located is not None else 0
    if on_disk:
        weights = int(on_disk * LOAD_OVERHEAD)
    else:
        weights = int(found.weights * LOAD_OVERHEAD) if found is not None else 0
    if not weights:
        return
    available = await asyncio.to_thread(available_ram)
    if available and weights > available:
        raise ResourceExhaustedError(
            f"{spec['model_name']} needs about {weights / 2**30:.1f} GiB to load; {available / 2**30:.1f} GiB is "
            "available",
            required_bytes=weights,
            available_bytes=available,
            metadata={"memory_kind": budget.kind},
        )
