"""The backend catalog: one entry per registry backend name, saying what the backend is without importing it.

An entry names the backend's classes (and which one a registry entry picks), what it needs before a model
can load, where its model's memory lives, and its ``estimate`` and ``weights`` functions. The rest of the
server asks the catalog and never tests a backend's name; a backend is one module and one entry here.
Modules are imported only when a model of theirs loads, or when its estimate or weights are asked for.
"""

from __future__ import annotations

import enum
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clemserve.registry import ModelSpec
from clemserve.registry.errors import ClemserveError, FailedPreconditionError

from ..memory import Estimate, Sizing
from .base import Backend, BackendContext, BackendDeadError, Progress, RetryPolicy, install_route
from .weights import SnapshotFinder, Weights, cached_snapshot, model_config

log = logging.getLogger(__name__)
_PACKAGE = "clemserve.service.backends"


@dataclass(frozen=True)
class Requirements:
    """What a backend needs before a model of it can load, known without importing its module (ListModels
    tells from this which models can run here). Each backend's ``load`` checks the same things again."""

    #: the pip extra that installs ``packages``
    extra: str = ""
    #: modules its load imports (the provider SDK, torch, ...)
    packages: tuple[str, ...] = ()
    #: it reads weights named by the entry's ``huggingface_id`` (or ``model_config.gguf``)
    weights: bool = False


class Memory(enum.Enum):
    """Where a backend's model lives, as the memory budget sees it."""

    #: no weights of its own (a remote provider, echo); ``model_config.memory_bytes`` may say otherwise
    NONE = "none"
    #: read through this process's RAM by its loader, then on the GPUs where there are any (transformers)
    PROCESS = "process"
    #: an engine of its own, on the GPUs where there are any (vLLM), in RAM on a CPU
    ENGINE = "engine"
    #: the file's tensors mapped as stored, in this process's RAM (llama.cpp)
    MAPPED = "mapped"

    @property
    def on_gpus(self) -> bool:
        """The model goes to the GPUs when the machine has any."""
        return self in (Memory.PROCESS, Memory.ENGINE)

    @property
    def read_through_ram(self) -> bool:
        """The loader reads the weights through this process's memory, which must have room for them."""
        return self is Memory.PROCESS


@dataclass(frozen=True)
class Route:
    """One class of a backend (``module:Class`` in this package) and the key.json entry it reads; ``when``
    picks it from a registry entry (None: the backend's default, listed last)."""

    target: str
    key: str = ""
    when: Callable[[ModelSpec], bool] | None = None


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    requirements: Requirements
    routes: tuple[Route, ...]
    memory: Memory = Memory.NONE
    #: ``module:function`` taking (spec, Sizing) to an :class:`Estimate`, from metadata only ("": none)
    estimate: str = ""
    #: ``module:function`` taking (spec, SnapshotFinder) to :class:`Weights` ("": it reads none)
    weights: str = ""
    #: a paid API's provider in genai-prices' price data ("": paid, but with no price list of its own; None:
    #: the server runs the model, which costs compute seconds, not money)
    prices: str | None = None

    def route(self, spec: ModelSpec) -> Route:
        return next(route for route in self.routes if route.when is None or route.when(spec))


def _multimodal(spec: ModelSpec) -> bool:
    """clembench picks its transformers class by ``model_config.multimodal``."""
    return bool(model_config(spec).get("multimodal"))


def _claude(spec: ModelSpec) -> bool:
    """Azure serves Claude deployments through Anthropic's SDK, others through OpenAI's."""
    return "claude" in str(spec.get("model_id", "")).lower()


_HF = ("torch", "transformers", "accelerate")
_CATALOG: dict[str, CatalogEntry] = {
    entry.name: entry
    for entry in (
        CatalogEntry("echo", Requirements(), (Route("echo:EchoBackend"),)),
        CatalogEntry("fault", Requirements(), (Route("fault:FaultBackend"),)),
        CatalogEntry(
            "huggingface_local",
            Requirements("hf", _HF, weights=True),
            (
                Route("huggingface_multimodal:HuggingfaceMultimodalBackend", when=_multimodal),
                Route("huggingface_local:HuggingfaceLocalBackend"),
            ),
            Memory.PROCESS,
            estimate="huggingface_local:estimate",
            weights="weights:transformers_weights",
        ),
        CatalogEntry(
            "vllm",
            Requirements("vllm", ("vllm", "transformers"), weights=True),
            (Route("vllm_engine:VLLMBackend"),),
            Memory.ENGINE,
            estimate="vllm_engine:estimate",
            weights="weights:transformers_weights",
        ),
        CatalogEntry(
            "llamacpp",
            Requirements("llamacpp", ("llama_cpp", "huggingface_hub"), weights=True),
            (Route("llamacpp:LlamaCppBackend"),),
            Memory.MAPPED,
            estimate="llamacpp:estimate",
            weights="llamacpp:weights",
        ),
        CatalogEntry(
            "openai", Requirements("remote", ("openai",)), (Route("openai:OpenAIBackend", "openai"),), prices="openai"
        ),
        CatalogEntry(
            "openai_compatible",
            Requirements("remote", ("openai",)),
            (Route("openai:OpenAICompatibleBackend", "openai_compatible"),),
            prices="",
        ),
        CatalogEntry(
            "openrouter",
            Requirements("remote", ("openai",)),
            (Route("openai:OpenRouterBackend", "openrouter"),),
            prices="openrouter",
        ),
        CatalogEntry(
            "azure",
            Requirements("remote", ("openai", "anthropic")),
            (
                Route("azure:AzureClaudeBackend", "azure_claude", when=_claude),
                Route("azure:AzureGPTBackend", "azure_gpt"),
            ),
            prices="azure",
        ),
        CatalogEntry(
            "anthropic",
            Requirements("remote", ("anthropic",)),
            (Route("anthropic:AnthropicBackend", "anthropic"),),
            prices="anthropic",
        ),
        CatalogEntry(
            "google",
            Requirements("remote", ("google.genai",)),
            (Route("google:GoogleBackend", "google"),),
            prices="google",
        ),
        CatalogEntry(
            "mistral",
            Requirements("remote", ("mistralai",)),
            (Route("mistral:MistralBackend", "mistral"),),
            prices="mistral",
        ),
        CatalogEntry(
            "cohere", Requirements("remote", ("cohere",)), (Route("cohere:CohereBackend", "cohere"),), prices="cohere"
        ),
    )
}

