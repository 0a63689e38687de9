"""Usage and cost as the client sums them: a model's calls (``Model.spent``), a server's totals per model
(``clemserve models``), and ``clemserve run``'s totals per model, game and experiment (``clemserve.json``).

The game's triple stays exactly what clemcore returns; what a call cost travels beside it, here."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from clemserve.v1 import clemserve_pb2 as pb


@dataclass(frozen=True)
class Spend:
    """Calls summed: their tokens (cached prompt tokens and reasoning tokens are parts of the prompt and
    completion tokens), their cost in US dollars, the compute seconds of models the server runs, and the calls
    that had no price, with the last reason the server gave."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    compute_seconds: float = 0.0
    unpriced_calls: int = 0
    unpriced: str = ""

    @classmethod
    def of_reply(cls, reply: pb.GenerateResponse) -> Spend:
        """One call's, from its reply."""
        usage, cost = reply.usage, reply.cost
        return cls(
            1,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_prompt_tokens,
            usage.reasoning_tokens,
            cost.usd,
            cost.compute_seconds,
            int(bool(cost.unpriced)),
            cost.unpriced,
        )

    @classmethod
    def of_model(cls, spend: pb.ModelSpend) -> Spend:
        """A server's totals for one model (ListModels)."""
        usage = spend.usage
        return cls(
            spend.calls,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_prompt_tokens,
            usage.reasoning_tokens,
            spend.cost_usd,
            spend.compute_seconds,
            spend.unpriced_calls,
            spend.unpriced,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Spend:
        """What :meth:`to_dict` wrote (fields it does not know are left out; a missing one is 0)."""
        known = {f.name: f.default for f in fields(cls)}
        values = {name: value for name, value in data.items() if name in known}
        for name, value in values.items():
            if type(value) is not type(known[name]) and not (isinstance(known[name], float) and type(value) is int):
                raise TypeError(f"{name} is {value!r}, not a {type(known[name]).__name__}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __add__(self, other: Spend) -> Spend:
        return Spend(
            self.calls + other.calls,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cached_prompt_tokens + other.cached_prompt_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
            self.cost_usd + other.cost_usd,
            self.compute_seconds + other.compute_seconds,
            self.unpriced_calls + other.unpriced_calls,
            other.unpriced or self.unpriced,
        )

    def __sub__(self, earlier: Spend) -> Spend:
        """What was spent since ``earlier`` (a snapshot of the same sum)."""
        return Spend(
            self.calls - earlier.calls,
            self.prompt_tokens - earlier.prompt_tokens,
            self.completion_tokens - earlier.completion_tokens,
            self.cached_prompt_tokens - earlier.cached_prompt_tokens,
            self.reasoning_tokens - earlier.reasoning_tokens,
            self.cost_usd - earlier.cost_usd,
            self.compute_seconds - earlier.compute_seconds,
            self.unpriced_calls - earlier.unpriced_calls,
            self.unpriced if self.unpriced_calls > earlier.unpriced_calls else "",
        )

    @property
    def cached_share(self) -> float:
        """The share of prompt tokens a cache served (a provider's prompt cache, a local model's prefix reuse)."""
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def line(self) -> str:
        """In words: calls, tokens (the share of prompt tokens cached), cost (and what had no price), compute
        seconds."""
        share = f", {self.cached_share:.0%}" if self.cached_prompt_tokens else ""
        parts = [
            f"{self.calls} calls",
            f"{self.prompt_tokens} prompt tokens ({self.cached_prompt_tokens} cached{share})",
            f"{self.completion_tokens} completion tokens ({self.reasoning_tokens} reasoning)",
            f"${self.cost_usd:.4f}",
        ]
        if self.unpriced_calls:
            parts[-1] += f" (+ {self.unpriced_calls} unpriced calls: {self.unpriced})"
        if self.compute_seconds:
            parts.append(f"{self.compute_seconds:.1f} compute s")
        return ", ".join(parts)


def total(spends: Iterable[Spend]) -> Spend:
    result = Spend()
    for spend in spends:
        result = result + spend
    return result


class RunSpend:
    """``clemserve run``'s spend per model, game and experiment (the episodes' calls, told by the workers),
    added to what earlier parts of the same run spent (a resumed run reads them from clemserve.json)."""

    def __init__(self, earlier: Mapping[str, Any] | None = None) -> None:
        self.spent: dict[tuple[str, str, str], Spend] = {}
        by_experiment = (earlier or {}).get("by_experiment", {})
        for model, games in by_experiment.items():
            for game, experiments in games.items():
                for experiment, spend in experiments.items():
                    self.spent[model, game, experiment] = Spend.from_dict(spend)

    def add(self, game: str, experiment: str, by_model: Mapping[str, Spend]) -> None:
        """One episode's calls, by the model that answered them."""
        for model, spend in by_model.items():
            key = (model, game, experiment)
            self.spent[key] = self.spent.get(key, Spend()) + spend

    def by_model(self) -> dict[str, Spend]:
        found: dict[str, Spend] = {}
        for (model, _, _), spend in sorted(self.spent.items()):
            found[model] = found.get(model, Spend()) + spend
        return found

    def to_json(self) -> dict[str, Any]:
        """The totals of the run, of each model, of each model's games, and of each game's experiments."""
        games: dict[str, dict[str, Spend]] = {}
        experiments: dict[str, dict[str, dict[str, Any]]] = {}
        for (model, game, experiment), spend in sorted(self.spent.items()):
            per_game = games.setdefault(model, {})
            per_game[game] = per_game.get(game, Spend()) + spend
            experiments.setdefault(model, {}).setdefault(game, {})[experiment] = spend.to_dict()
        return {
            "total": total(self.spent.values()).to_dict(),
            "by_model": {model: spend.to_dict() for model, spend in self.by_model().items()},
            "by_game": {m: {g: spend.to_dict() for g, spend in per.items()} for m, per in games.items()},
            "by_experiment": experiments,
        }

    def lines(self) -> list[str]:
        """The closing summary's lines: each model's total, then its games'."""
        lines = []
        for model, spend in self.by_model().items():
            lines.append(f"{model}: {spend.line()}")
            games: dict[str, Spend] = {}
            for (owner, game, _), part in sorted(self.spent.items()):
                if owner == model:
                    games[game] = games.get(game, Spend()) + part
            lines.extend(f"  {game}: {part.line()}" for game, part in games.items())
        return lines
