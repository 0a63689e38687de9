"""The GPUs this process may use and what each holds: through NVML where it is installed, else torch.

NVML (``pynvml``, from the ``nvidia-ml-py`` package NVIDIA maintains) reads every GPU without creating a
CUDA context and sees every process's memory; it lists the machine's GPUs in PCI order, so
``CUDA_VISIBLE_DEVICES`` (indices, or ``GPU-`` UUIDs or unique prefixes of them) is applied here as CUDA
applies it: the listed devices, in the listed order, up to the first entry that names none. torch
(``torch.cuda.mem_get_info``) is the fallback; it creates a CUDA context on each device, so it is asked
only when a GPU backend loads. Every function here blocks (driver calls): run them off the event loop.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .domain import GpuMemory

log = logging.getLogger(__name__)

#: where the NVIDIA driver lists its GPUs (absent in many containers, hence NVML first)
DRIVER_GPUS = Path("/proc/driver/nvidia/gpus")


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


def read_nvml(pynvml: Any, environ: Mapping[str, str] | None = None) -> list[GpuMemory]:
    """Every visible GPU: its size, what this process holds on it and what everyone else does."""
    environ = os.environ if environ is None else environ
    handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    uuids = [_text(pynvml.nvmlDeviceGetUUID(h)) for h in handles]
    torch = _torch_if_started()
    gpus = []
    for index, physical in enumerate(visible_order(environ.get("CUDA_VISIBLE_DEVICES"), uuids)):
        handle = handles[physical]
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        allocated, reserved = _torch_figures(torch, index)
        # inside a container NVML reports the host's process ids, and this process is not found by its own:
        # what torch reserved here is this process's all the same, not another's
        ours = max(_process_bytes(pynvml, handle), reserved)
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


def read_torch() -> list[GpuMemory]:
    """Every visible GPU through torch (imports it and creates a CUDA context on each device)."""
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
        gpus.append(
            GpuMemory(
                index=index,
                name=str(torch.cuda.get_device_name(index)),
                total_bytes=total,
                # what torch does not account for is counted as others': the CUDA context among it
                used_by_others_bytes=max(0, total - free - reserved),
                allocated_bytes=allocated,
                reserved_bytes=reserved,
            )
        )
    return gpus


def _torch_if_started() -> Any | None:
    """torch if this process has imported it and started CUDA (reading it then starts nothing new)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
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


def read_gpus(*, may_import_torch: bool) -> tuple[list[GpuMemory], str]:
    """The visible GPUs and how they were read ("nvml" or "torch"); ([], "") where there are none. torch
    is asked only when ``may_import_torch`` (a GPU backend is loading) or the driver lists GPUs."""
    pynvml = nvml()
    if pynvml is not None:
        try:
            return read_nvml(pynvml), "nvml"
        finally:
            pynvml.nvmlShutdown()
    if may_import_torch or "torch" in sys.modules or driver_lists_gpus():
        gpus = read_torch()
        return gpus, "torch" if gpus else ""
    return [], ""
