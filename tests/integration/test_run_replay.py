"""``clemserve run --replay``: a run of hellogame recorded by a server (``--record``), then played again from
the record alone, with one episode's prompt changed: the others replayed with the recorded results, the
changed one refused as a miss and listed in the run's summary."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.integration.test_clemcore import clemcore_python, game_side
from tests.integration.test_run import GAMES, episode_folders, timeless
from tests.serving import start_server

EPISODES = 3
MODEL = "echo-recorded"


def _instances(folder: Path, changed: int | None = None) -> None:
    instances = json.loads((GAMES / "hellogame" / "in" / "instances.json").read_text())
    (experiment,) = instances["experiments"]
    experiment["game_instances"] = experiment["game_instances"][:EPISODES]
    if changed is not None:  # the game developer's change: another prompt for one instance
        experiment["game_instances"][changed]["prompt"] += "\n\nBe brief."
    (folder / "hellogame" / "in" / "three.json").write_text(json.dumps(instances))


def _interactions(run_dir: Path) -> dict[str, object]:
    """Each complete episode's interactions, less their times."""
    return {
        p.name: timeless(json.loads((p / "interactions.json").read_text()))
        for p in episode_folders(run_dir)
        if (p / "completed.json").is_file()
    }


def test_a_recorded_run_replays_without_its_server_and_a_changed_request_is_refused(tmp_path: Path) -> None:
    if not (GAMES / "hellogame").is_dir():
        pytest.skip(f"no clembench games at {GAMES}")
    python = clemcore_python()
    entry = {"model_name": MODEL, "backend": "fault", "model_id": "fault", "model_config": {"sleep_s": 0.05}}
    (tmp_path / "registry.json").write_text(json.dumps([entry]))
    record = tmp_path / "calls.jsonl"
    server = start_server(tmp_path, "--registry", str(tmp_path / "registry.json"), "--record", str(record))
    folder = tmp_path / "game"
    folder.mkdir()
    shutil.copytree(GAMES / "hellogame", folder / "hellogame")
    _instances(folder)
    clemserve = str(python.parent / "clemserve")
    assert game_side(python, [clemserve, "clemcore-setup", "--address", server.address], folder).returncode == 0
    run = [clemserve, "run", "-g", "hellogame", "-i", "three", "-m", MODEL, "-j", "3"]
    recorded = game_side(python, [*run, "-r", "recorded"], folder)
    assert recorded.returncode == 0, recorded.stdout + recorded.stderr
    assert server.stop() == 0
    assert len(record.read_text().splitlines()) == EPISODES  # one call per episode

    _instances(folder, changed=2)
    # the game machine's environment has no server: the replay server runs in this one
    replay = [*run, "-r", "replayed", "--replay", str(record), "--replay-python", sys.executable]
    replayed = game_side(python, replay, folder)
    assert replayed.returncode == 1, replayed.stdout + replayed.stderr
    assert f"{EPISODES} episodes: {EPISODES - 1} played, 1 failed" in replayed.stdout
    assert "instance_00002: FailedPreconditionError:" in replayed.stdout and "--replay-miss refuse" in replayed.stdout
    summary = replayed.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"replay of {record}: {EPISODES - 1} calls answered from the record, 1 misses (refused)")
    assert MODEL in summary
    got, expected = _interactions(folder / "replayed" / MODEL), _interactions(folder / "recorded" / MODEL)
    del expected["instance_00002"]
    assert got == expected and len(got) == EPISODES - 1

    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text(record.read_text().splitlines()[0] + "\n{cut short\n")
    refused = game_side(
        python, [*run, "-r", "corrupt", "--replay", str(corrupt), "--replay-python", sys.executable], folder
    )
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"{corrupt}:2: not a record line (not JSON" in refused.stderr
