"""Backends by registry name. Modules are imported only when a model of theirs loads."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

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
    "llamacpp": f"{_PACKAGE}.llamacpp:LlamaCppBackend",
}

#: clembench backends that this server does not serve, and why; a clear error beats "unknown backend"
_NOT_SERVED = {
    "slurk": "its player is a person in a slurk chat room, which the game machine's clemcore reaches with its "
    "own slurk key; like human and programmatic players, keep its entry in the game's model_registry.json",
}
#: every backend name clemserve knows, served or not: a bounded set (metric labels)
KNOWN_BACKENDS = frozenset(_BACKENDS) | frozenset(_NOT_SERVED)


@dataclass(frozen=True)
class Requirements:
    """What a backend needs before a model of it can load, known without importing its module (ListModels
    tells from this which models can run here). Each backend's ``load`` checks the same things again."""

    #: the pip extra that installs ``packages``
    extra: str = ""
    #: modules its load imports (the provider SDK, torch, ...)
    packages: tuple[str, ...] = ()
    #: the key.json entry it reads; the azure backend's depends on the entry (see ``key_entry``)
    key: str = ""
    #: it reads weights named by the entry's ``huggingface_id`` (or ``model_config.gguf``)
    weights: bool = False


_HF = ("torch", "transformers", "accelerate")
_REQUIREMENTS: dict[str, Requirements] = {
    "echo": Requirements(),
    "fault": Requirements(),
    "huggingface_local": Requirements("hf", _HF, weights=True),
    "vllm": Requirements("vllm", ("vllm", "transformers"), weights=True),
    "llamacpp": Requirements("llamacpp", ("llama_cpp", "huggingface_hub"), weights=True),
    "openai": Requirements("remote", ("openai",), "openai"),
    "openai_compatible": Requirements("remote", ("openai",), "openai_compatible"),
    "openrouter": Requirements("remote", ("openai",), "openrouter"),
    "azure": Requirements("remote", ("openai", "anthropic"), "azure_gpt"),
    "anthropic": Requirements("remote", ("anthropic",), "anthropic"),
    "google": Requirements("remote", ("google.genai",), "google"),
    "mistral": Requirements("remote", ("mistralai",), "mistral"),
    "cohere": Requirements("remote", ("cohere",), "cohere"),
}


def requirements(name: str) -> Requirements:
    """The backend's requirements; FailedPreconditionError, as ``backend_class``, for one not served here."""
    if name not in _BACKENDS:
        backend_class(name)  # raises the error that says why
    return _REQUIREMENTS[name]


def key_entry(name: str, model_id: str) -> str:
    """The key.json entry a model of backend ``name`` reads: azure routes Claude deployments (by model_id, as
    ``AzureBackend`` does) to ``azure_claude``, the others to ``azure_gpt``."""
    if name == "azure" and "claude" in model_id.lower():
        return "azure_claude"
    return _REQUIREMENTS[name].key


def backend_class(name: str) -> type[Backend]:
    target = _BACKENDS.get(name)
    if target is None:
        if name in _NOT_SERVED:
            raise FailedPreconditionError(
                f"backend {name} is not served: {_NOT_SERVED[name]}", subject=f"backend {name}"
            )
        raise FailedPreconditionError(
            f"unknown backend {name!r}; available: {', '.join(sorted(_BACKENDS))}", subject=f"backend {name}"
        )
    module_name, class_name = target.split(":")
    cls: type[Backend] = getattr(importlib.import_module(module_name), class_name)
    return cls


__all__ = [
    "Backend",
    "BackendContext",
    "BackendDeadError",
    "Progress",
    "Requirements",
    "RetryPolicy",
    "backend_class",
    "key_entry",
    "requirements",
]
