"""Spend limits without a server: the flag's syntax, calendar periods in UTC, reservations held and settled,
concurrent calls never taking the total over a limit, the spent amount kept across a restart, a corrupt spend
file refused by name, and the model cache's hook (unpriced models refused, failed calls released)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from clemserve.registry import ModelSpec
from clemserve.registry.errors import FailedPreconditionError
from clemserve.service.domain import GenArgs, Generation
from clemserve.service.pricing import Price, Pricing
from clemserve.service.spend import (
    QuotaExceededError,
    SpendGuard,
    SpendLedger,
    SpendLimit,
    parse_spend_limit,
    prompt_token_bound,
)

NOW = datetime(2026, 12, 31, 23, 30, 15, tzinfo=UTC)
#: one dollar per million prompt tokens, two per million completion tokens
PRICED = {"model_name": "priced", "backend": "openai_compatible", "model_id": "m"}
PRICE = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}


def ledger(tmp_path: Path, *limits: str, now: datetime = NOW) -> SpendLedger:
    return SpendLedger([parse_spend_limit(text) for text in limits], tmp_path / "spend.sqlite3", lambda: now)


# -- the flag ---------------------------------------------------------------------------------------


def test_a_limit_reads_name_amount_and_period() -> None:
    assert parse_spend_limit("openai=50/day") == SpendLimit("openai", 50.0, "day")
    assert parse_spend_limit(" anthropic = $2.5 / Month ") == SpendLimit("anthropic", 2.5, "month")


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("openai", "NAME=AMOUNT/PERIOD"),
        ("=5/day", "NAME=AMOUNT/PERIOD"),
        ("openai=5", "openai: the period must be one of hour, day, month"),
        ("openai=5/week", "openai: the period must be one of hour, day, month"),
        ("openai=five/day", "openai: the amount must be a number of US dollars above 0, got 'five'"),
        ("openai=0/day", "openai: the amount must be"),
        ("openai=-1/day", "openai: the amount must be"),
        ("openai=inf/day", "openai: the amount must be"),
    ],
)
def test_a_malformed_limit_names_what_is_wrong(text: str, said: str) -> None:
    with pytest.raises(ValueError, match=said):
        parse_spend_limit(text)


# -- calendar periods in UTC ------------------------------------------------------------------------


def test_periods_are_calendar_periods_in_utc() -> None:
    later = NOW.astimezone(timezone(timedelta(hours=2)))  # 01:30 on Jan 1st there: still Dec 31st in UTC
    assert SpendLimit("x", 1, "hour").window(later) == (
        NOW.replace(minute=0, second=0),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    assert SpendLimit("x", 1, "day").window(later) == (
        datetime(2026, 12, 31, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    assert SpendLimit("x", 1, "month").window(later) == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    feb = datetime(2028, 2, 29, 12, tzinfo=UTC)
    assert SpendLimit("x", 1, "month").window(feb) == (
        datetime(2028, 2, 1, tzinfo=UTC),
        datetime(2028, 3, 1, tzinfo=UTC),
    )


# -- reserve and settle -----------------------------------------------------------------------------


def test_a_call_over_the_limit_is_refused_with_the_numbers(tmp_path: Path) -> None:
    book = ledger(tmp_path, "openai=1/day")
    first = book.reserve(["openai"], 0.6)
    with pytest.raises(QuotaExceededError) as refused:
        book.reserve(["openai"], 0.5)
    err = refused.value
    assert (err.code, err.reason) == ("RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED")
    assert err.metadata == {
        "limit": "openai",
        "limit_usd": "1",
        "period": "day",
        "spent_usd": "0.000000",
        "reserved_usd": "0.600000",
        "call_worst_case_usd": "0.500000",
        "period_end": "2027-01-01T00:00:00+00:00",
    }
    assert "--spend-limit openai=1/day" in err.message
    book.settle(first, 0.2)  # it cost less than its worst case: the rest is free again
    assert book.spent(SpendLimit("openai", 1, "day")) == pytest.approx(0.2)
    book.settle(book.reserve(["openai"], 0.8), 0.8)
    assert book.spent(SpendLimit("openai", 1, "day")) == pytest.approx(1.0)


def test_a_failed_call_is_released_at_zero_and_settling_twice_counts_once(tmp_path: Path) -> None:
    book = ledger(tmp_path, "openai=1/hour")
    held = book.reserve(["openai"], 0.9)
    book.settle(held, 0.0)
    book.settle(held, 0.5)
    assert book.spent(SpendLimit("openai", 1, "hour")) == 0.0
    book.reserve(["openai"], 1.0)  # the whole limit is free again


def test_a_call_counts_against_every_limit_it_is_under_and_a_new_period_starts_from_zero(tmp_path: Path) -> None:
    now = [NOW]
    book = SpendLedger(
        [parse_spend_limit("openai=1/hour"), parse_spend_limit("openai=10/month"), parse_spend_limit("key=3/day")],
        tmp_path / "spend.sqlite3",
        lambda: now[0],
    )
    book.settle(book.reserve(["key", "openai"], 0.9), 0.9)
    with pytest.raises(QuotaExceededError, match="openai=1/hour"):
        book.reserve(["key", "openai"], 0.2)
    now[0] = NOW + timedelta(hours=1)  # the next hour, the next day, the next month
    assert book.spent(SpendLimit("openai", 1, "hour")) == 0.0
    book.reserve(["key", "openai"], 0.9)


def test_concurrent_calls_at_the_limit_never_take_the_total_over_it(tmp_path: Path) -> None:
    book = ledger(tmp_path, "openai=1/day")
    barrier = threading.Barrier(16)
    refused = []

    def caller() -> None:
        barrier.wait()
        for _ in range(20):
            try:
                held = book.reserve(["openai"], 0.03)
            except QuotaExceededError:
                refused.append(1)
                continue
            book.settle(held, 0.03)

    threads = [threading.Thread(target=caller) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    spent = book.spent(SpendLimit("openai", 1, "day"))
    assert spent <= 1.0 + 1e-9
    assert spent == pytest.approx(0.03 * (16 * 20 - len(refused)))
    assert spent > 0.9  # the limit was reached, not refused early


# -- the spend file ---------------------------------------------------------------------------------


def test_a_restart_keeps_what_was_spent(tmp_path: Path) -> None:
    first = ledger(tmp_path, "openai=1/day")
    first.settle(first.reserve(["openai"], 0.7), 0.7)
    first.close()
    again = ledger(tmp_path, "openai=1/day")
    assert again.spent(SpendLimit("openai", 1, "day")) == pytest.approx(0.7)
    with pytest.raises(QuotaExceededError, match=r"\$0.700000 spent"):
        again.reserve(["openai"], 0.5)


def test_a_file_that_is_not_sqlite_stops_the_start_naming_it(tmp_path: Path) -> None:
    (tmp_path / "spend.sqlite3").write_bytes(b"not a database at all, just some bytes " * 100)
    with pytest.raises(ValueError, match=r"spend file .*spend.sqlite3: not a clemserve spend file"):
        ledger(tmp_path, "openai=1/day")


@pytest.mark.parametrize(
    ("row", "said"),
    [
        (("openai", "week", NOW.isoformat(), 1.0), "row 1: period must be one of hour, day, month, got 'week'"),
        (("openai", "day", "yesterday", 1.0), "row 1: period_start must be an ISO time in UTC, got 'yesterday'"),
        (("openai", "day", NOW.isoformat(), "lots"), "row 1: usd must be a number of US dollars >= 0, got 'lots'"),
        (("openai", "day", NOW.isoformat(), -2.0), "row 1: usd must be"),
        (("", "day", NOW.isoformat(), 1.0), "row 1: name must be"),
    ],
)
def test_a_corrupt_row_stops_the_start_naming_the_file_and_field(
    tmp_path: Path, row: tuple[Any, ...], said: str
) -> None:
    ledger(tmp_path, "openai=1/day").close()
    with sqlite3.connect(tmp_path / "spend.sqlite3") as db:
        db.execute("INSERT INTO spend VALUES (?, ?, ?, ?)", row)
    with pytest.raises(ValueError, match="spend file .*spend.sqlite3: " + said):
        ledger(tmp_path, "openai=1/day")


def test_a_table_without_the_columns_is_refused(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "spend.sqlite3") as db:
        db.execute("CREATE TABLE spend (name TEXT, dollars REAL)")
    with pytest.raises(ValueError, match="table spend has no column 'period'"):
        ledger(tmp_path, "openai=1/day")


# -- the model cache's hook -------------------------------------------------------------------------


def guard(tmp_path: Path, *limits: str, price: dict[str, float] | None = PRICE) -> SpendGuard:
    pricing = Pricing({"priced": Price(**price)} if price else None)
    return SpendGuard(ledger(tmp_path, *limits), pricing)


def reply(prompt: int, completion: int) -> Generation:
    return Generation(None, {}, "ok", prompt_tokens=prompt, completion_tokens=completion)


def test_the_prompt_bound_counts_bytes_messages_and_images() -> None:
    messages = [{"role": "user", "content": "héllo"}, {"role": "user", "content": "", "image": ["a", "b"]}]
    assert prompt_token_bound(messages) == 6 + 16 + 16 + 2 * 4096


def test_the_guard_reserves_the_worst_case_and_settles_the_real_cost(tmp_path: Path) -> None:
    spend = guard(tmp_path, "openai_compatible=1/day")
    spec = ModelSpec.from_dict(PRICED)
    messages = [{"role": "user", "content": "x" * 84}]  # 100 tokens at most
    seen = []

    async def attempt() -> Generation:
        seen.append(dict(spend.ledger._reserved))  # type: ignore[union-attr]
        return reply(10, 5)

    asyncio.run(spend.call(spec, messages, GenArgs(max_tokens=1000), attempt))
    assert list(seen[0].values()) == [pytest.approx((100 * 1.0 + 1000 * 2.0) / 1e6)]
    assert spend.ledger is not None and spend.ledger._reserved == {}
    assert spend.ledger.spent(SpendLimit("openai_compatible", 1, "day")) == pytest.approx((10 + 10) / 1e6)


def test_a_call_that_fails_upstream_spends_nothing(tmp_path: Path) -> None:
    spend = guard(tmp_path, "openai_compatible=1/day")

    async def attempt() -> Generation:
        raise ConnectionError("provider went away")

    with pytest.raises(ConnectionError):
        asyncio.run(spend.call(ModelSpec.from_dict(PRICED), [], GenArgs(max_tokens=10), attempt))
    assert spend.ledger is not None and spend.ledger._reserved == {}
    assert spend.ledger.spent(SpendLimit("openai_compatible", 1, "day")) == 0.0


def test_an_unpriced_model_under_a_limit_is_refused_naming_the_model_and_limit(tmp_path: Path) -> None:
    spend = guard(tmp_path, "openai_compatible=1/day", price=None)

    async def attempt() -> Generation:
        raise AssertionError("an unpriced call must not be sent")

    with pytest.raises(FailedPreconditionError, match="model priced is under --spend-limit openai_compatible=1/day"):
        asyncio.run(spend.call(ModelSpec.from_dict(PRICED), [], GenArgs(), attempt))


def test_models_under_no_limit_and_local_models_pass_untouched(tmp_path: Path) -> None:
    spend = guard(tmp_path, "anthropic=1/day", price=None)

    async def attempt() -> Generation:
        return reply(1, 1)

    assert asyncio.run(spend.call(ModelSpec.from_dict(PRICED), [], GenArgs(), attempt)).text == "ok"
    assert spend.names(ModelSpec.from_dict({"model_name": "l", "backend": "huggingface_local"})) == []
    assert SpendGuard(None, Pricing()).names(ModelSpec.from_dict(PRICED)) == []


def test_a_key_entry_and_its_backend_both_count(tmp_path: Path) -> None:
    spend = guard(tmp_path, "openai=1/day", "azure_gpt=1/day", "azure=1/day")
    assert spend.names(ModelSpec.from_dict({"model_name": "g", "backend": "azure", "model_id": "gpt"})) == [
        "azure_gpt",
        "azure",
    ]


class CountingPricing(Pricing):
    """Pricing that counts how often each generation was priced."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.priced: list[int] = []

    def cost(self, spec: ModelSpec, generation: Generation) -> Any:
        self.priced.append(id(generation))
        return super().cost(spec, generation)


