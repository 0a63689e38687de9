"""``clemserve run --score``: clemcore's scoring and evaluation of a run's results, and the main table.

What ``clem score`` and ``clem eval`` do, with clemcore's own code: each played game's ``GameBenchmark``
scores its complete episodes of this run (``scores.json`` beside each ``interactions.json``), then clemcore's
evaluation reads every score in the results folder (other models' runs too, as ``clem eval`` does) and writes
``raw.csv``, ``results.csv`` and ``results.html`` there. The main table is printed: per model, the clemscore,
the % of episodes played (not aborted) and the quality score, averaged over games.

It runs in the game environment, after the episodes: clemcore (and the pandas its evaluation needs) is
imported here only.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .run_episodes import COMPLETED, GameLoadError, load_game

#: the main table's columns in clemcore's results table (clemeval.save_clem_table), and their headings here
COLUMNS = {
    "-, clemscore": "CLEMSCORE",
    "all, Average % Played": "% PLAYED",
    "all, Average Quality Score": "QUALITY",
}


def score(results_dir: Path, run_dir: Path, games: Sequence[dict[str, Any]]) -> bool:
    """Score the games' complete episodes under ``run_dir``, evaluate ``results_dir``, print the main table.
    False (and why, on stderr) where scoring or the evaluation failed."""
    try:
        for spec in games:
            episodes = complete_episodes(run_dir / str(spec["game_name"]))
            if episodes:
                with load_game(spec) as benchmark, contextlib.redirect_stdout(sys.stderr):
                    benchmark.compute_scores(episodes)  # a failing episode is logged (clembench.log), not raised
        if not any(results_dir.rglob("scores.json")):
            print(f"nothing to score: no complete episode in {results_dir}", file=sys.stderr)
            return True
        from clemcore import clemeval

        with contextlib.redirect_stdout(sys.stderr):  # its progress notes; the table goes to stdout
            table = clemeval.perform_evaluation(str(results_dir), return_dataframe=True)
    except GameLoadError as exc:
        print(f"clemserve: run: scoring failed: {exc}", file=sys.stderr)
        return False
    except Exception as exc:  # clemcore's evaluation: whatever it raises, the episodes stay played
        print(f"clemserve: run: scoring failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return False
    print(main_table(table))
    print(f"scores: {results_dir / 'results.csv'} and results.html (per game), raw.csv (per episode)")
    return True


def complete_episodes(game_dir: Path) -> list[Path]:
    """The interactions of the game's episodes that clemcore completed (a failed episode's are cut short)."""
    return sorted(path for path in game_dir.rglob("interactions.json") if (path.parent / COMPLETED).is_file())


def main_table(table: Any) -> str:
    """clemcore's results table (a DataFrame, one row per model) as text: model, clemscore, % played, quality."""
    rows = [["MODEL", *COLUMNS.values()]]
    for model, values in table.iterrows():
        rows.append([str(model), *(_number(values.get(column)) for column in COLUMNS)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join([row[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))])
        for row in rows
    )


def _number(value: Any) -> str:
    """A table value: two decimals, or - where there is none (no episode played, no quality score)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(number) else f"{number:.2f}"
