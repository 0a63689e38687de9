"""ListModels: every registry entry with its availability and estimate, loaded models with their state."""

from __future__ import annotations

import asyncio
from pathlib import Path

from clemserve.registry import KeyRegistry, ModelRegistry, ModelSpec
from clemserve.service.backends import BackendContext
from clemserve.service.domain import Availability, ModelState
from clemserve.service.memory import ResidencyPolicy
from clemserve.service.model_cache import ModelCache


def test_entries_are_listed_with_availability_and_estimates_and_loaded_ones_as_ready(tmp_path: Path) -> None:
    entries = [
        ModelSpec.from_dict({"model_name": "sized", "backend": "fault", "model_config": {"memory_bytes": 2**20}}),
        ModelSpec.from_dict({"model_name": "paid", "backend": "openai", "model_id": "gpt-x", "model_config": {}}),
        ModelSpec.from_dict({"model_name": "person", "backend": "slurk", "model_config": {}}),
    ]
    context = BackendContext(keys=KeyRegistry(tmp_path / "key.json"), cache_dir=tmp_path)

    async def check() -> None:
        cache = ModelCache(ModelRegistry(entries), context, residency=ResidencyPolicy(memory_budget="1GiB"))
        before = {m.name: m for m in (await cache.list_models()).models}
        assert before["sized"].state is ModelState.NOT_LOADED and before["sized"].estimated_bytes == 2**20
        assert before["sized"].availability is Availability.CAN_LOAD
        assert before["paid"].availability in (Availability.NEEDS_KEY, Availability.NEEDS_EXTRA)
        assert before["person"].availability is Availability.NOT_SERVED
        await cache.load("sized")
        listed = await cache.list_models()
        sized = next(m for m in listed.models if m.name == "sized")
        assert sized.state is ModelState.READY and sized.availability is Availability.READY
        assert sized.charged_bytes == 2**20 and listed.used_bytes == 2**20 and listed.budget_bytes == 2**30
        assert [m.name for m in listed.models] == ["sized", "paid", "person"]
        await cache.shutdown()

    asyncio.run(check())
