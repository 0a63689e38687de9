"""``clemserve run`` plays a real clembench game (hellogame, from ../shared) on a game machine's environment
against a real server: the same results as ``clem run``, failures alone (a killed worker too), resume,
progress, provenance and exit codes; a game that cannot be loaded failing alone in a benchmark selection,
and ``--score``'s table (guesswhat, which has a scorer).

One server and one game working directory serve the module; the tests play four of hellogame's ten
instances (an instances file of the copy: ``-i``), each test into its own results folder.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_clemcore import clemcore_python, game_side
from tests.serving import REPO, ServerProcess, free_port, hf_entry, start_server

GAMES = REPO.parent / "shared" / "clembench-games"
#: hellogame's instances 0 to 3 (instance 1 greets Max), as the instances file ``four`` of the copy
EPISODES = 4
#: what changes from one run to the next however the episodes are played
VOLATILE = {
    "timestamp", "created", "benchmark_start", "benchmark_end", "duration", "duration_seconds",
    "call_start", "call_duration",
}  # fmt: skip


@pytest.fixture(scope="module")
def run_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("run-server")
    # a config that names no dtype: the registry and config say "auto", the loaded engine runs in float32
    model = shutil.copytree(tiny_model_dir, folder / "tiny-llama")
    config = json.loads((model / "config.json").read_text())
    for name in ("dtype", "torch_dtype"):
        config.pop(name, None)
    (model / "config.json").write_text(json.dumps(config))
    entries = [
        hf_entry("tiny-llama", model),
        # instance 1 greets Max: its only call fails on the server
        {"model_name": "fault-max", "backend": "fault", "model_id": "fault", "model_config": {"raise_on": "Max"}},
        {"model_name": "slow-echo", "backend": "fault", "model_id": "fault", "model_config": {"sleep_s": 1.0}},
    ]
    (folder / "registry.json").write_text(json.dumps(entries))
    proc = start_server(folder, "--registry", str(folder / "registry.json"))
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def workdir(run_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A clemcore working directory set up for the server, holding a copy of hellogame with a four-instance file."""
    if not (GAMES / "hellogame").is_dir():
        pytest.skip(f"no clembench games at {GAMES}")
    python = clemcore_python()
    folder = tmp_path_factory.mktemp("run-game")
    shutil.copytree(GAMES / "hellogame", folder / "hellogame")
    instances = json.loads((folder / "hellogame" / "in" / "instances.json").read_text())
    (experiment,) = instances["experiments"]
    experiment["game_instances"] = experiment["game_instances"][:EPISODES]
    (folder / "hellogame" / "in" / "four.json").write_text(json.dumps(instances))
    setup = game_side(
        python, [str(python.parent / "clemserve"), "clemcore-setup", "--address", run_server.address], folder
    )
    assert setup.returncode == 0, setup.stderr
    return python, folder


def run_command(python: Path, *args: str) -> list[str]:
    return [str(python.parent / "clemserve"), "run", "-g", "hellogame", "-i", "four", *args]


def clemserve_run(python: Path, folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return game_side(python, run_command(python, *args), folder)


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


def checkout_files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder / "hellogame")) for p in (folder / "hellogame").rglob("*")}


Played = tuple[Path, subprocess.CompletedProcess[str], tuple[set[str], set[str]]]


@pytest.fixture(scope="module")
def played(workdir: tuple[Path, Path]) -> Played:
    """The tiny model's episodes played twice: by ``clem run`` (into seq) and by ``clemserve run -j 2`` (par),
    so that each worker plays two; and the game checkout's files before and after clemserve run."""
    python, folder = workdir
    before = checkout_files(folder)
    parallel = clemserve_run(python, folder, "-m", "tiny-llama", "-t", "0.0", "-l", "12", "-j", "2", "-r", "par")
    after = checkout_files(folder)  # before clem run, which writes __pycache__ into it
    common = ["-i", "four", "-m", "tiny-llama", "-t", "0.0", "-l", "12"]
    sequential = game_side(python, ["clem", "run", "-g", "hellogame", *common, "-r", "seq"], folder)
    assert sequential.returncode == 0, sequential.stdout + sequential.stderr
    return folder, parallel, (before, after)


def test_same_results_as_sequential_clem_run(played: Played) -> None:
    folder, parallel, checkout = played
    assert parallel.returncode == 0, parallel.stdout + parallel.stderr
    before, after = checkout
    assert after == before  # the user's game checkout was left as it was (no instances, no __pycache__)
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


