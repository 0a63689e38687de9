"""``clemserve run``: a clembench game's episodes played side by side against a clemserve server.

``clem run`` plays one episode after another (its batchwise runner overlaps them, but stops the whole game at
the first failing row). This command hands each episode to one of JOBS worker processes; every worker plays it
with clemcore's own code: ``load_models``, ``GameBenchmark``, its sequential runner and its result files. So the
results folder is the one ``clem run`` writes with the same arguments, and ``clem score``/``transcribe``/``eval``
read it unchanged. The coordinator (this module) selects games and instances as ``clem run`` does, writes
``run.json`` with clemcore's own ``RunFileSaver``, shows progress (``run_progress``), and records where the
answers came from (``clemserve.json``).

The workers (``run_pool``) live for the whole run: forked from a fork server that imported clemcore once, each
sets up once (models, callbacks, game masters) and then plays the episodes it is sent, one at a time
(``run_worker``). A worker that dies (SIGKILL, the OOM killer, a crash) fails only the episode it was playing:
that episode is recorded as failed with the signal, and a fresh worker takes its place.

An episode is complete when clemcore wrote its ``completed.json`` (last, after interactions and requests). A
rerun plays only the episodes without one, after removing what an earlier, interrupted or failed try left in
their folders. Ctrl-C terminates the workers and removes the folders of the episodes they were playing.

It runs on the game machine: clemcore and clemserve's client. clemcore is imported when the command runs, never
at import time, so ``clemserve --help`` works where clemcore is not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .commands import EXIT_OK, EXIT_USAGE, add_connection_flags, report
from .run_episodes import LOCK, Episode, Outcome, WorkerConfig, defer_openenv, game_spec
from .run_pool import WorkerPool
from .run_progress import Progress

#: some episodes failed; the others were played and recorded
EXIT_FAILED = 1
#: stopped by Ctrl-C; the same command resumes
EXIT_INTERRUPTED = 130
PROVENANCE = "clemserve.json"


def add_parser(commands: Any, environ: Mapping[str, str]) -> None:
    parser: argparse.ArgumentParser = commands.add_parser(
        "run",
        help="play a clembench game's episodes in parallel against the server (resumable)",
        description=(
            "Play every episode of the selected games with up to JOBS clemcore processes at once, each episode "
            "played by clemcore's own game code. Run it where `clem run` runs: a clemcore working directory whose "
            "model_registry.json names the server's models (clemserve clemcore-setup). The results folder is the "
            "one `clem run` writes with the same arguments, plus clemserve.json (where the answers came from). "
            "Running the same command again plays only the episodes without complete results."
        ),
        epilog=(
            "exit codes: 0 every episode complete, 1 some episodes failed (listed), 2 usage error, 3 the server "
            "refused or failed, 4 no server reachable, 130 interrupted (run again to resume)"
        ),
    )
    parser.add_argument("-g", "--game", nargs="+", required=True, help="game names or GameSpec-like JSON selectors")
    parser.add_argument("-e", "--experiment", nargs="+", default=None, help="only these experiments")
    parser.add_argument("-i", "--instances", default=None, help="instances file name in the game's in/ (no .json)")
    parser.add_argument(
        "-m",
        "--model",
        dest="models",
        metavar="MODEL",
        action="extend",
        nargs="+",
        required=True,
        help="one or two model names (-m A B or -m A -m B)",
    )
    parser.add_argument("-t", "--temperature", type=float, default=0.0, help="sampling temperature (default: 0.0)")
    parser.add_argument("-l", "--max-tokens", type=int, default=300, help="tokens per turn at most (default: 300)")
    parser.add_argument("-j", "--jobs", type=int, default=8, help="episodes played at once (default: 8)")
    parser.add_argument("-r", "--results-dir", type=Path, default=Path("results"), help="default: results")
    # the connection flags, before or after ``run``; without --address (or CLEMSERVE_ADDRESS), each registry
    # entry's clemserve_address
    add_connection_flags(parser, environ)


@dataclass
class Game:
    """One selected game: its spec (as a plain dict, for the workers) and its episodes in instance order."""

    spec: dict[str, Any]
    episodes: list[Episode]

    @property
    def name(self) -> str:
        return str(self.spec["game_name"])


class UsageError(Exception):
    """The selection cannot be played as asked (no such game, experiment or instances file)."""


def _export_connection(args: argparse.Namespace) -> None:
    """The connection flags given, as the environment the clemserve backend reads: the episode workers inherit
    it (``--address`` overrides each entry's clemserve_address)."""
    for flag, variable in _CONNECTION_VARIABLES:
        value = getattr(args, flag, None)
        if value:
            os.environ[variable] = "1" if value is True else str(value)


_CONNECTION_VARIABLES = (
    ("address", "CLEMSERVE_ADDRESS"),
    ("token", "CLEMSERVE_TOKEN"),
    ("tls", "CLEMSERVE_TLS"),
    ("tls_ca", "CLEMSERVE_TLS_CA"),
    ("tls_cert", "CLEMSERVE_TLS_CERT"),
    ("tls_key", "CLEMSERVE_TLS_KEY"),
)


def run(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        print("clemserve: run: --jobs must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if importlib.util.find_spec("clemcore") is None:
        print("clemserve: run needs clemcore on this machine: pip install clemcore", file=sys.stderr)
        return EXIT_USAGE
    import clemserve.client as client

    sys.dont_write_bytecode = True  # loading a game's master writes no __pycache__ into the user's checkout
    _export_connection(args)
    start_fork_server()  # first: its import of clemcore runs beside ours and the set-up below
    defer_openenv()
    import clemcore  # noqa: F401  # configures clemcore's logging (clembench.log), as clem does

    try:
        return _run(args)
    except KeyboardInterrupt:  # before any episode started (while episodes run, _run handles it)
        print("interrupted before any episode started", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as exc:
        print(f"clemserve: run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except client.ClemserveError as exc:
        return report(exc)


def _run(args: argparse.Namespace) -> int:
    from clemcore import backends
    from clemcore.backends import Model
    from clemcore.clemgame import GameBenchmark, ResultsFolder, RunFileSaver

    import clemserve.client as client

    gen_args = {"temperature": args.temperature, "max_tokens": args.max_tokens}
    try:
        models = backends.load_models(backends.ModelSpec.from_strings(args.models), gen_args)
    except ValueError as exc:  # clemcore: no registry entry unifies, or no such backend
        if type(exc).__module__.startswith("clemserve"):
            raise
        raise UsageError(str(exc)) from None
    results = ResultsFolder(args.results_dir, run_dir=Model.to_identifier(models))
    run_dir = results.to_run_dir_path()
    games = select(args, results)
    config = WorkerConfig(args.models, gen_args, args.results_dir, {game.name: game.spec for game in games})
    progress = Progress([episode for game in games for episode in game.episodes])
    failed: list[Outcome] = []
    with (
        _lock_removed(run_dir / LOCK),
        WorkerPool(config, min(args.jobs, max(1, progress.todo))) as workers,
        contextlib.ExitStack() as loaded,
    ):
        write_provenance(run_dir, models)  # while the workers set up
        run_file = _RunFile(RunFileSaver(results, player_model_infos=Model.to_infos(models)))  # run.json
        benchmarks = {
            game.name: loaded.enter_context(GameBenchmark.load_from_spec(game_spec(game.spec))) for game in games
        }
        left = {game.name: sum(not episode.complete for episode in game.episodes) for game in games}
        for game in games:
            run_file.start(benchmarks[game.name], len(game.episodes))  # every episode, those played before too
            if not left[game.name]:
                run_file.end(benchmarks[game.name])

        def finished(outcome: Outcome) -> None:
            progress.calls = workers.calls_made()
            progress.finished(outcome)
            if outcome.error is not None:
                failed.append(outcome)
            name = outcome.episode.game
            left[name] -= 1
            if not left[name]:
                run_file.end(benchmarks[name])

        try:
            workers.play([e for e in progress.episodes if not e.complete], finished, progress.show)
        except KeyboardInterrupt:
            progress.close()
            cancelled = workers.cancel()
            print(
                f"interrupted: {progress.done} episodes complete, {len(cancelled)} cancelled and removed; "
                "run the same command again to resume",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
    progress.close()
    try:  # again, now that the server has loaded the models: the dtype and device their engines really use
        write_provenance(run_dir, models)
    except client.ClemserveError as exc:
        print(f"clemserve.json keeps what the server told at the start: {exc}", file=sys.stderr)
    print(progress.summary(run_dir))
    if failed:
        print(f"{len(failed)} episodes failed (clembench.log has their tracebacks):")
        for outcome in failed:
            print(f"  {outcome.episode}: {outcome.error}")
        return EXIT_FAILED
    return EXIT_OK


def start_fork_server() -> None:
    """The workers' parent, started first so that its import of clemcore overlaps our own set-up.

    Not a plain fork: the coordinator holds gRPC channels, which do not survive one. The fork server imports
    clemcore once (``run_worker``), holds no channel, and forks each worker from that clean process. It
    inherits the environment now: the runner's per-episode bar is off there (tqdm reads TQDM_DISABLE when
    imported), not here.
    """
    from multiprocessing import forkserver

    forkserver.set_forkserver_preload([f"{__package__}.run_worker"])
    os.environ["TQDM_DISABLE"] = "1"
    try:
        forkserver.ensure_running()
    finally:
        del os.environ["TQDM_DISABLE"]


def select(args: argparse.Namespace, results: Any) -> list[Game]:
    """The games and episodes ``clem run`` would play with these arguments, in its order."""
    from clemcore.clemgame import GameInstances, GameRegistry

    registry = GameRegistry.from_directories_and_cwd_files()
    specs: dict[str, Any] = {}
    for selector in args.game:
        try:
            found = registry.get_game_specs_that_unify_with(selector)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        for spec in found:
            specs.setdefault(spec.game_name, spec)
    games = []
    for name in sorted(specs):
        spec = specs[name]
        if args.instances:
            spec.instances = args.instances
        try:
            instances = GameInstances.from_game_spec(spec)
        except (OSError, ValueError) as exc:
            raise UsageError(f"{name}: cannot read its instances ({exc})") from None
        if args.experiment:
            instances = instances.filter(lambda row: row["experiment"]["name"] in args.experiment)
        game_dir = results.to_run_dir_path() / name
        episodes = [
            Episode(
                name,
                row["experiment"]["name"],
                row["game_instance"]["game_id"],
                game_dir / results.to_experiment_dir(row["experiment"]) / results.to_instance_dir(row["game_instance"]),
            )
            for row in instances
        ]
        games.append(Game(dict(vars(spec)), episodes))
    if not any(game.episodes for game in games):
        raise UsageError(f"no episodes selected (games {sorted(specs)}, experiments {args.experiment or 'all'})")
    return games


class _RunFile:
    """clemcore's RunFileSaver (run.json) for games played side by side: the saver follows one game at a time
    (its start, its episode count), so each started game's state is kept here until the game ends."""

    def __init__(self, saver: Any) -> None:
        self.saver = saver
        self.started: dict[str, tuple[Any, Any, int]] = {}

    def start(self, benchmark: Any, episodes: int) -> None:
        self.saver.on_benchmark_start(benchmark)
        for _ in range(episodes):
            self.saver.on_game_start(None, {})
        self.started[benchmark.game_name] = (self.saver.game_info, self.saver.benchmark_start, self.saver.num_instances)
        self.saver.num_instances = 0

    def end(self, benchmark: Any) -> None:
        saver = self.saver
        saver.game_info, saver.benchmark_start, saver.num_instances = self.started.pop(benchmark.game_name)
        saver.on_benchmark_end(benchmark)


def write_provenance(run_dir: Path, models: Sequence[Any]) -> None:
    """``clemserve.json`` in the run folder: for each model the server played, where its answers came from."""
    entries = []
    for model in models:
        remote = getattr(model, "remote", None)
        if remote is None:  # not a clemserve model (mock, programmatic, or an in-process clemcore backend)
            entries.append({"model_name": model.name, "served_by_clemserve": False, "gen_args": dict(model.gen_args)})
            continue
        entries.append({**_served(remote), "gen_args": dict(model.gen_args)})
    record = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "clemserve_client": _version("clemserve"),
        "clemcore": _version("clemcore"),
        "models": entries,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    partial = run_dir / f".{PROVENANCE}.partial"
    partial.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(partial, run_dir / PROVENANCE)


def _served(remote: Any) -> dict[str, Any]:
    """What the server tells of the model it plays (ResolveModel): its version, the resolved registry entry,
    the backend's library versions, the weights' revision, dtype and device."""
    from clemserve.v1 import clemserve_pb2 as pb
    from clemserve.v1 import clemserve_pb2_grpc as pb_grpc

    from .channel import channel_for
    from .convert import selector_to_proto, spec_from_proto

    stub = pb_grpc.ModelServiceStub(channel_for(remote.address, None))
    request = pb.ResolveModelRequest(model=selector_to_proto(remote.model_spec), describe=True)
    reply = stub.ResolveModel(request, timeout=30)
    entry = dict(spec_from_proto(reply.model_spec))
    return {
        "model_name": remote.name,
        "served_by_clemserve": True,
        "server_address": remote.address,
        "server_version": reply.server_version or "unknown (a server older than this field)",
        "registry_entry": entry,
        "backend": entry.get("backend", ""),
        "library_versions": dict(sorted(reply.library_versions.items())),
        "revision": reply.revision,
        "dtype": reply.dtype,
        "device": reply.device,
    }


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def _lock_removed(path: Path) -> Iterator[None]:
    """The workers' lock file goes when the run ends: the folder holds what clem run writes, and clemserve.json."""
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
