"""``clemserve run --score``'s table and the episodes it scores, without clemcore."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clemserve.client.score import complete_episodes, main_table


class Table:
    """clemcore's results table as far as the main table reads it: one row per model, by column name."""

    def __init__(self, rows: dict[str, dict[str, Any]]) -> None:
        self.rows = rows

    def iterrows(self) -> Iterator[tuple[str, dict[str, Any]]]:
        return iter(self.rows.items())


def test_the_main_table_has_each_models_clemscore_played_and_quality() -> None:
    table = Table(
        {
            "model-a": {"-, clemscore": 12.5, "all, Average % Played": 50.0, "all, Average Quality Score": 25.0,
                        "hellogame, % Played": 50.0},
            "model-b": {"-, clemscore": 0.0, "all, Average % Played": 0.0, "all, Average Quality Score": float("nan")},
        }
    )  # fmt: skip
    assert main_table(table).splitlines() == [
        "MODEL    CLEMSCORE  % PLAYED  QUALITY",
        "model-a      12.50     50.00    25.00",
        "model-b       0.00      0.00        -",
    ]


def test_only_complete_episodes_are_scored(tmp_path: Path) -> None:
    for name, complete in (("instance_00000", True), ("instance_00001", False)):
        folder = tmp_path / "game" / "exp" / name
        folder.mkdir(parents=True)
        (folder / "interactions.json").write_text("{}")
        if complete:
            (folder / "completed.json").write_text("{}")
    assert complete_episodes(tmp_path / "game") == [tmp_path / "game" / "exp" / "instance_00000" / "interactions.json"]
