"""What a call cost: US dollars for a paid API, compute seconds for a model the server runs.

A paid call is priced, in this order, by its registry entry's ``model_config.price``, by the server's price
file (``--prices``: entries by ``model_name``, else by the provider's ``model_id``), or by genai-prices' data
snapshot (the one its installed version ships; never its network update) for the backend's provider and the
entry's ``model_id``. A call none of them prices is unpriced: it says why, costs 0, and nothing is guessed.
A backend without a price list of its own (``openai_compatible``: any server speaking OpenAI's API) is priced
by an override only. A model the server runs itself costs no money; its compute seconds are its calls'
generation time (the scheduler's measure: from leaving the queue to the reply).

A price is ``{"input_per_mtok": USD, "output_per_mtok": USD, "cached_input_per_mtok": USD,
"cache_write_per_mtok": USD}`` per million tokens; the last two are optional (cached prompt tokens, and prompt
tokens written to the provider's prompt cache, then cost the input price). Anthropic bills a cache write above
its input price (1.25 times it for its 5-minute cache); genai-prices' data has that price as ``cache_write_mtok``
and it is used where the data has it. Malformed prices stop the server's start with the file and field named.

genai-prices is imported at the first paid call (its import takes a few tenths of a second); what it found
for a model, or that it found nothing, is kept for the process.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from clemserve.registry import ModelSpec

from .backends import price_list
from .domain import Cost, Generation, Spend

#: the fields of a price, US dollars per million tokens
PRICE_FIELDS = ("input_per_mtok", "output_per_mtok", "cached_input_per_mtok", "cache_write_per_mtok")
_REQUIRED = PRICE_FIELDS[:2]
MTOK = 1_000_000


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens; ``cached_input_per_mtok`` and ``cache_write_per_mtok`` None: cached
    prompt tokens and prompt tokens written to the provider's cache at the input price."""

    input_per_mtok: float
    output_per_mtok: float
    cached_input_per_mtok: float | None = None
    #: where it was set, for the reply's price_source
    source: str = ""
    cache_write_per_mtok: float | None = None

    def usd(self, generation: Generation) -> float:
        cached = min(generation.cached_prompt_tokens, generation.prompt_tokens)
        written = min(generation.cache_write_tokens, generation.prompt_tokens - cached)
        cached_price = self.input_per_mtok if self.cached_input_per_mtok is None else self.cached_input_per_mtok
        write_price = self.input_per_mtok if self.cache_write_per_mtok is None else self.cache_write_per_mtok
        return (
            (generation.prompt_tokens - cached - written) * self.input_per_mtok
            + cached * cached_price
            + written * write_price
            + generation.completion_tokens * self.output_per_mtok
        ) / MTOK


def parse_price(value: Any, where: str, source: str) -> Price:
    """``value`` as a price; ValueError naming ``where`` and the offending field."""
    if not isinstance(value, dict):
        raise ValueError(f"{where}: a price must be a JSON object with {', '.join(_REQUIRED)}, got {value!r}")
    unknown = sorted(set(value) - set(PRICE_FIELDS))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown price field; the fields are {', '.join(PRICE_FIELDS)}")
    for name in _REQUIRED:
        if name not in value:
            raise ValueError(f"{where}.{name}: missing (US dollars per million tokens)")
    numbers: dict[str, float] = {}
    for name, number in value.items():
        if isinstance(number, bool) or not isinstance(number, int | float) or not 0 <= number < float("inf"):
            raise ValueError(f"{where}.{name}: must be a number of US dollars per million tokens >= 0, got {number!r}")
        numbers[name] = float(number)
    return Price(
        numbers["input_per_mtok"],
        numbers["output_per_mtok"],
        numbers.get("cached_input_per_mtok"),
        source,
        numbers.get("cache_write_per_mtok"),
    )


def read_price_file(path: Path) -> dict[str, Price]:
    """The server's price file: ``{"<model_name or model_id>": {price}, ...}``; ValueError naming the file and
    the field for anything malformed (an unreadable file included)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"price file {path}: cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"price file {path}: not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"price file {path}: must be a JSON object of prices by model_name or model_id")
    source = f"--prices {path.name}"
    return {str(name): parse_price(value, f"price file {path}: {name}", source) for name, value in data.items()}


def entry_price(spec: ModelSpec) -> Price | None:
    """The entry's ``model_config.price`` (None: it sets none); ValueError naming the field when malformed."""
    config = spec.get("model_config")
    if not isinstance(config, Mapping) or "price" not in config:
        return None
    return parse_price(config["price"], "model_config.price", "model_config.price")


