"""clemserve's per-call overhead: ``Generate`` on the ``echo`` model against a bare grpcio echo, in one run.

Both servers run in a process of their own, so every call crosses the same loopback socket and process
boundary; what is left between the two is clemserve's own work (the client's conversions, validation,
model lookup, scheduling, the echo backend and the answer's conversion back).

    python -m bench.overhead [--calls N] [--payload BYTES] [--server-args "--metrics-port 9464"]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from tests.serving import REPO, start_server

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_P50_RATIO = 1.5
WARMUP_CALLS = 100
BLOCKS = 4
RAW_METHOD = "/bench.Echo/Echo"
# the start of a typical game prompt, repeated to the requested length
TEXT = (
    "You are playing a word guessing game. Guess the five-letter word in as few turns as you can. "
    "After each guess you learn which letters are in the word and which are in the right place. "
)


# --- the bare grpcio server, run as a child process of this script ---------------------------------


async def _raw_echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _serve_raw() -> None:
    """A bytes-in/bytes-out echo on grpc.aio, the server stack clemserve itself runs on.

    aio rather than the sync server so that the ratio measures clemserve's code, not a difference
    between grpcio's two server implementations.
    """
    server = grpc.aio.server()
    # no serializers: the handler gets and returns the raw bytes
    handler = grpc.unary_unary_rpc_method_handler(_raw_echo)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(port, flush=True)  # the parent waits for this line: port bound and serving
    await stop.wait()
    await server.stop(0)


@contextmanager
def raw_server() -> Iterator[str]:
    """The bare echo server in a child process; yields its address."""
    command = [sys.executable, "-m", "bench.overhead", "--serve-raw"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = process.stdout.readline() if process.stdout else ""
        if not line.strip().isdigit():
            raise RuntimeError(f"raw echo server did not start (exit code {process.poll()})")
        yield f"127.0.0.1:{line.strip()}"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


# --- the real clemserve server ----------------------------------------------------------------------


@contextmanager
def clemserve_server(flags: list[str]) -> Iterator[str]:
    """``clemserve serve`` on a free loopback port with the packaged registry and ``flags``; stopped with SIGTERM.

    It runs in a fresh temporary directory so that no ./model_registry.json or ./key.json is picked up.
    """
    with tempfile.TemporaryDirectory(prefix="clemserve-bench-") as tmp:
        server = start_server(Path(tmp), *flags)
        try:
            yield server.address
        except BaseException:
            server.process.kill()
            print(server.log()[-4000:], file=sys.stderr)
            raise
        code = server.stop()
        print(f"clemserve stopped on SIGTERM with exit code {code}")
        if code != 0:
            print(server.log()[-4000:], file=sys.stderr)
            raise RuntimeError(f"clemserve exited with {code} on SIGTERM, expected 0")


# --- measuring --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    label: str
    latencies_ns: list[int]

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile in microseconds."""
        ordered = sorted(self.latencies_ns)
        rank = max(1, math.ceil(q / 100 * len(ordered)))
        return ordered[rank - 1] / 1e3

    @property
    def mean_us(self) -> float:
        return sum(self.latencies_ns) / len(self.latencies_ns) / 1e3

    @property
    def calls_per_s(self) -> float:
        # one call at a time, so throughput is the inverse of the mean latency
        return 1e9 * len(self.latencies_ns) / sum(self.latencies_ns)


Call = Callable[[], object]


def time_calls(call: Call, count: int) -> list[int]:
    latencies = []
    for _ in range(count):
        start = time.perf_counter_ns()
        call()
        latencies.append(time.perf_counter_ns() - start)
    return latencies


