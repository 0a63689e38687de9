"""ListModels: every registry entry with its availability (found without loading it), its cache state when
loaded and its estimate always; then the loaded models no entry names; and the memory budget."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import replace

from clemserve.registry import KeyRegistry, ModelRegistry, ModelSpec

from .availability import HubProbe, Machine, availability_of, hub_offline
from .domain import Availability, CacheSnapshot, MemoryFigures, ModelSnapshot, ModelState, Spend
from .residency import Residency
from .resolver import cache_key

#: a loaded model's snapshot, listed under the given registry entry (None: its own spec)
Snapshot = Callable[[ModelSpec | None], ModelSnapshot]


async def list_models(
    registry: ModelRegistry,
    residency: Residency,
    keys: KeyRegistry,
    loaded: Mapping[str, Snapshot],
    hub: HubProbe | None = None,
    spend: Mapping[str, Spend] | None = None,
) -> CacheSnapshot:
    """``loaded``: the models in the cache by cache key; ``hub``: asks an online server's hub about weights
    not cached; ``spend``: each model's usage and cost so far, by model name. Reads file headers, installed
    packages and the Hugging Face cache (and asks the hub) off the event loop."""
    budget = await residency.find_budget()
    await asyncio.to_thread(residency.estimate_all, registry)
    machine = Machine(keys=keys, has_gpu=budget.kind == "gpu", offline=hub_offline(), hub=hub)
    found = await asyncio.to_thread(availability_of, list(registry), machine)
    listed: list[ModelSnapshot] = []
    seen: set[str] = set()
    for entry, (available, detail) in zip(registry, found, strict=True):
        key = cache_key(entry)
        snapshot = loaded.get(key)
        # a copy that several selectors share (ENGINE_FIELDS) is listed as the entry itself
        if snapshot is not None:
            listed.append(_available(snapshot(entry), available, detail))
        else:
            parts = residency.estimate_parts(key, entry)
            memory = MemoryFigures(parts.weights, parts.kv_cache, parts.source if parts.total else "")
            leases = residency.leases_on(key)
            listed.append(
                _available(
                    ModelSnapshot(entry, leases=leases, estimated_bytes=parts.total, memory=memory), available, detail
                )
            )
        seen.add(key)
    listed.extend(_available(snapshot(None), None, "") for key, snapshot in loaded.items() if key not in seen)
    spent = spend or {}
    return CacheSnapshot(
        tuple(replace(model, spend=spent[model.name]) if model.name in spent else model for model in listed),
        budget.total,
        residency.used(),
        budget.kind,
        devices=await residency.devices(),
        memory_source=budget.source,
        kv_cache_tokens=residency.policy.kv_cache_tokens,
    )


def _available(snapshot: ModelSnapshot, found: Availability | None, detail: str) -> ModelSnapshot:
    """``snapshot`` with what was found of its availability (None: nothing); a loaded model is ready."""
    if snapshot.state is ModelState.READY:
        found, detail = Availability.READY, ""
    return replace(snapshot, availability=found, availability_detail=detail)
