"""The rate limiter of a provider key: parsing ``--rate-limit`` values, the concurrency limit and its AIMD
adaptation to 429s, the pause a 429 asks for, requests and tokens per window, the FIFO queue and the
caller's deadline. Windows and pauses are tenths of a second; nothing waits longer."""

from __future__ import annotations

import asyncio
import time

import pytest

from clemserve.registry.errors import DeadlineExceededError
from clemserve.service.backends.rate_limits import (
    Limiter,
    Permit,
    RateLimit,
    RateLimits,
    TokenCharge,
    estimate_tokens,
    parse_rate_limit,
)

# -- parsing -------------------------------------------------------------------------------------------


def test_a_rate_limit_names_its_key_and_any_of_its_three_fields() -> None:
    assert parse_rate_limit("openai=concurrency:8,rpm:500,tpm:200000") == ("openai", RateLimit(8, 500, 200000))
    assert parse_rate_limit(" anthropic = rpm : 50 ") == ("anthropic", RateLimit(rpm=50))


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("openai", "is not NAME=FIELD:NUMBER"),
        ("=rpm:5", "is not NAME=FIELD:NUMBER"),
        ("openai=", "openai: an empty field"),
        ("openai=burst:5", "openai: unknown field 'burst'; the fields are concurrency, rpm, tpm"),
        ("openai=rpm:0", "openai: rpm must be a whole number above 0, got '0'"),
        ("openai=tpm:1.5", "openai: tpm must be a whole number above 0, got '1.5'"),
        ("openai=concurrency", "openai: concurrency must be a whole number above 0"),
        ("openai=rpm:5,rpm:6", "openai: rpm is given twice"),
    ],
)
def test_a_malformed_rate_limit_is_refused_naming_the_part(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_rate_limit(text)


def test_a_request_is_estimated_at_a_token_per_four_characters_plus_max_tokens() -> None:
    assert estimate_tokens(401, 100) == 101 + 100


def test_a_model_gets_its_key_entrys_limiter_else_its_backends() -> None:
    limits = RateLimits([("azure", RateLimit(rpm=1)), ("azure_claude", RateLimit(rpm=2))])
    claude = limits.limiter("azure_claude", "azure")
    gpt = limits.limiter("azure_gpt", "azure")
    assert claude is not None and claude.configured.rpm == 2
    assert gpt is not None and gpt.configured.rpm == 1
    assert limits.limiter("openai", "openai") is None


# -- concurrency ---------------------------------------------------------------------------------------


async def _turns() -> None:
    """Let the event loop run what is ready (a granted caller wakes up a few steps after its grant)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def _acquire_all(limiter: Limiter, count: int) -> tuple[list[Permit], list[asyncio.Task[Permit]]]:
    """``count`` callers, one after another: the permits granted at once and the callers still waiting."""
    tasks = [asyncio.create_task(limiter.acquire(TokenCharge(1))) for _ in range(count)]
    await _turns()
    granted = [task.result() for task in tasks if task.done()]
    return granted, [task for task in tasks if not task.done()]


def test_callers_over_the_concurrency_limit_wait_and_are_let_through_first_come_first_served() -> None:
    async def scenario() -> None:
        limiter = Limiter("openai", RateLimit(concurrency=2))
        granted, waiting = await _acquire_all(limiter, 5)
        assert len(granted) == 2 and limiter.state().waiting == 3
        order = []
        for task in waiting:
            task.add_done_callback(lambda _, task=task: order.append(waiting.index(task)))
        granted[0].succeeded()
        await _turns()
        assert order == [0] and limiter.in_flight == 2
        granted[1].failed()
        waiting[0].result().succeeded()
        await _turns()
        assert order == [0, 1, 2] and limiter.state().waiting == 0

    asyncio.run(scenario())


def test_a_429_lowers_the_concurrency_once_per_congestion_and_successes_raise_it_slowly_up_to_the_cap() -> None:
    async def scenario() -> None:
        limiter = Limiter("openai", RateLimit(concurrency=8))
        granted, _ = await _acquire_all(limiter, 8)
        granted[0].rate_limited(0.0)
        assert limiter.concurrency == 6  # 3/4 of the 8 in flight
        # sent before the lowering: the congestion it reports was answered already
        granted[1].rate_limited(0.0)
        assert limiter.concurrency == 6
        for permit in granted[2:]:
            permit.succeeded()
        await _succeed(limiter, 6)
        assert limiter.concurrency == 7  # 12 successes at 6: two round trips
        await _succeed(limiter, 14)
        assert limiter.concurrency == 8
        await _succeed(limiter, 100)
        assert limiter.concurrency == 8  # the configured cap
        assert limiter.state().rate_limited == 2

    asyncio.run(scenario())


async def _succeed(limiter: Limiter, count: int) -> None:
    for _ in range(count):
        (await limiter.acquire(TokenCharge(1))).succeeded()


def test_a_429_lowers_the_limit_from_the_calls_in_flight_when_fewer_than_the_limit() -> None:
    async def scenario() -> None:
        limiter = Limiter("openai", RateLimit(rpm=1000))
        assert limiter.concurrency == 8  # no cap configured: the start
        granted, _ = await _acquire_all(limiter, 4)
        granted[0].rate_limited(0.0)
        assert limiter.concurrency == 3

    asyncio.run(scenario())


def test_the_concurrency_never_falls_below_one() -> None:
    async def scenario() -> None:
        limiter = Limiter("openai", RateLimit(concurrency=1))
        for _ in range(3):
            (await limiter.acquire(TokenCharge(1))).rate_limited(0.0)
        assert limiter.concurrency == 1

    asyncio.run(scenario())


def test_a_429_pauses_the_key_for_its_retry_after() -> None:
    async def scenario() -> float:
        limiter = Limiter("openai", RateLimit(concurrency=4))
        (await limiter.acquire(TokenCharge(1))).rate_limited(0.15)
        started = time.monotonic()
        (await limiter.acquire(TokenCharge(1))).succeeded()
        return time.monotonic() - started

    assert 0.14 <= asyncio.run(scenario()) < 1.0


# -- requests and tokens per window ---------------------------------------------------------------------


def test_requests_over_rpm_wait_until_the_oldest_leaves_the_window() -> None:
    async def scenario() -> list[float]:
        limiter = Limiter("openai", RateLimit(rpm=2), window_s=0.2)
        started, times = time.monotonic(), []
        for _ in range(3):
            (await limiter.acquire(TokenCharge(1))).succeeded()
            times.append(time.monotonic() - started)
        return times

    _, second, third = asyncio.run(scenario())
    assert second < 0.05 and 0.19 <= third < 1.0


def test_tokens_over_tpm_wait_and_a_settled_charge_counts_its_real_usage() -> None:
    async def scenario() -> tuple[int, float]:
        limiter = Limiter("openai", RateLimit(tpm=100), window_s=0.2)
        first = TokenCharge(80)
        (await limiter.acquire(first)).succeeded()
        first.settle(30)
        settled = limiter.state().window_tokens
        started = time.monotonic()
        (await limiter.acquire(TokenCharge(80))).succeeded()  # 30 + 80 > 100: waits for the window
        return settled, time.monotonic() - started

    settled, waited = asyncio.run(scenario())
    assert settled == 30 and 0.19 <= waited < 1.0


def test_a_request_larger_than_tpm_goes_alone_rather_than_never() -> None:
    async def scenario() -> int:
        limiter = Limiter("openai", RateLimit(tpm=10), window_s=5)
        (await limiter.acquire(TokenCharge(500))).succeeded()
        return limiter.state().window_tokens

    assert asyncio.run(scenario()) == 500


def test_a_refused_request_uses_no_tokens() -> None:
    async def scenario() -> int:
        limiter = Limiter("openai", RateLimit(tpm=1000), window_s=5)
        (await limiter.acquire(TokenCharge(500))).rate_limited(0.0)
        return limiter.state().window_tokens

    assert asyncio.run(scenario()) == 0


# -- the queue and the caller ---------------------------------------------------------------------------


def test_a_caller_whose_deadline_passes_in_the_queue_gets_deadline_exceeded_naming_the_limiter() -> None:
    async def scenario() -> None:
        limiter = Limiter("mistral", RateLimit(concurrency=1))
        held = await limiter.acquire(TokenCharge(1))
        later = asyncio.create_task(limiter.acquire(TokenCharge(1)))
        with pytest.raises(DeadlineExceededError, match="rate limiter of 'mistral'") as caught:
            await limiter.acquire(TokenCharge(1), deadline=time.monotonic() + 0.05)
        assert caught.value.metadata["rate_limit"] == "mistral"
        assert limiter.state().waiting == 1  # it left the queue; the one behind it stays
        held.succeeded()
        (await later).succeeded()
        assert limiter.in_flight == 0

    asyncio.run(scenario())


def test_a_cancelled_caller_leaves_the_queue_and_holds_no_place() -> None:
    async def scenario() -> None:
        limiter = Limiter("openai", RateLimit(concurrency=1))
        held = await limiter.acquire(TokenCharge(1))
        gone = asyncio.create_task(limiter.acquire(TokenCharge(1)))
        await _turns()
        gone.cancel()
        await _turns()
        assert limiter.state().waiting == 0
        held.succeeded()
        (await limiter.acquire(TokenCharge(1))).succeeded()
        assert limiter.in_flight == 0

    asyncio.run(scenario())


def test_a_permit_is_given_back_once_however_its_try_ends() -> None:
    async def scenario() -> None:
        limiter = Limiter("openai", RateLimit(concurrency=2))
        with pytest.raises(RuntimeError), await limiter.acquire(TokenCharge(1)):
            raise RuntimeError("the try failed")
        assert limiter.in_flight == 0
        with await limiter.acquire(TokenCharge(1)) as permit:
            permit.succeeded()
        permit.failed()
        assert limiter.in_flight == 0

    asyncio.run(scenario())
