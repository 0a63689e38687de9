"""Memory: the budget that loaded models share, what a loaded model really holds, and the KV-cache room of
its running batches.

What a model is expected to take is the backend's to say (each backend's ``estimate`` in the catalog of
service/backends/, from its files' metadata); this module defines the :class:`Estimate` they return and the
:class:`Sizing` they are made for.

Measured memory is what the loaded model holds, not what the process grew by: on a GPU, the CUDA memory
the load allocated, summed over every device it went to; on a CPU, the bytes of the model's parameters and
buffers (a tied weight once). The process's resident-set growth across the load is kept as a separate,
labelled figure for the operator (it counts the first load's import of torch, about 300 MiB, and loads
running at the same time). A backend whose model lives in another process (vLLM's engine core) is not
measured here: it is charged its estimate.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clemserve.registry.errors import ResourceExhaustedError

from . import gpus as gpu_reader
from .domain import GpuMemory, MemoryFigures

log = logging.getLogger(__name__)

#: share of the whole memory that ``auto`` budgets: the rest is the server itself, CUDA's context, the OS
AUTO_GPU_SHARE, AUTO_RAM_SHARE = 0.9, 0.8
#: the KV-cache tokens a model's estimate allows its batches (``--kv-cache-tokens``): a full default batch
#: (8 rows) of 4096-token conversations (clembench's imagegame opens with at most 354 prompt tokens)
DEFAULT_KV_CACHE_TOKENS = 32768
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30})


@dataclass(frozen=True)
class Estimate:
    """What a model is expected to take: its weights and the KV-cache allowance, and how that was found.
    ``kv_per_token``: the KV-cache bytes of one token (0: no KV cache this process allocates as it goes);
    ``context``: the model's context, which caps each row."""

    weights: int = 0
    kv_cache: int = 0
    source: str = "none"
    kv_per_token: int = 0
    context: int = 0
    #: an engine that takes this share of each of its GPUs when it starts (0: none), whatever its model
    #: needs, and the registry field that sets the share
    gpu_share: float = 0.0
    #: the GPUs its engine runs on (vLLM: tensor_parallel_size); 0: the entry's number_gpus, else as many as
    #: hold it
    gpus: int = 0
    share_field: str = ""
    #: what an engine takes beyond weights and KV cache (its CUDA context, activations, CUDA graphs)
    overhead: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.overhead


@dataclass(frozen=True)
class Sizing:
    """What an estimate is made for: the server's cache folder (where converted weights go), the rows of a
    batch, the KV-cache tokens a model's batches are allowed, and the memory of one of the GPUs the model
    goes to (0: it runs on the CPU)."""

    cache_dir: Path
    max_batch: int = 1
    kv_tokens: int = DEFAULT_KV_CACHE_TOKENS
    gpu_bytes: int = 0


# -- the budget ---------------------------------------------------------------------------------