def test_provenance_file(run_server: ServerProcess, played: Played) -> None:
    folder, parallel, _ = played
    assert parallel.returncode == 0, parallel.stdout + parallel.stderr
    record = json.loads((folder / "par" / "tiny-llama" / "clemserve.json").read_text())
    assert record["clemcore"] == "3.7.2"
    assert record["clemserve_client"] == importlib.metadata.version("clemserve")
    (model,) = record["models"]
    assert model["model_name"] == "tiny-llama" and model["served_by_clemserve"] is True
    assert model["server_address"] == run_server.address
    assert model["registry_entry"]["backend"] == model["backend"] == "huggingface_local"
    assert model["server_version"] == importlib.metadata.version("clemserve")
    assert set(model["library_versions"]) >= {"torch", "transformers", "accelerate"}
    assert model["library_versions"]["transformers"] == importlib.metadata.version("transformers")
    # the tiny model is a local folder: its weight files' hash
    weights = sorted(Path(model["registry_entry"]["huggingface_id"]).glob("*.safetensors"))
    assert weights and model["revision"].startswith("sha256:") and len(model["revision"]) == len("sha256:") + 64
    # what the loaded engine uses (the record is written again once the episodes were played), where its
    # config names no dtype
    assert model["dtype"] == "float32"
    assert model["device"] == "cpu"
    assert model["prefix_caching"] == "prefix cache up to 1024 MiB"  # float32: on by default
    assert model["gen_args"] == {"temperature": 0.0, "max_tokens": 12}


def test_a_failing_episode_fails_alone_and_a_rerun_replays_only_it(workdir: tuple[Path, Path]) -> None:
    python, folder = workdir
    first = clemserve_run(python, folder, "-m", "fault-max", "-j", "3", "-r", "failing")
    assert first.returncode == 1, first.stdout + first.stderr
    assert f"{EPISODES} episodes: {EPISODES - 1} played, 1 failed, 0 complete before" in first.stdout
    assert "1 episodes failed" in first.stdout
    assert "  hellogame/greet_en/instance_00001: InternalError: internal error (request id" in first.stdout
    # progress on the terminal: episodes done/failed/total, the rate of calls and tokens
    progress = first.stderr.replace("\r", "\n")
    assert f"{EPISODES}/{EPISODES}" in progress
    assert re.search(rf"done={EPISODES - 1} failed=1 [0-9.]+ calls/(s|min), [0-9.]+ tokens/(s|min)", progress)
    run_dir = folder / "failing" / "fault-max"
    complete = [p.name for p in episode_folders(run_dir) if (p / "completed.json").is_file()]
    assert complete == [f"instance_{i:05d}" for i in range(EPISODES) if i != 1]
    assert not (run_dir / "hellogame" / "greet_en" / "instance_00001" / "interactions.json").exists()

    again = clemserve_run(python, folder, "-m", "fault-max", "-j", "3", "-r", "failing")
    assert again.returncode == 1
    assert f"{EPISODES} episodes: 0 played, 1 failed, {EPISODES - 1} complete before" in again.stdout
    assert json.loads((run_dir / "run.json").read_text())["games"]["hellogame"]["num_instances"] == EPISODES


