"""The failures a transformers model can raise on its device, and what a backend turns each into (both
huggingface_local backends share the mapping: ``service/backends/placement.py``)."""

from __future__ import annotations

from typing import Any

from clemserve.registry.errors import ResourceExhaustedError
from clemserve.service.backends import BackendDeadError


def failures(model_name: str) -> list[tuple[str, type[BaseException], str]]:
    """``(failure, what it becomes, what the error says)`` for a backend serving ``model_name``."""
    return [
        ("CUDA error: an illegal memory access was encountered", BackendDeadError, "left its GPU state unusable"),
        ("accelerator", BackendDeadError, "device-side assert triggered"),
        ("oom", ResourceExhaustedError, f"out of memory while generating with {model_name}"),
        ("host", ResourceExhaustedError, f"out of memory while generating with {model_name}"),
        ("a bug", RuntimeError, "a bug"),
    ]


def raised(failure: str) -> Any:
    """The exception behind one of :func:`failures`: torch's own where torch raises it."""
    import torch

    return {
        "accelerator": torch.AcceleratorError("CUDA error: device-side assert triggered"),
        "oom": torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        "host": MemoryError(),
    }.get(failure, RuntimeError(failure))
