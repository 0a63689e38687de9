"""``clemserve run``: a clembench game's episodes played side by side against a clemserve server.

``clem run`` plays one episode after another (its batchwise runner overlaps them, but stops the whole game at
the first failing row). This command hands each episode to one of JOBS worker processes; every worker plays it
with clemcore's own code: ``load_models``, ``GameBenchmark``, its sequential runner and its result files. So the
results folder is the one ``clem run`` writes with the same arguments, and ``clem score``/``transcribe``/``eval``
read it unchanged. The coordinator (this module) selects games and instances as ``clem run`` does, writes
``run.json`` with clemcore's own ``RunFileSaver``, shows progress (``run_progress``), and records where the
answers came from (``clemserve.json``). With ``--score`` it then scores the results (``score``). Each model
plays on its own server (``run_servers``): its entry's, or with ``--address`` repeated the first that has it.

The workers (``run_pool``) live for the whole run: forked from a fork server that imported clemcore once, each
sets up once (models, callbacks, game masters) and then plays the episodes it is sent, one at a time
(``run_worker``). A worker that dies (SIGKILL, the OOM killer, a crash) fails only the episode it was playing:
that episode is recorded as failed with the signal, and a fresh worker takes its place. A game that cannot be
loaded (a package its master imports is missing) fails alone too: the coordinator loads each game first, and
lists the episodes of one that fails as failed, with the cause and the requirements to install.

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
import textwrap
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .budget import EXIT_BUDGET, checked_budget, stopped_lines
from .commands import EXIT_OK, EXIT_USAGE, add_connection_flags, report
from .replay import ReplayError, ReplayServer
from .run_episodes import LOCK, Episode, GameLoadError, Outcome, WorkerConfig, defer_openenv, load_game
from .run_pool import WorkerPool
from .run_progress import Progress
from .run_servers import NotServedError, load_models, route, servers_named, servers_of
from .spend import RunSpend

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
            "exit codes: 0 every episode complete, 1 some episodes failed (listed; a game that cannot be loaded "
            "fails its episodes) or scoring failed, 2 usage error, 3 the server refused or failed, 4 no server "
            "reachable, 5 a --max-cost cap was reached (the command to resume with higher caps is printed), 130 "
            "interrupted (run again to resume)"
        ),
    )
    # every repeatable option keeps all its values: -g A B and -g A -g B are the same
    parser.add_argument(
        "-g",
        "--game",
        action="extend",
        nargs="+",
        required=True,
        help="game names or GameSpec-like JSON selectors, as clem run takes them (the whole benchmark: "
        '-g \'{"benchmark":["2.0"]}\')',
    )
    parser.add_argument("-e", "--experiment", action="extend", nargs="+", default=None, help="only these experiments")
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
    parser.add_argument(
        "--score",
        action="store_true",
        help="afterwards, score the episodes and evaluate the results folder as clem score and clem eval do, and "
        "print the main table (per model: clemscore, %% played, quality score)",
    )
    parser.add_argument(
        "--replay",
        type=Path,
        metavar="FILE",
        help="answer the run's calls from this record (written by clemserve serve --record), identical requests in "
        "their recorded order, by a replay server the run starts on loopback: no model or provider is called "
        "(needs clemserve's [server] extra here)",
    )
    parser.add_argument(
        "--replay-miss",
        choices=("refuse", "forward"),
        default="refuse",
        help="with --replay, a call not in the record: refuse (its episode fails with REPLAY_MISS; the default) or "
        "forward (the replay server calls the model, with ./key.json or ~/.clemcore/key.json)",
    )
    parser.add_argument(
        "--replay-python",
        metavar="PYTHON",
        default=environ.get("CLEMSERVE_REPLAY_PYTHON") or None,
        help="with --replay, the Python of an environment with clemserve's [server] extra, to run the replay server "
        "(default: this one) [env CLEMSERVE_REPLAY_PYTHON]",
    )
    parser.add_argument(
        "--max-cost",
        action="append",
        metavar="USD|MODEL=USD",
        help="cap what the run spends, in US dollars: USD caps the total, MODEL=USD one model (repeatable); a resumed "
        "run's earlier parts count. Once a cap is reached no new episode starts, those in flight finish, and the run "
        "exits 5 with the command that resumes it with higher caps",
    )
    parser.add_argument(
        "--allow-unpriced",
        action="store_true",
        help="with --max-cost, play models the server cannot price (their calls count as $0)",
    )
    # the connection flags, before or after ``run``; without --address (or CLEMSERVE_ADDRESS), each registry
    # entry's clemserve_address; --address repeated, each model on the server that has it (run_servers)
    add_connection_flags(parser, environ, several=True)


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
    it (``--address`` overrides each entry's clemserve_address and any route of ``CLEMSERVE_ROUTES``)."""
    for flag, variable in _CONNECTION_VARIABLES:
        value = getattr(args, flag, None)
        if value:
            os.environ[variable] = "1" if value is True else str(value)
    if getattr(args, "address", None) or getattr(args, "servers", None):  # the command line wins over routes
        os.environ.pop("CLEMSERVE_ROUTES", None)
        os.environ.pop("CLEMSERVE_ROUTES_FILE", None)


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
    args.servers = servers_named(args)
    replay = ReplayServer(args.replay, args.replay_miss, args.replay_python) if args.replay else None
    if replay is not None:
        try:
            _replay_connection(args, replay)
        except ReplayError as exc:
            print(f"clemserve: run: {exc}", file=sys.stderr)
            replay.stop()
            return EXIT_USAGE
    _export_connection(args)
    start_fork_server()  # first: its import of clemcore runs beside ours and the set-up below
    defer_openenv()
    import clemcore  # noqa: F401  # configures clemcore's logging (clembench.log), as clem does

    try:
        if replay is not None:
            replay.wait()  # it started beside the fork server's import of clemcore
        return _run(args)
    except ReplayError as exc:
        print(f"clemserve: run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before any episode started (while episodes run, _run handles it)
        print("interrupted before any episode started", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as exc:
        print(f"clemserve: run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except client.ClemserveError as exc:
        return report(exc)
    finally:
        summary = replay.stop() if replay is not None else ""
        if summary:
            print(summary)


def _replay_connection(args: argparse.Namespace, replay: ReplayServer) -> None:
    """Start the run's replay server (``replay``) and connect every worker to it, and to nothing else."""
    args.address, args.servers = replay.start(), []
    for flag, variable in _CONNECTION_VARIABLES[1:]:  # its own server: plain text on loopback, no token
        setattr(args, flag, None)
        os.environ.pop(variable, None)


def _run(args: argparse.Namespace) -> int:
    from clemcore.backends import Model
    from clemcore.clemgame import ResultsFolder, RunFileSaver

    import clemserve.client as client

    gen_args = {"temperature": args.temperature, "max_tokens": args.max_tokens}
    try:
        routes = route(args.models, args.servers) if getattr(args, "servers", None) else {}
        models = load_models(args.models, gen_args, routes)
    except NotServedError as exc:
        raise UsageError(str(exc)) from None
    except ValueError as exc:  # clemcore: no registry entry unifies, or no such backend
        if type(exc).__module__.startswith("clemserve"):
            raise
        raise UsageError(str(exc)) from None
    results = ResultsFolder(args.results_dir, run_dir=Model.to_identifier(models))
    run_dir = results.to_run_dir_path()
    games = select(args, results)
    config = WorkerConfig(args.models, gen_args, args.results_dir, {game.name: game.spec for game in games}, routes)
    try:
        budget = checked_budget(args.max_cost, models, args.allow_unpriced)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    stop_for: list[str] = []  # why a --max-cost cap stopped the run
    progress = Progress([episode for game in games for episode in game.episodes])
    failed: list[Outcome] = []
    spend = RunSpend(earlier_spend(run_dir / PROVENANCE))  # a resumed run adds to what it spent before
    pool = WorkerPool(config, min(args.jobs, max(1, progress.todo)), servers=servers_of(models))
    with _lock_removed(run_dir / LOCK), pool as workers:
        progress.watch(workers.calls)  # their tokens and the server's outages, on the progress line
        write_provenance(run_dir, models, spend)  # while the workers set up
        run_file = _RunFile(RunFileSaver(results, player_model_infos=Model.to_infos(models)))  # run.json
        benchmarks = _loaded(games, progress, failed)
        playable = [game for game in games if game.name in benchmarks]
        left = {game.name: sum(not episode.complete for episode in game.episodes) for game in playable}
        for game in playable:
            run_file.start(benchmarks[game.name], len(game.episodes))  # every episode, those played before too
            if not left[game.name]:
                run_file.end(benchmarks[game.name])

        def finished(outcome: Outcome) -> None:
            progress.calls = workers.calls_made()
            progress.finished(outcome)
            spend.add(outcome.episode.game, outcome.episode.experiment, outcome.spend)
            check_budget()
            if outcome.error is not None:
                failed.append(outcome)
            name = outcome.episode.game
            left[name] -= 1
            if not left[name]:
                run_file.end(benchmarks[name])

        def check_budget() -> None:
            if budget and not stop_for:
                stop_for.extend(budget.reached(spend.by_model(), args.allow_unpriced))
            if stop_for:
                workers.stop_starting()

        todo = [e for game in playable for e in game.episodes if not e.complete]
        check_budget()  # a resumed run may have spent its caps already
        try:
            not_started = workers.play(todo, finished, progress.show)
        except KeyboardInterrupt:
            progress.close()
            cancelled = workers.cancel()
            _record_spend(run_dir, spend)
            print(
                f"interrupted: {progress.done} episodes complete, {len(cancelled)} cancelled and removed; "
                "run the same command again to resume",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
    progress.close()
    try:  # again, now that the server has loaded the models: the dtype and device their engines really use
        write_provenance(run_dir, models, spend)
    except client.ClemserveError as exc:
        _record_spend(run_dir, spend)
        print(f"clemserve.json keeps what the server told at the start: {exc}", file=sys.stderr)
    print(progress.summary(run_dir))
    spent = spend.lines()
    if spent:
        print("spent (this run and its earlier parts, by model and game):\n" + "\n".join(spent))
    if failed:
        print("\n".join(failure_lines(failed)))
    if stop_for and not_started:  # a cap reached once every episode had started stops nothing
        lines = stopped_lines(budget, spend.by_model(), sys.argv[1:], len(not_started), args.allow_unpriced)
        print("\n".join(lines))
    code = EXIT_BUDGET if stop_for and not_started else EXIT_FAILED if failed else EXIT_OK
    if args.score:
        from .score import score

        try:
            scored = score(args.results_dir, run_dir, [game.spec for game in playable])
        except KeyboardInterrupt:
            print("scoring interrupted; the episodes are played: the same command scores them", file=sys.stderr)
            return EXIT_INTERRUPTED
        code = code if scored else EXIT_FAILED
    return code


def _loaded(games: Sequence[Game], progress: Progress, failed: list[Outcome]) -> dict[str, Any]:
    """Each game's benchmark, loaded and closed again (run.json needs its name and path; loading checks that
    the workers can load it). A game that cannot be loaded fails its episodes not complete before, with the
    cause and what to do, and is said at once; the other games are played."""
    benchmarks = {}
    for game in games:
        try:
            with load_game(game.spec) as benchmark:
                benchmarks[game.name] = benchmark
        except GameLoadError as exc:
            lost = [episode for episode in game.episodes if not episode.complete]
            progress.not_played(len(lost))
            failed.extend(Outcome(episode, str(exc)) for episode in lost)
            print(f"clemserve: run: {exc}: its {len(lost)} episodes are not played", file=sys.stderr)
    return benchmarks


def failure_lines(failed: Sequence[Outcome]) -> list[str]:
    """The failed episodes, each cause once: alone with its episode, or with its count and its episodes by
    experiment (twenty episodes refused for want of a key make one entry, not twenty)."""
    by_cause: dict[str, list[Episode]] = {}
    for outcome in failed:
        by_cause.setdefault(str(outcome.error), []).append(outcome.episode)
    lines = [f"{len(failed)} episodes failed (clembench.log has their tracebacks):"]
    for cause, episodes in by_cause.items():
        if len(episodes) == 1:
            lines.append(f"  {episodes[0]}: {cause}")
            continue
        lines.append(f"  {len(episodes)} episodes: {cause}")
        by_experiment: dict[str, list[str]] = {}
        for episode in episodes:
            by_experiment.setdefault(f"{episode.game}/{episode.experiment}", []).append(episode.folder.name)
        for experiment, instances in by_experiment.items():
            listed = textwrap.fill(", ".join(instances), width=110, initial_indent="      ", subsequent_indent="      ")
            lines.append(f"    {experiment} ({len(instances)}):\n{listed}")
    return lines


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


def write_provenance(run_dir: Path, models: Sequence[Any], spend: RunSpend | None = None) -> None:
    """``clemserve.json`` in the run folder: for each model the server played, where its answers came from; and
    what the run's calls spent, by model, game and experiment."""
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
        "spend": (spend or RunSpend()).to_json(),
    }
    _write_record(run_dir, record)


def _record_spend(run_dir: Path, spend: RunSpend) -> None:
    """The run's spend into clemserve.json, the rest of it kept (the run stopped before it could ask the server
    again)."""
    path = run_dir / PROVENANCE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    _write_record(run_dir, {**record, "spend": spend.to_json()})


def earlier_spend(path: Path) -> dict[str, Any]:
    """What an earlier part of the run spent, as its clemserve.json records it ({}: none recorded, or no earlier
    part); UsageError naming the file and field when the record is not what clemserve writes."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read what the earlier run spent: {exc}") from None
    spend = record.get("spend", {}) if isinstance(record, dict) else None
    try:
        RunSpend(spend)
    except (AttributeError, TypeError) as exc:
        raise UsageError(f"{path}: field spend.by_experiment is not what clemserve run writes: {exc}") from None
    return dict(spend or {})


def _write_record(run_dir: Path, record: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    partial = run_dir / f".{PROVENANCE}.partial"
    partial.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(partial, run_dir / PROVENANCE)


def _served(remote: Any) -> dict[str, Any]:
    """What the server tells of the model it plays (ResolveModel): its version, the resolved registry entry,
    the backend's library versions, the weights' revision, dtype and device."""
    from clemserve.v1 import clemserve_pb2 as pb
    from clemserve.v1 import clemserve_pb2_grpc as pb_grpc

    from .calls import model_metadata
    from .channel import channel_for
    from .convert import selector_to_proto, spec_from_proto

    stub = pb_grpc.ModelServiceStub(channel_for(remote.address, None))
    request = pb.ResolveModelRequest(model=selector_to_proto(remote.model_spec), describe=True)
    reply = stub.ResolveModel(request, timeout=30, metadata=model_metadata(request))
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
        # how the model reuses prompt prefixes it computed before ("": not loaded when asked)
        "prefix_caching": reply.prefix_caching,
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
