"""Where a transformers model goes: the plan over the visible GPUs and the host, number_gpus, the device map's summary
and what was offloaded, and CUDA failures told from other errors."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from clemserve.registry import KeyRegistry
from clemserve.registry.errors import FailedPreconditionError, ResourceExhaustedError
from clemserve.service.backends import BackendContext, BackendDeadError, placement
from tests import device_failures

GiB = 2**30


def test_a_cpu_machine_places_on_the_cpu_whatever_number_gpus_says(caplog: pytest.LogCaptureFixture) -> None:
    assert placement.plan("m", {}, [], allow_offload=False) == placement.Placement((), {"device_map": "auto"})
    with caplog.at_level(logging.WARNING):
        assert not placement.plan("m", {"number_gpus": 2}, [], allow_offload=False).on_gpu
    assert "no GPU is visible" in caplog.text


def test_number_gpus_bounds_the_gpus_and_the_cpu_takes_nothing_unless_allowed() -> None:
    free = [10 * GiB, 20 * GiB, 30 * GiB]
    every = placement.plan("m", {}, free, allow_offload=False)
    assert every.gpus == (0, 1, 2) and every.kwargs["max_memory"] == {0: 10 * GiB, 1: 20 * GiB, 2: 30 * GiB}
    two = placement.plan("m", {"number_gpus": 2}, free, allow_offload=False, host_bytes=64 * GiB)
    assert two.gpus == (0, 1) and two.kwargs == {"device_map": "auto", "max_memory": {0: 10 * GiB, 1: 20 * GiB}}
    offload = placement.plan("m", {"number_gpus": 1}, free, allow_offload=True, host_bytes=64 * GiB)
    assert offload.kwargs["max_memory"] == {0: 10 * GiB, "cpu": 64 * GiB}


def test_the_gpus_admission_chose_take_the_model_and_the_others_nothing() -> None:
    free = [2 * GiB, 70 * GiB, 30 * GiB, 70 * GiB]
    second = placement.plan("m", {"number_gpus": 1}, free, allow_offload=False, chosen=(1,))
    assert second.gpus == (1,) and second.kwargs["max_memory"] == {1: 70 * GiB}
    pair = placement.plan("m", {"number_gpus": 2}, free, allow_offload=False, chosen=(1, 3))
    assert pair.kwargs["max_memory"] == {1: 70 * GiB, 3: 70 * GiB}
    fewest = placement.plan("m", {}, free, allow_offload=False, chosen=(3,))  # no number_gpus: as admitted
    assert fewest.gpus == (3,)
    # a choice that does not match the visible GPUs or number_gpus is not followed: GPUs 0 to n - 1
    assert placement.plan("m", {"number_gpus": 2}, free, allow_offload=False, chosen=(3,)).gpus == (0, 1)
    assert placement.plan("m", {"number_gpus": 1}, free[:2], allow_offload=False, chosen=(3,)).gpus == (0,)


def test_a_worker_places_its_model_on_the_gpus_of_its_grant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clemserve.service.devices import Grant

    monkeypatch.setattr(placement, "visible_gpus", lambda: [10 * GiB, 60 * GiB])
    monkeypatch.setattr(placement, "_start_cuda", lambda: None)
    worker = _Worker(tmp_path)
    worker.context = BackendContext(KeyRegistry(tmp_path / "key.json"), tmp_path, grant=Grant((1,), ("GPU-1",)))
    asyncio.run(worker._load_placed({"number_gpus": 1}, lambda: None))
    assert worker.placement.kwargs["max_memory"] == {1: 60 * GiB}


@pytest.mark.parametrize(("number_gpus", "says"), [(3, "asks for 3 GPUs"), (0, "positive integer"), ("2", "positive")])
def test_number_gpus_beyond_the_visible_gpus_or_malformed_is_refused(number_gpus: object, says: str) -> None:
    with pytest.raises(FailedPreconditionError) as caught:
        placement.plan("m", {"number_gpus": number_gpus}, [GiB, GiB], allow_offload=False)
    assert caught.value.subject == "model_config.number_gpus" and says in str(caught.value)


def test_device_map_summary_and_offloaded_modules() -> None:
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cuda:1", "model.norm": "cpu"}
    assert placement.describe(device_map) == "cpu: 1 module, cuda:0: 2 modules, cuda:1: 1 module"
    assert placement.offloaded({**device_map, "lm_head": "disk"}) == {"cpu": 1, "disk": 1}
    assert placement.offloaded({"": 0}) == {} and placement.describe(None) == "no device map"


# -- failures on the device: a CUDA error kills the backend, out of memory fails the call -----------------------


def test_cuda_failures_are_told_from_other_errors() -> None:
    import torch

    assert placement.is_cuda_failure(RuntimeError("CUDA error: device-side assert triggered\nCompile with ..."))
    assert placement.is_cuda_failure(torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
    assert placement.is_cuda_failure(RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling ..."))
    assert not placement.is_cuda_failure(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not placement.is_cuda_failure(RuntimeError("shape mismatch"))
    assert not placement.is_cuda_failure(ValueError("CUDA error: in a ValueError, not torch's"))


class _Worker(placement.DeviceWorker):
    def __init__(self, tmp_path: Path) -> None:
        self.model_name = "m"
        self.context = BackendContext(KeyRegistry(tmp_path / "key.json"), tmp_path)
        self._start_worker()


@pytest.mark.parametrize(
    ("failure", "becomes", "says"),
    [
        ("accelerator", BackendDeadError, "a CUDA error while finding room on its GPUs with m"),
        ("oom", ResourceExhaustedError, "out of memory while finding room on its GPUs with m"),
        ("a bug", RuntimeError, "a bug"),
    ],
)
def test_a_failure_at_the_first_cuda_call_of_a_load_is_what_it_means(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str, becomes: type[BaseException], says: str
) -> None:
    """After a CUDA error the reload's first CUDA call (reading each GPU's free memory) fails too: a dead
    backend, so that the server turns NOT_SERVING and the call UNAVAILABLE, not INTERNAL."""

    def broken() -> list[int]:
        raise device_failures.raised(failure)

    monkeypatch.setattr(placement, "visible_gpus", broken)
    loaded: list[bool] = []
    worker = _Worker(tmp_path)
    with pytest.raises(becomes, match=says):
        asyncio.run(worker._load_placed({}, lambda: loaded.append(True)))
    assert loaded == []  # nothing loaded on a device whose state is unknown


def test_the_free_memory_of_each_gpu_is_asked_of_nvml_before_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's answer creates a CUDA context on every GPU; NVML's creates none."""
    import sys
    import types

    class Nvml(types.ModuleType):
        def __init__(self) -> None:
            super().__init__("pynvml")
            self.stopped = 0

        def nvmlInit(self) -> None: ...

        def nvmlShutdown(self) -> None:
            self.stopped += 1

        def nvmlDeviceGetCount(self) -> int:
            return 2

        def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
            return index

        def nvmlDeviceGetUUID(self, handle: int) -> str:
            return f"GPU-{handle}"

        def nvmlDeviceGetName(self, handle: int) -> str:
            return "a GPU"

        def nvmlDeviceGetMemoryInfo(self, handle: int) -> types.SimpleNamespace:
            return types.SimpleNamespace(total=80 * GiB, used=(handle + 1) * 10 * GiB)

        def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[types.SimpleNamespace]:
            return [types.SimpleNamespace(pid=123456789, usedGpuMemory=(handle + 1) * 10 * GiB)]

    fake = Nvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    monkeypatch.setitem(sys.modules, "torch", None)  # importing torch would fail: it is not asked
    assert placement.visible_gpus() == [60 * GiB, 70 * GiB]  # in CUDA's order, GPU 1 first
    assert fake.stopped == 1


@pytest.mark.parametrize(
    ("config", "package"),
    [
        ({"attn_implementation": "flash_attention_2"}, "flash-attn"),
        ({"load_in_4bit": True}, "bitsandbytes"),
        ({"peft_model": "org/adapter"}, "peft"),
    ],
)
def test_a_loading_option_without_its_package_is_refused_naming_the_package(
    monkeypatch: pytest.MonkeyPatch, config: dict[str, object], package: str
) -> None:
    monkeypatch.setattr(placement, "_installed", lambda module: False)
    with pytest.raises(FailedPreconditionError) as caught:
        placement.check_loading_options(config)
    assert caught.value.subject == f"pip install {package}"
    monkeypatch.setattr(placement, "_installed", lambda module: True)
    placement.check_loading_options(config)
    placement.check_loading_options({"attn_implementation": "sdpa"})
