"""``clemserve run``: a clembench game's episodes played side by side against a clemserve server.

``clem run`` plays one episode after another (its batchwise runner overlaps them, but stops the whole game at
the first failing row). This command hands each episode to one of JOBS worker processes; every worker plays it
with clemcore's own code: ``load_models``, ``GameBenchmark``, its sequential runner and its result files. So the
results folder is the one ``clem run`` writes with the same arguments, and ``clem score``/``transcribe``/``eval``
read it unchanged. The coordinator (this process) selects games and instances as ``clem run`` does, writes
``run.json`` with clemcore's own ``RunFileSaver``, shows progress, and records where the answers came from
(``clemserve.json``).

An episode is complete when clemcore wrote its ``completed.json`` (last, after interactions and requests). A
rerun plays only the episodes without one, after removing what an earlier, interrupted or failed try left in
their folders. Ctrl-C terminates the workers and removes the folders of the episodes they were playing.

It runs on the game machine: clemcore and clemserve's client. clemcore is imported when the command runs, never
at import time, so ``clemserve --help`` works where clemcore is not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.metadata
import json
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .commands import EXIT_OK, EXIT_USAGE, add_connection_flags, report

#: some episodes failed; the others were played and recorded
EXIT_FAILED = 1
#: stopped by Ctrl-C; the same command resumes
EXIT_INTERRUPTED = 130
#: clemcore's marker of an episode that finished without an error (SignalFileSaver writes it last)
COMPLETED = "completed.json"
PROVENANCE = "clemserve.json"
LOCK = ".clemserve-run.lock"


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


@dataclass(frozen=True)
class Episode:
    """One instance of one experiment of one game, and the folder its results go to."""

    game: str
    experiment: str
    game_id: int
    folder: Path

    def __str__(self) -> str:
        return f"{self.game}/{self.experiment}/{self.folder.name}"

    @property
    def complete(self) -> bool:
        return (self.folder / COMPLETED).is_file()


@dataclass(frozen=True)
class Outcome:
    episode: Episode
    error: str | None = None


@dataclass
class Game:
    """One selected game: its spec (as a plain dict, for the workers) and its episodes in instance order."""

    spec: dict[str, Any]
    episodes: list[Episode]

    @property
    def name(self) -> str:
        return str(self.spec["game_name"])


@dataclass(frozen=True)
class WorkerConfig:
    models: list[str]
    gen_args: dict[str, Any]
    results_dir: Path
    games: dict[str, dict[str, Any]]


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
    try:
        import clemcore  # noqa: F401  # configures clemcore's logging (clembench.log), as clem does
    except ImportError:
        print("clemserve: run needs clemcore on this machine: pip install clemcore", file=sys.stderr)
        return EXIT_USAGE
    import clemserve.client as client

    sys.dont_write_bytecode = True  # loading a game's master writes no __pycache__ into the user's checkout
    _export_connection(args)
    try:
        return _run(args)
    except KeyboardInterrupt:  # before any episode started (while episodes run, Workers.play's caller handles it)
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

    gen_args = {"temperature": args.temperature, "max_tokens": args.max_tokens}
    try:
        models = backends.load_models(backends.ModelSpec.from_strings(args.models), gen_args)
    except ValueError as exc:  # clemcore: no registry entry unifies, or no such backend
        if type(exc).__module__.startswith("clemserve"):
            raise
        raise UsageError(str(exc)) from None
    results = ResultsFolder(args.results_dir, run_dir=Model.to_identifier(models))
    games = select(args, results)
    start_fork_server()  # the server answered and there are episodes: the workers will be needed
    write_provenance(results.to_run_dir_path(), models)
    run_file = RunFileSaver(results, player_model_infos=Model.to_infos(models))  # creates run.json, as clem run
    config = WorkerConfig(args.models, gen_args, args.results_dir, {game.name: game.spec for game in games})
    progress = Progress([episode for game in games for episode in game.episodes])
    failed: list[Outcome] = []
    with (
        _lock_removed(results.to_run_dir_path() / LOCK),
        Workers(config, min(args.jobs, max(1, progress.todo))) as workers,
    ):
        for game in games:
            spec = _game_spec(game.spec)
            with GameBenchmark.load_from_spec(spec) as benchmark:
                run_file.on_benchmark_start(benchmark)
                for _ in game.episodes:
                    run_file.on_game_start(None, {})  # counts every episode of the game, those played before too
                try:
                    failed += workers.play([e for e in game.episodes if not e.complete], progress)
                except KeyboardInterrupt:
                    progress.close()
                    cancelled = workers.cancel()
                    print(
                        f"interrupted: {progress.done} episodes complete, {len(cancelled)} cancelled and removed; "
                        "run the same command again to resume",
                        file=sys.stderr,
                    )
                    return EXIT_INTERRUPTED
                run_file.on_benchmark_end(benchmark)
    progress.close()
    print(progress.summary(results.to_run_dir_path()))
    if failed:
        print(f"{len(failed)} episodes failed (clembench.log has their tracebacks):")
        for outcome in failed:
            print(f"  {outcome.episode}: {outcome.error}")
        return EXIT_FAILED
    return EXIT_OK


def start_fork_server() -> None:
    """The workers' parent, started early so that its import of clemcore (seconds) overlaps our remaining set-up.

    Not a plain fork: the coordinator holds gRPC channels, which do not survive one. The fork server imports
    clemcore once, holds no channel, and forks each worker from that clean process. It inherits the
    environment now: the runner's per-episode bar is off there (tqdm reads TQDM_DISABLE when imported), not here.
    """
    from multiprocessing import forkserver

    forkserver.set_forkserver_preload(["clemcore.clemgame.runners.sequential", __name__])
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


class Workers:
    """JOBS spawned processes that play episodes; Ctrl-C reaches them only through ``cancel``."""

    def __init__(self, config: WorkerConfig, jobs: int) -> None:
        self.config = config
        self.jobs = jobs
        self.pool: Any = None
        self.in_flight: set[Episode] = set()

    def __enter__(self) -> Workers:
        context = multiprocessing.get_context("forkserver")  # started early by start_fork_server
        self.calls = context.Value("q", 0, lock=True)
        self.pool = context.Pool(self.jobs, initializer=_start_worker, initargs=(self.config, self.calls))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.pool.terminate()
        self.pool.join()

    def play(self, episodes: Sequence[Episode], progress: Progress) -> list[Outcome]:
        """Every episode played; the failed ones' outcomes. Returns when all are done."""
        finished: queue.Queue[Outcome] = queue.Queue()
        for episode in episodes:
            _discard(episode.folder)  # what an interrupted or failed earlier try left
            self.in_flight.add(episode)
            self.pool.apply_async(_play, (episode,), callback=finished.put)
        failed = []
        while self.in_flight:
            try:
                outcome = finished.get(timeout=0.5)
            except queue.Empty:
                progress.show(self.calls.value)
                continue
            self.in_flight.discard(outcome.episode)
            if outcome.error is not None:
                failed.append(outcome)
            progress.finished(outcome, self.calls.value)
        return failed

    def cancel(self) -> list[Episode]:
        """Stop every worker now; remove the folders of the episodes they had not completed."""
        self.pool.terminate()
        self.pool.join()
        cancelled = [episode for episode in self.in_flight if not episode.complete]
        for episode in cancelled:
            _discard(episode.folder)
        self.in_flight.clear()
        return cancelled


