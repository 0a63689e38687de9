"""The GPUs this process may use, read through a stand-in NVML: each GPU's size, this process's share and
everyone else's, CUDA_VISIBLE_DEVICES applied as CUDA applies it, and which reader is asked when."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from clemserve.service import gpus
from clemserve.service.domain import GpuMemory

GiB = 2**30


class StandInNvml:
    """pynvml's calls over a table of GPUs: (name, uuid, total, used, {pid: bytes} or None for 'not supported')."""

    def __init__(self, devices: list[tuple[str, str, int, int, dict[int, int] | None]]) -> None:
        self.devices = devices
        self.shut = 0

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return self.devices[handle][1].encode()  # older pynvml answers bytes

    def nvmlDeviceGetName(self, handle: int) -> str:
        return self.devices[handle][0]

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        _, _, total, used, _ = self.devices[handle]
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Any]:
        processes = self.devices[handle][4]
        if processes is None:
            raise RuntimeError("NVMLError_NotSupported")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in processes.items()]

    def nvmlShutdown(self) -> None:
        self.shut += 1


def machine() -> StandInNvml:
    me = os.getpid()
    return StandInNvml(
        [
            ("A100", "GPU-aaaa-1111", 80 * GiB, 30 * GiB, {me: 10 * GiB, me + 1: 20 * GiB}),
            ("H100", "GPU-bbbb-2222", 96 * GiB, 6 * GiB, None),
            ("L4", "GPU-cccc-3333", 24 * GiB, 0, {}),
        ]
    )


def test_each_gpu_its_size_this_process_share_and_the_others() -> None:
    first, second, third = gpus.read_nvml(machine(), environ={})
    assert first == GpuMemory(
        index=0,
        name="A100",
        uuid="GPU-aaaa-1111",
        total_bytes=80 * GiB,
        used_by_others_bytes=20 * GiB,
        process_bytes=10 * GiB,
        allocated_bytes=0,
        reserved_bytes=0,
    )
    # a device that cannot list processes counts everything as others'
    assert (second.process_bytes, second.used_by_others_bytes) == (0, 6 * GiB)
    assert (third.index, third.name, third.used_by_others_bytes) == (2, "L4", 0)


@pytest.mark.parametrize(
    ("setting", "names"),
    [
        ("2,0", ["L4", "A100"]),
        ("GPU-bbbb", ["H100"]),
        ("cccc-3333,1", ["L4", "H100"]),
        ("", []),
        ("0,9,1", ["A100"]),  # an entry that names no device ends the list
    ],
)
def test_cuda_visible_devices_picks_and_orders_the_gpus(setting: str, names: list[str]) -> None:
    read = gpus.read_nvml(machine(), environ={"CUDA_VISIBLE_DEVICES": setting})
    assert [g.name for g in read] == names
    assert [g.index for g in read] == list(range(len(names)))  # CUDA's indices, not the physical ones


