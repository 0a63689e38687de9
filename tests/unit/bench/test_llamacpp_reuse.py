"""The llama.cpp reuse benchmark's call orders and table, without a model."""

from __future__ import annotations

from types import SimpleNamespace

from bench.llamacpp_reuse import Tally, _table, orders
from bench.prefix_cache import Episode


def test_episode_by_episode_keeps_each_episodes_turns_together_and_interleaved_alternates() -> None:
    eps = [Episode("a", ("x",)), Episode("b", ("y",))]
    found = orders(eps, 2)
    assert found["episode by episode"] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert found["interleaved"] == [(0, 0), (1, 0), (0, 1), (1, 1)]


def test_the_table_gives_the_share_reused_and_the_speed_up_against_no_reuse() -> None:
    none = Tally(["a", "b"], prompt_tokens=100, evaluated=100, seconds=4.0)
    kept = Tally(["a", "c"], prompt_tokens=100, evaluated=20, reported=80, seconds=2.0)
    table = _table(
        [("interleaved", "no reuse", none), ("interleaved", "previous prompt", kept)],
        SimpleNamespace(episodes=2, turns=1, max_tokens=8),
    )
    assert "| interleaved | previous prompt | 100 | 20 | 80% | 80 | 2.0 | 2.00x | 1/2 |" in table
