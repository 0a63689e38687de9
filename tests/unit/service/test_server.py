"""The server's lifecycle lines: what the drain reports while the server stops."""

from __future__ import annotations

from clemserve.service.scheduler import CallsInFlight
from clemserve.service.server import cut_report, drain_report

#: three rows of 30 tokens, 1.8 s into their batch, on a model that makes 10 tokens a second per call
BATCH = CallsInFlight("slow", ((30, 1.8), (30, 1.8), (30, 1.8)), tokens_per_s=10.0)


def test_the_drain_reports_calls_tokens_and_the_time_they_need() -> None:
    assert drain_report(3, [BATCH], grace_left_s=30.0) == (
        "draining: 3 calls in flight, 30 s of the grace period left; slow: 3 generations, about 54 of 90 tokens "
        "made, 36 left, about 1.2 s more at 10.0 tokens/s per call; expected to end in about 1.2 s"
    )


def test_the_drain_says_when_the_grace_period_will_not_do() -> None:
    assert drain_report(3, [BATCH], grace_left_s=1.0).endswith(
        "expected to end in about 1.2 s (past the grace period: raise --grace-period to keep this work)"
    )


def test_without_a_token_rate_the_drain_says_how_long_the_calls_have_run() -> None:
    cold = CallsInFlight("cold", ((300, 4.0), (300, 2.5)))
    assert drain_report(2, [cold], grace_left_s=26.0) == (
        "draining: 2 calls in flight, 26 s of the grace period left; cold: 2 generations of up to 600 tokens, "
        "running for up to 4.0 s (no call finished yet to time the token rate)"
    )
    assert drain_report(1, [], grace_left_s=5.0).endswith(
        "no generation running (the calls wait for a load or the queue)"
    )


def test_the_cut_says_how_far_each_generation_got() -> None:
    assert cut_report([BATCH]) == (
        "cut: slow: 3 generations cut at about 18 of 30, 18 of 30, 18 of 30 tokens "
        "(a client that waits for the server sends them again, from the start)"
    )
    assert cut_report([]) == "no generation was running"