@pytest.mark.parametrize("limits", [("openai_compatible=1/day",), ()])
def test_a_call_is_priced_once_and_settled_at_the_cost_it_was_charged(tmp_path: Path, limits: tuple[str, ...]) -> None:
    pricing = CountingPricing({"priced": Price(**PRICE)})
    spend = SpendGuard(ledger(tmp_path, *limits) if limits else None, pricing)
    answer = reply(10, 5)

    async def attempt() -> Generation:
        return answer

    assert asyncio.run(spend.call(ModelSpec.from_dict(PRICED), [], GenArgs(max_tokens=10), attempt)) is answer
    assert pricing.priced.count(id(answer)) == 1
    assert answer.cost is not None and answer.cost.usd == pytest.approx((10 + 10) / 1e6)
    assert (pricing.totals()["priced"].calls, pricing.totals()["priced"].cost_usd) == (1, answer.cost.usd)
    if spend.ledger is not None:
        assert spend.ledger.spent(SpendLimit("openai_compatible", 1, "day")) == answer.cost.usd


def test_the_worst_case_of_a_provider_billing_cache_writes_above_input_is_at_the_write_price(tmp_path: Path) -> None:
    from genai_prices import Usage, calc_price

    spend = guard(tmp_path, "anthropic=1/day", price=None)
    claude = ModelSpec.from_dict(
        {"model_name": "claude", "backend": "anthropic", "model_id": "claude-3-5-haiku-latest"}
    )
    messages = [{"role": "user", "content": "x" * 84}]  # 100 tokens at most
    seen = []

    async def attempt() -> Generation:
        seen.append(dict(spend.ledger._reserved))  # type: ignore[union-attr]
        return reply(10, 5)

    asyncio.run(spend.call(claude, messages, GenArgs(max_tokens=1000), attempt))
    usage = Usage(input_tokens=100, output_tokens=1000, cache_write_tokens=100)
    written = float(calc_price(usage, "claude-3-5-haiku-latest", provider_id="anthropic").total_price)
    plain = float(
        calc_price(
            Usage(input_tokens=100, output_tokens=1000), "claude-3-5-haiku-latest", provider_id="anthropic"
        ).total_price
    )
    assert written > plain
    assert list(seen[0].values()) == [pytest.approx(written)]
