"""The GPUs this process may use and what each holds: through NVML where it is installed, else torch.

NVML (``pynvml``, from the ``nvidia-ml-py`` package NVIDIA maintains) reads every GPU without creating a
CUDA context and sees every process's memory; it lists the machine's GPUs in PCI order, so
``CUDA_VISIBLE_DEVICES`` (indices, or ``GPU-`` UUIDs or unique prefixes of them) is applied here as CUDA
applies it: the listed devices, in the listed order, up to the first entry that names none. torch
(``torch.cuda.mem_get_info``) is the fallback; it creates a CUDA context on each device, so it is asked
only when a GPU backend loads. Every function here blocks (driver calls): run them off the event loop.

What this server holds on a GPU is its own process's memory (found by its process id, or, inside a container
where NVML reports the host's ids, as what torch reserved) plus what the engines it started hold (a vLLM
engine core is a child process torch here does not see): ``engines``, each GPU's bytes, the engines' charge
in the budget. The rest of the GPU's used memory is other processes'.

An engine's process is started with ``CUDA_VISIBLE_DEVICES`` naming its GPUs (:func:`visible_to_children`);
the server keeps its own view meanwhile: the readers here read the server's setting, and torch in the server
starts CUDA (:func:`start_cuda`) only while no child's setting is in the environment.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from .domain import GpuMemory

T = TypeVar("T")
log = logging.getLogger(__name__)

#: where the NVIDIA driver lists its GPUs (absent in many containers, hence NVML first)
DRIVER_GPUS = Path("/proc/driver/nvidia/gpus")
_VISIBLE = "CUDA_VISIBLE_DEVICES"
#: held while a child process's CUDA_VISIBLE_DEVICES is in the environment, and while torch here starts CUDA
_CHILD_SETTING = threading.Lock()
#: the server's own CUDA_VISIBLE_DEVICES (None: unset) while a child's is in the environment
_server_setting: list[str | None] = []


def nvml() -> Any | None:
    """The ``pynvml`` module, initialised, or None where it is not installed or finds no driver."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError: no driver, no library
        log.debug("NVML is installed but cannot start: %s", exc)
        return None
    return pynvml


def driver_lists_gpus() -> bool:
    return DRIVER_GPUS.is_dir() and any(DRIVER_GPUS.iterdir())


def visible_order(setting: str | None, uuids: list[str]) -> list[int]:
    """The physical indices CUDA makes visible, in CUDA's order, for ``CUDA_VISIBLE_DEVICES=setting``
    (None: every device). An entry that names no device ends the list, as it does for CUDA."""
    if setting is None:
        return list(range(len(uuids)))
    order: list[int] = []
    for entry in (e.strip() for e in setting.split(",")):
        if entry.isdigit() and int(entry) < len(uuids):
            found = int(entry)
        else:
            matches = [i for i, uuid in enumerate(uuids) if entry and uuid.startswith(_uuid_form(entry))]
            if len(matches) != 1:
                break
            found = matches[0]
        if found in order:
            break
        order.append(found)
    return order


def _uuid_form(entry: str) -> str:
    return entry if entry.startswith(("GPU-", "MIG-")) else f"GPU-{entry}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def server_visible_devices(environ: Mapping[str, str] | None = None) -> str | None:
    """The server's own ``CUDA_VISIBLE_DEVICES`` (None: unset), also while a child's is in the environment."""
    if environ is None:
        if _server_setting:
            return _server_setting[0]
        environ = os.environ
    return environ.get(_VISIBLE)


@contextmanager
def visible_to_children(setting: str, environ: MutableMapping[str, str] | None = None) -> Iterator[None]:
    """``CUDA_VISIBLE_DEVICES=setting`` for the processes started inside (an engine's), the server's own setting
    back after. Meanwhile the readers here keep reading the server's setting, and torch here waits to start
    CUDA (:func:`start_cuda`): CUDA reads the variable once, when a process first starts it."""
    environ = os.environ if environ is None else environ
    with _CHILD_SETTING:
        saved = environ.get(_VISIBLE)
        _server_setting.append(saved)
        environ[_VISIBLE] = setting
        try:
            yield
        finally:
            if saved is None:
                environ.pop(_VISIBLE, None)
            else:
                environ[_VISIBLE] = saved
            _server_setting.clear()