def _discard(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Progress:
    """Episodes done/failed/total, calls per second and an ETA on stderr (tqdm, which clemcore brings)."""

    episodes: list[Episode]
    failed: int = 0
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    calls: int = 0

    def __post_init__(self) -> None:
        from tqdm import tqdm

        self.skipped = sum(episode.complete for episode in self.episodes)
        self.done = self.skipped
        self.bar = tqdm(
            total=len(self.episodes), initial=self.skipped, desc="episodes", unit="ep", mininterval=0.5, file=sys.stderr
        )
        self._postfix()

    @property
    def todo(self) -> int:
        return len(self.episodes) - self.skipped

    def show(self, calls: int) -> None:
        self.calls = calls
        self._postfix()

    def finished(self, outcome: Outcome, calls: int) -> None:
        self.calls = calls
        if outcome.error is None:
            self.done += 1
        else:
            self.failed += 1
            self.bar.write(f"failed: {outcome.episode}: {outcome.error}", file=sys.stderr)
        self.bar.update(1)
        self._postfix()

    def calls_per_second(self) -> float:
        return self.calls / max(time.monotonic() - self.started, 1e-9)

    def _postfix(self) -> None:
        self.bar.set_postfix_str(
            f"done={self.done} failed={self.failed} calls/s={self.calls_per_second():.1f}", refresh=True
        )

    def close(self) -> None:
        self.bar.close()

    def summary(self, run_dir: Path) -> str:
        seconds = time.monotonic() - self.started
        return (
            f"{len(self.episodes)} episodes: {self.done - self.skipped} played, {self.failed} failed, "
            f"{self.skipped} complete before; {self.calls} calls in {seconds:.1f} s "
            f"({self.calls_per_second():.1f} calls/s); results in {run_dir}"
        )


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


def _game_spec(spec: dict[str, Any]) -> Any:
    from clemcore.clemgame import GameSpec

    return GameSpec(**spec)


# -- the worker side: one process plays one episode at a time ---------------------------------------------------


class _Worker:
    def __init__(self, config: WorkerConfig, calls: Any) -> None:
        from clemcore import backends
        from clemcore.backends import Model
        from clemcore.clemgame import (
            GameBenchmarkCallbackList,
            InstanceFileSaver,
            InteractionsFileSaver,
            ResultsFolder,
        )
        from clemcore.clemgame.callbacks.files import PlayerFileSaver, SignalFileSaver

        _quiet_console()
        self.config = config
        self.models = backends.load_models(backends.ModelSpec.from_strings(config.models), config.gen_args)
        for model in self.models:
            _count_calls(model, calls)
        results = ResultsFolder(config.results_dir, run_dir=Model.to_identifier(self.models))
        infos = Model.to_infos(self.models)
        # clem run's callbacks, less RunFileSaver (the coordinator keeps run.json)
        self.callbacks = GameBenchmarkCallbackList(
            [
                InstanceFileSaver(results),
                _experiment_file_saver(results, infos),
                InteractionsFileSaver(results, player_model_infos=infos),
                PlayerFileSaver(results),
                SignalFileSaver(results),
            ]
        )
        self.games: dict[str, tuple[Any, dict[tuple[str, int], dict[str, Any]]]] = {}
        self.failure = _FailureCapture()
        logging.getLogger("clemcore.clemgame.runners.sequential").addHandler(self.failure)

    def game(self, name: str) -> tuple[Any, dict[tuple[str, int], dict[str, Any]]]:
        if name not in self.games:
            from clemcore.clemgame import GameBenchmark, GameInstances

            spec = _game_spec(self.config.games[name])
            benchmark = GameBenchmark.load_from_spec(spec).__enter__()  # kept for the worker's life
            rows = {
                (row["experiment"]["name"], row["game_instance"]["game_id"]): row
                for row in GameInstances.from_game_spec(spec)
            }
            self.games[name] = (benchmark, rows)
        return self.games[name]

    def play(self, episode: Episode) -> Outcome:
        from clemcore.clemgame import GameInstances
        from clemcore.clemgame.runners import sequential

        benchmark, rows = self.game(episode.game)
        row = rows[(episode.experiment, episode.game_id)]
        self.failure.error = None
        sequential.run(benchmark, GameInstances(episode.game, [row]), self.models, callbacks=self.callbacks)
        if episode.complete:
            return Outcome(episode)
        return Outcome(episode, self.failure.error or "no completed.json written (see clembench.log)")


def _quiet_console() -> None:
    """clemcore logs each episode's start to the console; in JOBS workers that buries the progress bar. The
    records still reach clembench.log through the root logger, as clem run's do."""
    for name in ("clemcore.run", "clemcore.cli", "clemcore.backends", "clemcore.clemgame.envs"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # the console; FileHandler is a subclass and stays
                logger.removeHandler(handler)


class _FailureCapture(logging.Handler):
    """The sequential runner logs, and swallows, an episode's exception: keep its last one."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.error: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            self.error = f"{type(exc).__name__}: {exc}"


def _experiment_file_saver(results: Any, infos: Any) -> Any:
    """clemcore's ExperimentFileSaver writes experiment.json when absent; workers check and write under a lock."""
    from clemcore.clemgame import ExperimentFileSaver

    class LockedExperimentFileSaver(ExperimentFileSaver):  # type: ignore[misc]
        def on_game_start(self, game_master: Any, game_instance: dict[str, Any]) -> None:
            with _locked(results.to_run_dir_path() / LOCK):
                super().on_game_start(game_master, game_instance)

    return LockedExperimentFileSaver(results, player_model_infos=infos)


@contextlib.contextmanager
def _lock_removed(path: Path) -> Iterator[None]:
    """The workers' lock file goes when the run ends: the folder holds what clem run writes, and clemserve.json."""
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _count_calls(model: Any, calls: Any) -> None:
    """Every generate call of the worker's models adds one to the coordinator's counter."""

    def counted(method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            finally:
                with calls.get_lock():
                    calls.value += 1

        return call

    model.generate_response = counted(model.generate_response)


_worker: _Worker | None = None


_worker_error: str | None = None


def _start_worker(config: WorkerConfig, calls: Any) -> None:
    global _worker, _worker_error
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the coordinator, which terminates us
    sys.dont_write_bytecode = True  # no __pycache__ in the user's game checkout
    try:
        _worker = _Worker(config, calls)
    except Exception as exc:  # a pool restarts a worker whose start raises, forever: report it per episode
        _worker_error = f"worker could not start: {type(exc).__name__}: {exc}"


def _play(episode: Episode) -> Outcome:
    try:
        if _worker is None:
            return Outcome(episode, _worker_error or "worker not started")
        return _worker.play(episode)
    except Exception as exc:  # an episode fails alone; the worker goes on with the next
        return Outcome(episode, f"{type(exc).__name__}: {exc}")