def test_nvml_is_asked_first_and_shut_down_after(monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in = machine()
    monkeypatch.setattr(gpus, "nvml", lambda: stand_in)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    read, source = gpus.read_gpus(may_import_torch=False)
    assert source == "nvml" and len(read) == 3 and stand_in.shut == 1


def test_without_nvml_torch_is_asked_only_when_it_may_be(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    asked: list[bool] = []
    monkeypatch.setattr(gpus, "nvml", lambda: None)
    monkeypatch.setattr(gpus, "read_torch", lambda engines=None: asked.append(True) or [])
    monkeypatch.setattr(gpus, "DRIVER_GPUS", tmp_path / "gpus")
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert gpus.read_gpus(may_import_torch=False) == ([], "") and asked == []
    assert gpus.read_gpus(may_import_torch=True) == ([], "") and asked == [True]
    (tmp_path / "gpus" / "0000:01:00.0").mkdir(parents=True)  # the driver lists a GPU
    assert gpus.driver_lists_gpus()
    gpus.read_gpus(may_import_torch=False)
    assert asked == [True, True]


def test_torch_figures_only_once_torch_has_started_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert gpus.allocated_by_device() == {}
    cuda = SimpleNamespace(
        is_available=lambda: True,
        is_initialized=lambda: True,
        device_count=lambda: 2,
        memory_allocated=lambda i: (i + 1) * GiB,
        memory_reserved=lambda i: (i + 2) * GiB,
    )
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    assert gpus.allocated_by_device() == {0: GiB, 1: 2 * GiB}
    first = gpus.read_nvml(machine(), environ={"CUDA_VISIBLE_DEVICES": "1"})[0]
    assert (first.name, first.allocated_bytes, first.reserved_bytes) == ("H100", GiB, 2 * GiB)
    cuda.is_initialized = lambda: False
    assert gpus.allocated_by_device() == {}


def test_inside_a_container_what_torch_reserved_is_this_processs_not_anothers(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML reports the host's process ids there: none matches this process's own."""
    foreign = StandInNvml([("H100", "GPU-dddd-4444", 80 * GiB, 30 * GiB, {4242: 30 * GiB})])
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    (unseen,) = gpus.read_nvml(foreign, environ={})
    assert (unseen.process_bytes, unseen.used_by_others_bytes) == (0, 30 * GiB)  # torch not started: nothing known
    cuda = SimpleNamespace(
        is_available=lambda: True,
        is_initialized=lambda: True,
        device_count=lambda: 1,
        memory_allocated=lambda i: 20 * GiB,
        memory_reserved=lambda i: 24 * GiB,
    )
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    (seen,) = gpus.read_nvml(foreign, environ={})
    assert (seen.process_bytes, seen.used_by_others_bytes) == (24 * GiB, 6 * GiB)


def test_the_engines_this_server_started_are_its_own_memory_not_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """A vLLM engine core is a child process: NVML lists it under its own id (a host id inside a container),
    torch here does not see it. Its charge (``engines``, by CUDA's index) is counted as this server's."""
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    foreign = StandInNvml(
        [
            ("H100", "GPU-dddd-4444", 80 * GiB, 50 * GiB, {4242: 40 * GiB, 4343: 10 * GiB}),
            ("H100", "GPU-eeee-5555", 80 * GiB, 10 * GiB, {4444: 10 * GiB}),
        ]
    )
    first, second = gpus.read_nvml(foreign, environ={}, engines={0: 40 * GiB})
    assert (first.process_bytes, first.used_by_others_bytes) == (40 * GiB, 10 * GiB)
    assert (second.process_bytes, second.used_by_others_bytes) == (0, 10 * GiB)
    # an engine still starting holds less than its charge: never more than the GPU's used memory is ours
    (starting, _) = gpus.read_nvml(foreign, environ={}, engines={0: 60 * GiB})
    assert (starting.process_bytes, starting.used_by_others_bytes) == (50 * GiB, 0)


def _child_sees(path: str) -> None:
    Path(path).write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))


def test_an_engine_process_sees_its_gpus_while_the_server_keeps_its_own(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The child is started with CUDA_VISIBLE_DEVICES naming its GPUs; the server's readers read the server's
    own setting meanwhile, and the environment has it back once the child exists, before ``start`` returns."""
    import multiprocessing
    import threading

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    seen: dict[str, object] = {}
    child_started, may_return = threading.Event(), threading.Event()

    def start() -> str:
        seen["server"] = gpus.server_visible_devices()
        child = multiprocessing.get_context("fork").Process(target=_child_sees, args=(str(tmp_path / "seen"),))
        child.start()
        child_started.set()
        may_return.wait(10)  # an engine getting ready: minutes
        child.join(10)
        return "engine"

    result: list[str] = []
    runner = threading.Thread(target=lambda: result.append(gpus.start_seeing("GPU-bbbb-2222", start, poll_s=0.01)))
    runner.start()
    assert child_started.wait(10)
    for _ in range(500):  # restored once the child exists, while start still runs
        if os.environ.get("CUDA_VISIBLE_DEVICES") == "0,1,2":
            break
        threading.Event().wait(0.01)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2" and runner.is_alive()
    may_return.set()
    runner.join(10)
    assert result == ["engine"] and seen["server"] == "0,1,2"
    assert (tmp_path / "seen").read_text() == "GPU-bbbb-2222"


def test_a_reader_during_an_engine_start_reads_the_servers_own_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    with gpus.visible_to_children("2"):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"
        assert [g.name for g in gpus.read_nvml(machine())] == ["A100", "H100", "L4"]  # all three, as the server
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
