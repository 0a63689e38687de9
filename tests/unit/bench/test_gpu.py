"""bench.gpu's defaults per device and its report of each part (what make gpu-check reads while it runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import gpu


def test_a_cpu_run_is_tiny_and_a_gpu_run_measures_32_callers() -> None:
    cpu, cuda = gpu.resolve(gpu.parse([]), cuda=False), gpu.resolve(gpu.parse([]), cuda=True)
    assert (cpu.device, cpu.size, cpu.dtype, cpu.clients, cpu.max_tokens) == ("cpu", "tiny", "float32", "1,8", 8)
    assert (cuda.device, cuda.size, cuda.dtype, cuda.clients) == ("cuda", "0.5b", "bfloat16", "1,8,32")
    assert (cuda.max_tokens, cuda.calls, cuda.identity_dtypes) == (32, 2, "float32,bfloat16")
    assert gpu.resolve(gpu.parse(["--device", "cpu"]), cuda=True).size == "tiny"  # the CPU, asked for
    assert gpu.resolve(gpu.parse(["--clients", "2"]), cuda=False).clients == "2"  # asked for beats the default
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu.resolve(gpu.parse(["--device", "cuda"]), cuda=False)
    with pytest.raises(SystemExit):
        gpu.parse(["--only", "load,memory"])


def test_a_failing_part_reports_why_and_the_next_part_still_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    figures = tmp_path / "figures.jsonl"
    report = gpu.Report(figures)
    with report.part("load"):
        report.figures("load", "load 1.00 s", load_s=1.0)
        report.table("Load", ["a"], [[1]])
    with report.part("throughput", logs=lambda: "-- the end of batched/server-1.log: Traceback"):
        raise RuntimeError("server exited with 1\nthe log")
    assert "-- the end of batched/server-1.log: Traceback" in capsys.readouterr().out  # printed, the run's logs go
    with report.part("identity"):
        report.figures("identity", "float32 0 of 2")
    events = [json.loads(line) for line in figures.read_text().splitlines()]
    ends = {e["part"]: e for e in events if e["event"] == "end"}
    assert [e["part"] for e in events] == ["load", "load", "throughput", "identity", "identity"]
    assert ends["load"]["status"] == "passed" and ends["load"]["table"].startswith("### Load")
    assert (ends["throughput"]["status"], ends["throughput"]["reason"]) == (
        "failed",
        "RuntimeError: server exited with 1",
    )
    assert ends["identity"]["status"] == "passed"
    assert report.failed == ["throughput"]


def test_sizes_read_in_gib_or_mib() -> None:
    assert gpu.size_text(3 * 2**30) == "3.00 GiB"
    assert gpu.size_text(5 * 2**20) == "5.0 MiB"
