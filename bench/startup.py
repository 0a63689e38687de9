"""clemserve's start-up time: from launching ``clemserve serve`` to SERVING on the health service.

Measured against the target of 2 s and against ``python -c "import grpc"`` in the same run, the floor that
any grpcio server pays. The server must not import torch to get there (heavy imports wait until a backend
loads), so the script also reads the server's memory map for libtorch.

    python -m bench.startup [--runs N]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.plots import write_table
from tests.serving import free_port

TARGET_S = 2.0
TIMEOUT_S = 60.0
# grpcio's default reconnect backoff (1 s and up) would add itself to the measurement after the first
# refused connection; retry every few milliseconds instead
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 5),
    ("grpc.min_reconnect_backoff_ms", 5),
    ("grpc.max_reconnect_backoff_ms", 20),
]


@dataclass(frozen=True)
class Run:
    seconds: float
    torch_loaded: bool | None
    exit_code: int


def serve_command() -> list[str]:
    """The installed ``clemserve`` command when there is one, as a user runs it; else the module."""
    script = Path(sys.executable).with_name("clemserve")
    if script.exists():
        return [str(script), "serve"]
    return [sys.executable, "-m", "clemserve.service.cli", "serve"]


def torch_loaded(pid: int) -> bool | None:
    """Whether libtorch is mapped into the process; None where /proc cannot tell."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None


def wait_serving(stub: health_pb2_grpc.HealthStub, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    request = health_pb2.HealthCheckRequest(service="")
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"clemserve exited with {process.returncode} before SERVING")
        try:
            if stub.Check(request, timeout=0.5).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.005)
    raise TimeoutError(f"clemserve not SERVING after {TIMEOUT_S} s")


def echo_roundtrip(address: str) -> None:
    """One Generate on the echo model, to check that serving it does not pull torch in either."""
    import clemserve.client as backends

    model = backends.get_model_for("echo", address=address)
    model.generate_response([{"role": "user", "content": "ping"}])


def start_once(tmp: Path, *, then_echo: bool = False) -> Run:
    """One start in a fresh directory: packaged registry only, empty cache."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    command = [*serve_command(), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--cache-dir", str(tmp / "cache")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # the channel exists before the clock starts: the client's own set-up is not the server's start-up
    log_path = tmp / "server.log"
    with grpc.insecure_channel(address, options=FAST_RECONNECT) as channel, open(log_path, "wb") as log:
        stub = health_pb2_grpc.HealthStub(channel)
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp, env=env)
        try:
            wait_serving(stub, process)
            seconds = time.perf_counter() - start
            if then_echo:
                echo_roundtrip(address)
            torch = torch_loaded(process.pid)
        except BaseException:
            process.kill()
            process.wait()
            print(log_path.read_text(errors="replace")[-4000:], file=sys.stderr)
            raise
        process.send_signal(signal.SIGTERM)
        return Run(seconds, torch, process.wait(timeout=60))


def time_python(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


def yes_no(flag: bool | None) -> str:
    return "unknown" if flag is None else ("yes" if flag else "no")


def summary(label: str, seconds: list[float]) -> str:
    return f"| {label} | {len(seconds)} | {min(seconds):.3f} | {statistics.median(seconds):.3f} | {max(seconds):.3f} |"


def report(runs: list[Run], import_grpc: list[float], bare_python: list[float]) -> None:
    starts = [r.seconds for r in runs]
    median = statistics.median(starts)
    ratio = median / statistics.median(import_grpc)
    body = "\n".join(
        [
            "| what | runs | min s | median s | max s |",
            "|---|---:|---:|---:|---:|",
            summary("`clemserve serve` to SERVING", starts),
            summary('`python -c "import grpc"`', import_grpc),
            summary('`python -c "pass"`', bare_python),
        ]
    )
    holds = "holds" if median <= TARGET_S else "does NOT hold"
    notes = [
        f"median start-up / median `import grpc`: {ratio:.1f}x",
        f"target: SERVING within {TARGET_S:.0f} s (median): {holds}",
        f"torch loaded by the server after SERVING: {yes_no(any_flag(r.torch_loaded for r in runs[:-1]))}",
        f"torch loaded after an echo Generate (last run): {yes_no(runs[-1].torch_loaded)}",
        f"exit codes on SIGTERM: {', '.join(str(r.exit_code) for r in runs)}",
    ]
    print(body)
    print("\n".join(notes))
    text = ["# clemserve start-up", "", body, "", *(f"- {n}" for n in notes)]
    write_table("startup.md", "\n".join(text) + "\n")


def any_flag(flags: Iterable[bool | None]) -> bool | None:
    """True if any run saw torch; None if /proc could not tell for any of them."""
    values = list(flags)
    if any(v is None for v in values):
        return None
    return any(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="server starts to time (default 5)")
    args = parser.parse_args()
    if args.runs < 2:
        parser.error("--runs must be at least 2 (the last one also checks an echo Generate)")
    runs: list[Run] = []
    import_grpc: list[float] = []
    bare_python: list[float] = []
    # interleaved, so that the baselines see the same state of the machine as the server starts
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="clemserve-startup-") as tmp:
            runs.append(start_once(Path(tmp), then_echo=i == args.runs - 1))
        import_grpc.append(time_python("import grpc"))
        bare_python.append(time_python("pass"))
        print(f"run {i + 1}: SERVING after {runs[-1].seconds:.3f} s, exit code {runs[-1].exit_code}")
    report(runs, import_grpc, bare_python)
    return 0 if all(r.exit_code == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
