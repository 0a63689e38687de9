"""The gateway's cost per call: ``Generate`` on the ``echo`` model through nginx against a direct connection, in
one run.

One clemserve server with the packaged registry; nginx in front of it, its configuration rendered by
``deploy/nginx/render.py`` with a route for ``echo`` (and the server as the default route), started as the
gateway test starts it (its own prefix in a temporary folder, one worker, an access log line per call, as a
gateway keeps one). The same client sends the same request to the server's address and to the gateway's, in
alternating blocks so that a busy spell on the machine hits both alike; the difference is what the gateway adds:
one more HTTP/2 hop on loopback, nginx's header map and its connection to the server (kept alive).

    python -m bench.gateway [--calls N] [--repeats R] [--payload BYTES]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.overhead import WARMUP_CALLS, Call, Stats, clemserve_server, cpu_s, game_messages, table, time_calls
from bench.plots import write_table
from tests.integration.test_gateway import render_module, start_nginx
from tests.serving import free_port

#: what the gateway may add to a call at the median, on a 2-core development machine
TARGET_ADDED_P50_MS = 0.3
#: alternating blocks per repeat: short ones, so that a busy spell on the machine hits both paths alike
BLOCKS = 10
MODEL = "echo"


@dataclass
class Path_:
    """One way to the server: its call, the processes that serve it, and what its timed calls took."""

    label: str
    call: Call
    pids: tuple[int, ...]
    latencies_ns: list[int] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)

    def timed(self, count: int) -> None:
        before = [cpu_s(pid) for pid in self.pids]
        self.latencies_ns.extend(time_calls(self.call, count))
        spent = [cpu_s(pid) - start for pid, start in zip(self.pids, before, strict=True)]
        self.cpu_s = [a + b for a, b in zip(self.cpu_s, spent, strict=True)] if self.cpu_s else spent

    def stats(self) -> Stats:
        return Stats(self.label, self.latencies_ns)

    def cpu_us_per_call(self) -> list[float]:
        """CPU time per call of each serving process (all its threads)."""
        return [1e6 * spent / len(self.latencies_ns) for spent in self.cpu_s]


def measure(direct: Path_, gateway: Path_, calls: int) -> tuple[Path_, Path_]:
    """Fresh copies of both paths, timed in alternating blocks (direct first, then the gateway first, ...)."""
    direct = Path_(direct.label, direct.call, direct.pids)
    gateway = Path_(gateway.label, gateway.call, gateway.pids)
    per_block = max(1, calls // BLOCKS)
    for block in range(BLOCKS):
        order = [direct, gateway] if block % 2 == 0 else [gateway, direct]
        for path in order:
            gc.collect()  # between blocks, not in the middle of one
            path.timed(per_block)
    return direct, gateway


def added_ms(direct: Stats, gateway: Stats, q: float) -> float:
    """What the gateway adds at percentile ``q``, in milliseconds."""
    return (gateway.percentile(q) - direct.percentile(q)) / 1e3


def verdict(repeats: list[tuple[Stats, Stats]]) -> list[str]:
    """The time added at p50 in each repeat and their median (what the target is judged on), the ratio
    gateway/direct at p50 and p90, and the mean's difference."""
    each = [added_ms(direct, gateway, 50) for direct, gateway in repeats]
    median = statistics.median(each)
    holds = "holds" if median <= TARGET_ADDED_P50_MS else "does NOT hold"
    lines = [
        f"added at p50: {median:.3f} ms (median of {len(each)} repeats: {', '.join(f'{a:.3f}' for a in each)}); "
        f"target {TARGET_ADDED_P50_MS} ms: {holds}"
    ]
    for q in (50, 90):
        ratios = [gateway.percentile(q) / direct.percentile(q) for direct, gateway in repeats]
        lines.append(f"p{q} ratio gateway/direct: {statistics.median(ratios):.2f}x (median of repeats)")
    means = [(gateway.mean_us - direct.mean_us) / 1e3 for direct, gateway in repeats]
    lines.append(f"added to the mean: {statistics.median(means):.3f} ms (median of repeats)")
    return lines


