"""bench.spend_overhead's baseline and figures: the bypassed server's hook really does no accounting, the hook
is timed alone for each path, and what a path adds is the median of each repeat's own difference."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from bench import spend_overhead
from clemserve.registry import ModelSpec
from clemserve.service.domain import GenArgs, Generation
from clemserve.service.pricing import Pricing
from clemserve.service.spend import SpendGuard, SpendLedger, SpendLimit, parse_spend_limit


def test_the_bypassed_hook_prices_nothing_and_holds_no_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SpendGuard, "call", SpendGuard.call)  # restored after the test
    spend_overhead.bypass_accounting()
    ledger = SpendLedger([parse_spend_limit("openai=1/day")], tmp_path / "spend.sqlite3")
    pricing = Pricing()
    spec = ModelSpec.from_dict({"model_name": "m", "backend": "openai", "model_id": "gpt-4o-mini"})
    answer = Generation(None, {}, "ok", prompt_tokens=10_000_000, completion_tokens=10_000_000)

    async def attempt() -> Generation:
        return answer

    assert asyncio.run(SpendGuard(ledger, pricing).call(spec, [], GenArgs(), attempt)) is answer
    assert answer.cost is None and pricing.totals() == {}
    assert ledger.spent(SpendLimit("openai", 1, "day")) == 0.0


def test_the_hook_is_timed_alone_for_each_path_and_the_limit_writes_its_file(tmp_path: Path) -> None:
    figures = spend_overhead.hook_us(20, tmp_path)
    assert set(figures) == {"echo", "priced", "priced, --spend-limit"}
    assert all(len(figure) == 2 for figure in figures.values())
    with sqlite3.connect(tmp_path / "spend.sqlite3") as db:
        ((spent,),) = db.execute("SELECT usd FROM spend").fetchall()
    assert spent > 0  # every timed call under the limit settled


def test_what_a_path_adds_is_the_median_of_each_repeats_difference() -> None:
    def repeat(base: list[int], path: list[int]) -> dict[str, spend_overhead.Path_]:
        return {"base": spend_overhead.Path_("base", int, base), "path": spend_overhead.Path_("path", int, path)}

    repeats = [repeat([1000] * 3, [3000] * 3), repeat([5000] * 3, [5000] * 3), repeat([2000] * 3, [3000] * 3)]
    assert spend_overhead.added(repeats, "path", "base", spend_overhead.p50_us) == 1.0  # µs: of +2, 0, +1