def game_messages(chars: int) -> list[dict[str, str]]:
    content = (TEXT * (chars // len(TEXT) + 1))[:chars]
    return [{"role": "user", "content": content}]


def measure(raw: Call, served: Call, calls: int) -> tuple[list[int], list[int]]:
    """Alternating blocks (raw first, then clemserve first, ...) so drift on the machine hits both alike."""
    raw_ns: list[int] = []
    served_ns: list[int] = []
    per_block = max(1, calls // BLOCKS)
    for block in range(BLOCKS):
        order = [(raw, raw_ns), (served, served_ns)]
        for call, latencies in order if block % 2 == 0 else reversed(order):
            gc.collect()  # collect between blocks, not in the middle of one
            latencies.extend(time_calls(call, per_block))
    return raw_ns, served_ns


# --- reporting --------------------------------------------------------------------------------------


def table(rows: list[Stats]) -> str:
    lines = [
        "| path | calls | p50 µs | p90 µs | p99 µs | mean µs | calls/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in rows:
        lines.append(
            f"| {s.label} | {len(s.latencies_ns)} | {s.percentile(50):.0f} | {s.percentile(90):.0f} "
            f"| {s.percentile(99):.0f} | {s.mean_us:.0f} | {s.calls_per_s:.0f} |"
        )
    return "\n".join(lines)


def verdict(raw: Stats, served: Stats) -> list[str]:
    p50 = served.percentile(50) / raw.percentile(50)
    p99 = served.percentile(99) / raw.percentile(99)
    holds = "holds" if p50 <= TARGET_P50_RATIO else "does NOT hold"
    return [
        f"p50 ratio clemserve/raw: {p50:.2f}x",
        f"p99 ratio clemserve/raw: {p99:.2f}x",
        f"target: clemserve p50 within {TARGET_P50_RATIO}x of raw grpcio: {holds}",
    ]


def plot_cdf(rows: list[Stats], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for s in rows:
        ordered = sorted(ns / 1e3 for ns in s.latencies_ns)
        ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=s.label)
    ax.set_xscale("log")
    ax.set_xlabel("latency per call (µs, log scale)")
    ax.set_ylabel("fraction of calls")
    ax.set_title("Unary call latency on loopback")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to bench/results/{path.name}")


def report(rows: list[Stats], setup: list[str]) -> None:
    body = table(rows)
    lines = verdict(*rows)
    print(body)
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    markdown = ["# clemserve overhead", "", *(f"- {s}" for s in setup), "", body, ""]
    markdown += [f"- {v}" for v in lines]
    (RESULTS / "overhead.md").write_text("\n".join(markdown) + "\n")
    print("table written to bench/results/overhead.md")
    plot_cdf(rows, RESULTS / "overhead.png")


# --- main -------------------------------------------------------------------------------------------


def run(calls: int, payload_chars: int, flags: list[str]) -> None:
    import clemserve.client as backends

    messages = game_messages(payload_chars)
    with clemserve_server(flags) as address, raw_server() as raw_address:
        backends.connect(address)
        model = backends.get_model_for("echo")
        # the raw call carries exactly the bytes clemserve's client sends for this Generate
        payload = model._request(messages).SerializeToString()
        with grpc.insecure_channel(raw_address) as channel:
            raw_call = channel.unary_unary(RAW_METHOD)
            assert raw_call(payload) == payload
            assert model.generate_response(messages)[2] == messages[-1]["content"]

            def raw() -> object:
                return raw_call(payload)

            def served() -> object:
                return model.generate_response(messages)

            time_calls(raw, WARMUP_CALLS)
            time_calls(served, WARMUP_CALLS)
            raw_ns, served_ns = measure(raw, served, calls)
    setup = [
        f"{len(raw_ns)} timed calls each after {WARMUP_CALLS} warm-up calls, "
        f"in {BLOCKS} alternating blocks of {len(raw_ns) // BLOCKS}",
        f"request: one user message of {len(messages[-1]['content'])} characters, {len(payload)} bytes on the wire",
        f"one call at a time, sync clients, each server in its own process, {os.cpu_count()} CPUs",
        f"clemserve flags: {shlex.join(flags) or 'none'}",
    ]
    print("\n".join(setup))
    rows = [Stats("raw grpcio unary echo", raw_ns), Stats("clemserve Generate (echo model)", served_ns)]
    report(rows, setup)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per path (default 2000)")
    parser.add_argument("--payload", type=int, default=512, help="message size in bytes (ASCII text; default 512)")
    parser.add_argument("--server-args", default="", help="extra clemserve serve flags, e.g. '--metrics-port 9464'")
    parser.add_argument("--serve-raw", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_raw:
        asyncio.run(_serve_raw())
        return 0
    if args.calls < BLOCKS or args.payload < 1:
        parser.error(f"--calls must be at least {BLOCKS} and --payload at least 1")
    run(args.calls, args.payload, shlex.split(args.server_args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
