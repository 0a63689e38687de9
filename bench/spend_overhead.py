"""Cost accounting's overhead per call: ``Generate`` through the real client and server with the accounting as
shipped, against the same server with it bypassed, in one run; and what a ``--spend-limit`` adds.

The accounting is the model cache's one hook, ``SpendGuard.call`` (service/spend.py): it prices each call
(``Pricing.charge``: the reply's cost, the model's totals for ListModels) and, for a model under a
``--spend-limit``, reserves the call's worst case in the spend file before it is sent and settles it after.
The bypassed server is ``clemserve serve`` itself, started by this script with that one method replaced by
``return await attempt()``: the same registry, flags, process boundary and code path but for the accounting
(its replies carry no cost). Three servers, each in its own process, one call at a time, in alternating blocks:

- ``echo`` (the packaged entry: a local model, priced at its compute seconds), bypassed and shipped;
- a priced remote model (``openai`` ``gpt-4o-mini``, priced from genai-prices' data) whose provider is a
  stand-in OpenAI API on loopback answering at once: bypassed, shipped, and shipped under
  ``--spend-limit openai=1000000/day`` (a limit never reached: every call reserves and settles).

The target is judged on the echo call: the accounting may add at most 5% of its time. Differences of a few
microseconds sit below the run-to-run noise of a call over loopback, so the hook is also timed alone in this
process (CPU time of ``SpendGuard.call`` around a reply that is ready, against calling the reply directly).
Prints a table and writes docs/bench/spend_overhead.md.

    python -m bench.spend_overhead [--calls 1000] [--repeats 3] [--payload 512]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.benchmark_run import FAKE_KEY
from bench.overhead import BLOCKS, WARMUP_CALLS, Stats, game_messages, time_calls
from bench.plots import REPO, write_table
from tests.providers import openai_reply, openai_usage
from tests.serving import ServerProcess, free_port, start_server, wait_serving
from tests.standin import Reply, StandIn

#: the share of the echo call the accounting may add
TARGET = 0.05
PRICED = "bench-priced"
MODEL_ID = "gpt-4o-mini"
#: a limit that every call reserves against and none reaches
SPEND_LIMIT = "openai=1000000/day"
#: the stand-in provider's usage: a game prompt's size, a short answer
USAGE = openai_usage(150, 8)
#: calls of the hook timed alone in this process, per path
HOOK_CALLS = 20000


# --- the servers -------------------------------------------------------------------------------------


def bypass_accounting() -> None:
    """The model cache's hook hands each call through: no pricing, no totals, no spend limit."""
    from clemserve.service.spend import SpendGuard

    async def handed_through(self: SpendGuard, spec: Any, messages: Any, args: Any, attempt: Any) -> Any:
        return await attempt()

    SpendGuard.call = handed_through  # type: ignore[method-assign]


def serve_unaccounted(argv: Sequence[str]) -> int:
    """``clemserve serve`` with the accounting bypassed."""
    from clemserve.service import cli

    bypass_accounting()
    return cli.main(list(argv))


def start_unaccounted(tmp: Path, *flags: str) -> ServerProcess:
    """The bypassed server, started as ``tests.serving.start_server`` starts the shipped one."""
    port = free_port()
    log_path = tmp / f"server-{port}.log"
    command = [sys.executable, "-m", "bench.spend_overhead", "--serve-unaccounted", "serve", "--port", str(port),
               "--cache-dir", str(tmp / "cache"), *flags]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp, env=env)
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address, process, log_path)
    except BaseException:
        process.kill()
        raise
    return ServerProcess(address, process, log_path)


# --- measuring ---------------------------------------------------------------------------------------


@dataclass
class Path_:
    label: str
    call: Callable[[], object]
    latencies_ns: list[int] = field(default_factory=list)


