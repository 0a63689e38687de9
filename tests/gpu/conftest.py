"""The GPU tests' device and models. Every test here carries the ``gpu`` marker and is skipped, with the
reason shown by ``pytest -ra``, where torch sees no CUDA device. ``CLEMSERVE_GPU_TESTS_ON_CPU=1`` runs them
on the CPU with a smaller model (a dry run of the tests themselves; what only a GPU has is skipped).
``CLEMSERVE_GPU_MODELS`` names a folder where the random models are built once and kept (``make gpu-check``
shares them with its benchmark); without it they are built in a temporary folder."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests.gpu.random_llama import random_llama

ON_CPU = os.environ.get("CLEMSERVE_GPU_TESTS_ON_CPU", "") in ("1", "true", "yes")


def _no_cuda_reason() -> str:
    """Why the GPU tests cannot run here; "" when they can."""
    if importlib.util.find_spec("torch") is None:
        return "GPU test: torch is not installed"
    if ON_CPU:
        return ""
    import torch

    if not torch.cuda.is_available():
        return (
            f"GPU test: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False); "
            "run `make gpu-check` on a GPU machine"
        )
    return ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    reason = _no_cuda_reason()
    if reason:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def device() -> str:
    return "cpu" if ON_CPU else "cuda"


def needs_cuda(device: str, what: str) -> None:
    """Skip (with the reason) a check that only a CUDA device can make, in a dry run on the CPU."""
    if device != "cuda":
        pytest.skip(f"GPU test dry run on the CPU: {what} needs a CUDA device")


SIZE = "small" if ON_CPU else "0.5b"


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    shared = os.environ.get("CLEMSERVE_GPU_MODELS", "")
    return Path(shared) if shared else tmp_path_factory.mktemp("random-llamas")


@pytest.fixture(scope="session")
def model_bf16(models: Path) -> Path:
    return random_llama(models, SIZE, "bfloat16")


@pytest.fixture(scope="session")
def model_fp32(models: Path) -> Path:
    return random_llama(models, SIZE, "float32")
