"""Where on the GPUs a model goes: per-device admission, and the ledger of what each GPU holds.

The budget pools every GPU, but a model lives on the GPUs it is placed on. So a load that goes to the GPUs
is given GPUs with room: as many as its engine runs on (vLLM's ``tensor_parallel_size``) or its entry's
``number_gpus`` says, else the fewest that hold it. Its estimate is split evenly over them (transformers'
``device_map="auto"`` balances a model over its GPUs; tensor parallelism splits it), and each must have its
part in room: in its part of the budget, less what the models placed there hold, and free on the device now
(what other processes and this server hold there taken off). An engine that takes a share of each of its
GPUs at start (vLLM's ``gpu_memory_utilization``) needs that share in room on each. Of the GPUs that fit,
those with the most room are chosen.

Residency asks :func:`choose` while it admits, evicts only when no set of GPUs has room, and records the
choice here (:class:`DeviceLedger`), as a :class:`Grant` that the backend receives.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from clemserve.registry.errors import ResourceExhaustedError

from . import gpus as gpu_reader
from .domain import GpuMemory
from .memory import Estimate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grant:
    """What admission granted a load: the GPUs it goes to (CUDA's indices among the server's visible GPUs;
    none: it was not placed on GPUs) and their UUIDs, the bytes it may hold on each, the size of the smallest
    of them, and the estimate it was granted for."""

    gpus: tuple[int, ...] = ()
    uuids: tuple[str, ...] = ()
    per_gpu: int = 0
    gpu_bytes: int = 0
    estimate: Estimate = field(default_factory=Estimate)

    @property
    def cuda_visible_devices(self) -> str:
        """The GPUs as a child process's ``CUDA_VISIBLE_DEVICES`` names them: by UUID where NVML told them,
        else by the server's own setting's entries (its indices are among those), else by index."""
        if self.uuids and all(self.uuids):
            return ",".join(self.uuids)
        own = gpu_reader.server_visible_devices()
        entries = [entry.strip() for entry in own.split(",")] if own is not None else []
        return ",".join(entries[gpu] if gpu < len(entries) else str(gpu) for gpu in self.gpus)


def gpu_count(config: object, found: Estimate) -> int:
    """The GPUs a model asks for: its engine's (the estimate says), else ``number_gpus`` of its
    ``model_config`` (clembench's field), else 0: as many as hold it."""
    if found.gpus:
        return found.gpus
    number = config.get("number_gpus") if isinstance(config, Mapping) else None
    return number if isinstance(number, int) and not isinstance(number, bool) and number > 0 else 0


def free(device: GpuMemory) -> int:
    """What a GPU has free now: its memory less what this server and others hold on it."""
    return max(0, device.total_bytes - device.used_by_others_bytes - max(device.process_bytes, device.reserved_bytes))


def room(device: GpuMemory, held: int) -> int:
    """What a GPU can take now: its part of the budget less what the models placed there hold, and no more
    than it has free."""
    return max(0, min(device.budget_bytes - held, free(device)))


def capacity(device: GpuMemory) -> int:
    """What a GPU could take with none of this server's models on it: its part of the budget, and no more
    than other processes leave of it."""
    return max(0, min(device.budget_bytes, device.total_bytes - device.used_by_others_bytes))


def _requirement(device: GpuMemory, part: int, share: float) -> int:
    return max(part, int(device.total_bytes * share))


def choose(
    devices: Sequence[GpuMemory],
    held: Mapping[int, int],
    need: int,
    count: int,
    share: float = 0.0,
    *,
    empty: bool = False,
) -> tuple[GpuMemory, ...]:
    """The GPUs (in index order) that a model of ``need`` bytes over ``count`` GPUs (0: the fewest that hold
    it) fits now, those with the most room; () where no set of GPUs has room. ``held``: what the models
    placed on each GPU hold; ``share``: of each GPU an engine takes at start. ``empty``: whether it would fit
    with none of this server's models loaded (then nothing is worth evicting)."""

    def space(device: GpuMemory) -> int:
        return capacity(device) if empty else room(device, held.get(device.index, 0))

    ranked = sorted(devices, key=lambda d: (-space(d), d.index))
    for k in [count] if count else range(1, len(devices) + 1):
        part = -(-need // k)
        chosen = ranked[:k]
        if len(chosen) == k and all(_requirement(d, part, share) <= space(d) for d in chosen):
            return tuple(sorted(chosen, key=lambda d: d.index))
    return ()


def shortfall(
    name: str,
    need: int,
    count: int,
    found: Estimate,
    devices: Sequence[GpuMemory],
    held: Mapping[int, int],
    why: str,
) -> ResourceExhaustedError:
    """The refusal of a model that no set of GPUs has room for, with each GPU's figures."""
    k = count or len(devices)
    part = -(-need // max(1, k))
    if not devices:
        return ResourceExhaustedError(f"cannot load {name}: no GPU can be read now; {why}", required_bytes=part)
    best = max(devices, key=lambda d: room(d, held.get(d.index, 0)))
    if found.gpu_share:
        want = int(best.total_bytes * found.gpu_share)
        return ResourceExhaustedError(
            f"cannot start {name}'s engine: it takes {found.gpu_share:g} of each of its {k} GPU(s) "
            f"({want / 2**30:.1f} GiB on cuda:{best.index}), and cuda:{best.index}, the GPU with the most room, "
            f"has {free(best) / 2**30:.1f} GiB free: this server holds {best.process_bytes / 2**30:.1f} GiB "
            f"there (its CUDA context, loaded models and engines) and other processes "
            f"{best.used_by_others_bytes / 2**30:.1f} GiB; {why}. Lower {found.share_field} or unload models",
            required_bytes=want,
            available_bytes=free(best),
            metadata={"field": found.share_field, "memory_kind": "gpu"},
        )
    figures = "; ".join(
        f"cuda:{d.index} {room(d, held.get(d.index, 0)) / 2**20:.0f} MiB (its budget part "
        f"{d.budget_bytes / 2**20:.0f} MiB, this server's models {held.get(d.index, 0) / 2**20:.0f} MiB, other "
        f"processes {d.used_by_others_bytes / 2**20:.0f} MiB)"
        for d in devices
    )
    gpus = f"each of {count} GPU(s)" if count else "the GPUs it would span"
    return ResourceExhaustedError(
        f"cannot load {name}: it needs about {part / 2**20:.0f} MiB on {gpus}, and no GPUs have that room "
        f"({figures}); {why}",
        required_bytes=part,
        available_bytes=room(best, held.get(best.index, 0)),
        metadata={"memory_kind": "gpu", "field": "model_config.number_gpus"},
    )


@dataclass
class DeviceLedger:
    """The GPUs each admitted model (by cache key) was placed on, and whether it runs in an engine process of
    its own; what each GPU holds follows from the models' charges, split evenly over their GPUs."""

    _grants: dict[str, Grant] = field(default_factory=dict)
    _engines: set[str] = field(default_factory=set)

    def place(
        self, key: str, name: str, chosen: Sequence[GpuMemory], need: int, found: Estimate, *, engine: bool
    ) -> None:
        """``key`` (``name``) goes to the ``chosen`` GPUs (none: it is not placed on GPUs), ``need`` bytes
        split over them; ``engine``: in an engine process of its own."""
        self.forget(key)
        if not chosen:
            return
        each = -(-need // len(chosen))
        uuids = tuple(d.uuid for d in chosen)
        smallest = min(d.total_bytes for d in chosen)
        self._grants[key] = Grant(tuple(d.index for d in chosen), uuids, each, smallest, found)
        if engine:
            self._engines.add(key)
        log.info("placing %s on %s: %.0f MiB on each", name, ", ".join(f"cuda:{d.index}" for d in chosen), each / 2**20)

    def grant(self, key: str) -> Grant:
        return self._grants.get(key, Grant())

    def forget(self, key: str) -> None:
        self._grants.pop(key, None)
        self._engines.discard(key)

    def placed(self, key: str) -> bool:
        return bool(self.grant(key).gpus)

    def held(self, charges: Mapping[str, int], *, engines_only: bool = False) -> dict[int, int]:
        """What the models placed on each GPU hold there (``engines_only``: those in engine processes)."""
        found: dict[int, int] = {}
        for key, grant in list(self._grants.items()):
            if not grant.gpus or (engines_only and key not in self._engines):
                continue
            each = charges.get(key, 0) // len(grant.gpus)
            for gpu in grant.gpus:
                found[gpu] = found.get(gpu, 0) + each
        return found
