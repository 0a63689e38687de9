"""clemserve's per-call overhead: ``Generate`` on the ``echo`` model against a bare grpcio echo, in one run.

Both servers run in a process of their own, so every call crosses the same loopback socket and process
boundary; what is left between the two is clemserve's own work (the client's conversions, validation,
model lookup, scheduling, the echo backend and the answer's conversion back).

    python -m bench.overhead [--calls N] [--repeats R] [--payload BYTES] [--server-args "--metrics-port 9464"]
    python -m bench.overhead --profile [--calls 10000]

``--profile`` runs no server: it profiles clemserve's own Python for the same request in this process, the
server's half (``ModelServicer.Generate`` with a stand-in gRPC context, the packaged ``echo`` entry, the
same selector, messages and arguments the client sends) and the client's half (``Model.generate_response``
with a stand-in stub that serializes the request and returns the server's reply). Each half reports its CPU
time per call, warm (calls back to back) and cold (the CPU caches evicted before each call), and the functions
it spends it in. The cold figure is the one a live server pays: between two of its calls grpc's C-core, the
kernel and the other processes run and evict clemserve's code and data from the caches, so the same Python
costs it several times its warm figure.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import math
import os
import pstats
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench.plots import RESULTS, shown, write_table
from tests.serving import REPO, start_server

#: clemserve's latency over raw grpcio's that its own Python may add, at the median and in the tail
TARGET_P50_RATIO = 1.2
TARGET_P99_RATIO = 1.3
WARMUP_CALLS = 100
#: alternating blocks per repeat: short ones, so that a busy spell on the machine hits both paths alike
BLOCKS = 10
#: functions listed per profile, by their own time
PROFILE_ROWS = 25
#: timed rounds of unprofiled calls per profiled path
PROFILE_ROUNDS = 5
#: calls timed one by one with the caches evicted before each (``--profile``)
COLD_CALLS = 2000
#: bytes written before each cold call: more than a CPU's last-level cache, as a live server's grpc C-core,
#: kernel and neighbouring processes touch between two of its calls
EVICT_BYTES = 16 << 20
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
def raw_server() -> Iterator[tuple[str, int]]:
    """The bare echo server in a child process; yields its address and process id."""
    command = [sys.executable, "-m", "bench.overhead", "--serve-raw"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = process.stdout.readline() if process.stdout else ""
        if not line.strip().isdigit():
            raise RuntimeError(f"raw echo server did not start (exit code {process.poll()})")
        yield f"127.0.0.1:{line.strip()}", process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


# --- the real clemserve server ----------------------------------------------------------------------


@contextmanager
def clemserve_server(flags: list[str]) -> Iterator[tuple[str, int]]:
    """``clemserve serve`` on a free loopback port with the packaged registry and ``flags``; stopped with SIGTERM.
    Yields its address and process id.

    It runs in a fresh temporary directory so that no ./model_registry.json or ./key.json is picked up.
    """
    with tempfile.TemporaryDirectory(prefix="clemserve-bench-") as tmp:
        server = start_server(Path(tmp), *flags)
        try:
            yield server.address, server.process.pid
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


def cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user and system) of process ``pid`` so far (Linux), or of this process when None."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Path_:
    """One path measured: its call, the process serving it, and what its timed calls took."""

    call: Call
    server_pid: int
    latencies_ns: list[int] = field(default_factory=list)
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0

    def timed(self, count: int) -> None:
        client, server = cpu_s(), cpu_s(self.server_pid)
        self.latencies_ns.extend(time_calls(self.call, count))
        self.client_cpu_s += cpu_s() - client
        self.server_cpu_s += cpu_s(self.server_pid) - server

    def cpu_us_per_call(self) -> tuple[float, float]:
        """CPU time per call of the calling process and of the serving one (all their threads)."""
        calls = len(self.latencies_ns)
        return 1e6 * self.client_cpu_s / calls, 1e6 * self.server_cpu_s / calls


def measure(raw: Path_, served: Path_, calls: int) -> tuple[Path_, Path_]:
    """Alternating blocks (raw first, then clemserve first, ...) so drift on the machine hits both alike."""
    raw, served = Path_(raw.call, raw.server_pid), Path_(served.call, served.server_pid)
    per_block = max(1, calls // BLOCKS)
    for block in range(BLOCKS):
        order = [raw, served]
        for path in order if block % 2 == 0 else reversed(order):
            gc.collect()  # collect between blocks, not in the middle of one
            path.timed(per_block)
    return raw, served


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


def ratio(raw: Stats, served: Stats, q: float) -> float:
    return served.percentile(q) / raw.percentile(q)


def verdict(repeats: list[tuple[Stats, Stats]]) -> list[str]:
    """The ratios of each repeat, their median (what the target is judged on) and their spread (the noise)."""
    lines = []
    for q, target in ((50, TARGET_P50_RATIO), (99, TARGET_P99_RATIO)):
        ratios = [ratio(raw, served, q) for raw, served in repeats]
        median = statistics.median(ratios)
        each = ", ".join(f"{r:.2f}" for r in ratios)
        holds = "holds" if median <= target else "does NOT hold"
        lines.append(
            f"p{q} ratio clemserve/raw: {median:.2f}x (median of {len(ratios)} repeats: {each}); "
            f"target {target}x: {holds}"
        )
    return lines


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
    print(f"plot written to {shown(path)}")


def cpu_lines(measured: list[tuple[Path_, Path_]]) -> list[str]:
    """CPU time per call of the calling and the serving process (grpc's own threads and polling included):
    which side the difference is on."""
    lines = []
    totals = []
    for label, side in (("raw grpcio", 0), ("clemserve", 1)):
        per_repeat = [paths[side].cpu_us_per_call() for paths in measured]
        client = statistics.median(c for c, _ in per_repeat)
        server = statistics.median(s for _, s in per_repeat)
        totals.append(client + server)
        lines.append(f"CPU per call, {label}: client process {client:.0f} µs + server process {server:.0f} µs")
    lines.append(f"CPU per call ratio clemserve/raw (both processes, median of repeats): {totals[1] / totals[0]:.2f}x")
    return lines


def report(rows: list[Stats], measured: list[tuple[Path_, Path_]], setup: list[str]) -> None:
    """``rows``: every timed call of each path; ``measured``: (raw, clemserve) per repeat."""
    body = table(rows)
    repeats = [(Stats("raw", r.latencies_ns), Stats("clemserve", c.latencies_ns)) for r, c in measured]
    lines = verdict(repeats) + cpu_lines(measured)
    print(body)
    print("\n".join(lines))
    markdown = ["# clemserve overhead", "", *(f"- {s}" for s in setup), "", body, ""]
    markdown += [f"- {v}" for v in lines]
    write_table("overhead.md", "\n".join(markdown) + "\n")
    plot_cdf(rows, RESULTS / "overhead.png")


# --- profiling clemserve's own Python in-process ------------------------------------------------------


class _Context:
    """What ``Generate`` reads of a grpc.aio.ServicerContext, as the benchmark's client sends it."""

    def __init__(self, request_id: str) -> None:
        self._metadata = (("x-request-id", request_id),)

    def time_remaining(self) -> None:
        return None  # the benchmark's calls have no deadline

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:50000"


Run = Callable[[int, Callable[[], object] | None], list[int]]
"""``run(count, before)``: ``count`` calls, ``before()`` ahead of each (untimed) where given; returns each call's
nanoseconds (empty where no ``before`` is given: the calls were run back to back, untimed)."""


def evictor() -> Callable[[], None]:
    """Writes a buffer larger than the CPU's caches: the next call finds its code and data in memory only."""
    buffer = bytearray(EVICT_BYTES)
    ones = b"\x01" * (EVICT_BYTES // 64)

    def evict() -> None:
        buffer[::64] = ones  # one byte per cache line

    return evict


def _profile(label: str, run: Run, calls: int) -> list[str]:
    """CPU time per call (unprofiled, after a warm-up; the median of ``PROFILE_ROUNDS`` rounds of ``calls`` calls
    in all), the same calls with the caches evicted before each (what a live server pays), then the profile of
    ``calls`` more."""
    run(WARMUP_CALLS, None)
    per_round = max(1, calls // PROFILE_ROUNDS)
    rounds = []
    for _ in range(PROFILE_ROUNDS):
        gc.collect()
        start = time.thread_time_ns()
        run(per_round, None)
        rounds.append((time.thread_time_ns() - start) / per_round / 1e3)
    rounds.sort()
    cpu_us = statistics.median(rounds)
    cold_us = statistics.median(run(COLD_CALLS, evictor())) / 1e3
    profiler = cProfile.Profile()
    profiler.enable()
    run(calls, None)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("tottime").print_stats(PROFILE_ROWS)
    # the header lines, then the rows without pstats' blank lines
    rows = [line.rstrip() for line in out.getvalue().splitlines() if line.strip()]
    head = (
        f"## {label}: {cpu_us:.1f} µs CPU per call unprofiled (median of {PROFILE_ROUNDS} rounds, "
        f"{rounds[0]:.1f} to {rounds[-1]:.1f}); {cold_us:.1f} µs with cold caches (median of {COLD_CALLS} calls, "
        f"each after {EVICT_BYTES >> 20} MiB were written); profile of {calls} calls, warm"
    )
    return [head, "", "```", *rows, "```", ""]


def profile(calls: int, payload_chars: int) -> None:
    """The server's and the client's half of a Generate on ``echo``, in this process (see the module doc)."""
    from clemserve.client.model import Model
    from clemserve.registry import KeyRegistry, ModelRegistry
    from clemserve.service.backends import BackendContext
    from clemserve.service.draining import Drain
    from clemserve.service.draining import current as current_drain
    from clemserve.service.model_cache import ModelCache
    from clemserve.service.servicer import ModelServicer
    from clemserve.v1 import clemserve_pb2 as pb

    messages = game_messages(payload_chars)
    with tempfile.TemporaryDirectory(prefix="clemserve-bench-") as tmp:
        manager = ModelCache(
            ModelRegistry.from_files((), cwd=Path(tmp)),
            BackendContext(keys=KeyRegistry(Path(tmp) / "key.json"), cache_dir=Path(tmp)),
        )
        servicer = ModelServicer(manager)
        # the selector, messages and arguments exactly as the benchmark's client sends them
        model = Model(manager.resolve("echo"), address="127.0.0.1:1", lease=False)
        request = model._request(messages)
        context = _Context(uuid.uuid4().hex)
        current_drain.set(Drain())  # as the server does: every call is counted for the drain

        async def serve(count: int, before: Callable[[], object] | None = None) -> list[int]:
            if before is None:
                for _ in range(count):
                    await servicer.Generate(request, context)
                return []
            took = []
            for _ in range(count):
                before()
                start = time.perf_counter_ns()
                await servicer.Generate(request, context)  # echo answers without suspending: wall time is CPU time
                took.append(time.perf_counter_ns() - start)
            return took

        loop = asyncio.new_event_loop()
        try:
            reply = loop.run_until_complete(servicer.Generate(request, context))
            assert reply.response_text == messages[-1]["content"], reply
            # one coroutine runs all calls: the event loop's own turns are grpc's, not clemserve's
            server = _profile(
                "server: ModelServicer.Generate", lambda n, before: loop.run_until_complete(serve(n, before)), calls
            )
        finally:
            loop.run_until_complete(manager.shutdown())
            loop.close()

        class Stub:
            """The channel's part: the request serialized, the reply handed back."""

            def Generate(self, request: pb.GenerateRequest, **_: object) -> pb.GenerateResponse:
                request.SerializeToString()
                return reply

        model._stub()  # the model's channel as a call makes it (no call is made on it)...
        model._sync_stub = Stub()  # ... and the stand-in in place of its stub

        def ask(count: int, before: Callable[[], object] | None) -> list[int]:
            if before is None:
                for _ in range(count):
                    model.generate_response(messages)
                return []
            took = []
            for _ in range(count):
                before()
                start = time.perf_counter_ns()
                model.generate_response(messages)
                took.append(time.perf_counter_ns() - start)
            return took

        client = _profile("client: Model.generate_response", ask, calls)
    text = [
        "# clemserve overhead: in-process profile",
        "",
        f"- request: one user message of {len(messages[-1]['content'])} characters, the packaged `echo` entry",
        "- warm: CPU time of this thread (time.thread_time), so that other processes on the machine count less",
        f"- cold: wall time of each call after {EVICT_BYTES >> 20} MiB were written (the calls do not wait)",
        "",
        *server,
        *client,
    ]
    print("\n".join(text))
    write_table("overhead.profile.md", "\n".join(text) + "\n")


# --- main -------------------------------------------------------------------------------------------


def run(calls: int, repeats: int, payload_chars: int, flags: list[str]) -> None:
    import clemserve.client as backends

    messages = game_messages(payload_chars)
    with clemserve_server(flags) as (address, pid), raw_server() as (raw_address, raw_pid):
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
            paths = Path_(raw, raw_pid), Path_(served, pid)
            measured = [measure(*paths, calls) for _ in range(repeats)]
    raw_ns = [ns for r, _ in measured for ns in r.latencies_ns]
    served_ns = [ns for _, c in measured for ns in c.latencies_ns]
    timed = len(measured[0][0].latencies_ns)
    setup = [
        f"{repeats} repeats of {timed} timed calls per path after {WARMUP_CALLS} warm-up calls, "
        f"each in {BLOCKS} alternating blocks of {timed // BLOCKS}",
        f"request: one user message of {len(messages[-1]['content'])} characters, {len(payload)} bytes on the wire",
        f"one call at a time, sync clients, each server in its own process, {os.cpu_count()} CPUs",
        f"clemserve flags: {shlex.join(flags) or 'none'}",
    ]
    print("\n".join(setup))
    rows = [Stats("raw grpcio unary echo", raw_ns), Stats("clemserve Generate (echo model)", served_ns)]
    report(rows, measured, setup)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per path and repeat (default 2000)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements, each alternating the paths (default 3)")
    parser.add_argument("--payload", type=int, default=512, help="message size in bytes (ASCII text; default 512)")
    parser.add_argument("--server-args", default="", help="extra clemserve serve flags, e.g. '--metrics-port 9464'")
    parser.add_argument(
        "--profile", action="store_true", help="profile clemserve's own Python in this process (no servers)"
    )
    parser.add_argument("--serve-raw", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_raw:
        asyncio.run(_serve_raw())
        return 0
    if args.calls < BLOCKS or args.payload < 1 or args.repeats < 1:
        parser.error(f"--calls must be at least {BLOCKS}, --payload and --repeats at least 1")
    if args.profile:
        profile(args.calls, args.payload)
        return 0
    run(args.calls, args.repeats, args.payload, shlex.split(args.server_args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
