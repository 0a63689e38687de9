"""Selectors to registry entries and cache keys."""

from __future__ import annotations

import pytest

from clemserve.registry import ModelRegistry, ModelSpec
from clemserve.registry.errors import InvalidArgumentError
from clemserve.service.resolver import Resolver, cache_key

ENTRIES = [
    {"model_name": "m", "backend": "echo", "model_id": "m-1", "model_config": {}},
    {"model_name": "you", "backend": "_player_human", "model_config": {}},
]


def resolver() -> Resolver:
    return Resolver(ModelRegistry([ModelSpec.from_dict(e) for e in ENTRIES]))


def test_a_name_resolves_to_its_entry_and_a_key_shared_by_selectors_that_load_the_same_model() -> None:
    found = resolver()
    spec, key = found.resolved("m")
    assert spec["model_id"] == "m-1" and found.names == {"m", "you"}
    warmer, same_key = found.resolved({"model_name": "m", "temperature": 0.7})
    assert same_key == key == cache_key(spec) and warmer.get("temperature") == 0.7


def test_a_player_that_the_game_answers_for_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="is a human player"):
        resolver().servable("you")