#: clembench backends that this server does not serve, and why; a clear error beats "unknown backend"
_NOT_SERVED = {
    "slurk": "its player is a person in a slurk chat room, which the game machine's clemcore reaches with its "
    "own slurk key; like human and programmatic players, keep its entry in the game's model_registry.json",
}
#: clembench's players that are no model (a person at the terminal, a program): they play in the game's own
#: process, and a server cannot answer for them
PLAYER_BACKENDS = ("_player_human", "_player_programmed")
#: every backend name clemserve knows, served or not: a bounded set (metric labels)
KNOWN_BACKENDS = frozenset(_CATALOG) | frozenset(_NOT_SERVED)


def catalog(name: str) -> CatalogEntry:
    """The backend's entry; FailedPreconditionError saying why for a backend not served here."""
    entry = _CATALOG.get(name)
    if entry is not None:
        return entry
    if name in _NOT_SERVED:
        raise FailedPreconditionError(f"backend {name} is not served: {_NOT_SERVED[name]}", subject=f"backend {name}")
    raise FailedPreconditionError(
        f"unknown backend {name!r}; available: {', '.join(sorted(_CATALOG))}", subject=f"backend {name}"
    )


def served_backends() -> tuple[str, ...]:
    return tuple(_CATALOG)


def requirements(name: str) -> Requirements:
    """The backend's requirements; FailedPreconditionError for one not served here."""
    return catalog(name).requirements


def _entry_of(spec: ModelSpec) -> CatalogEntry:
    return catalog(str(spec.get("backend", "")))


def key_entry(spec: ModelSpec) -> str:
    """The key.json entry a model reads ("" for none): its route's (azure: Claude deployments ``azure_claude``)."""
    return _entry_of(spec).route(spec).key


def _load(target: str) -> Any:
    module_name, attribute = target.split(":")
    return getattr(importlib.import_module(f"{_PACKAGE}.{module_name}"), attribute)


def backend_for(spec: ModelSpec) -> type[Backend]:
    """The backend class that serves ``spec``, by its backend and route (imports its module)."""
    cls: type[Backend] = _load(_entry_of(spec).route(spec).target)
    return cls


def backend_class(name: str) -> type[Backend]:
    """The backend's default class (imports its module)."""
    cls: type[Backend] = _load(catalog(name).routes[-1].target)
    return cls


def memory_of(spec: ModelSpec) -> Memory:
    """Where the model's memory lives (NONE for a backend not served here)."""
    entry = _CATALOG.get(str(spec.get("backend", "")))
    return entry.memory if entry is not None else Memory.NONE


def price_list(spec: ModelSpec) -> str | None:
    """The model's provider in genai-prices' data ("": a paid API without one; None: the server runs it)."""
    entry = _CATALOG.get(str(spec.get("backend", "")))
    return entry.prices if entry is not None else None


def estimate(spec: ModelSpec, sizing: Sizing) -> Estimate:
    """The model's expected footprint, from metadata only; 0 where it cannot be told (logged, not fatal).
    ``model_config.memory_bytes`` overrides any backend's estimate."""
    declared = model_config(spec).get("memory_bytes")
    if isinstance(declared, int) and not isinstance(declared, bool) and declared >= 0:
        return Estimate(weights=declared, source="model_config.memory_bytes")
    entry = _CATALOG.get(str(spec.get("backend", "")))
    if entry is None or not entry.estimate:
        return Estimate()
    try:
        found: Estimate = _load(entry.estimate)(spec, sizing)
        return found
    except (OSError, ValueError, KeyError, TypeError, ClemserveError) as exc:
        log.info("cannot estimate the memory of %s: %s", spec.get("model_name"), exc)
    return Estimate()


def locate_weights(spec: ModelSpec, find: SnapshotFinder = cached_snapshot) -> Weights | None:
    """Where the model's weights are (None: its backend reads none, or is not served); ``find``: how a hub
    id's cached snapshot is found."""
    entry = _CATALOG.get(str(spec.get("backend", "")))
    if entry is None or not entry.weights:
        return None
    found: Weights = _load(entry.weights)(spec, find)
    return found


__all__ = [
    "KNOWN_BACKENDS",
    "PLAYER_BACKENDS",
    "Backend",
    "BackendContext",
    "BackendDeadError",
    "CatalogEntry",
    "Memory",
    "Progress",
    "Requirements",
    "RetryPolicy",
    "Route",
    "Weights",
    "backend_class",
    "backend_for",
    "catalog",
    "estimate",
    "install_route",
    "key_entry",
    "locate_weights",
    "memory_of",
    "price_list",
    "requirements",
    "served_backends",
]
