"""``make gpu-check`` within one short loan of a GPU machine: the GPU tests, then the GPU benchmark's parts, each
part within a time limit and all of them within one deadline, and one summary table at the end.

    python -m bench.gpu_check [PARTS] [--deadline S] [--limit PART=S ...] [--results DIR] [-- bench.gpu args]

``bench/gpu_check.sh`` runs it once the environment is ready. PARTS is a comma-separated list of ``tests``
(tests/gpu, marker gpu), ``load`` (load time, memory estimated vs measured), ``throughput`` (batched vs
unbatched at 1, 8 and 32 callers), ``identity`` (merged vs alone per dtype) and ``nice`` (--compute-nice);
``all``, the default, is every part but nice, ``bench`` the benchmark's parts of all.

A part that runs past its limit (``LIMITS``), or past the deadline, is cut: its processes are killed, it is
reported with what it had measured, and the next part still runs; a part the deadline leaves no time is
reported as skipped. The default parts' limits add up to the deadline, so one part that hangs costs only its
own time. Where torch sees no CUDA device, the tests are skipped with pytest's reason and the benchmark runs
tiny on the CPU.

The summary goes to stdout, to ``docs/bench/gpu-summary.md`` and, with each part's tables, to
``docs/bench/gpu-<device>.md`` (``--results``: another folder), both copied into ``$OUT`` when it is set. The
exit status is 0 when no part failed or was cut.

Loaded into pytest with ``-p bench.gpu_check``, this module also reports each test's outcome as it comes
(``--gpu-check-progress FILE``), so that tests cut at the limit are still counted.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.plots import RESULTS, conditions

PARTS = ("tests", "load", "throughput", "identity", "nice")
GROUPS = {"all": ("tests", "load", "throughput", "identity"), "bench": ("load", "throughput", "identity")}
#: seconds per part: estimates for the defaults on one H100, with room (the summary's seconds show how much);
#: load's includes the benchmark's start and, unless the tests built it, the model's build
LIMITS = {"tests": 165, "load": 60, "throughput": 120, "identity": 75, "nice": 120}
#: seconds for every part, from the start of bench/gpu_check.sh: with its few seconds of set-up and the
#: summary, the default run ends within 8 minutes
DEADLINE = 420
#: seconds per test (pytest-timeout)
TEST_TIMEOUT = 90
WORST_FIRST = ("error", "failed", "skipped", "passed")


@dataclass
class PartResult:
    part: str
    #: passed, failed, skipped or cut
    status: str
    seconds: float
    #: the key figures, or why it failed, was cut or was skipped
    said: str
    table: str = ""


def parse_parts(text: str) -> list[str]:
    """``tests,load`` -> those parts in their running order; ``all`` and ``bench`` name groups."""
    asked: set[str] = set()
    for word in filter(None, text.replace(" ", "").split(",")):
        if word not in PARTS and word not in GROUPS:
            raise ValueError(f"unknown part {word!r}: choose from {', '.join(PARTS)}, or all, bench")
        asked.update(GROUPS.get(word, (word,)))
    if not asked:
        raise ValueError("no part named")
    return [part for part in PARTS if part in asked]


def parse_limits(pairs: Sequence[str]) -> dict[str, float]:
    limits: dict[str, float] = dict(LIMITS)
    for pair in pairs:
        part, _, seconds = pair.partition("=")
        if part not in PARTS or not seconds:
            raise ValueError(f"--limit {pair!r}: expected PART=SECONDS with PART one of {', '.join(PARTS)}")
        limits[part] = float(seconds)
    return limits


def device_event(torch: Any) -> dict[str, str]:
    """What the tests or the benchmark ran on (they import torch; this process does not, to start sooner)."""
    import importlib.metadata

    cuda = torch.cuda.is_available()
    return {
        "event": "device",
        "device": "cuda" if cuda else "cpu",
        "name": torch.cuda.get_device_name(0) if cuda else "the CPU (no CUDA device)",
        "versions": f"torch {torch.__version__}, transformers {importlib.metadata.version('transformers')}",
    }


def read_events(path: Path) -> list[dict[str, Any]]:
    """The JSON lines written so far (a line being written when its writer was killed is left out)."""
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            events.append(json.loads(line))
    return events


@dataclass
class Watched:
    #: None where the run was cut
    returncode: int | None
    #: the part it ran last (cut, or the one it failed in) and that part's seconds
    part: str
    seconds: float
    tail: list[str]


def watch(command: Sequence[str], env: dict[str, str], progress: Path, parts: Sequence[str],
          limits: dict[str, float], deadline: float) -> Watched:  # fmt: skip
    """Run ``command`` in a process group of its own, its output passed through, and kill the whole group
    (servers and helpers included) when the part it runs now passes its limit or the deadline passes.

    ``parts``: what it runs, in order; a part's clock starts when the part before it reports its end in
    ``progress`` (the first's at the start), so imports and the model's build count to the part that waits
    for them.
    """
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    tail: collections.deque[str] = collections.deque(maxlen=20)

    def relay() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode(errors="replace")
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.rstrip())

    relaying = threading.Thread(target=relay, daemon=True)
    relaying.start()
    since, ended = time.monotonic(), 0
    current = parts[0]
    while process.poll() is None:
        done = {e["part"] for e in read_events(progress) if e.get("event") == "end"}
        now = time.monotonic()
        if len(done) > ended:
            ended, since = len(done), now
        current = next((p for p in parts if p not in done), parts[-1])
        if now - since > limits[current] or now > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            relaying.join(timeout=5)
            return Watched(None, current, now - since, list(tail))
        time.sleep(0.2)
    relaying.join(timeout=5)
    return Watched(process.returncode, current, time.monotonic() - since, list(tail))


def cut_reason(watched: Watched, limits: dict[str, float]) -> str:
    over = watched.seconds > limits[watched.part]
    return f"cut at its limit of {limits[watched.part]:.0f} s" if over else "cut at the deadline"


# -- the tests -------------------------------------------------------------------------------------------


def failure(report: Any) -> str:
    """A failed test's or collection's message in one line: the exception's, else the report's last line."""
    crash = getattr(report.longrepr, "reprcrash", None)
    lines = (getattr(crash, "message", "") or report.longreprtext).strip().splitlines()
    return (lines[0] if crash is not None else lines[-1]) if lines else ""


class TestProgress:
    """A pytest plugin: each test's outcome, appended to a file as it comes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _write(self, test: str, outcome: str, reason: str) -> None:
        with open(self.path, "a") as out:
            out.write(json.dumps({"part": "tests", "event": "test", "test": test, "outcome": outcome,
                                  "reason": reason}) + "\n")  # fmt: skip

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.passed and report.when != "call":
            return
        outcome = "error" if report.failed and report.when != "call" else report.outcome
        reason = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        elif report.failed:
            reason = failure(report)
        self._write(report.nodeid, outcome, reason)

    def pytest_sessionfinish(self) -> None:
        if torch := sys.modules.get("torch"):  # the GPU tests' conftest imported it to decide
            with open(self.path, "a") as out:
                out.write(json.dumps(device_event(torch)) + "\n")

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            self._write(report.nodeid or "collection", "error", failure(report))


def pytest_addoption(parser: Any) -> None:
    parser.addoption("--gpu-check-progress", default=None, help="append each test's outcome to this file")


def pytest_configure(config: Any) -> None:
    if path := config.getoption("gpu_check_progress"):
        config.pluginmanager.register(TestProgress(Path(path)), "gpu-check-progress")


def tests_result(events: Sequence[dict[str, Any]], watched: Watched, limits: dict[str, float]) -> PartResult:
    outcomes: dict[str, tuple[str, str]] = {}
    for event in events:
        if event.get("event") == "test":
            seen = outcomes.get(event["test"])
            if seen is None or WORST_FIRST.index(event["outcome"]) < WORST_FIRST.index(seen[0]):
                outcomes[event["test"]] = (event["outcome"], event["reason"])
    counts = collections.Counter(outcome for outcome, _ in outcomes.values())
    said = ", ".join(f"{counts[o]} {o}" for o in reversed(WORST_FIRST) if counts[o]) or "no test finished"
    failing = [test.rpartition("::")[2] for test, (o, _) in outcomes.items() if o in ("failed", "error")]
    skips = sorted({reason for o, reason in outcomes.values() if o == "skipped"})
    if watched.returncode is None:
        return PartResult("tests", "cut", watched.seconds, f"{cut_reason(watched, limits)}: {said}")
    if failing:
        return PartResult("tests", "failed", watched.seconds, f"{said}; failed: {', '.join(failing)}")
    if watched.returncode not in (0, 5):
        last = watched.tail[-1] if watched.tail else ""
        return PartResult("tests", "failed", watched.seconds, f"pytest exit {watched.returncode}: {last}")
    if not counts["passed"]:
        return PartResult("tests", "skipped", watched.seconds, f"{'; '.join(skips) or 'no GPU test'} ({said})")
    return PartResult("tests", "passed", watched.seconds, said + (f"; skipped: {'; '.join(skips)}" if skips else ""))


def run_tests(python: str, env: dict[str, str], folder: Path, limits: dict[str, float], deadline: float) -> PartResult:
    progress = folder / "tests.jsonl"
    command = [python, "-m", "pytest", "-q", "-ra", "-m", "gpu", "-p", "no:cacheprovider", "-p", "bench.gpu_check",
               f"--gpu-check-progress={progress}", f"--timeout={TEST_TIMEOUT}", "tests/gpu"]  # fmt: skip
    print(f"== gpu-check: tests ({' '.join(command[1:])})", flush=True)
    watched = watch(command, env, progress, ["tests"], limits, deadline)
    return tests_result(read_events(progress), watched, limits)


# -- the benchmark ---------------------------------------------------------------------------------------


def bench_results(
    events: Sequence[dict[str, Any]], todo: Sequence[str], watched: Watched, limits: dict[str, float]
) -> dict[str, PartResult]:
    """What one run of bench.gpu reported: every part that ended, and the part it was cut in or died in."""
    results, summaries = {}, {}
    for event in events:
        part = event.get("part", "")
        if event["event"] == "figures":
            summaries[part] = event["summary"]
        elif event["event"] == "end":
            said = event["reason"] if event["status"] != "passed" else summaries.get(part, "")
            results[part] = PartResult(part, event["status"], event["seconds"], said, event["table"])
    part = watched.part
    if part in todo and part not in results:
        so_far = f"; so far: {summaries[part]}" if part in summaries else ""
        if watched.returncode is None:
            results[part] = PartResult(part, "cut", watched.seconds, cut_reason(watched, limits) + so_far)
        else:
            last = watched.tail[-1] if watched.tail else ""
            reason = f"bench.gpu exited with {watched.returncode} in it: {last}" + so_far
            results[part] = PartResult(part, "failed", watched.seconds, reason)
    return results


def run_bench(bench: Sequence[str], env: dict[str, str], folder: Path, parts: Sequence[str],
              limits: dict[str, float], deadline: float) -> dict[str, PartResult]:  # fmt: skip
    """The benchmark's parts in one process (``bench``: ``python -m bench.gpu ARGS``); after a part is cut (or
    kills it), the rest in a new one."""
    results: dict[str, PartResult] = {}
    todo = list(parts)
    for attempt in range(len(parts)):
        if not todo or time.monotonic() >= deadline:
            break
        progress = folder / f"bench-{attempt}.jsonl"
        command = [*bench, "--only", ",".join(todo), "--figures", str(progress)]
        print(f"== gpu-check: bench ({' '.join(command[1:])})", flush=True)
        watched = watch(command, env, progress, todo, limits, deadline)
        results.update(bench_results(read_events(progress), todo, watched, limits))
        todo = [part for part in todo if part not in results]
    return results


# -- the summary -----------------------------------------------------------------------------------------


def summary_table(results: Sequence[PartResult], heading: str, note: str) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [heading, "", "| part | status | seconds | key figures, or why |", "|---|---|---|---|"]
    lines += [f"| {r.part} | {r.status} | {r.seconds:.1f} | {cell(r.said)} |" for r in results]
    return "\n".join([*lines, "", note])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="?", default="all", help=f"of {', '.join(PARTS)}; all (default), bench")
    parser.add_argument("--deadline", type=float, default=DEADLINE, help="seconds for every part, from --since")
    parser.add_argument("--since", type=float, default=None, help="when the check began (epoch s; default: now)")
    parser.add_argument("--limit", action="append", default=[], metavar="PART=S", help="a part's time limit")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the pages go (default docs/bench)")
    parser.add_argument("--models", type=Path, default=None, help="where built models are kept (default: temporary)")
    args = parser.parse_args(argv)
    try:
        parts, limits = parse_parts(args.parts), parse_limits(args.limit)
    except ValueError as exc:
        parser.error(str(exc))
    began = time.time() if args.since is None else args.since
    deadline = time.monotonic() + args.deadline - (time.time() - began)
    python = sys.executable
    results: list[PartResult] = []
    with tempfile.TemporaryDirectory(prefix="clemserve-gpu-check-") as tmp:
        folder = Path(tmp)
        models = args.models or folder / "models"
        env = {**os.environ, "CLEMSERVE_GPU_MODELS": str(models)}
        if "tests" in parts and time.monotonic() < deadline:
            results.append(run_tests(python, env, folder, limits, deadline))
        bench_parts = [part for part in parts if part != "tests"]
        if bench_parts:
            bench = [python, "-m", "bench.gpu", "--models", str(models), *bench_args]
            found = run_bench(bench, env, folder, bench_parts, limits, deadline)
            results += [found[part] for part in bench_parts if part in found]
        seen = [e for path in sorted(folder.glob("*.jsonl")) for e in read_events(path) if e["event"] == "device"]
    device = seen[0] if seen else {"device": "unknown", "name": "a device not reported", "versions": ""}
    late = [part for part in parts if part not in {r.part for r in results}]
    results += [PartResult(part, "skipped", 0.0, f"the deadline ({args.deadline:.0f} s) had passed") for part in late]
    results.sort(key=lambda r: parts.index(r.part))
    bad = [r.part for r in results if r.status in ("failed", "cut")]
    took = time.time() - began
    verdict = f"FAILED: {', '.join(bad)}" if bad else "every part that ran passed"
    summary = summary_table(
        results,
        f"## make gpu-check on {device['name']}",
        f"- {verdict}; {took:.0f} s in all (deadline {args.deadline:.0f} s); parts: {', '.join(parts)}\n"
        f"- {device['versions']}\n{conditions()}",
    )
    print("\n" + summary, flush=True)
    write_pages(args.results, device["device"], summary, results)
    return 1 if bad else 0


def write_pages(results_dir: Path, kind: str, summary: str, results: Sequence[PartResult]) -> None:
    """The summary page and the page with every part's tables, in ``results_dir`` and in ``$OUT`` when set."""
    results_dir.mkdir(parents=True, exist_ok=True)
    pages = {
        "gpu-summary.md": summary + "\n",
        f"gpu-{kind}.md": "\n\n".join([summary, *(r.table for r in results if r.table)]) + "\n",
    }
    out = os.environ.get("OUT", "")
    for name, text in pages.items():
        (results_dir / name).write_text(text)
        print(f"written: {results_dir / name}")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            shutil.copy(results_dir / name, Path(out) / name)


if __name__ == "__main__":
    sys.exit(main())