def start_seeing(setting: str, start: Callable[[], T], poll_s: float = 0.05) -> T:
    """``start()`` (which starts a child process: an engine's), the child started with
    ``CUDA_VISIBLE_DEVICES=setting``; the server's own setting is back as soon as a new child process exists
    (or ``start`` ended), not after the minutes an engine takes to get ready. Blocks."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-start") as pool:
        with visible_to_children(setting):
            before = {child.pid for child in multiprocessing.active_children()}
            started = pool.submit(start)
            while not started.done() and not {c.pid for c in multiprocessing.active_children()} - before:
                wait([started], timeout=poll_s)
        return started.result()


def start_cuda() -> None:
    """Start torch's CUDA in this process under the server's own ``CUDA_VISIBLE_DEVICES``: never while an
    engine's process is being started with its own (blocks until that is done)."""
    torch: Any = importlib.import_module("torch")  # its CUDA functions are untyped
    with _CHILD_SETTING:
        if not torch.cuda.is_initialized() and torch.cuda.is_available():
            torch.cuda.init()


def read_nvml(
    pynvml: Any, environ: Mapping[str, str] | None = None, engines: Mapping[int, int] | None = None
) -> list[GpuMemory]:
    """Every visible GPU: its size, what this server holds on it and what everyone else does. ``engines``:
    what the engines this server started hold on each GPU (by CUDA's index), counted as the server's."""
    engines = engines or {}
    handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    uuids = [_text(pynvml.nvmlDeviceGetUUID(h)) for h in handles]
    torch = _torch_if_started()
    gpus = []
    for index, physical in enumerate(visible_order(server_visible_devices(environ), uuids)):
        handle = handles[physical]
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        allocated, reserved = _torch_figures(torch, index)
        # inside a container NVML reports the host's process ids, and this process is not found by its own:
        # what torch reserved here is this process's all the same, not another's; and the engines this server
        # started run in processes of their own, found by no id of this one
        ours = min(int(info.used), max(_process_bytes(pynvml, handle), reserved) + engines.get(index, 0))
        gpus.append(
            GpuMemory(
                index=index,
                name=_text(pynvml.nvmlDeviceGetName(handle)),
                uuid=uuids[physical],
                total_bytes=int(info.total),
                used_by_others_bytes=max(0, int(info.used) - ours),
                process_bytes=ours,
                allocated_bytes=allocated,
                reserved_bytes=reserved,
            )
        )
    return gpus


def _process_bytes(pynvml: Any, handle: Any) -> int:
    """What this process holds on the device as the driver counts it (0 where it cannot see this process,
    for example from inside a container with its own process ids)."""
    pid = os.getpid()
    try:
        processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception:  # NVMLError: not supported on this device or driver
        return 0
    return sum(int(p.usedGpuMemory or 0) for p in processes if p.pid == pid)


def read_torch(engines: Mapping[int, int] | None = None) -> list[GpuMemory]:
    """Every visible GPU through torch (imports it and creates a CUDA context on each device); ``engines`` as
    for :func:`read_nvml`."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        free, total = (int(n) for n in torch.cuda.mem_get_info(index))
        allocated, reserved = _torch_figures(torch, index)
        ours = min(total - free, reserved + (engines or {}).get(index, 0))
        gpus.append(
            GpuMemory(
                index=index,
                name=str(torch.cuda.get_device_name(index)),
                total_bytes=total,
                # what torch and the engines do not account for is counted as others': the CUDA context among it
                used_by_others_bytes=max(0, total - free - ours),
                process_bytes=ours,
                allocated_bytes=allocated,
                reserved_bytes=reserved,
            )
        )
    return gpus


def _torch_if_started() -> Any | None:
    """torch if this process has imported it and started CUDA (reading it then starts nothing new)."""
    torch = sys.modules.get("torch")
    # is_initialized first: is_available starts the CUDA driver, which reads CUDA_VISIBLE_DEVICES for good
    if torch is None or not torch.cuda.is_initialized() or not torch.cuda.is_available():
        return None
    return torch


def _torch_figures(torch: Any | None, index: int) -> tuple[int, int]:
    if torch is None:
        return 0, 0
    return int(torch.cuda.memory_allocated(index)), int(torch.cuda.memory_reserved(index))


def allocated_by_device() -> dict[int, int]:
    """Tensor bytes torch has allocated on each device now ({} before CUDA is started)."""
    torch = _torch_if_started()
    if torch is None:
        return {}
    return {i: int(torch.cuda.memory_allocated(i)) for i in range(torch.cuda.device_count())}


def read_gpus(*, may_import_torch: bool, engines: Mapping[int, int] | None = None) -> tuple[list[GpuMemory], str]:
    """The visible GPUs and how they were read ("nvml" or "torch"); ([], "") where there are none. torch
    is asked only when ``may_import_torch`` (a GPU backend is loading) or the driver lists GPUs. ``engines``:
    what the engines this server started hold on each GPU (see :func:`read_nvml`)."""
    pynvml = nvml()
    if pynvml is not None:
        try:
            return read_nvml(pynvml, engines=engines), "nvml"
        finally:
            pynvml.nvmlShutdown()
    if may_import_torch or "torch" in sys.modules or driver_lists_gpus():
        gpus = read_torch(engines)
        return gpus, "torch" if gpus else ""
    return [], ""
