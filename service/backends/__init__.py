"""Backends by registry name. Modules are imported only when a model of theirs loads."""

from __future__ import annotations

import importlib

from clemserve.registry.errors import FailedPreconditionError

from .base import Backend, BackendContext, Progress, RetryPolicy

_BACKENDS: dict[str, str] = {
    "echo": "clemserve.service.backends.echo:EchoBackend",
    "huggingface_local": "clemserve.service.backends.huggingface_local:HuggingfaceLocalBackend",
}

#: clembench backends that this server does not serve (yet); a clear error beats "unknown backend"
_NOT_SERVED = {
    "openai", "openai_compatible", "openrouter", "azure", "anthropic", "mistral", "cohere", "google",
    "vllm", "llamacpp", "slurk",
}  # fmt: skip


def backend_class(name: str) -> type[Backend]:
    target = _BACKENDS.get(name)
    if target is None:
        if name in _NOT_SERVED:
            raise FailedPreconditionError(
                f"backend {name} is not available in this clemserve version; available: {', '.join(sorted(_BACKENDS))}",
                subject=f"backend {name}",
            )
        raise FailedPreconditionError(
            f"unknown backend {name!r}; available: {', '.join(sorted(_BACKENDS))}", subject=f"backend {name}"
        )
    module_name, class_name = target.split(":")
    cls: type[Backend] = getattr(importlib.import_module(module_name), class_name)
    return cls


__all__ = ["Backend", "BackendContext", "Progress", "RetryPolicy", "backend_class"]
