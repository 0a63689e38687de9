"""Where a transformers model goes: the plan over the visible GPUs and the host, number_gpus, the device map's summary
and what was offloaded, and CUDA failures told from other errors."""

from __future__ import annotations

import logging

import pytest

from clemserve.registry.errors import (
    FailedPreconditionError,
)
from clemserve.service.backends import placement

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