def started(command: list[str], folder: Path) -> subprocess.Popen[str]:
    """The command as a terminal's foreground job: its own process group, Ctrl-C not ignored (as it is in
    whatever a shell started in the background, a test runner perhaps), output captured."""
    env = {"PATH": f"{Path(command[0]).parent}:/usr/bin:/bin", "HOME": str(folder)}
    # Ctrl-C's default restored by a small exec'ing wrapper, not a preexec_fn: Python code between fork and
    # exec in this threaded process (gRPC's threads) can crash the child
    unignore = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
    )
    return subprocess.Popen(
        [sys.executable, "-c", unignore, *command], cwd=folder, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def wait_for(process: subprocess.Popen[str], condition: Any, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)


def workers_of(pid: int) -> list[int]:
    """The episode workers of a ``clemserve run``: the children of its fork server, itself a child of the run."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    children = {p for p, parent in parents.items() if parent == pid}
    return sorted(p for p, parent in parents.items() if parent in children)


def test_a_killed_worker_fails_its_episode_alone(workdir: tuple[Path, Path]) -> None:
    python, folder = workdir
    run_dir = folder / "killed" / "slow-echo"
    process = started(run_command(python, "-m", "slow-echo", "-j", "2", "-r", "killed"), folder)
    try:
        # both workers are inside their first episode (each call takes 1 s): instance.json is written at its start
        wait_for(process, lambda: len(list(run_dir.glob("hellogame/greet_en/instance_*/instance.json"))) == 2)
        victim = workers_of(process.pid)[0]
        os.kill(victim, signal.SIGKILL)  # what the out-of-memory killer does
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, out + err
    assert f"{EPISODES} episodes: {EPISODES - 1} played, 1 failed, 0 complete before" in out
    (failure,) = (line for line in out.splitlines() if line.startswith("  hellogame/"))
    assert failure.endswith("worker process killed by SIGKILL (the out-of-memory killer sends it, as does kill -9)")
    killed = run_dir / "hellogame" / "greet_en" / failure.split("/")[2].split(":")[0]
    assert not killed.exists()  # what it had written is gone; the others are complete
    assert sum((p / "completed.json").is_file() for p in episode_folders(run_dir)) == EPISODES - 1


def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(workdir: tuple[Path, Path]) -> None:
    python, folder = workdir
    # one at a time: after the first episode is complete, three more seconds of episodes to interrupt
    command = run_command(python, "-m", "slow-echo", "-j", "1", "-r", "stopped")
    run_dir = folder / "stopped" / "slow-echo"
    process = started(command, folder)
    try:
        wait_for(process, lambda: any((p / "completed.json").exists() for p in episode_folders(run_dir)))
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


def test_exit_codes(workdir: tuple[Path, Path]) -> None:
    python, folder = workdir
    dead = f"127.0.0.1:{free_port()}"
    unreachable = clemserve_run(python, folder, "-m", "tiny-llama", "--address", dead)
    assert unreachable.returncode == 4, unreachable.stderr
    assert f"cannot reach clemserve at {dead}" in unreachable.stderr
    no_experiment = clemserve_run(python, folder, "-m", "tiny-llama", "-e", "no-such-experiment")
    assert no_experiment.returncode == 2 and "no episodes selected" in no_experiment.stderr
    no_jobs = clemserve_run(python, folder, "-m", "tiny-llama", "-j", "0")
    assert no_jobs.returncode == 2 and "--jobs must be at least 1" in no_jobs.stderr


def test_a_game_that_cannot_be_loaded_fails_alone_and_score_prints_the_table(
    workdir: tuple[Path, Path], tmp_path: Path
) -> None:
    """The whole benchmark died at one game whose master imports a package the environment lacks: now that
    game's episodes fail with the cause and what to install, the other games are played (each worker plays
    guesswhat's episodes, then hellogame's: one game loaded at a time), and --score prints the main table that
    clemcore's evaluation wrote (of guesswhat: hellogame has no scorer)."""
    python, setup = workdir
    folder = tmp_path / "benchmark"
    folder.mkdir()
    for name in ("clemserve_api.py", "model_registry.json"):
        shutil.copy(setup / name, folder / name)
    hellogame = shutil.copytree(setup / "hellogame", folder / "hellogame")
    spec = json.loads((hellogame / "clemgame.json").read_text())
    (hellogame / "clemgame.json").write_text(json.dumps({**spec, "benchmark": ["2.0"]}))
    broken = shutil.copytree(hellogame, folder / "brokengame")
    (broken / "clemgame.json").write_text(json.dumps({**spec, "game_name": "brokengame", "benchmark": ["2.0"]}))
    master = broken / "master.py"
    master.write_text("import clemserve_no_such_package\n" + master.read_text())
    (broken / "requirements.txt").write_text("clemserve_no_such_package\n")
    played = shutil.copytree(GAMES / "guesswhat", folder / "guesswhat")
    instances = json.loads((played / "in" / "instances.json").read_text())
    instances["experiments"] = instances["experiments"][:1]
    (experiment,) = instances["experiments"]
    experiment["game_instances"] = experiment["game_instances"][:EPISODES]
    (played / "in" / "four.json").write_text(json.dumps(instances))

    command = [str(python.parent / "clemserve"), "run", "-g", '{"benchmark":["2.0"]}', "-i", "four", "-l", "20"]
    run = game_side(python, [*command, "-m", "fault-max", "-j", "2", "--score"], folder)
    assert run.returncode == 1, run.stdout + run.stderr
    cause = (
        "brokengame cannot be loaded: ModuleNotFoundError: No module named 'clemserve_no_such_package'; the game "
        "needs packages this environment lacks: install its checkout's requirements here "
        f"({python.parent / 'python'} -m pip install -r {broken / 'requirements.txt'})"
    )
    assert f"clemserve: run: {cause}: its {EPISODES} episodes are not played" in run.stderr  # said at once
    # hellogame's instance 1 fails on the server, as in the tests above
    assert f"{3 * EPISODES} episodes: {2 * EPISODES - 1} played, {EPISODES + 1} failed, 0 complete" in run.stdout
    assert f"{EPISODES + 1} episodes failed" in run.stdout
    assert f"  {EPISODES} episodes: {cause}\n    brokengame/greet_en ({EPISODES}):\n" in run.stdout  # listed once
    assert "  hellogame/greet_en/instance_00001: InternalError" in run.stdout
    assert (
        sum((p / "completed.json").is_file() for p in episode_folders(folder / "results" / "fault-max")) == EPISODES - 1
    )
    run_dir = folder / "results" / "fault-max"
    assert len(list(run_dir.glob("guesswhat/Level_1/instance_*/completed.json"))) == EPISODES
    assert not (run_dir / "brokengame").exists()
    # each episode scored, and clemcore's table of the results folder printed
    assert len(list(run_dir.glob("guesswhat/Level_1/instance_*/scores.json"))) == EPISODES
    with open(folder / "results" / "results.csv", newline="") as file:
        (row,) = csv.DictReader(file)
    header, printed = run.stdout.splitlines()[-3:-1]
    assert header.split() == ["MODEL", "CLEMSCORE", "%", "PLAYED", "QUALITY"]
    columns = ("-, clemscore", "all, Average % Played", "all, Average Quality Score")
    assert printed.split() == [
        "fault-max",
        *(f"{float(row[column]):.2f}" if row[column] else "-" for column in columns),
    ]
