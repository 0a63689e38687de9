"""Which registry entry a selector names, and which loaded copy serves it.

A selector (a model name, or a spec the client sent) unifies with the registry's entries into one spec;
specs that differ only in fields that do not change what a load produces share one loaded copy, found by
their cache key. Selectors that add fields choosing what is loaded are refused unless the operator allows
client specs (service/security/client_specs.py); the human and programmed players resolve but are served by no server.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from clemserve.registry import ModelRegistry, ModelSpec
from clemserve.registry.errors import InvalidArgumentError

from .backends import PLAYER_BACKENDS
from .security.client_specs import check_selector

Selector = str | Mapping[str, Any]

RESOLVE_CACHE_SIZE = 4096
SELECTORS_HELD = 64
#: the spec fields that decide what a load produces (weights, engine, context); others, such as
#: temperature or lookup_source, do not, so selectors differing only there share one loaded copy
ENGINE_FIELDS = ("model_name", "backend", "huggingface_id", "model_id", "model_config", "context_size")


def cache_key(spec: ModelSpec) -> str:
    """Loaded models are cached by their ``ENGINE_FIELDS`` (content, not key order)."""
    engine = {name: value for name, value in spec.to_dict().items() if name in ENGINE_FIELDS}
    return json.dumps(engine, sort_keys=True, separators=(",", ":"))


class Resolver:
    """Selectors to specs and cache keys, each selector resolved once (the registry does not change while
    serving, and game processes send the same few selectors on every turn)."""

    def __init__(self, registry: ModelRegistry, *, allow_client_specs: bool = False) -> None:
        self.registry = registry
        #: let selectors add fields that choose what is loaded or called (security/client_specs.py); off by default
        self.allow_client_specs = allow_client_specs
        self._resolved: OrderedDict[str, tuple[ModelSpec, str]] = OrderedDict()
        #: spec selectors by identity (each held, so that its id is not reused): the servicer hands the same
        #: object, never changed, for the same spec text on every turn; found here, it is not encoded again
        self._by_object: dict[int, tuple[Selector, tuple[ModelSpec, str]]] = {}
        #: the names of the registry's entries
        self.names = frozenset(str(entry["model_name"]) for entry in registry)

    def resolve(self, selector: Selector) -> ModelSpec:
        return self.resolved(selector)[0]

    def resolved(self, selector: Selector) -> tuple[ModelSpec, str]:
        """The unified spec and its cache key."""
        held = self._by_object.get(id(selector))
        if held is not None and held[0] is selector:
            return held[1]
        # key order matters (it orders the result's keys), so the lookup key keeps it
        lookup = selector if isinstance(selector, str) else "\0" + json.dumps(selector, default=repr)
        found = self._resolved.get(lookup)
        if found is None:
            spec = self.registry.resolve(selector)
            if not self.allow_client_specs:
                check_selector(selector, self.registry)
            found = self._resolved[lookup] = (spec, cache_key(spec))
            if len(self._resolved) > RESOLVE_CACHE_SIZE:
                self._resolved.popitem(last=False)
        if not isinstance(selector, str):
            if len(self._by_object) >= SELECTORS_HELD:
                del self._by_object[next(iter(self._by_object))]
            self._by_object[id(selector)] = (selector, found)
        return found

    def servable(self, selector: Selector) -> tuple[ModelSpec, str]:
        """``resolved``, refusing the players that a game answers for itself."""
        spec, key = self.resolved(selector)
        if spec["backend"] in PLAYER_BACKENDS:
            raise InvalidArgumentError(
                "model",
                f"{spec['model_name']!r} is a {spec['backend'][len('_player_') :]} player: the game answers "
                "for it, no server does",
            )
        return spec, key
