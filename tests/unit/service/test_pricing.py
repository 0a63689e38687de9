"""Prices of calls without a server: genai-prices' own figures for a paid model, overrides that win over them,
models that cannot be priced saying why, local models costing compute seconds, and malformed prices refused
with the file and field named."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from genai_prices import Usage, calc_price, data_snapshot

from clemserve.registry import ModelRegistry, ModelSpec
from clemserve.service.domain import Generation
from clemserve.service.pricing import Price, Pricing, read_price_file

GPT = {"model_name": "gpt-test", "backend": "openai", "model_id": "gpt-4o-mini"}


def spec(**fields: Any) -> ModelSpec:
    return ModelSpec.from_dict({**GPT, **fields})


def call(
    prompt: int = 1000, completion: int = 200, cached: int = 0, seconds: float = 0.0, written: int = 0
) -> Generation:
    return Generation(
        {},
        {},
        "",
        prompt,
        completion,
        cached_prompt_tokens=cached,
        generation_seconds=seconds,
        cache_write_tokens=written,
    )


def database_usd(
    model_id: str, provider: str, prompt: int, completion: int, cached: int = 0, written: int = 0
) -> float:
    usage = Usage(input_tokens=prompt, output_tokens=completion, cache_read_tokens=cached, cache_write_tokens=written)
    return float(calc_price(usage, model_id, provider_id=provider).total_price)


def test_a_paid_call_costs_its_tokens_at_genai_prices_price() -> None:
    cost = Pricing().cost(spec(), call(1000, 200))
    assert cost.usd == pytest.approx(database_usd("gpt-4o-mini", "openai", 1000, 200))
    assert cost.usd > 0 and cost.unpriced == "" and cost.source.startswith("genai-prices ")
    assert cost.compute_seconds == 0


def test_cached_prompt_tokens_cost_the_cached_input_price() -> None:
    cached = Pricing().cost(spec(), call(1000, 200, cached=800))
    assert cached.usd == pytest.approx(database_usd("gpt-4o-mini", "openai", 1000, 200, cached=800))
    assert cached.usd < Pricing().cost(spec(), call(1000, 200)).usd


def test_each_backend_is_priced_by_its_own_provider() -> None:
    claude = spec(model_name="claude", backend="anthropic", model_id="claude-3-5-haiku-latest")
    assert Pricing().cost(claude, call()).usd == pytest.approx(
        database_usd("claude-3-5-haiku-latest", "anthropic", 1000, 200)
    )


def database_prices(model_id: str, provider: str) -> Any:
    _provider, model = data_snapshot.get_snapshot().find_provider_model(model_id, None, provider, None)
    return model.get_prices(datetime.now(UTC))


@pytest.mark.parametrize("model_id", ["claude-3-5-haiku-latest", "claude-sonnet-4-5"])  # flat, and tiered
def test_anthropic_cache_writes_cost_genai_prices_cache_write_price(model_id: str) -> None:
    prices = database_prices(model_id, "anthropic")
    assert prices.cache_write_mtok is not None  # the data has Anthropic's price for a (5-minute) cache write
    claude = spec(model_name="claude", backend="anthropic", model_id=model_id)
    written = Pricing().cost(claude, call(1000, 200, cached=300, written=500))
    assert written.usd == pytest.approx(database_usd(model_id, "anthropic", 1000, 200, cached=300, written=500))
    assert written.usd > Pricing().cost(claude, call(1000, 200, cached=300)).usd  # a write costs above input


def test_cache_writes_of_a_provider_without_a_write_price_cost_the_input_price() -> None:
    assert database_prices("gpt-4o-mini", "openai").cache_write_mtok is None
    assert Pricing().cost(spec(), call(1000, 200, written=600)).usd == pytest.approx(
        Pricing().cost(spec(), call(1000, 200)).usd
    )


def test_an_override_prices_cache_writes_at_its_own_price_or_the_input_price() -> None:
    both = {"input_per_mtok": 1, "output_per_mtok": 4, "cached_input_per_mtok": 0.5, "cache_write_per_mtok": 3}
    entry = spec(model_config={"price": both})
    tokens = call(1_000_000, 1_000_000, cached=200_000, written=300_000)
    assert Pricing().cost(entry, tokens).usd == pytest.approx(1 * 0.5 + 0.5 * 0.2 + 3 * 0.3 + 4)
    assert Pricing({"gpt-test": Price(1.0, 4.0)}).cost(spec(), tokens).usd == pytest.approx(1 + 4)


@pytest.mark.parametrize("prompt", [1000, 300_000])
def test_prices_tiered_by_the_prompts_size_are_genai_prices_own(prompt: int) -> None:
    gemini = spec(model_name="gemini", backend="google", model_id="gemini-2.5-pro")
    cost = Pricing().cost(gemini, call(prompt, 200, cached=500))
    assert cost.usd == pytest.approx(database_usd("gemini-2.5-pro", "google", prompt, 200, cached=500))


def test_the_entrys_price_wins_over_the_price_file_and_the_database() -> None:
    file_price = Price(1.0, 2.0, source="--prices prices.json")
    pricing = Pricing({"gpt-test": file_price})
    by_file = pricing.cost(spec(), call(1_000_000, 1_000_000))
    assert (by_file.usd, by_file.source) == (3.0, "--prices prices.json")
    entry = spec(model_config={"price": {"input_per_mtok": 10, "output_per_mtok": 20, "cached_input_per_mtok": 1}})
    by_entry = pricing.cost(entry, call(1_000_000, 1_000_000, cached=500_000))
    assert (by_entry.usd, by_entry.source) == (10 * 0.5 + 1 * 0.5 + 20, "model_config.price")


def test_the_price_file_also_prices_by_the_providers_model_id() -> None:
    pricing = Pricing({"gpt-4o-mini": Price(1.0, 1.0, source="--prices p.json")})
    assert pricing.cost(spec(), call(500_000, 500_000)).usd == 1.0


def test_a_model_genai_prices_does_not_know_is_unpriced_and_says_so() -> None:
    cost = Pricing().cost(spec(model_id="no-such-model-xyz"), call())
    assert cost.usd == 0
    assert "no-such-model-xyz" in cost.unpriced and "model_config.price" in cost.unpriced


def test_a_backend_without_a_price_list_is_priced_by_an_override_only() -> None:
    compat = spec(backend="openai_compatible", model_id="gpt-4o-mini")  # a name the database knows: not guessed
    assert "openai_compatible has no price list" in Pricing().cost(compat, call()).unpriced
    assert Pricing({"gpt-test": Price(1.0, 1.0)}).cost(compat, call(1_000_000, 0)).usd == 1.0


def test_a_local_model_costs_no_money_and_reports_its_generation_seconds() -> None:
    local = ModelSpec.from_dict({"model_name": "tiny", "backend": "huggingface_local", "huggingface_id": "x/y"})
    cost = Pricing({"tiny": Price(5.0, 5.0)}).cost(local, call(seconds=1.25))
    assert (cost.usd, cost.unpriced, cost.source, cost.compute_seconds) == (0, "", "local", 1.25)


def test_charge_sets_the_calls_cost_and_sums_each_models_calls() -> None:
    pricing = Pricing({"gpt-test": Price(1.0, 2.0)})
    first, second = call(1_000_000, 0, cached=10), call(0, 1_000_000)
    pricing.charge(spec(), first)
    pricing.charge(spec(), second)
    pricing.charge(spec(model_name="unknown", model_id="no-such-model-xyz"), call())
    assert first.cost is not None and first.cost.usd == 1.0
    totals = pricing.totals()
    assert (totals["gpt-test"].calls, totals["gpt-test"].cost_usd) == (2, 3.0)
    assert (totals["gpt-test"].prompt_tokens, totals["gpt-test"].cached_prompt_tokens) == (1_000_000, 10)
    assert (totals["unknown"].unpriced_calls, totals["unknown"].cost_usd) == (1, 0)
    assert "no-such-model-xyz" in totals["unknown"].unpriced


# -- malformed prices, refused at the start -------------------------------------------------------


def write(path: Path, data: Any) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_the_price_file_is_read_by_model(tmp_path: Path) -> None:
    prices = read_price_file(
        write(
            tmp_path / "prices.json",
            {
                "m": {"input_per_mtok": 1, "output_per_mtok": 2.5},
                "c": {
                    "input_per_mtok": 3,
                    "output_per_mtok": 15,
                    "cached_input_per_mtok": 0.3,
                    "cache_write_per_mtok": 3.75,
                },
            },
        )
    )
    assert prices == {
        "m": Price(1.0, 2.5, None, "--prices prices.json"),
        "c": Price(3.0, 15.0, 0.3, "--prices prices.json", cache_write_per_mtok=3.75),
    }


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (
            {"m": {"input_per_mtok": 1, "output_per_mtok": 2, "input_per_mtk": 3}},
            "m.input_per_mtk: unknown price field",
        ),
        ({"m": {"input_per_mtok": 1}}, "m.output_per_mtok: missing"),
        ({"m": {"input_per_mtok": -1, "output_per_mtok": 2}}, "m.input_per_mtok: must be a number"),
        ({"m": {"input_per_mtok": "1", "output_per_mtok": 2}}, "m.input_per_mtok: must be a number"),
        ({"m": [1, 2]}, "m: a price must be a JSON object"),
        ([1], "must be a JSON object of prices"),
        ("{", "not JSON"),
    ],
)
def test_a_malformed_price_file_names_the_file_and_field(tmp_path: Path, data: Any, named: str) -> None:
    path = write(tmp_path / "prices.json", data)
    with pytest.raises(ValueError, match="price file") as refused:
        read_price_file(path)
    assert str(path) in str(refused.value) and named in str(refused.value)


def test_a_missing_price_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"price file {tmp_path / 'none.json'}: cannot read it"):
        read_price_file(tmp_path / "none.json")


def test_a_registry_entrys_malformed_price_names_the_file_entry_and_field(tmp_path: Path) -> None:
    price = {"input_per_mtok": 1, "output_per_mtok": 2, "cache_per_mtok": 1}
    path = write(tmp_path / "registry.json", [{**GPT, "model_config": {"price": price}}])
    registry = ModelRegistry.from_files([path], packaged=False)
    with pytest.raises(ValueError) as refused:
        Pricing().checked(registry)
    message = str(refused.value)
    assert str(path) in message and "'gpt-test'" in message
    assert "model_config.price.cache_per_mtok: unknown price field" in message


def test_a_clients_malformed_price_leaves_the_call_unpriced_with_the_reason() -> None:
    cost = Pricing().cost(spec(model_config={"price": {"input_per_mtok": 1}}), call())
    assert cost.usd == 0 and "model_config.price.output_per_mtok: missing" in cost.unpriced