def measure(paths: list[Path_], calls: int) -> list[Path_]:
    """One repeat: ``calls`` per path in alternating blocks (each block in another order), so that a busy
    spell of the machine weighs on every path alike."""
    fresh = [Path_(p.label, p.call) for p in paths]
    per_block = max(1, calls // BLOCKS)
    for block in range(BLOCKS):
        shift = block % len(fresh)
        order = fresh[shift:] + fresh[:shift]
        for path in order if block % 2 == 0 else reversed(order):
            gc.collect()
            path.latencies_ns.extend(time_calls(path.call, per_block))
    return fresh


def hook_us(calls: int, cache_dir: Path) -> dict[str, tuple[float, float]]:
    """Microseconds per call that ``SpendGuard.call`` adds in this process around a reply that is ready, wall
    time (the spend file's writes wait on the file system) and CPU time, for the echo entry, the priced model,
    and the priced model under a limit."""
    from clemserve.registry import ModelSpec
    from clemserve.service.domain import GenArgs, Generation
    from clemserve.service.pricing import Pricing
    from clemserve.service.spend import SpendGuard, SpendLedger, parse_spend_limit

    echo = ModelSpec.from_dict({"model_name": "echo", "backend": "echo", "model_id": "echo"})
    priced = ModelSpec.from_dict({"model_name": PRICED, "backend": "openai", "model_id": MODEL_ID})
    messages = game_messages(512)
    args = GenArgs(max_tokens=100)
    ledger = SpendLedger([parse_spend_limit(SPEND_LIMIT)], cache_dir / "spend.sqlite3")
    plain, limited = SpendGuard(None, Pricing()), SpendGuard(ledger, Pricing())

    async def attempt() -> Generation:
        return Generation(None, {}, "ok", prompt_tokens=150, completion_tokens=8, generation_seconds=0.001)

    async def timed(run: Callable[[], Any]) -> tuple[float, float]:
        for _ in range(WARMUP_CALLS):
            await run()
        gc.collect()
        wall, cpu = time.perf_counter_ns(), time.thread_time_ns()
        for _ in range(calls):
            await run()
        return (time.perf_counter_ns() - wall) / calls / 1e3, (time.thread_time_ns() - cpu) / calls / 1e3

    async def all_paths() -> dict[str, tuple[float, float]]:
        bare = await timed(attempt)
        hooked = {
            "echo": await timed(lambda: plain.call(echo, messages, args, attempt)),
            "priced": await timed(lambda: plain.call(priced, messages, args, attempt)),
            "priced, --spend-limit": await timed(lambda: limited.call(priced, messages, args, attempt)),
        }
        return {name: (wall - bare[0], cpu - bare[1]) for name, (wall, cpu) in hooked.items()}

    try:
        return asyncio.run(all_paths())
    finally:
        ledger.close()


# --- reporting ---------------------------------------------------------------------------------------


def p50_us(latencies_ns: list[int]) -> float:
    return Stats("", latencies_ns).percentile(50)


def mean_us(latencies_ns: list[int]) -> float:
    return Stats("", latencies_ns).mean_us


def added(repeats: list[dict[str, Path_]], path: str, baseline: str, stat: Callable[[list[int]], float]) -> float:
    """What ``path`` adds to ``baseline`` (µs): the median over the repeats of each repeat's difference."""
    return statistics.median(stat(r[path].latencies_ns) - stat(r[baseline].latencies_ns) for r in repeats)


#: (path, its baseline); the first path of each pair is measured against itself
COMPARED = [
    ("echo, accounting bypassed", "echo, accounting bypassed"),
    ("echo, accounting as shipped", "echo, accounting bypassed"),
    ("priced, accounting bypassed", "priced, accounting bypassed"),
    ("priced, accounting as shipped", "priced, accounting bypassed"),
    (f"priced, as shipped, --spend-limit {SPEND_LIMIT}", "priced, accounting as shipped"),
]


def report(repeats: list[dict[str, Path_]], hook: dict[str, tuple[float, float]], setup: list[str]) -> bool:
    merged = {label: [ns for r in repeats for ns in r[label].latencies_ns] for label in repeats[0]}
    echo_p50 = statistics.median(p50_us(r["echo, accounting bypassed"].latencies_ns) for r in repeats)
    rows = [
        "| path | calls | p50 µs | mean µs | p50 ratio to its baseline | added at p50 | added to the mean |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for path, baseline in COMPARED:
        ratio = statistics.median(p50_us(r[path].latencies_ns) / p50_us(r[baseline].latencies_ns) for r in repeats)
        at_p50, at_mean = added(repeats, path, baseline, p50_us), added(repeats, path, baseline, mean_us)
        against = "(baseline)" if path == baseline else f"{ratio:.3f}x"
        plus = "" if path == baseline else f"{at_p50:+.0f} µs"
        rows.append(
            f"| {path} | {len(merged[path])} | {p50_us(merged[path]):.0f} | {mean_us(merged[path]):.0f} "
            f"| {against} | {plus} | {'' if path == baseline else f'{at_mean:+.0f} µs'} |"
        )
    echo_added = added(repeats, "echo, accounting as shipped", "echo, accounting bypassed", p50_us)
    priced_added = added(repeats, "priced, accounting as shipped", "priced, accounting bypassed", p50_us)
    limit_added = added(repeats, COMPARED[4][0], "priced, accounting as shipped", p50_us)
    priced_p50 = statistics.median(p50_us(r["priced, accounting as shipped"].latencies_ns) for r in repeats)
    holds = hook["echo"][0] <= TARGET * echo_p50
    echo_paths = [(r["echo, accounting as shipped"], r["echo, accounting bypassed"]) for r in repeats]
    each = ", ".join(f"{p50_us(a.latencies_ns) - p50_us(b.latencies_ns):+.0f}" for a, b in echo_paths)

    def alone(name: str) -> str:
        wall, cpu = hook[name]
        return f"alone in-process: {wall:.1f} µs ({cpu:.1f} µs CPU) = {wall / echo_p50:.2%}"

    lines = [
        f"the echo call (accounting bypassed) takes {echo_p50:.0f} µs at p50 (median of {len(repeats)} repeats); "
        f"the target allows the accounting {TARGET * echo_p50:.0f} µs ({TARGET:.0%}) of it",
        f"accounting on echo: {alone('echo')} of the echo call: target {TARGET:.0%} "
        f"{'holds' if holds else 'does NOT hold'}; end to end {echo_added:+.0f} µs at p50 = "
        f"{echo_added / echo_p50:+.1%} (the median of the repeats' differences, {each} µs: the noise of a call "
        "over loopback on this machine)",
        f"accounting on the priced model (genai-prices): end to end {priced_added:+.0f} µs at p50 = "
        f"{priced_added / echo_p50:+.1%} of the echo call; {alone('priced')}",
        f"--spend-limit on the priced model (a reservation, then its settling written to the spend file): end to "
        f"end {limit_added:+.0f} µs at p50 = {limit_added / echo_p50:+.1%} of the echo call, "
        f"{limit_added / priced_p50:+.1%} of the priced call on a stand-in answering at once; "
        f"{alone('priced, --spend-limit')} for the whole hook (a limit is on paid calls only: models the server "
        "runs are under none)",
    ]
    print("\n".join([*rows, "", *lines]))
    markdown = ["# Cost accounting overhead", "", *(f"- {s}" for s in setup), "", *rows, "", *(f"- {x}" for x in lines)]
    write_table("spend_overhead.md", "\n".join(markdown) + "\n")
    return holds


# --- main --------------------------------------------------------------------------------------------


def run(calls: int, repeats: int, payload: int) -> bool:
    import clemserve.client as backends

    messages = game_messages(payload)
    with tempfile.TemporaryDirectory(prefix="clemserve-bench-") as tmp_name, StandIn() as standin:
        tmp = Path(tmp_name)
        # its headers and body are two writes: without TCP_NODELAY each answer waits out a delayed ACK (40 ms)
        standin._server.RequestHandlerClass.disable_nagle_algorithm = True  # type: ignore[attr-defined]
        standin.script("POST", r"/chat/completions$", Reply(200, openai_reply("GREET: Hello", USAGE)))
        registry, keys = tmp / "registry.json", tmp / "key.json"
        registry.write_text(json.dumps([{"model_name": PRICED, "backend": "openai", "model_id": MODEL_ID}]))
        keys.write_text(json.dumps({"openai": {"api_key": FAKE_KEY, "base_url": standin.url}}))
        flags = ("--registry", str(registry), "--key-file", str(keys))
        servers: list[ServerProcess] = []
        try:
            for name, start, extra in (
                ("bypassed", start_unaccounted, ()),
                ("shipped", start_server, ()),
                ("limited", start_server, ("--spend-limit", SPEND_LIMIT)),
            ):
                (tmp / name).mkdir()
                servers.append(start(tmp / name, *flags, *extra))
            bypassed, shipped, limited = (server.address for server in servers)
            models = {
                "echo, accounting bypassed": backends.get_model_for("echo", address=bypassed),
                "echo, accounting as shipped": backends.get_model_for("echo", address=shipped),
                "priced, accounting bypassed": backends.get_model_for(PRICED, address=bypassed),
                "priced, accounting as shipped": backends.get_model_for(PRICED, address=shipped),
                COMPARED[4][0]: backends.get_model_for(PRICED, address=limited),
            }
            paths = [Path_(label, lambda m=model: m.generate_response(messages)) for label, model in models.items()]
            for path in paths:
                time_calls(path.call, WARMUP_CALLS)
            measured = []
            for _ in range(repeats):
                measured.append({p.label: p for p in measure(paths, calls)})
                standin.reset()
            spent = servers[2].log()
        finally:
            for server in servers:
                server.stop()
        hook = hook_us(HOOK_CALLS, tmp)
    if "QUOTA_EXCEEDED" in spent:
        raise RuntimeError("a call met the spend limit: the benchmark's limit must never be reached")
    timed = len(measured[0]["echo, accounting bypassed"].latencies_ns)
    setup = [
        f"{repeats} repeats of {timed} timed calls per path after {WARMUP_CALLS} warm-up calls, each in {BLOCKS} "
        f"alternating blocks; one call at a time, sync client; each server in its own process, {os.cpu_count()} CPUs",
        f"request: one user message of {payload} characters; the priced model is `openai` `{MODEL_ID}` on a "
        f"stand-in OpenAI API on loopback answering at once ({USAGE['prompt_tokens']} prompt and "
        f"{USAGE['completion_tokens']} completion tokens)",
        "accounting bypassed: the same `clemserve serve` with `SpendGuard.call` (the model cache's one hook: "
        "pricing, the model's totals, the spend limit) replaced by handing the call through",
        f"in-process: {HOOK_CALLS} calls of the hook around a ready reply, wall and CPU time of the thread, less "
        "the same calls of the reply alone",
    ]
    return report(measured, hook, setup)


def main() -> int:
    if sys.argv[1:2] == ["--serve-unaccounted"]:
        return serve_unaccounted(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="timed calls per path and repeat (default 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements, each alternating the paths (default 3)")
    parser.add_argument("--payload", type=int, default=512, help="message size in bytes (ASCII text; default 512)")
    args = parser.parse_args()
    if args.calls < BLOCKS or args.payload < 1 or args.repeats < 1:
        parser.error(f"--calls must be at least {BLOCKS}, --payload and --repeats at least 1")
    return 0 if run(args.calls, args.repeats, args.payload) else 1


if __name__ == "__main__":
    sys.exit(main())
