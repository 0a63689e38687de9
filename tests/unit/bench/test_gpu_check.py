"""make gpu-check's parts, time limits and summary (bench.gpu_check), with stand-in commands for pytest and the
benchmark: a part that runs over is cut with every process it started, the next part's clock starts when the
part before it ends, and the summary says what each part found."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from bench import gpu_check
from bench.gpu_check import PartResult, Watched


def test_parts_run_in_their_order_and_groups_name_the_default_run() -> None:
    assert gpu_check.parse_parts("identity,tests") == ["tests", "identity"]
    assert gpu_check.parse_parts("all") == ["tests", "load", "throughput", "identity"]
    assert gpu_check.parse_parts("bench,nice") == ["load", "throughput", "identity", "nice"]
    with pytest.raises(ValueError, match="unknown part 'memory'"):
        gpu_check.parse_parts("tests,memory")
    with pytest.raises(ValueError, match="PART=SECONDS"):
        gpu_check.parse_limits(["load"])
    assert gpu_check.parse_limits(["load=5"])["load"] == 5


def test_the_default_parts_limits_fit_the_deadline() -> None:
    """One part that hangs until its limit leaves every other part its own limit."""
    assert sum(gpu_check.LIMITS[p] for p in gpu_check.GROUPS["all"]) <= gpu_check.DEADLINE


def _stand_in(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "stand_in.py"
    script.write_text("import json, subprocess, sys, time\n" + body)
    return [sys.executable, str(script)]


def test_a_part_past_its_limit_is_cut_with_its_children(tmp_path: Path) -> None:
    progress, pid_file = tmp_path / "progress.jsonl", tmp_path / "child.pid"
    # a part that starts a server-like child, then hangs
    command = _stand_in(
        tmp_path,
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('working', flush=True)\ntime.sleep(60)\n",
    )
    started = time.monotonic()
    watched = gpu_check.watch(command, {}, progress, ["load"], {"load": 1.0}, time.monotonic() + 30)
    assert time.monotonic() - started < 10
    assert watched.returncode is None and watched.part == "load" and watched.tail == ["working"]
    assert gpu_check.cut_reason(watched, {"load": 1.0}) == "cut at its limit of 1 s"
    child = int(pid_file.read_text())
    gone = not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    assert gone, "the part's child outlived the cut"


def test_each_parts_clock_starts_when_the_part_before_it_ends(tmp_path: Path) -> None:
    progress = tmp_path / "progress.jsonl"
    # load takes 1 s (under its limit of 4), throughput then hangs: cut in throughput, after its 1 s
    end = json.dumps({"part": "load", "event": "end", "status": "passed", "reason": "", "seconds": 1.0, "table": ""})
    command = _stand_in(
        tmp_path, f"time.sleep(1)\nopen({str(progress)!r}, 'a').write({end!r} + '\\n')\ntime.sleep(60)\n"
    )
    limits = {"load": 4.0, "throughput": 1.0}
    watched = gpu_check.watch(command, {}, progress, ["load", "throughput"], limits, time.monotonic() + 30)
    assert watched.returncode is None and watched.part == "throughput"
    assert 1.0 <= watched.seconds < 2.0


def test_the_deadline_cuts_a_part_inside_its_limit(tmp_path: Path) -> None:
    watched = gpu_check.watch(
        _stand_in(tmp_path, "time.sleep(60)\n"),
        {},
        tmp_path / "p",
        ["identity"],
        {"identity": 60},
        time.monotonic() + 1,
    )
    assert watched.returncode is None
    assert gpu_check.cut_reason(watched, {"identity": 60}) == "cut at the deadline"


def test_after_a_cut_the_rest_of_the_benchmark_runs_in_a_new_process(tmp_path: Path) -> None:
    # a stand-in for bench.gpu: each part ends at once, but throughput hangs
    command = _stand_in(
        tmp_path,
        "arg = lambda name: sys.argv[sys.argv.index(name) + 1]\n"
        "parts, figures = arg('--only').split(','), arg('--figures')\n"
        "for part in parts:\n"
        "    if part == 'throughput':\n"
        "        time.sleep(60)\n"
        "    end = {'part': part, 'event': 'end', 'status': 'passed', 'reason': '', 'seconds': 0.1, 'table': part}\n"
        "    open(figures, 'a').write(json.dumps(end) + '\\n')\n",
    )
    limits = {"load": 10.0, "throughput": 1.0, "identity": 10.0}
    found = gpu_check.run_bench(
        command, {}, tmp_path, ["load", "throughput", "identity"], limits, time.monotonic() + 30
    )
    assert {part: r.status for part, r in found.items()} == {
        "load": "passed",
        "throughput": "cut",
        "identity": "passed",
    }
    assert found["identity"].table == "identity"
    assert sorted(path.name for path in tmp_path.glob("bench-*.jsonl")) == ["bench-0.jsonl", "bench-1.jsonl"]


def _tests_events(*outcomes: tuple[str, str, str]) -> list[dict[str, Any]]:
    return [{"part": "tests", "event": "test", "test": t, "outcome": o, "reason": r} for t, o, r in outcomes]


def test_the_tests_part_says_skipped_with_the_reason_failed_with_the_names_or_cut() -> None:
    ran = Watched(0, "tests", 3.0, [])
    no_cuda = "GPU test: no CUDA device"
    skipped = gpu_check.tests_result(
        _tests_events(("a::t1", "skipped", no_cuda), ("a::t2", "skipped", no_cuda)), ran, {}
    )
    assert (skipped.status, skipped.said) == ("skipped", f"{no_cuda} (2 skipped)")
    # a test whose teardown fails after it passed counts as an error
    events = _tests_events(("a::t1", "passed", ""), ("a::t2", "passed", ""), ("a::t2", "error", "boom"))
    failed = gpu_check.tests_result(events, Watched(1, "tests", 3.0, []), {})
    assert (failed.status, failed.said) == ("failed", "1 passed, 1 error; failed: t2")
    cut = gpu_check.tests_result(_tests_events(("a::t1", "passed", "")), Watched(None, "tests", 9.0, []), {"tests": 8})
    assert (cut.status, cut.said) == ("cut", "cut at its limit of 8 s: 1 passed")
    broken = gpu_check.tests_result([], Watched(4, "tests", 1.0, ["ERROR: usage"]), {})
    assert (broken.status, broken.said) == ("failed", "pytest exit 4: ERROR: usage")


def test_the_pytest_plugin_reports_each_outcome(tmp_path: Path) -> None:
    """Run through pytest itself, as make gpu-check runs it."""
    import subprocess

    tests = tmp_path / "test_some.py"
    tests.write_text(
        "import pytest\n"
        "def test_passes(): pass\n"
        "def test_fails(): assert 1 == 2\n"
        "@pytest.mark.skip(reason='no CUDA here')\n"
        "def test_skipped(): pass\n"
    )
    progress = tmp_path / "progress.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "bench.gpu_check", f"--gpu-check-progress={progress}",
         "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tests)],
        capture_output=True, text=True, cwd=Path(gpu_check.__file__).parent.parent,
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    found = {e["test"].rpartition("::")[2]: (e["outcome"], e["reason"]) for e in gpu_check.read_events(progress)}
    assert found["test_passes"] == ("passed", "")
    assert found["test_fails"][0] == "failed" and "assert 1 == 2" in found["test_fails"][1]
    assert found["test_skipped"] == ("skipped", "no CUDA here")


def test_a_cut_bench_part_keeps_its_figures_and_a_crash_fails_the_part_it_was_in() -> None:
    events = [
        {"part": "load", "event": "figures", "summary": "load 1.00 s", "values": {}},
        {"part": "load", "event": "end", "status": "passed", "reason": "", "seconds": 2.0, "table": "### Load"},
        {"part": "throughput", "event": "figures", "summary": "1: 5 vs 4 (1.25x)", "values": {}},
    ]
    todo = ["load", "throughput", "identity"]
    found = gpu_check.bench_results(events, todo, Watched(None, "throughput", 121.0, []), {"throughput": 120})
    assert found["load"] == PartResult("load", "passed", 2.0, "load 1.00 s", "### Load")
    assert found["throughput"].status == "cut"
    assert found["throughput"].said == "cut at its limit of 120 s; so far: 1: 5 vs 4 (1.25x)"
    assert "identity" not in found  # left for the next run of the benchmark
    crashed = gpu_check.bench_results(events[:2], todo, Watched(-9, "throughput", 3.0, ["Killed"]), {})
    assert crashed["throughput"].status == "failed" and "exited with -9 in it: Killed" in crashed["throughput"].said


def test_the_summary_has_a_row_per_part_and_keeps_the_table_whole() -> None:
    text = gpu_check.summary_table(
        [PartResult("tests", "skipped", 1.25, "no CUDA | none"), PartResult("load", "passed", 3.0, "load 1 s")],
        "## make gpu-check on the CPU",
        "- note",
    )
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["| tests | skipped | 1.2 | no CUDA \\| none |", "| load | passed | 3.0 | load 1 s |"]
