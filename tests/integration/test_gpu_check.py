"""``make gpu-check`` itself, run here on the CPU so that it cannot rot between loans of a GPU machine: the
same script, the tiny model, tiny counts; the GPU tests skipped with their reason, the benchmark's parts with
their figures, the summary table on stdout, in the results folder and in ``$OUT``, and a part run alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serving import REPO

#: the time limits are a GPU's: on two busy cores a part may take longer than there, which is not the point here
ROOMY = [f"--limit={part}=240" for part in ("tests", "load", "throughput", "identity")]
#: the fewest calls that still fill every row: two numbers of callers, one call each, four tokens
TINY = ["--", "--clients", "1,2", "--calls", "1", "--max-tokens", "4", "--identity-rows", "2"]


def gpu_check(tmp: Path, *args: str, make: bool = False) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    results, out = tmp / "results", tmp / "out"
    env = {
        **os.environ,
        "PYTHON": sys.executable,  # this environment has every package: no wheels needed
        "CUDA_VISIBLE_DEVICES": "",  # the CPU, even on a machine with a GPU
        "GPU_CHECK_WORK": str(tmp.parent / "work"),  # shared by the runs here: the tiny model is built once
        "GPU_WHEELS": str(tmp / "no-wheels"),
        "OUT": str(out),
    }
    if make:
        env["GPU_PYTHON"] = sys.executable
        command = ["make", "--no-print-directory", "gpu-check", *args, f"GPU_CHECK_ARGS=--results {results}"]
    else:
        command = ["bench/gpu_check.sh", "--results", str(results), *args]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return run, results, out


def rows(summary: str) -> dict[str, list[str]]:
    """The summary table's rows by part: [status, seconds, key figures]."""
    found = {}
    for line in summary.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] not in ("part", "---"):
            found[cells[0]] = cells[1:]
    return found


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    return gpu_check(tmp_path_factory.mktemp("all"), "all", *ROOMY, *TINY)


def test_on_the_cpu_the_gpu_tests_are_skipped_with_the_reason_and_the_benchmark_gives_figures(
    whole_run: tuple[subprocess.CompletedProcess[str], Path, Path],
) -> None:
    run, results, _ = whole_run
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-4000:]
    summary = (results / "gpu-summary.md").read_text()
    found = rows(summary)
    assert list(found) == ["tests", "load", "throughput", "identity"], summary
    status, _, said = found["tests"]
    assert status == "skipped" and "no CUDA device" in said and "skipped)" in said, summary
    assert [found[part][0] for part in ("load", "throughput", "identity")] == ["passed"] * 3, summary
    assert "load " in found["load"][2] and " vs measured " in found["load"][2], summary
    assert "1: " in found["throughput"][2] and "2: " in found["throughput"][2] and "x)" in found["throughput"][2]
    assert "float32 " in found["identity"][2] and "bfloat16 " in found["identity"][2], summary
    assert all(float(seconds) > 0 for _, seconds, _ in found.values()), summary
    assert summary.startswith("## make gpu-check on the CPU (no CUDA device)"), summary


def test_the_summary_is_printed_and_copied_into_out_with_the_parts_tables(
    whole_run: tuple[subprocess.CompletedProcess[str], Path, Path],
) -> None:
    run, results, out = whole_run
    summary = (out / "gpu-summary.md").read_text()
    assert summary == (results / "gpu-summary.md").read_text()
    assert summary.strip() in run.stdout
    details = (out / "gpu-cpu.md").read_text()
    assert details.startswith(summary.strip())
    for table in ("### Load and memory", "### Throughput", "### Greedy replies merged"):
        assert table in details


def test_a_part_named_alone_runs_alone(tmp_path: Path) -> None:
    """Through the Makefile, as a loan runs it: make gpu-check PARTS=tests."""
    run, results, out = gpu_check(tmp_path, "PARTS=tests", make=True)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-4000:]
    assert list(rows((results / "gpu-summary.md").read_text())) == ["tests"]
    assert "== gpu-check: bench" not in run.stdout  # the benchmark did not start
    assert (out / "gpu-summary.md").is_file()
