"""The model cache's side of admission, for residency's tests without a server: models by cache key, each
unloaded (its charge drained) when residency names it."""

from __future__ import annotations

import contextlib

from clemserve.registry import ModelSpec
from clemserve.service.domain import ModelState
from clemserve.service.loaded import LoadedModel
from clemserve.service.residency import Residency
from clemserve.service.resolver import cache_key


async def admit(residency: Residency, models: dict[str, LoadedModel], spec: ModelSpec) -> LoadedModel:
    """Admit ``spec`` as the cache does: in the cache while loading, the keys residency names unloaded."""
    key = cache_key(spec)
    model = models[key] = LoadedModel(spec, state=ModelState.LOADING)
    residents = [m.resident(k) for k, m in models.items()]
    async with contextlib.aclosing(residency.admit(key, spec, residents)) as victims:
        async for victim in victims:
            unload(residency, models, victim)
    return model


def unload(residency: Residency, models: dict[str, LoadedModel], key: str) -> None:
    models.pop(key, None)
    residency.drained(residency.drain(key))


def unload_all(residency: Residency, models: dict[str, LoadedModel]) -> None:
    for key in list(models):
        unload(residency, models, key)


def charged(residency: Residency, model: LoadedModel) -> int:
    return residency.charged(cache_key(model.spec))
