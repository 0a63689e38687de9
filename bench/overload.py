"""Overload: four times more concurrent callers than a model's queue holds.

The server serves the tiny random Llama with ``--max-queue Q``. Each burst starts 4 x Q callers at the same
instant, spread over several client processes (each its own channel, like game processes); every caller
makes one Generate call. A caller the server cannot queue must be refused at once (RESOURCE_EXHAUSTED with
a retry delay) rather than left waiting. Then the retry round: every caller keeps trying, waiting the delay
the refusal suggested, until it is answered, so that nothing a game asks for is lost.

Criteria (exit 1 when one fails): every refused call came back in under 50 ms, every accepted call
completed, no call failed any other way, and every caller of the retry round was answered. A refusal's
time is measured by its caller; the table also shows its time inside the server (from the server's log),
so that the server's share can be told from the clients' and the machine's. Prints a table, writes
docs/bench/overload.md and the plot docs/bench/overload.png.

    python -m bench.overload [--queue 16] [--bursts 5] [--processes 4] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.plots import pyplot, save, write_table
from tests.serving import hf_entry, start_server

MODEL = "overload-tiny"
REFUSAL_LIMIT_S = 0.050
#: the server's log line for a refusal: the time from its handler's start to the refusal
SERVER_REFUSAL = re.compile(r"Generate -> RESOURCE_EXHAUSTED in ([0-9.]+) ms")
CALL_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Call:
    """One Generate call: when it started (shared monotonic clock), how long it took, and how it ended."""

    started: float
    seconds: float
    outcome: str  # "ok", "refused" or another gRPC status name
    retry_after_s: float = 0.0


# --- the client processes ---------------------------------------------------------------------------


async def one_call(model: Any, messages: list[dict[str, str]]) -> Call:
    from clemserve.registry.errors import ResourceExhaustedError

    started = time.monotonic()
    try:
        await model.generate_response(messages)
        return Call(started, time.monotonic() - started, "ok")
    except ResourceExhaustedError as exc:
        return Call(started, time.monotonic() - started, "refused", exc.retry_after_s)
    except Exception as exc:
        return Call(started, time.monotonic() - started, getattr(exc, "code", type(exc).__name__))


async def until_answered(model: Any, messages: list[dict[str, str]]) -> list[Call]:
    """The retry round: try, wait what a refusal suggests, try again; every attempt is recorded."""
    attempts = [await one_call(model, messages)]
    while attempts[-1].outcome == "refused" and len(attempts) < 200:
        await asyncio.sleep(max(0.01, attempts[-1].retry_after_s))
        attempts.append(await one_call(model, messages))
    return attempts


def client(address: str, index: int, callers: int, max_tokens: int, start_at: float, retry: bool, out: Any) -> None:
    import clemserve.client as backends

    async def run() -> list[Call]:
        model = await backends.get_async_model_for(MODEL, address=address, timeout=CALL_TIMEOUT_S)
        model.set_gen_args(temperature=0.0, max_tokens=max_tokens)
        rows = [[{"role": "user", "content": f"caller {index}.{i}: count to ten"}] for i in range(callers)]
        await model.generate_response(rows[0])  # a game already playing: connected, its lease taken
        wait = start_at - time.monotonic()
        if wait < 0:
            print(f"client {index} joined its burst {-wait:.2f} s late: that burst was less concurrent than asked")
        await asyncio.sleep(max(0.0, wait))
        if retry:
            nested = await asyncio.gather(*(until_answered(model, row) for row in rows))
            return [call for attempts in nested for call in attempts]
        return list(await asyncio.gather(*(one_call(model, row) for row in rows)))

    out.put([c.__dict__ for c in asyncio.run(run())])


def burst(address: str, args: argparse.Namespace, retry: bool) -> list[Call]:
    """4 x queue callers over ``args.processes`` processes, all starting at one instant."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    total = 4 * args.queue
    shares = [total // args.processes + (1 if i < total % args.processes else 0) for i in range(args.processes)]
    start_at = time.monotonic() + 6.0  # time for the spawned processes to import and connect, even on a small machine
    procs = [
        ctx.Process(target=client, args=(address, i, n, args.max_tokens, start_at, retry, out))
        for i, n in enumerate(shares)
    ]
    for proc in procs:
        proc.start()
    calls = [Call(**c) for _ in procs for c in out.get(timeout=CALL_TIMEOUT_S * 2)]
    for proc in procs:
        proc.join(timeout=60)
    return calls


# --- the report -------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summarize(
    bursts: list[list[Call]], in_server: list[list[float]], retry_round: list[Call], args: argparse.Namespace
) -> tuple[list[str], bool]:
    """``in_server``: per burst, each refusal's time inside the server (its handler), in seconds; the rest
    of a refusal's time is the client's, the network stack's and the wait for a core."""
    lines = [
        f"tiny random Llama, --max-queue {args.queue}, {4 * args.queue} callers per burst over {args.processes} "
        f"client processes, max_tokens {args.max_tokens}, {os.cpu_count()} CPUs",
        "",
        "| burst | callers | accepted | refused | other | refusal p50 ms | refusal p99 ms | refusal max ms "
        "| in server p50 ms | in server max ms | accepted p50 ms | accepted max ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, (calls, server) in enumerate(zip(bursts, in_server, strict=True), 1):
        refused = [c.seconds for c in calls if c.outcome == "refused"]
        accepted = [c.seconds for c in calls if c.outcome == "ok"]
        other = len(calls) - len(refused) - len(accepted)
        lines.append(
            f"| {i} | {len(calls)} | {len(accepted)} | {len(refused)} | {other} | {ms(percentile(refused, 0.5))} | "
            f"{ms(percentile(refused, 0.99))} | {ms(max(refused, default=float('nan')))} | "
            f"{ms(percentile(server, 0.5))} | {ms(max(server, default=float('nan')))} | "
            f"{ms(percentile(accepted, 0.5))} | {ms(max(accepted, default=float('nan')))} |"
        )
    every = [c for calls in bursts for c in calls]
    refusals = [c for c in every if c.outcome == "refused"]
    others = sorted({c.outcome for c in every + retry_round} - {"ok", "refused"})
    answered = sum(1 for c in retry_round if c.outcome == "ok")
    attempts = len(retry_round)
    delays = [c.retry_after_s for c in refusals]
    checks = [
        (bool(refusals), f"{len(refusals)} of {len(every)} calls refused (the queue was full)"),
        (
            all(c.seconds < REFUSAL_LIMIT_S for c in refusals),
            f"every refusal under {REFUSAL_LIMIT_S * 1000:.0f} ms: "
            f"slowest {ms(max((c.seconds for c in refusals), default=0))} ms",
        ),
        (
            all(d > 0 for d in delays),
            f"every refusal carried a retry delay ({min(delays, default=0):.2f} to {max(delays, default=0):.2f} s)",
        ),
        (not others, f"no call failed otherwise ({', '.join(others) or 'none'})"),
        (
            answered == 4 * args.queue,
            f"retry round: {answered} of {4 * args.queue} callers answered in {attempts} attempts "
            f"({attempts - answered} refusals waited out)",
        ),
    ]
    lines += ["", *[f"{'PASS' if ok else 'FAIL'}  {text}" for ok, text in checks]]
    return lines, all(ok for ok, _ in checks)


def plot(bursts: list[list[Call]], retry_round: list[Call]) -> None:
    plt = pyplot()
    fig, (scatter, retries) = plt.subplots(1, 2, figsize=(11, 4.5))
    for outcome, colour in (("ok", "tab:blue"), ("refused", "tab:red")):
        points = [(c.started - min(d.started for d in calls), c.seconds * 1000) for calls in bursts for c in calls
                  if c.outcome == outcome]  # fmt: skip
        scatter.scatter([p[0] for p in points], [p[1] for p in points], s=10, color=colour,
                        label="accepted" if outcome == "ok" else "refused")  # fmt: skip
    scatter.axhline(REFUSAL_LIMIT_S * 1000, color="grey", linestyle=":", label="50 ms")
    scatter.set_yscale("log")
    scatter.set_xlabel("call start within its burst (s)")
    scatter.set_ylabel("latency (ms, log scale)")
    scatter.set_title("bursts of 4 x queue callers")
    scatter.legend()
    scatter.grid(True, alpha=0.3)
    origin = min(c.started for c in retry_round)
    done = sorted(c.started + c.seconds - origin for c in retry_round if c.outcome == "ok")
    retries.step(done, range(1, len(done) + 1), where="post")
    retries.set_xlabel("seconds into the retry round")
    retries.set_ylabel("callers answered")
    retries.set_title("retry round: refused callers wait the suggested delay")
    retries.grid(True, alpha=0.3)
    save(fig, "overload.png")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", type=int, default=16, help="the server's --max-queue")
    parser.add_argument("--bursts", type=int, default=5)
    parser.add_argument("--processes", type=int, default=4, help="client processes sharing the callers")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        from tests.tiny_model import build_tiny_llama

        registry = tmp / "registry.json"
        registry.write_text(json.dumps([hf_entry(MODEL, build_tiny_llama(tmp / "tiny"))]))
        server = start_server(tmp, "--registry", str(registry), "--preload", MODEL, "--max-queue", str(args.queue))
        try:
            bursts, in_server = [], []
            for i in range(args.bursts):
                seen = len(SERVER_REFUSAL.findall(server.log()))
                bursts.append(burst(server.address, args, retry=False))
                in_server.append([float(t) / 1000 for t in SERVER_REFUSAL.findall(server.log())[seen:]])
                refused = sum(c.outcome == "refused" for c in bursts[-1])
                print(f"burst {i + 1}: {len(bursts[-1]) - refused} accepted, {refused} refused", flush=True)
            retry_round = burst(server.address, args, retry=True)
        finally:
            server.stop()
    lines, passed = summarize(bursts, in_server, retry_round, args)
    print("\n".join(lines))
    write_table("overload.md", "\n".join(lines) + "\n")
    plot(bursts, retry_round)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