class Pricing:
    """Prices calls and keeps each model's totals since the start (by model name)."""

    def __init__(self, overrides: Mapping[str, Price] | None = None) -> None:
        self.overrides = dict(overrides or {})
        #: (provider, model_id) -> genai-prices' (provider, model), or why it has no price
        self._found: dict[tuple[str, str], tuple[Any, Any] | str] = {}
        self._totals: dict[str, Spend] = {}
        self._lock = threading.Lock()

    def checked(self, entries: Iterable[ModelSpec]) -> Pricing:
        """Itself, once every registry entry's ``model_config.price`` is found well formed; ValueError naming the
        entry's file, the entry and the field otherwise (at the server's start)."""
        for entry in entries:
            try:
                entry_price(entry)
            except ValueError as exc:
                where = entry.get("lookup_source", "")
                raise ValueError(f"registry {where}: entry {entry.get('model_name')!r}: {exc}") from None
        return self

    def charge(self, spec: ModelSpec, generation: Generation) -> Cost:
        """Price the call, set its ``cost`` and add it to its model's totals."""
        cost = self.cost(spec, generation)
        generation.cost = cost
        name = str(spec["model_name"])
        with self._lock:
            self._totals[name] = self._totals.get(name, Spend()).add(generation)
        return cost

    def totals(self) -> dict[str, Spend]:
        """Each model's usage and cost so far, by model name."""
        with self._lock:
            return dict(self._totals)

    def cost(self, spec: ModelSpec, generation: Generation) -> Cost:
        provider = price_list(spec)
        if provider is None:  # a model the server runs: no money, its generation time
            return Cost(source="local", compute_seconds=generation.generation_seconds)
        try:
            price = entry_price(spec)
        except ValueError as exc:  # a client's spec (registry entries are checked at the start): said, not zero
            return Cost(unpriced=str(exc))
        name, model_id = str(spec["model_name"]), str(spec.get("model_id", ""))
        price = price or self.overrides.get(name) or self.overrides.get(model_id)
        if price is not None:
            return Cost(usd=price.usd(generation), source=price.source)
        if not provider:
            return Cost(unpriced=f"backend {spec['backend']} has no price list: set model_config.price or --prices")
        return self._from_database(provider, model_id, generation)

    def _from_database(self, provider: str, model_id: str, generation: Generation) -> Cost:
        import genai_prices

        found = self._found.get((provider, model_id))
        if found is None:
            found = self._found[provider, model_id] = _lookup(provider, model_id)
        if isinstance(found, str):
            return Cost(unpriced=found)
        provider_info, model = found
        source = f"genai-prices {genai_prices.__version__}"
        now = datetime.now(UTC)
        flat = _flat(model.get_prices(now))
        if flat is not None:  # the same sum genai-prices makes, without its general machinery (0.1 ms a call)
            return Cost(usd=flat.usd(generation), source=source)
        cached = min(generation.cached_prompt_tokens, generation.prompt_tokens)
        usage = genai_prices.Usage(
            input_tokens=generation.prompt_tokens,
            output_tokens=generation.completion_tokens,
            cache_read_tokens=cached,
            cache_write_tokens=min(generation.cache_write_tokens, generation.prompt_tokens - cached),
        )
        calculation = model.calc_price(usage, provider_info, genai_request_timestamp=now)
        return Cost(usd=float(calculation.total_price), source=source)


def _flat(prices: Any) -> Price | None:
    """genai-prices' prices of a model as a flat :class:`Price` where they are plain per-token prices (None where
    one is tiered by the prompt's size, or the input or output price is missing)."""
    prompt, completion = getattr(prices, "input_mtok", None), getattr(prices, "output_mtok", None)
    cached, written = getattr(prices, "cache_read_mtok", None), getattr(prices, "cache_write_mtok", None)
    if not isinstance(prompt, Decimal) or not isinstance(completion, Decimal):
        return None
    if not isinstance(cached, Decimal | None) or not isinstance(written, Decimal | None):
        return None
    return Price(
        float(prompt),
        float(completion),
        None if cached is None else float(cached),
        cache_write_per_mtok=None if written is None else float(written),
    )


def _lookup(provider: str, model_id: str) -> tuple[Any, Any] | str:
    """genai-prices' provider and model for a provider's model id, or why there is none."""
    from genai_prices import data_snapshot

    if not model_id:
        return "the registry entry names no model_id to price"
    try:
        return data_snapshot.get_snapshot().find_provider_model(model_id, None, provider, None)
    except LookupError as exc:
        return f"genai-prices does not know {provider} model {model_id!r} ({exc}): set model_config.price or --prices"
