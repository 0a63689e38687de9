"""``clemserve run --max-cost`` without a server: the flag's values, caps reached by the run's spend (its earlier
parts included), unpriced models refused, and the command that resumes a stopped run with higher caps."""

from __future__ import annotations

import shlex

import pytest

from clemserve.client.budget import Budget, parse_max_cost, refused_unpriced, resume_command, stopped_lines
from clemserve.client.spend import Spend

MODELS = ["gpt", "claude"]


def usd(amount: float, unpriced_calls: int = 0) -> Spend:
    return Spend(calls=1, cost_usd=amount, unpriced_calls=unpriced_calls, unpriced="no price" if unpriced_calls else "")


def test_max_cost_reads_a_total_and_caps_per_model() -> None:
    assert parse_max_cost(None, MODELS) == Budget()
    assert not parse_max_cost([], MODELS)
    assert parse_max_cost(["5", "gpt=$2.5", "claude=1"], MODELS) == Budget(5.0, {"gpt": 2.5, "claude": 1.0})


@pytest.mark.parametrize(
    ("values", "said"),
    [
        (["five"], "--max-cost five: the cap must be a number of US dollars above 0"),
        (["0"], "--max-cost 0: the cap must be"),
        (["gpt=-1"], "--max-cost gpt=-1: the cap must be"),
        (["llama=1"], "--max-cost llama=1: 'llama' is not one of the run's models \\(gpt, claude\\)"),
        (["1", "2"], "--max-cost: the run's total is given twice"),
        (["gpt=1", "gpt=2"], "--max-cost: gpt is given twice"),
    ],
)
def test_a_malformed_max_cost_names_the_value(values: list[str], said: str) -> None:
    with pytest.raises(ValueError, match=said):
        parse_max_cost(values, MODELS)


def test_a_cap_is_reached_when_the_spend_gets_to_it() -> None:
    budget = Budget(1.0, {"gpt": 0.5})
    assert budget.reached({"gpt": usd(0.3), "claude": usd(0.3)}) == []
    assert budget.reached({"gpt": usd(0.5), "claude": usd(0.1)}) == ["gpt spent $0.5000, reaching --max-cost gpt=0.5"]
    assert budget.reached({"gpt": usd(0.4), "claude": usd(0.6)}) == ["the run spent $1.0000, reaching --max-cost 1"]
    assert Budget(None, {"gpt": 0.5}).reached({"claude": usd(9.0)}) == []  # only gpt is capped


def test_calls_without_a_price_stop_a_capped_run_unless_allowed() -> None:
    spent = {"gpt": usd(0.1, unpriced_calls=2), "claude": usd(0.1, unpriced_calls=1)}
    assert Budget(None, {"gpt": 1.0}).reached(spent) == ["gpt had 2 calls without a price (no price)"]
    assert Budget(None, {"gpt": 1.0}).reached(spent, allow_unpriced=True) == []


def test_unpriced_models_are_refused_only_where_a_cap_counts_them() -> None:
    unpriced = {"gpt": "", "claude": "genai-prices does not know it"}
    assert refused_unpriced(Budget(5.0), unpriced) == ["claude: genai-prices does not know it"]
    assert refused_unpriced(Budget(None, {"gpt": 1.0}), unpriced) == []
    assert refused_unpriced(Budget(None, {"claude": 1.0}), unpriced) == ["claude: genai-prices does not know it"]


def test_the_resume_command_raises_each_reached_cap_by_what_was_spent() -> None:
    argv = ["run", "-g", "taboo", "-m", "gpt", "claude", "--max-cost", "1", "--max-cost=gpt=0.5", "-j", "4"]
    budget = parse_max_cost(["1", "gpt=0.5"], MODELS)
    spent = {"gpt": usd(0.25), "claude": usd(0.801)}
    command = resume_command(argv, budget.raised(spent))
    assert shlex.split(command) == [
        "clemserve", "run", "-g", "taboo", "-m", "gpt", "claude", "-j", "4",
        "--max-cost", "2.06", "--max-cost", "gpt=0.5",
    ]  # fmt: skip


def test_the_stop_says_why_how_many_were_not_started_and_how_to_resume() -> None:
    budget = Budget(None, {"gpt": 0.5})
    spent = {"gpt": usd(0.6, unpriced_calls=1)}
    lines = stopped_lines(budget, spent, ["run", "-m", "gpt", "--max-cost", "gpt=0.5"], 7, allow_unpriced=False)
    assert lines[0].startswith("budget reached: gpt spent $0.6000, reaching --max-cost gpt=0.5; gpt had 1 calls")
    assert "7 were not started" in lines[0]
    assert lines[2] == "  clemserve run -m gpt --max-cost gpt=1.1 --allow-unpriced"
