"""Backends by registry name. Modules are imported only when a model of theirs loads."""

from __future__ import annotations

import importlib

from clemserve.registry.errors import FailedPreconditionError

from .base import Backend, BackendContext, BackendDeadError, Progress, RetryPolicy

_PACKAGE = "clemserve.service.backends"
_BACKENDS: dict[str, str] = {
    "echo": f"{_PACKAGE}.echo:EchoBackend",
    "fault": f"{_PACKAGE}.fault:FaultBackend",
    "huggingface_local": f"{_PACKAGE}.huggingface_local:HuggingfaceLocalBackend",
    "openai": f"{_PACKAGE}.openai:OpenAIBackend",
    "openai_compatible": f"{_PACKAGE}.openai:OpenAICompatibleBackend",
    "openrouter": f"{_PACKAGE}.openai:OpenRouterBackend",
    "azure": f"{_PACKAGE}.azure:AzureBackend",
    "anthropic": f"{_PACKAGE}.anthropic:AnthropicBackend",
    "google": f"{_PACKAGE}.google:GoogleBackend",
    "mistral": f"{_PACKAGE}.mistral:MistralBackend",
    "cohere": f"{_PACKAGE}.cohere:CohereBackend",
    "vllm": f"{_PACKAGE}.vllm_engine:VLLMBackend",
}

#: clembench backends that this server does not serve (yet); a clear error beats "unknown backend"
_NOT_SERVED = {"llamacpp", "slurk"}
#: every backend name clemserve knows, served or not: a bounded set (metric labels)
KNOWN_BACKENDS = frozenset(_BACKENDS) | frozenset(_NOT_SERVED)


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


__all__ = ["Backend", "BackendContext", "BackendDeadError", "Progress", "RetryPolicy", "backend_class"]
