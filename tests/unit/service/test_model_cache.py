"""The model cache without a server: one definition of what is running and queued, leases, the snapshot."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from clemserve.registry import KeyRegistry, ModelRegistry, ModelSpec
from clemserve.registry.errors import InvalidArgumentError
from clemserve.service import convert
from clemserve.service.backends import BackendContext, BackendDeadError
from clemserve.service.domain import Cost, GenArgs, Generation, ModelState
from clemserve.service.memory import ResidencyPolicy
from clemserve.service.model_cache import ModelCache
from clemserve.service.pricing import Pricing
from clemserve.service.scheduler import SchedulingPolicy
from clemserve.service.spend import SpendLedger, parse_spend_limit
from clemserve.service.streaming import TextDelta

HI = [{"role": "user", "content": "hi"}]


def _manager(tmp_path: Path, **config: object) -> ModelCache:
    entry = ModelSpec.from_dict({"model_name": "slow", "backend": "fault", "model_config": config})
    context = BackendContext(keys=KeyRegistry(tmp_path / "key.json"), cache_dir=tmp_path)
    return ModelCache(ModelRegistry([entry]), context, policy=SchedulingPolicy(max_wait_s=0))


def test_snapshot_and_listing_agree_on_running_and_queued(tmp_path: Path) -> None:
    async def check() -> None:
        manager = _manager(tmp_path, sleep_s=0.5)
        assert manager.snapshot().models == ()
        calls = [asyncio.create_task(manager.generate("slow", HI, GenArgs(), f"game-{i}")) for i in range(3)]
        await asyncio.sleep(0.2)
        (cached,) = manager.snapshot().models
        listed = next(m for m in (await manager.list_models()).models if m.name == "slow")
        assert cached.state is ModelState.READY and listed.state is ModelState.READY
        assert (cached.running, cached.queued) == (listed.running, listed.queued)
        assert cached.running + cached.queued == 3
        assert cached.idle_seconds == 0.0  # busy
        await asyncio.gather(*calls)
        (done,) = manager.snapshot().models
        assert (done.running, done.queued) == (0, 0) and done.idle_seconds >= 0.0
        await manager.shutdown()
        assert manager.snapshot().models == ()

    asyncio.run(check())


def test_a_lease_is_counted_while_held_and_released_when_its_holder_leaves(tmp_path: Path) -> None:
    async def check() -> None:
        manager = _manager(tmp_path)
        events = manager.lease("slow", "game-1", requested_s=60, load=True)
        granted = await anext(events)
        assert granted.model.state is ModelState.READY and granted.model.leases == 1 and not granted.expired
        assert 0 < granted.expires_in_seconds <= 60
        assert manager.snapshot().models[0].leases == 1
        await events.aclose()  # the holder leaves
        assert manager.snapshot().models[0].leases == 0
        await manager.shutdown()

    asyncio.run(check())


def test_a_lease_expires_and_ends_when_the_server_stops(tmp_path: Path) -> None:
    async def check() -> None:
        manager = _manager(tmp_path)
        expiring = [event async for event in manager.lease("slow", "game-1", requested_s=0.05, load=False)]
        assert [event.expired for event in expiring] == [False, True]
        assert expiring[0].model.state is ModelState.NOT_LOADED  # load=False: held, not loaded
        stopping = manager.lease("slow", "game-2", requested_s=60, load=False)
        await anext(stopping)
        manager.end_leases()
        assert [event async for event in stopping] == []  # ended without an expiry message
        assert manager.snapshot().models == ()
        await manager.shutdown()

    asyncio.run(check())


def test_a_dead_backend_is_dropped_and_the_next_request_loads_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a CUDA error makes of a huggingface_local model (BackendDeadError): every call of the failed batch
    gets UNAVAILABLE, the model is unloaded and reported NOT_SERVING, and the next request loads it again."""
    from clemserve.service import loading
    from clemserve.service.backends.fault import FaultBackend

    unloads: list[str] = []

    class Poisoned(FaultBackend):
        loads = 0

        async def load(self, progress: Any) -> None:
            Poisoned.loads += 1
            await super().load(progress)

        async def generate(self, messages: Any, args: GenArgs, sink: Any = None) -> Any:
            if "poison" in messages[-1]["content"]:
                await asyncio.sleep(0.05)  # the others join while it runs
                raise BackendDeadError("a CUDA error left its GPU state unusable")
            return await super().generate(messages, args, sink)

        async def unload(self) -> None:
            unloads.append(self.model_name)

    monkeypatch.setattr(loading, "backend_for", lambda spec: Poisoned)

    async def check() -> None:
        manager = _manager(tmp_path)
        told: list[tuple[str, bool]] = []

        async def on_health(name: str, serving: bool) -> None:
            told.append((name, serving))

        manager.on_health = on_health
        assert (await manager.generate("slow", HI, GenArgs()))[1].text == "hi"
        with pytest.raises(BackendDeadError) as caught:
            await manager.generate("slow", [{"role": "user", "content": "poison"}], GenArgs())
        assert caught.value.code == "UNAVAILABLE"
        assert manager.snapshot().models == () and unloads == ["slow"] and told == [("slow", True), ("slow", False)]
        assert (await manager.generate("slow", HI, GenArgs()))[1].text == "hi"
        assert Poisoned.loads == 2 and told[-1] == ("slow", True)
        await manager.shutdown()

    asyncio.run(check())