def parse_bytes(text: str) -> int:
    """``8GiB``, ``512MiB``, ``1.5G`` (binary) or ``4GB`` (decimal), or plain bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (say 8GiB, 512MiB or a number of bytes)")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class Budget:
    """The memory that loaded models may take, what it counts ("gpu" or "ram"), the GPUs it covers (each
    with its part in ``budget_bytes``), and where its size came from."""

    total: int
    kind: str
    devices: tuple[GpuMemory, ...] = ()
    source: str = ""


def budget_from_setting(
    setting: str, *, may_import_torch: bool = False, engines: Mapping[int, int] | None = None
) -> Budget:
    """``auto``: on a GPU machine, 90% of every visible GPU, or what other processes leave of it where that
    is less; else 80% of the machine's RAM. A size: that, over the GPUs where there are any (each GPU's part
    then what other processes leave of it).

    GPUs are read through NVML where it is installed, else through torch where the driver lists GPUs or
    ``may_import_torch`` (a GPU backend is loading, so torch is imported anyway). ``engines``: what the
    engines this server started hold on each GPU (the server's, not others'). Blocks: call it off the event
    loop.
    """
    found, how = gpu_reader.read_gpus(may_import_torch=may_import_torch, engines=engines)
    auto = setting.strip().lower() == "auto"
    if found:
        devices = tuple(_with_budget(gpu, AUTO_GPU_SHARE if auto else 1.0) for gpu in found)
        if auto:
            return Budget(sum(d.budget_bytes for d in devices), "gpu", devices, how)
        return Budget(parse_bytes(setting), "gpu", devices, "--memory-budget")
    if auto:
        return Budget(int(_meminfo("MemTotal") * AUTO_RAM_SHARE), "ram", (), "/proc/meminfo")
    return Budget(parse_bytes(setting), "ram", (), "--memory-budget")


def _with_budget(gpu: GpuMemory, share: float) -> GpuMemory:
    """The device with its part of the budget: its ``share``, or what others leave of it where that is less
    (the driver's few hundred MiB fit in the share's headroom; another process's model does not)."""
    part = min(int(gpu.total_bytes * share), gpu.total_bytes - gpu.used_by_others_bytes)
    return GpuMemory(**{**gpu.__dict__, "budget_bytes": max(0, part)})


def read_devices(budget: Budget, engines: Mapping[int, int] | None = None) -> tuple[GpuMemory, ...]:
    """The budget's GPUs as they stand now (each keeping its part of the budget); ``engines`` as for
    :func:`budget_from_setting`. Blocks."""
    if budget.kind != "gpu":
        return ()
    parts = {d.index: d.budget_bytes for d in budget.devices}
    found, _ = gpu_reader.read_gpus(may_import_torch=False, engines=engines)
    return tuple(GpuMemory(**{**d.__dict__, "budget_bytes": parts.get(d.index, 0)}) for d in found)


def available_ram() -> int:
    """What the machine can give a new load now without swapping (0 where it cannot be told)."""
    return _meminfo("MemAvailable")


def _meminfo(field: str) -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# -- measuring ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """The process's memory at one moment: its resident set, and the tensor bytes on each GPU."""

    rss: int
    allocated: dict[int, int] = field(default_factory=dict)


def reading() -> Reading:
    return Reading(resident_set(), gpu_reader.allocated_by_device())


def resident_set() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def measure(before: Reading, backend: object, estimate: Estimate) -> tuple[int, MemoryFigures]:
    """What a finished load holds, and its labelled figures: the CUDA memory it allocated (summed over its
    devices), else the bytes of its model's parameters and buffers, else nothing this process can see."""
    after = reading()
    devices = tuple(
        (index, after.allocated[index] - before.allocated.get(index, 0))
        for index in sorted(after.allocated)
        if after.allocated[index] > before.allocated.get(index, 0)
    )
    measured, how = sum(n for _, n in devices), "cuda allocated"
    if not measured:
        measured, how = tensor_bytes(getattr(backend, "model", None)), "parameters and buffers"
    if not measured:
        how = "estimate" if estimate.total else ""
    return measured, MemoryFigures(
        estimated_weights_bytes=estimate.weights,
        estimated_kv_cache_bytes=estimate.kv_cache,
        estimate_source=estimate.source if estimate.total else "",
        measured_by=how,
        rss_delta_bytes=max(0, after.rss - before.rss),
        devices=devices,
    )


def tensor_bytes(model: Any) -> int:
    """The bytes of a torch module's parameters and buffers, each storage once (tied weights share one);
    0 for anything else. Tensors on the meta device (offloaded to disk) hold nothing here."""
    if model is None or not hasattr(model, "parameters") or not hasattr(model, "buffers"):
        return 0
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def free_memory(*, cuda: bool = True) -> None:
    """Hand back what an unloaded model left: Python's garbage, then torch's cached CUDA blocks (not after a
    CUDA error, ``cuda=False``: every CUDA call fails then)."""
    gc.collect()
    torch = sys.modules.get("torch")
    # is_initialized first: asking is_available of a process that never started CUDA would start its driver
    if cuda and torch is not None and torch.cuda.is_initialized() and torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- the KV cache of running batches ------------------------------------------------------------


class KvRoom:
    """The KV cache one model's batches may hold: its allowance (charged in the budget since its load), and
    free budget it may borrow for a batch that needs more, given back when the batch ends.

    Used from the model's generation thread: ``groups`` splits a batch into runs that fit, ``holding``
    charges a run's borrowed bytes while it runs. ``free`` reads the budget's free bytes and ``charge`` adds
    to (or, negative, takes from) the model's charge; both are plain reads and writes of numbers.
    """

    def __init__(
        self,
        name: str,
        estimate: Estimate,
        free: Callable[[], int],
        charge: Callable[[int], None],
    ) -> None:
        self.name = name
        self.per_token = estimate.kv_per_token
        self.context = estimate.context
        self.allowance = estimate.kv_cache
        self._free = free
        self._charge = charge
        self._lock = threading.Lock()

    def need(self, rows: int, tokens: int) -> int:
        """The KV bytes of ``rows`` rows of ``tokens`` tokens each (prompt + new tokens), the context capping."""
        return self.per_token * rows * (min(tokens, self.context) if self.context else tokens)

    def room(self) -> int:
        return self.allowance + max(0, self._free())

    def groups(self, lengths: dict[int, int], new_tokens: int) -> tuple[list[list[int]], dict[int, BaseException]]:
        """The rows (index -> prompt tokens) in runs whose KV cache fits the room now, in order; a row that
        does not fit even alone gets RESOURCE_EXHAUSTED with the numbers. Rows are padded to the longest
        prompt of their run, so a run needs rows x (its longest prompt + ``new_tokens``)."""
        if not self.per_token:
            return ([list(lengths)] if lengths else []), {}
        room = self.room()
        runs: list[list[int]] = []
        refused: dict[int, BaseException] = {}
        run: list[int] = []
        longest = 0
        for index, length in lengths.items():
            alone = self.need(1, length + new_tokens)
            if alone > room:
                refused[index] = ResourceExhaustedError(
                    f"{self.name}: this conversation's KV cache ({length} prompt + {new_tokens} new tokens) needs "
                    f"about {alone / 2**20:.0f} MiB; {room / 2**20:.0f} MiB is free for it (the model's "
                    f"{self.allowance / 2**20:.0f} MiB allowance and the free budget)",
                    required_bytes=alone,
                    available_bytes=room,
                )
                continue
            if run and self.need(len(run) + 1, max(longest, length) + new_tokens) > room:
                runs.append(run)
                run, longest = [], 0
            run.append(index)
            longest = max(longest, length)
        if run:
            runs.append(run)
        if len(runs) > 1:
            log.info("%s: a batch's KV cache exceeds its room; run as %d smaller batches", self.name, len(runs))
        return runs, refused

    @contextmanager
    def holding(self, rows: int, tokens: int) -> Iterator[None]:
        """Charge what a run needs beyond the allowance while it runs."""
        with self._lock:
            borrowed = max(0, self.need(rows, tokens) - self.allowance)
            if borrowed:
                self._charge(borrowed)
        try:
            yield
        finally:
            if borrowed:
                self._charge(-borrowed)


@dataclass(frozen=True)
class ResidencyPolicy:
    """Which models stay loaded: the memory budget, idle unloading, leases, and how loads are bounded."""

    #: ``auto`` or a size (see ``budget_from_setting``)
    memory_budget: str = "auto"
    #: unload a model idle this long, in seconds; 0 or less: never
    keep_alive_s: float = 1800.0
    #: loads running at once; more wait their turn
    max_concurrent_loads: int = 1
    #: a load that takes longer fails (UNAVAILABLE, reason LOAD_TIMEOUT); 0 or less: no limit. Counted after
    #: the download of weights from the hub, where a load has one
    load_timeout_s: float = 1800.0
    #: a download of weights that gains no byte for this long fails (UNAVAILABLE, DOWNLOAD_STALLED); 0 or
    #: less: never
    download_stall_s: float = 300.0
    #: the longest a lease lasts; a request's ttl_seconds may shorten it
    lease_timeout_s: float = 1800.0
    #: the KV-cache tokens a model's estimate allows its batches (rows x (prompt + max_tokens))
    kv_cache_tokens: int = DEFAULT_KV_CACHE_TOKENS
