"""What ``clemserve run``'s coordinator and workers share: why a game cannot be loaded, and what to do."""

from __future__ import annotations

import sys
from pathlib import Path

from clemserve.client.run_episodes import cannot_load


def test_a_missing_package_names_the_requirements_file_to_install_here(tmp_path: Path) -> None:
    checkout = tmp_path / "clembench"
    game = checkout / "adventuregame"
    game.mkdir(parents=True)
    (checkout / "requirements.txt").write_text("lark\n")
    said = cannot_load(
        {"game_name": "adventuregame", "game_path": str(game)}, ModuleNotFoundError("No module named 'lark'")
    )
    assert said.startswith("adventuregame cannot be loaded: ModuleNotFoundError: No module named 'lark'; ")
    assert f"{sys.executable} -m pip install -r {checkout / 'requirements.txt'}" in said
    # the game's own file, where it has one, is nearer
    (game / "requirements.txt").write_text("lark\n")
    said = cannot_load({"game_name": "adventuregame", "game_path": str(game)}, ImportError("cannot import name 'x'"))
    assert f"-m pip install -r {game / 'requirements.txt'})" in said


def test_without_a_requirements_file_the_hint_says_where_one_usually_is(tmp_path: Path) -> None:
    said = cannot_load({"game_name": "g", "game_path": str(tmp_path / "a" / "b" / "g")}, ModuleNotFoundError("x"))
    assert "pip install -r requirements.txt (in the game checkout)" in said


def test_another_error_points_to_the_traceback() -> None:
    said = cannot_load({"game_name": "g", "game_path": "."}, LookupError("There is no GameBenchmark defined"))
    assert (
        said == "g cannot be loaded: LookupError: There is no GameBenchmark defined (clembench.log has the traceback)"
    )