def cpu_lines(measured: list[tuple[Path_, Path_]]) -> list[str]:
    """CPU time per call of the server, and of nginx's worker on the gateway's path: the work the hop costs."""
    server = [statistics.median(paths[side].cpu_us_per_call()[0] for paths in measured) for side in (0, 1)]
    nginx = statistics.median(gateway.cpu_us_per_call()[1] for _, gateway in measured)
    return [
        f"CPU per call, server process: {server[0]:.0f} µs direct, {server[1]:.0f} µs through the gateway",
        f"CPU per call, nginx's worker: {nginx:.0f} µs",
    ]


# --- the servers ------------------------------------------------------------------------------------


def nginx_worker(master: int) -> int:
    """The worker of an nginx master started with ``worker_processes 1`` (Linux: the master's one child)."""
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    if len(children) != 1:
        raise RuntimeError(f"nginx {master}: expected one worker, found {children}")
    return int(children[0])


@contextmanager
def gateway_for(server: str) -> Iterator[tuple[str, int]]:
    """nginx on a free loopback port in front of ``server``, routing ``echo`` to it; its address and worker's
    process id."""
    with tempfile.TemporaryDirectory(prefix="clemserve-gateway-") as tmp:
        port = free_port()
        site = render_module().render([(MODEL, (server,))], (server,), f"127.0.0.1:{port}")
        nginx = start_nginx(Path(tmp), site, port)
        try:
            yield f"127.0.0.1:{port}", nginx_worker(nginx.pid)
        finally:
            nginx.terminate()
            nginx.wait(timeout=10)


# --- main -------------------------------------------------------------------------------------------


def run(calls: int, repeats: int, payload_chars: int) -> None:
    import clemserve.client as backends

    messages = game_messages(payload_chars)
    with clemserve_server([]) as (address, pid), gateway_for(address) as (gateway_address, worker):
        direct = backends.get_model_for(MODEL, address=address, lease=False)
        through = backends.get_model_for(MODEL, address=gateway_address, lease=False)
        for model in (direct, through):
            assert model.generate_response(messages)[2] == messages[-1]["content"]
            time_calls(lambda model=model: model.generate_response(messages), WARMUP_CALLS)
        paths = (
            Path_("direct to the server", lambda: direct.generate_response(messages), (pid,)),
            Path_("through nginx", lambda: through.generate_response(messages), (pid, worker)),
        )
        measured = [measure(*paths, calls) for _ in range(repeats)]
        payload = len(direct._request(messages).SerializeToString())
    timed = len(measured[0][0].latencies_ns)
    setup = [
        f"{repeats} repeats of {timed} timed calls per path after {WARMUP_CALLS} warm-up calls, "
        f"each in {BLOCKS} alternating blocks of {timed // BLOCKS}",
        f"`Generate` on `{MODEL}`: one user message of {len(messages[-1]['content'])} characters, "
        f"{payload} bytes on the wire",
        "one call at a time, one sync client; server and nginx (one worker, access log on, keep-alive to the server) "
        f"each in its own process on loopback, {os.cpu_count()} CPUs",
    ]
    rows = [Stats(paths[side].label, [ns for pair in measured for ns in pair[side].latencies_ns]) for side in (0, 1)]
    lines = verdict([(d.stats(), g.stats()) for d, g in measured]) + cpu_lines(measured)
    body = table(rows)
    print("\n".join(setup))
    print(body)
    print("\n".join(lines))
    markdown = ["# The gateway's cost per call", "", *(f"- {s}" for s in setup), "", body, ""]
    markdown += [f"- {line}" for line in lines]
    write_table("gateway.md", "\n".join(markdown) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per path and repeat (default 2000)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements, each alternating the paths (default 3)")
    parser.add_argument("--payload", type=int, default=512, help="message size in bytes (ASCII text; default 512)")
    args = parser.parse_args()
    if args.calls < BLOCKS or args.payload < 1 or args.repeats < 1:
        parser.error(f"--calls must be at least {BLOCKS}, --payload and --repeats at least 1")
    run(args.calls, args.repeats, args.payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
