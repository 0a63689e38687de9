"""The model and backend labels of an RPC's metrics, from the selector its request names.

Label values come from bounded sets only, and never carry a secret: a backend name that clemserve knows,
and a model name that is a registry entry or a loaded model. Any other model name, which a client may
write freely into a spec, is folded to ``other``; a call that names no model at all (ListModels) has empty
labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from typing import Any

from clemserve.registry import ModelSpec

from . import convert
from .backends import KNOWN_BACKENDS
from .metrics import OTHER, fold
from .resolver import Selector

#: selectors whose labels are kept (game processes send the same few on every turn)
SELECTOR_CACHE_SIZE = 4096


def model_label(name: str, registry_names: AbstractSet[str], loaded_names: Iterable[str]) -> str:
    """``name`` when it is a registry entry's or a loaded model's (both sets bounded by the operator), else
    other: a client's spec may carry any text as its model_name."""
    if name in registry_names or name in loaded_names:
        return name
    return OTHER


def backend_label(name: str) -> str:
    return fold(name, KNOWN_BACKENDS)


class RequestLabels:
    """(model, backend) of the model a request names: ("", "") when it names none, (other, "") when it
    names one that does not resolve. Kept per selector text where they cannot change (the registry does not
    change while serving; whether a model is loaded does)."""

    def __init__(
        self,
        resolve: Callable[[Selector], ModelSpec],
        registry_names: AbstractSet[str],
        loaded_names: Callable[[], Iterable[str]],
    ) -> None:
        self._resolve = resolve
        self._registry_names = registry_names
        self._loaded_names = loaded_names
        self._kept: dict[tuple[str, str], tuple[str, str]] = {}

    def __call__(self, request: object) -> tuple[str, str]:
        selector = getattr(request, "model", None)
        if selector is None or not selector.WhichOneof("selector"):
            return "", ""
        kind = selector.WhichOneof("selector")
        key = (kind, selector.name if kind == "name" else selector.spec.json)
        labels = self._kept.get(key)
        if labels is None:
            labels = self._labels(selector)
            if labels[1] == "" or labels[0] in self._registry_names:
                if len(self._kept) >= SELECTOR_CACHE_SIZE:
                    self._kept.pop(next(iter(self._kept)))
                self._kept[key] = labels
        return labels

    def _labels(self, selector: Any) -> tuple[str, str]:
        """Resolved the way the model cache resolves it (its cache makes that a lookup)."""
        try:
            spec = self._resolve(convert.selector_from_proto(selector))
        except Exception:
            return OTHER, ""
        model = model_label(spec["model_name"], self._registry_names, self._loaded_names())
        return model, backend_label(spec["backend"])
