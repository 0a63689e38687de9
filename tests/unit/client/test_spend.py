"""The client's sums of usage and cost: one reply's, a batch's through the model, a server's totals per model,
and a run's per model, game and experiment."""

from __future__ import annotations

import pytest

from clemserve.client.spend import RunSpend, Spend, total
from clemserve.v1 import clemserve_pb2 as pb


def reply(usd: float = 0.0, unpriced: str = "", seconds: float = 0.0) -> pb.GenerateResponse:
    usage = pb.Usage(prompt_tokens=100, completion_tokens=20, cached_prompt_tokens=60, reasoning_tokens=5)
    return pb.GenerateResponse(usage=usage, cost=pb.Cost(usd=usd, unpriced=unpriced, compute_seconds=seconds))


def test_a_replys_spend_is_its_usage_and_cost() -> None:
    assert Spend.of_reply(reply(0.01)) == Spend(1, 100, 20, 60, 5, 0.01, 0.0, 0, "")
    assert Spend.of_reply(reply(unpriced="unknown model")).unpriced_calls == 1


def test_a_line_says_the_share_of_prompt_tokens_a_cache_served() -> None:
    assert "100 prompt tokens (60 cached, 60%)" in Spend.of_reply(reply()).line()
    assert "100 prompt tokens (0 cached)," in Spend(1, 100).line() and Spend().cached_share == 0.0


def test_spends_add_and_subtract() -> None:
    both = total([Spend.of_reply(reply(0.01)), Spend.of_reply(reply(unpriced="why", seconds=2.0))])
    assert (both.calls, both.prompt_tokens, both.cost_usd, both.compute_seconds) == (2, 200, 0.01, 2.0)
    assert (both.unpriced_calls, both.unpriced) == (1, "why")
    since = both - Spend.of_reply(reply(0.01))
    assert (since.calls, since.cost_usd, since.unpriced) == (1, 0.0, "why")
    assert (Spend.of_reply(reply(0.01)) - Spend()).unpriced == ""


def test_a_servers_totals_per_model() -> None:
    usage = pb.Usage(prompt_tokens=7, completion_tokens=3, cached_prompt_tokens=1, reasoning_tokens=2)
    spend = pb.ModelSpend(calls=2, usage=usage, cost_usd=0.5, compute_seconds=1.0, unpriced_calls=1, unpriced="x")
    assert Spend.of_model(spend) == Spend(2, 7, 3, 1, 2, 0.5, 1.0, 1, "x")


def test_a_spend_round_trips_through_json_and_refuses_wrong_types() -> None:
    spend = Spend(3, 10, 5, 0, 0, 1.5, 0.0, 0, "")
    assert Spend.from_dict(spend.to_dict()) == spend
    assert Spend.from_dict({"calls": 1, "cost_usd": 2}).cost_usd == 2  # an integral number of dollars
    with pytest.raises(TypeError, match="cost_usd"):
        Spend.from_dict({"cost_usd": "2"})


def test_the_runs_lines_say_each_models_total_and_its_games() -> None:
    spend = RunSpend()
    spend.add("taboo", "high", {"gpt": Spend(calls=2, cost_usd=0.25)})
    spend.add("wordle", "easy", {"gpt": Spend(calls=1, cost_usd=0.5, unpriced_calls=1, unpriced="no price")})
    lines = spend.lines()
    assert lines[0].startswith("gpt: 3 calls") and "$0.7500" in lines[0] and "1 unpriced calls: no price" in lines[0]
    assert lines[1].startswith("  taboo: 2 calls") and lines[2].startswith("  wordle: 1 calls")
