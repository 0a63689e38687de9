"""Residency as a bookkeeper, without a server: its ledger, admission naming the keys to evict, the idle
models it names, leases. It owns no model: the test plays the cache with plain Resident records."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from clemserve.registry import ModelSpec
from clemserve.registry.errors import ResourceExhaustedError
from clemserve.service.domain import ModelState
from clemserve.service.loaded import Resident
from clemserve.service.memory import ResidencyPolicy
from clemserve.service.residency import Residency
from clemserve.service.resolver import cache_key

MiB = 2**20


def spec(name: str, memory_bytes: int) -> ModelSpec:
    return ModelSpec(model_name=name, backend="fault", model_config={"memory_bytes": memory_bytes})


def resident(name: str, idle_for: float, *, ready: bool = True, in_flight: int = 0) -> Resident:
    state = ModelState.READY if ready else ModelState.LOADING
    return Resident(cache_key(spec(name, 0)), name, time.monotonic() - idle_for, ready, in_flight, state)


def residency(tmp_path: Path, budget: str = "100MiB", **policy: float) -> Residency:
    return Residency(ResidencyPolicy(memory_budget=budget, **policy), cache_dir=tmp_path)  # type: ignore[arg-type]


async def admit(found: Residency, entry: ModelSpec, residents: list[Resident]) -> list[str]:
    """What admitting ``entry`` names to evict; each named key is drained at once, as the cache's unload does."""
    named = []
    async with contextlib.aclosing(found.admit(cache_key(entry), entry, residents)) as victims:
        async for key in victims:
            named.append(key)
            found.drained(found.drain(key))
    return named


def test_the_ledger_counts_charges_and_keeps_draining_bytes_until_they_are_free(tmp_path: Path) -> None:
    found = residency(tmp_path)
    found.charge("a", 10 * MiB)
    found.charge("b", 5 * MiB)
    assert found.used() == 15 * MiB and found.charged("a") == 10 * MiB
    held = found.drain("a")
    assert held == 10 * MiB and found.charged("a") == 0
    assert found.used() == 15 * MiB  # still counted: the backend has not let go yet
    found.drained(held)
    assert found.used() == 5 * MiB


def test_admission_names_the_least_recently_used_idle_models_until_the_load_fits(tmp_path: Path) -> None:
    found = residency(tmp_path)
    residents = [
        resident("busy", 90, in_flight=1),
        resident("loading", 80, ready=False),
        resident("old", 60),
        resident("older", 70),
        resident("new", 1),
    ]
    for each in residents:
        found.charge(each.key, 30 * MiB)  # 150 MiB held: over the budget already, as after a shrink
    big = spec("big", 40 * MiB)
    named = asyncio.run(admit(found, big, residents))
    # 150 held, 40 needed in 100: evict until 60 or less is held, oldest idle first
    assert named == [resident("older", 0).key, resident("old", 0).key, resident("new", 0).key]
    assert found.charged(cache_key(big)) == 40 * MiB and found.used() == 100 * MiB


def test_admission_refuses_with_the_holders_when_nothing_can_be_evicted(tmp_path: Path) -> None:
    found = residency(tmp_path)
    busy = resident("busy", 10, in_flight=2)
    leased = resident("leased", 20)
    found.charge(busy.key, 50 * MiB)
    found.charge(leased.key, 40 * MiB)
    found.grant(leased.key, "game-1", 60)
    big = spec("big", 20 * MiB)
    with pytest.raises(ResourceExhaustedError) as caught:
        asyncio.run(admit(found, big, [busy, leased]))
    message = str(caught.value)
    assert "cannot load big: it needs about 20 MiB, 10 MiB of the 100 MiB ram budget is free" in message
    assert "busy (50 MiB, 2 request(s) in flight or queued)" in message and "leased (40 MiB, 1 lease(s))" in message
    assert found.charged(cache_key(big)) == 0  # nothing reserved


def test_a_model_larger_than_the_whole_budget_is_refused_before_anything_is_evicted(tmp_path: Path) -> None:
    found = residency(tmp_path)
    idle = resident("idle", 100)
    found.charge(idle.key, 10 * MiB)
    with pytest.raises(ResourceExhaustedError, match="larger than the whole budget"):
        asyncio.run(admit(found, spec("huge", 200 * MiB), [idle]))
    assert found.charged(idle.key) == 10 * MiB


def test_idle_models_past_the_keep_alive_are_named_never_busy_or_leased_ones(tmp_path: Path) -> None:
    found = residency(tmp_path, keep_alive_s=30)
    stale, fresh, busy, leased = (
        resident("stale", 40),
        resident("fresh", 5),
        resident("busy", 50, in_flight=1),
        resident("leased", 60),
    )
    found.grant(leased.key, "game", 600)
    assert [r.name for r in found.idle_past_keep_alive([stale, fresh, busy, leased])] == ["stale"]
    assert found.idle_check_every() == 7.5
    assert residency(tmp_path, keep_alive_s=0).idle_check_every() == 0.0  # never unload


def test_a_lease_lasts_the_requested_time_bounded_by_the_server_timeout(tmp_path: Path) -> None:
    found = residency(tmp_path, lease_timeout_s=600)
    assert (found.lease_ttl(0), found.lease_ttl(30), found.lease_ttl(3600)) == (600, 30, 600)
    lease = found.grant("k", "game", found.lease_ttl(30))
    assert found.leases_on("k") == 1 and 29 < lease.seconds_left <= 30
    found.release(lease)
    assert found.leases_on("k") == 0
