"""``clemserve run``'s coordinator without clemcore: the connection flags handed to the workers, run.json for
games played side by side, clemserve.json for models the server does not play, and the lock file."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import pytest

from clemserve.client import run


def test_the_connection_flags_given_reach_the_workers_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for _, variable in run._CONNECTION_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    run._export_connection(argparse.Namespace(address="h:1", tls=True, tls_ca="ca.pem", token=None))
    exported = {variable: os.environ.get(variable) for _, variable in run._CONNECTION_VARIABLES}
    assert exported == {
        "CLEMSERVE_ADDRESS": "h:1",
        "CLEMSERVE_TOKEN": None,
        "CLEMSERVE_TLS": "1",
        "CLEMSERVE_TLS_CA": "ca.pem",
        "CLEMSERVE_TLS_CERT": None,
        "CLEMSERVE_TLS_KEY": None,
    }


class Saver:
    """clemcore's RunFileSaver as far as the coordinator drives it: one game at a time."""

    def __init__(self) -> None:
        self.game_info: Any = None
        self.benchmark_start: Any = None
        self.num_instances = 0
        self.ended: list[tuple[str, Any, int]] = []

    def on_benchmark_start(self, benchmark: Any) -> None:
        self.game_info, self.benchmark_start, self.num_instances = {"game": benchmark.game_name}, object(), 0

    def on_game_start(self, game_master: Any, instance: Any) -> None:
        self.num_instances += 1

    def on_benchmark_end(self, benchmark: Any) -> None:
        self.ended.append((benchmark.game_name, self.game_info, self.num_instances))


def test_the_run_file_follows_games_played_side_by_side() -> None:
    saver = Saver()
    run_file = run._RunFile(saver)
    a, b = argparse.Namespace(game_name="a"), argparse.Namespace(game_name="b")
    run_file.start(a, 3)
    run_file.start(b, 2)
    run_file.end(a)
    run_file.end(b)
    assert saver.ended == [("a", {"game": "a"}, 3), ("b", {"game": "b"}, 2)]
    assert run_file.started == {}


def test_provenance_of_models_the_server_does_not_play(tmp_path: Path) -> None:
    mock = argparse.Namespace(name="mock", gen_args={"temperature": 0.0})
    run.write_provenance(tmp_path / "run", [mock])
    record = json.loads((tmp_path / "run" / run.PROVENANCE).read_text())
    assert record["models"] == [{"model_name": "mock", "served_by_clemserve": False, "gen_args": {"temperature": 0.0}}]
    assert record["clemserve_client"] and record["clemcore"]
    assert not list((tmp_path / "run").glob(".*.partial"))


def test_the_lock_file_goes_when_the_run_ends(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    with pytest.raises(KeyboardInterrupt), run._lock_removed(lock):
        lock.write_text("")
        raise KeyboardInterrupt
    assert not lock.exists()
