"""``clemserve run``'s coordinator without clemcore: the connection flags handed to the workers, run.json for
games played side by side, clemserve.json for models the server does not play, the lock file, the list of
failures and the options."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import pytest

from clemserve.client import run
from clemserve.client.run_episodes import Episode, Outcome
from clemserve.client.spend import RunSpend, Spend


def test_the_connection_flags_given_reach_the_workers_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for _, variable in run._CONNECTION_VARIABLES:
        monkeypatch.setenv(variable, "")  # recorded, so that what the export sets is undone after the test
        monkeypatch.delenv(variable)
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


def test_an_address_on_the_command_line_wins_over_the_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLEMSERVE_ROUTES", "echo*=routed:1")
    monkeypatch.setenv("CLEMSERVE_ROUTES_FILE", "routes.txt")
    run._export_connection(argparse.Namespace(address=None, servers=[]))  # no --address: the routes stand
    assert os.environ.get("CLEMSERVE_ROUTES") == "echo*=routed:1"
    run._export_connection(argparse.Namespace(address=None, servers=["a:1", "b:2"]))
    assert "CLEMSERVE_ROUTES" not in os.environ and "CLEMSERVE_ROUTES_FILE" not in os.environ


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


def test_each_cause_of_failure_is_listed_once_with_its_count(tmp_path: Path) -> None:
    def failed(game: str, experiment: str, game_id: int, error: str) -> Outcome:
        return Outcome(Episode(game, experiment, game_id, tmp_path / f"instance_{game_id:05d}"), error)

    key = "FailedPreconditionError: the key.json entry 'openai' has no api_key"
    outcomes = [
        failed("hellogame", "greet_en", 1, "InternalError: internal error (request id a)"),
        *(failed("taboo", "high_en", i, key) for i in range(3)),
        failed("taboo", "low_en", 7, key),
        failed("hellogame", "greet_en", 2, "InternalError: internal error (request id b)"),
    ]
    assert run.failure_lines(outcomes) == [
        "6 episodes failed (clembench.log has their tracebacks):",
        "  hellogame/greet_en/instance_00001: InternalError: internal error (request id a)",
        f"  4 episodes: {key}",
        "    taboo/high_en (3):\n      instance_00000, instance_00001, instance_00002",
        "    taboo/low_en (1):\n      instance_00007",
        "  hellogame/greet_en/instance_00002: InternalError: internal error (request id b)",
    ]


def test_every_repeated_option_keeps_all_its_values() -> None:
    from clemserve.client.cli import parser

    args = parser().parse_args(
        ["run", "-g", "a", "b", "-g", "c", "-e", "x", "-e", "y", "-m", "A", "-m", "B", "--score"]
    )
    assert (args.game, args.experiment, args.models, args.score) == (["a", "b", "c"], ["x", "y"], ["A", "B"], True)


def test_clemserve_json_records_the_spend_and_a_resumed_run_adds_to_it(tmp_path: Path) -> None:
    mock = argparse.Namespace(name="mock", gen_args={})
    first = RunSpend()
    first.add("hellogame", "greet_en", {"m": Spend(calls=2, prompt_tokens=20, cost_usd=0.5)})
    run.write_provenance(tmp_path, [mock], first)
    resumed = RunSpend(run.earlier_spend(tmp_path / run.PROVENANCE))
    resumed.add("hellogame", "greet_en", {"m": Spend(calls=1, prompt_tokens=10, cost_usd=0.25)})
    resumed.add("hellogame", "greet_de", {"m": Spend(calls=1, compute_seconds=2.0)})
    run._record_spend(tmp_path, resumed)
    record = json.loads((tmp_path / run.PROVENANCE).read_text())
    assert record["models"][0]["model_name"] == "mock"  # the rest of the record is kept
    spend = record["spend"]
    assert (spend["total"]["calls"], spend["total"]["cost_usd"]) == (4, 0.75)
    assert spend["by_model"]["m"]["prompt_tokens"] == 30
    assert spend["by_game"]["m"]["hellogame"]["calls"] == 4
    assert spend["by_experiment"]["m"]["hellogame"]["greet_en"]["calls"] == 3
    assert spend["by_experiment"]["m"]["hellogame"]["greet_de"]["compute_seconds"] == 2.0


def test_no_earlier_record_means_nothing_spent_before(tmp_path: Path) -> None:
    assert run.earlier_spend(tmp_path / run.PROVENANCE) == {}
    (tmp_path / run.PROVENANCE).write_text(json.dumps({"models": []}))  # a record from before spend was kept
    assert run.earlier_spend(tmp_path / run.PROVENANCE) == {}


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("{", "cannot read what the earlier run spent"),
        (json.dumps({"spend": {"by_experiment": []}}), "field spend.by_experiment"),
        (json.dumps({"spend": {"by_experiment": {"m": {"g": {"e": {"calls": "3"}}}}}}), "calls is '3', not a int"),
    ],
)
def test_a_corrupt_record_of_the_earlier_spend_is_named(tmp_path: Path, text: str, named: str) -> None:
    (tmp_path / run.PROVENANCE).write_text(text)
    with pytest.raises(run.UsageError, match=str(tmp_path / run.PROVENANCE)) as refused:
        run.earlier_spend(tmp_path / run.PROVENANCE)
    assert named in str(refused.value)
