"""``clemserve run`` plays a real clembench game (hellogame, from ../shared) on a game machine's environment
against a real server: the same results as ``clem run``, failures alone, resume, progress, provenance."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_clemcore import clemcore_python, game_side
from tests.serving import REPO, ServerProcess, free_port, hf_entry, start_server

GAMES = REPO.parent / "shared" / "clembench-games"
EPISODES = 10  # hellogame: one experiment, greet_en, instances 0 to 9
#: what changes from one run to the next however the episodes are played
VOLATILE = {
    "timestamp", "created", "benchmark_start", "benchmark_end", "duration", "duration_seconds",
    "call_start", "call_duration",
}  # fmt: skip


@pytest.fixture(scope="module")
def run_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("run-server")
    entries = [
        hf_entry("tiny-llama", tiny_model_dir),
        # instance 1 greets Max: its only call fails on the server
        {"model_name": "fault-max", "backend": "fault", "model_id": "fault", "model_config": {"raise_on": "Max"}},
        {"model_name": "slow-echo", "backend": "fault", "model_id": "fault", "model_config": {"sleep_s": 1.5}},
    ]
    (folder / "registry.json").write_text(json.dumps(entries))
    proc = start_server(folder, "--registry", str(folder / "registry.json"))
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture
def workdir(run_server: ServerProcess, tmp_path: Path) -> tuple[Path, Path]:
    """A clemcore working directory set up for the server, holding a copy of hellogame."""
    if not (GAMES / "hellogame").is_dir():
        pytest.skip(f"no clembench games at {GAMES}")
    python = clemcore_python()
    shutil.copytree(GAMES / "hellogame", tmp_path / "hellogame")
    setup = game_side(
        python, [str(python.parent / "clemserve"), "clemcore-setup", "--address", run_server.address], tmp_path
    )
    assert setup.returncode == 0, setup.stderr
    return python, tmp_path


def clemserve_run(python: Path, folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return game_side(python, [str(python.parent / "clemserve"), "run", "-g", "hellogame", *args], folder)


def episode_folders(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "hellogame" / "greet_en").glob("instance_*"))


def timeless(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: timeless(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [timeless(v) for v in value]
    return value


def tree(root: Path) -> dict[str, Any]:
    return {str(p.relative_to(root)): timeless(json.loads(p.read_text())) for p in sorted(root.rglob("*.json"))}


def test_same_results_as_sequential_clem_run(workdir: tuple[Path, Path]) -> None:
    python, folder = workdir
    sequential = game_side(
        python, ["clem", "run", "-g", "hellogame", "-m", "tiny-llama", "-l", "12", "-r", "seq"], folder
    )
    assert sequential.returncode == 0, sequential.stdout + sequential.stderr
    parallel = clemserve_run(python, folder, "-m", "tiny-llama", "-l", "12", "-j", "4", "-r", "par")
    assert parallel.returncode == 0, parallel.stdout + parallel.stderr
    assert f"{EPISODES} episodes: {EPISODES} played, 0 failed, 0 complete before" in parallel.stdout

    expected, got = tree(folder / "seq" / "tiny-llama"), tree(folder / "par" / "tiny-llama")
    assert got.pop("clemserve.json")["models"][0]["model_name"] == "tiny-llama"
    assert sorted(got) == sorted(expected)  # the same files, one folder per episode
    for name in expected:
        assert got[name] == expected[name], name
    assert len(episode_folders(folder / "par" / "tiny-llama")) == EPISODES
    assert sorted(p.name for p in (folder / "par" / "tiny-llama").iterdir()) == sorted(
        [*(p.name for p in (folder / "seq" / "tiny-llama").iterdir()), "clemserve.json"]
    )
    # clemcore's own tools read it (hellogame has no scorer: clem score has nothing to compute)
    transcribed = game_side(python, ["clem", "transcribe", "-g", "hellogame", "-r", "par"], folder)
    assert transcribed.returncode == 0, transcribed.stdout + transcribed.stderr
    assert len(list((folder / "par").rglob("transcript.html"))) == EPISODES


def test_a_failing_episode_fails_alone_and_a_rerun_replays_only_it(
    run_server: ServerProcess, workdir: tuple[Path, Path]
) -> None:
    python, folder = workdir
    first = clemserve_run(python, folder, "-m", "fault-max", "-j", "3")
    assert first.returncode == 1, first.stdout + first.stderr
    assert f"{EPISODES} episodes: {EPISODES - 1} played, 1 failed, 0 complete before" in first.stdout
    assert "1 episodes failed" in first.stdout
    assert "  hellogame/greet_en/instance_00001: InternalError: internal error (request id" in first.stdout
    # progress on the terminal: episodes done/failed/total, calls per second
    progress = first.stderr.replace("\r", "\n")
    assert f"{EPISODES}/{EPISODES}" in progress and "done=9 failed=1 calls/s=" in progress
    run_dir = folder / "results" / "fault-max"
    complete = [p.name for p in episode_folders(run_dir) if (p / "completed.json").is_file()]
    assert complete == [f"instance_{i:05d}" for i in range(EPISODES) if i != 1]
    assert not (run_dir / "hellogame" / "greet_en" / "instance_00001" / "interactions.json").exists()

    again = clemserve_run(python, folder, "-m", "fault-max", "-j", "3")
    assert again.returncode == 1
    assert f"{EPISODES} episodes: 0 played, 1 failed, {EPISODES - 1} complete before" in again.stdout
    assert json.loads((run_dir / "run.json").read_text())["games"]["hellogame"]["num_instances"] == EPISODES


def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(workdir: tuple[Path, Path]) -> None:
    python, folder = workdir
    command = [str(python.parent / "clemserve"), "run", "-g", "hellogame", "-m", "slow-echo", "-j", "2"]
    env = {"PATH": f"{python.parent}:/usr/bin:/bin", "HOME": str(folder)}
    run_dir = folder / "results" / "slow-echo"
    process = subprocess.Popen(
        command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while not any((p / "completed.json").exists() for p in episode_folders(run_dir)):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, out + err
    assert "run the same command again to resume" in err
    folders = episode_folders(run_dir)
    assert 0 < len(folders) < EPISODES
    assert all((p / "completed.json").is_file() for p in folders)  # nothing half-written looks complete

    resumed = game_side(python, command, folder)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"{EPISODES - len(folders)} played, 0 failed, {len(folders)} complete before" in resumed.stdout
    assert all((p / "completed.json").is_file() for p in episode_folders(run_dir))
    assert len(episode_folders(run_dir)) == EPISODES


def test_provenance_file(run_server: ServerProcess, workdir: tuple[Path, Path], tiny_model_dir: Path) -> None:
    python, folder = workdir
    checkout = {str(p.relative_to(folder / "hellogame")) for p in (folder / "hellogame").rglob("*")}
    run = clemserve_run(python, folder, "-m", "tiny-llama", "-l", "5", "-t", "0.5", "-e", "greet_en", "-j", "2")
    assert run.returncode == 0, run.stdout + run.stderr
    # the user's game checkout is left as it was (no instances, no __pycache__)
    assert {str(p.relative_to(folder / "hellogame")) for p in (folder / "hellogame").rglob("*")} == checkout
    record = json.loads((folder / "results" / "tiny-llama" / "clemserve.json").read_text())
    assert record["clemcore"] == "3.7.2"
    (model,) = record["models"]
    assert model["model_name"] == "tiny-llama" and model["served_by_clemserve"] is True
    assert model["server_address"] == run_server.address
    assert model["registry_entry"]["backend"] == model["backend"] == "huggingface_local"
    assert model["server_version"] == importlib.metadata.version("clemserve")
    assert set(model["library_versions"]) >= {"torch", "transformers", "accelerate"}
    assert model["library_versions"]["transformers"] == importlib.metadata.version("transformers")
    # the tiny model is a local folder: its weight files' hash
    weights = sorted(tiny_model_dir.glob("*.safetensors"))
    assert weights and model["revision"].startswith("sha256:") and len(model["revision"]) == len("sha256:") + 64
    assert model["dtype"] == "float32"  # its config's dtype, which dtype="auto" loads
    assert model["device"] == "cpu"
    assert model["gen_args"] == {"temperature": 0.5, "max_tokens": 5}


def test_exit_codes(run_server: ServerProcess, workdir: tuple[Path, Path]) -> None:
    python, folder = workdir
    dead = f"127.0.0.1:{free_port()}"
    unreachable = clemserve_run(python, folder, "-m", "tiny-llama", "--address", dead)
    assert unreachable.returncode == 4, unreachable.stderr
    assert f"cannot reach clemserve at {dead}" in unreachable.stderr
    no_experiment = clemserve_run(python, folder, "-m", "tiny-llama", "-e", "no-such-experiment")
    assert no_experiment.returncode == 2 and "no episodes selected" in no_experiment.stderr
    no_jobs = clemserve_run(python, folder, "-m", "tiny-llama", "-j", "0")
    assert no_jobs.returncode == 2