def test_a_batch_answers_each_row_with_its_reply_or_its_own_error(tmp_path: Path) -> None:
    async def check() -> None:
        manager = _manager(tmp_path, raise_on="boom")
        rows: list[Any] = [HI, [{"role": "user", "content": "boom"}], ValueError("bad row"), []]
        outcomes = await manager.generate_batch("slow", rows, GenArgs(max_tokens=5), "game")
        assert outcomes[0][1].text == "hi"  # type: ignore[index]
        assert isinstance(outcomes[1], RuntimeError) and "boom" in str(outcomes[1])
        assert isinstance(outcomes[2], ValueError)
        assert isinstance(outcomes[3], InvalidArgumentError) and outcomes[3].field == "conversations[3].messages"
        await manager.shutdown()

    asyncio.run(check())


def test_a_reply_carries_the_call_timing_that_the_conversion_stamps(tmp_path: Path) -> None:
    async def check() -> None:
        manager = _manager(tmp_path)
        spec, generation = await manager.generate("slow", HI, GenArgs(max_tokens=5))
        assert generation.call_start is not None and generation.call_duration is not None
        assert "clem_player" not in generation.response  # the reply conversion stamps it
        reply = convert.generation_to_proto(generation, spec, "rid")
        block = json.loads(reply.response_json)["clem_player"]
        assert block == {
            "call_start": str(generation.call_start),
            "call_duration": str(generation.call_duration),
            "response": "hi",
            "model_name": "slow",
        }
        await manager.shutdown()

    asyncio.run(check())


def test_unsupported_arguments_are_refused_before_the_request_is_queued(tmp_path: Path) -> None:
    async def check() -> None:
        manager = _manager(tmp_path)
        with pytest.raises(InvalidArgumentError) as caught:
            await manager.generate("slow", HI, GenArgs(extra={"top_k": 3}))
        assert caught.value.field == "args.top_k"
        (model,) = manager.snapshot().models
        assert (model.running, model.queued) == (0, 0)
        await manager.shutdown()

    asyncio.run(check())


def test_a_stream_tells_its_text_then_ends_with_the_reply(tmp_path: Path) -> None:
    async def check() -> None:
        manager = _manager(tmp_path)
        items = [
            item async for item in manager.generate_stream("slow", [{"role": "user", "content": "a b c"}], GenArgs())
        ]
        *events, (spec, generation) = items
        assert spec["model_name"] == "slow" and generation.text == "a b c"
        assert "".join(e.text for e in events if isinstance(e, TextDelta)).split() == ["a", "b", "c"]
        await manager.shutdown()

    asyncio.run(check())


def test_describe_answers_the_entry_and_provenance_only_when_asked(tmp_path: Path) -> None:
    async def check() -> None:
        manager = _manager(tmp_path)
        spec, served = await manager.describe("slow", provenance=False)
        assert spec["model_name"] == "slow" and served is None
        _, served = await manager.describe("slow", provenance=True)
        assert served is not None and served.server_version

    asyncio.run(check())


def test_a_load_that_needs_room_unloads_the_least_recently_used_idle_model(tmp_path: Path) -> None:
    entries = [
        ModelSpec.from_dict({"model_name": name, "backend": "fault", "model_config": {"memory_bytes": 60 * 2**20}})
        for name in ("first", "second")
    ]
    context = BackendContext(keys=KeyRegistry(tmp_path / "key.json"), cache_dir=tmp_path)

    async def check() -> None:
        manager = ModelCache(ModelRegistry(entries), context, residency=ResidencyPolicy(memory_budget="100MiB"))
        await manager.generate("first", HI, GenArgs())
        await manager.generate("second", HI, GenArgs())
        assert [m.name for m in manager.snapshot().models] == ["second"]
        assert manager.snapshot().used_bytes == 60 * 2**20
        await manager.shutdown()
        assert manager.snapshot().used_bytes == 0

    asyncio.run(check())


def test_a_call_under_a_spend_limit_is_priced_once_and_counted_once(tmp_path: Path) -> None:
    """The spend limit's settle and the model's totals share one pricing of the reply."""

    class Counting(Pricing):
        priced = 0

        def cost(self, spec: ModelSpec, generation: Generation) -> Cost:
            self.priced += generation.text == "hi"  # the reply's pricing; the worst case's text is empty
            return super().cost(spec, generation)

    entry = ModelSpec.from_dict({"model_name": "slow", "backend": "fault"})
    context = BackendContext(keys=KeyRegistry(tmp_path / "key.json"), cache_dir=tmp_path)
    pricing = Counting()
    spend = SpendLedger([parse_spend_limit("fault=1/day")], tmp_path / "spend.sqlite3")
    manager = ModelCache(ModelRegistry([entry]), context, pricing=pricing, spend=spend)

    async def check() -> None:
        _, generation = await manager.generate("slow", HI, GenArgs(max_tokens=5))
        assert generation.cost is not None and generation.cost.source == "local"
        await manager.shutdown()

    asyncio.run(check())
    assert pricing.priced == 1
    assert pricing.totals()["slow"].calls == 1
