"""Usage and cost of paid calls through a real server and the real client: cached and reasoning tokens as the
provider reports them, the price genai-prices gives (computed here from genai-prices itself), a registry
entry's price winning, a model nobody prices saying so, and ListModels' totals per model."""

from __future__ import annotations

from typing import Any

import pytest
from genai_prices import Usage, calc_price

import clemserve.client as backends
from clemserve.client.admin import list_models
from tests.providers import anthropic_usage, openai_reply, openai_usage
from tests.serving import ServerProcess
from tests.standin import Reply, StandIn

CHAT = r"^/chat/completions$"
MESSAGES = r"^/v1/messages$"
USER = [{"role": "user", "content": "Say hello."}]
OVERRIDE = {"input_per_mtok": 2.0, "output_per_mtok": 8.0, "cached_input_per_mtok": 0.5}

ENTRIES: list[dict[str, Any]] = [
    {"model_name": "spend-gpt", "backend": "openai", "model_id": "gpt-4o-mini"},
    {"model_name": "spend-claude", "backend": "anthropic", "model_id": "claude-3-5-haiku-latest"},
    {
        "model_name": "spend-override",
        "backend": "openai",
        "model_id": "gpt-4o-mini",
        "model_config": {"price": OVERRIDE},
    },
    {"model_name": "spend-unknown", "backend": "openai", "model_id": "gpt-nobody-prices-this"},
    {"model_name": "spend-compat", "backend": "openai_compatible", "model_id": "gpt-4o-mini"},
]


def database_usd(model_id: str, provider: str, prompt: int, completion: int, cached: int) -> float:
    usage = Usage(input_tokens=prompt, output_tokens=completion, cache_read_tokens=cached)
    return float(calc_price(usage, model_id, provider_id=provider).total_price)


@pytest.fixture
def chat(standin: StandIn) -> None:
    """Every chat completion: 1200 prompt tokens (1024 cached), 300 completion tokens (256 reasoning)."""
    standin.reset()
    standin.script("POST", CHAT, lambda _: Reply(200, openai_reply("Hello!", openai_usage(1200, 300, 1024, 256))))


def generate(server: ServerProcess, name: str) -> backends.Model:
    model = backends.get_model_for(name, address=server.address, timeout=60)
    model.set_gen_args(temperature=0.0, max_tokens=50)
    assert model.generate_response(USER)[2] == "Hello!"
    return model


def test_a_paid_call_reports_cached_and_reasoning_tokens_and_costs_genai_prices_price(
    server: ServerProcess, chat: None
) -> None:
    spent = generate(server, "spend-gpt").spent
    assert (spent.calls, spent.prompt_tokens, spent.completion_tokens) == (1, 1200, 300)
    assert (spent.cached_prompt_tokens, spent.reasoning_tokens) == (1024, 256)
    assert spent.cost_usd == pytest.approx(database_usd("gpt-4o-mini", "openai", 1200, 300, 1024))
    assert spent.cost_usd > 0 and spent.unpriced_calls == 0 and spent.compute_seconds == 0


def test_anthropics_cache_reads_are_part_of_the_prompt_and_priced_as_cached(
    server: ServerProcess, standin: StandIn
) -> None:
    standin.reset()
    body = {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-3-5-haiku-latest",
        "content": [{"type": "text", "text": "Hello!"}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": anthropic_usage(uncached=100, output=40, cache_read=900),
    }  # fmt: skip
    standin.script("POST", MESSAGES, Reply(200, body))
    spent = generate(server, "spend-claude").spent
    assert (spent.prompt_tokens, spent.cached_prompt_tokens, spent.completion_tokens) == (1000, 900, 40)
    assert spent.cost_usd == pytest.approx(database_usd("claude-3-5-haiku-latest", "anthropic", 1000, 40, 900))


def test_the_entrys_price_wins(server: ServerProcess, chat: None) -> None:
    spent = generate(server, "spend-override").spent
    expected = ((1200 - 1024) * 2.0 + 1024 * 0.5 + 300 * 8.0) / 1_000_000
    assert spent.cost_usd == pytest.approx(expected)


@pytest.mark.parametrize(
    ("name", "reason"),
    [("spend-unknown", "gpt-nobody-prices-this"), ("spend-compat", "openai_compatible has no price list")],
)
def test_a_model_nobody_prices_says_so_and_costs_nothing(
    server: ServerProcess, standin: StandIn, chat: None, name: str, reason: str
) -> None:
    model = backends.get_model_for(name, address=server.address, timeout=60)
    model.set_gen_args(temperature=0.0, max_tokens=50)
    reply = model._stub().Generate(model._request(USER), timeout=60)
    assert reply.cost.usd == 0 and reason in reply.cost.unpriced and reply.cost.price_source == ""
    assert reply.usage.prompt_tokens == 1200  # its usage is still told


def test_list_models_carries_each_models_totals(server: ServerProcess, standin: StandIn, chat: None) -> None:
    before = {s.name: s.spend for s in list_models(address=server.address, timeout=30)}
    model = backends.get_model_for("spend-gpt", address=server.address, timeout=60)
    model.set_gen_args(temperature=0.0, max_tokens=50)
    model.generate_batch_response([USER, USER])
    model.generate_response(USER)
    after = {s.name: s.spend for s in list_models(address=server.address, timeout=30)}
    added = after["spend-gpt"] - before["spend-gpt"]
    assert (added.calls, added.prompt_tokens, added.cached_prompt_tokens, added.reasoning_tokens) == (
        3, 3600, 3072, 768
    )  # fmt: skip
    assert added.cost_usd == pytest.approx(3 * database_usd("gpt-4o-mini", "openai", 1200, 300, 1024))
    # the client's sum of its replies is the server's
    assert (added.calls, added.cost_usd) == (model.spent.calls, pytest.approx(model.spent.cost_usd))
    assert after["spend-unknown"].unpriced_calls == before["spend-unknown"].unpriced_calls
