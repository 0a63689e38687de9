"""Soak: many client processes play game-like loops against one clemserve for a bounded time.

Each client process plays games: two players (the tiny Llama and the echo model) answer in turns, each
keeping its own growing conversation, a new game every few turns. Meanwhile the server process's memory
(VmRSS), open file descriptors and threads are sampled from /proc. It passes when no request failed, RSS
after the warm-up stays within 10% of its value at the end of the warm-up, descriptors and threads stay
stable, and the server exits 0 on SIGTERM. p50/p99 latency per window (a minute; 10 s in runs shorter than
5 minutes) is printed, written to docs/bench/soak.md and plotted to docs/bench/soak.png. Exits 1 when a
criterion fails.

    python -m bench.soak [--seconds 60] [--clients 32] [--max-tokens 8]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.plots import pyplot, save, write_table
from tests.serving import ServerProcess, hf_entry, start_server

MODELS = ("soak-tiny", "echo")
TURNS_PER_GAME = 5
RSS_TOLERANCE = 0.10
#: growth past the end of the warm-up that still counts as stable
FD_SLACK = 8
THREAD_SLACK = 4
CALL_TIMEOUT_S = 120.0
WORDS = ("apple", "brown", "crane", "dough", "eagle", "flame", "grape", "house", "ivory", "jolly", "knife")


# --- the client processes ---------------------------------------------------------------------------


@dataclass
class Outcome:
    """One client's calls: (start on the shared monotonic clock, latency s, model index, ok)."""

    calls: list[tuple[float, float, int, bool]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def player(address: str, index: int, max_tokens: int, go: Any, stop_at: Any, ready: Any, results: Any) -> None:
    """A game-like loop: two players take turns on their models until ``stop_at`` (time.monotonic())."""
    import clemserve.client as backends

    rng = random.Random(index)
    models = [backends.get_model_for(name, address=address, timeout=CALL_TIMEOUT_S) for name in MODELS]
    for model in models:
        model.set_gen_args(temperature=0.0, max_tokens=max_tokens)
    ready.release()
    go.wait()
    outcome = Outcome()
    while time.monotonic() < stop_at.value:
        histories: list[list[dict[str, str]]] = [[], []]
        for turn in range(TURNS_PER_GAME):
            for which, model in enumerate(models):
                if time.monotonic() >= stop_at.value:
                    break
                said = f"Turn {turn}: is the word {rng.choice(WORDS)}?"
                histories[which].append({"role": "user", "content": said})
                started = time.monotonic()
                try:
                    text = model.generate_response(histories[which])[2]
                    ok = which == 0 or text == said  # echo answers with the last user message
                    if not ok:
                        outcome.errors.append(f"echo answered {text!r} to {said!r}")
                except Exception as exc:  # every failure counts; the soak reports them
                    ok, text = False, ""
                    outcome.errors.append(f"{type(exc).__name__}: {exc}")
                outcome.calls.append((started, time.monotonic() - started, which, ok))
                histories[which].append({"role": "assistant", "content": text or "..."})
    results.put((index, outcome))


# --- the server's resources -------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    at: float
    rss_kib: int
    fds: int
    threads: int


def sample(pid: int) -> Sample:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return Sample(
        time.monotonic(),
        int(fields["VmRSS"].split()[0]),
        len(os.listdir(f"/proc/{pid}/fd")),
        int(fields["Threads"]),
    )


# --- the run ----------------------------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    clients: int
    max_tokens: int
    warmup_s: float
    window_s: float
    started: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    calls: list[tuple[float, float, int, bool]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    exit_code: int | None = None


def registry(tmp: Path) -> Path:
    from tests.tiny_model import build_tiny_llama

    folder = build_tiny_llama(tmp / "tiny-llama")
    path = tmp / "soak_registry.json"
    path.write_text(json.dumps([hf_entry(MODELS[0], folder)]))
    return path


def soak(run: Run, sample_every: float) -> None:
    with tempfile.TemporaryDirectory(prefix="clemserve-soak-") as name:
        tmp = Path(name)
        server = start_server(tmp, "--registry", str(registry(tmp)), *(f"--preload={m}" for m in MODELS), timeout=180)
        try:
            drive(server, run, sample_every)
        finally:
            run.exit_code = server.stop(timeout=120)
            if run.exit_code != 0:
                print(server.log()[-4000:], file=sys.stderr)


def drive(server: ServerProcess, run: Run, sample_every: float) -> None:
    context = mp.get_context("spawn")  # children import the client only: no torch, no inherited state
    go, ready, results = context.Event(), context.Semaphore(0), context.Queue()
    stop_at = context.Value("d", math.inf)
    processes = [
        context.Process(
            target=player, args=(server.address, i, run.max_tokens, go, stop_at, ready, results), daemon=True
        )
        for i in range(run.clients)
    ]
    for process in processes:
        process.start()
    for _ in processes:
        if not ready.acquire(timeout=120):
            raise RuntimeError("client processes did not start within 120 s")
    run.started = time.monotonic()
    stop_at.value = run.started + run.seconds
    go.set()
    pid = server.process.pid
    while time.monotonic() < stop_at.value:
        run.samples.append(sample(pid))
        time.sleep(min(sample_every, max(0.0, stop_at.value - time.monotonic())))
    run.samples.append(sample(pid))
    for _ in processes:
        _, outcome = results.get(timeout=CALL_TIMEOUT_S + 60)
        run.calls.extend(outcome.calls)
        run.errors.extend(outcome.errors)
    for process in processes:
        process.join(timeout=30)


# --- the report -------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def windows(run: Run) -> list[dict[str, Any]]:
    rows = []
    count = max(1, math.ceil(run.seconds / run.window_s))
    for w in range(count):
        start, end = run.started + w * run.window_s, run.started + min((w + 1) * run.window_s, run.seconds)
        inside = [c for c in run.calls if start <= c[0] < end]
        row: dict[str, Any] = {"from": w * run.window_s, "to": min((w + 1) * run.window_s, run.seconds)}
        row["requests"] = len(inside)
        row["failed"] = sum(not c[3] for c in inside)
        for m, name in enumerate(MODELS):
            latencies = [c[1] * 1e3 for c in inside if c[2] == m]
            row[name] = (percentile(latencies, 50), percentile(latencies, 99)) if latencies else None
        rows.append(row)
    return rows


def latency_table(rows: list[dict[str, Any]]) -> list[str]:
    head = "| window s | requests | failed | " + " | ".join(f"{m} p50 ms | {m} p99 ms" for m in MODELS) + " |"
    lines = [head, "|---|---:|---:|" + "---:|---:|" * len(MODELS)]
    for row in rows:
        cells = [f"{row['from']:.0f}-{row['to']:.0f}", str(row["requests"]), str(row["failed"])]
        for m in MODELS:
            cells += [f"{row[m][0]:.1f}", f"{row[m][1]:.1f}"] if row[m] else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def criteria(run: Run) -> list[tuple[bool, str]]:
    after = [s for s in run.samples if s.at >= run.started + run.warmup_s] or run.samples[-1:]
    base = after[0]
    rss = [s.rss_kib for s in after]
    fds = [s.fds for s in after]
    threads = [s.threads for s in after]
    low, high = min(rss) / base.rss_kib - 1, max(rss) / base.rss_kib - 1
    failed = sum(not c[3] for c in run.calls)
    return [
        (failed == 0 and bool(run.calls), f"failed requests: {failed} of {len(run.calls)}"),
        (
            max(-low, high) <= RSS_TOLERANCE,
            f"server RSS after warm-up: {base.rss_kib / 1024:.1f} MiB at its end, {min(rss) / 1024:.1f}-"
            f"{max(rss) / 1024:.1f} MiB after ({low:+.1%} / {high:+.1%}; allowed ±{RSS_TOLERANCE:.0%}), "
            f"{after[-1].rss_kib / 1024:.1f} MiB at the end of the run",
        ),
        (
            max(fds) <= base.fds + FD_SLACK,
            f"open descriptors after warm-up: {base.fds} at its end, {min(fds)}-{max(fds)}, "
            f"{after[-1].fds} at the end of the run (allowed: at most +{FD_SLACK})",
        ),
        (
            max(threads) <= base.threads + THREAD_SLACK,
            f"threads after warm-up: {base.threads} at its end, {min(threads)}-{max(threads)}, "
            f"{after[-1].threads} at the end of the run (allowed: at most +{THREAD_SLACK})",
        ),
        (run.exit_code == 0, f"server exit code on SIGTERM: {run.exit_code}"),
    ]


def plot(run: Run, rows: list[dict[str, Any]]) -> None:
    plt = pyplot()
    fig, (lat, rss) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    mids = [(r["from"] + r["to"]) / 2 for r in rows]
    for m in MODELS:
        points = [(x, r[m]) for x, r in zip(mids, rows, strict=True) if r[m]]
        lat.plot([x for x, _ in points], [p[0] for _, p in points], marker="o", label=f"{m} p50")
        lat.plot([x for x, _ in points], [p[1] for _, p in points], marker="x", linestyle="--", label=f"{m} p99")
    lat.set_yscale("log")
    lat.set_ylabel("latency (ms, log scale)")
    lat.legend()
    lat.grid(True, alpha=0.3)
    rss.plot([s.at - run.started for s in run.samples], [s.rss_kib / 1024 for s in run.samples])
    rss.axvline(run.warmup_s, color="grey", linestyle=":", label="end of warm-up")
    rss.set_ylabel("server RSS (MiB)")
    rss.set_xlabel("seconds into the run")
    rss.legend()
    rss.grid(True, alpha=0.3)
    fig.suptitle(f"clemserve soak: {run.clients} client processes, {run.seconds:.0f} s")
    save(fig, "soak.png")


def report(run: Run) -> bool:
    rows = windows(run)
    checks = criteria(run)
    first = run.samples[0]
    setup = [
        f"{run.clients} client processes for {run.seconds:.0f} s, each playing games of {TURNS_PER_GAME} turns "
        f"on {MODELS[0]} (tiny random Llama, max_tokens {run.max_tokens}) and {MODELS[1]}",
        f"warm-up {run.warmup_s:.0f} s, server sampled {len(run.samples)} times, {os.cpu_count()} CPUs",
        f"server at the start of the run: RSS {first.rss_kib / 1024:.1f} MiB, {first.fds} open descriptors, "
        f"{first.threads} threads",
    ]
    lines = [*setup, "", *latency_table(rows), ""]
    lines += [f"{'PASS' if ok else 'FAIL'}  {text}" for ok, text in checks]
    if run.errors:
        lines += ["", f"first errors ({len(run.errors)} in all):", *sorted(set(run.errors))[:10]]
    print("\n".join(lines))
    markdown = ["# clemserve soak", "", *(f"- {s}" for s in setup), "", *latency_table(rows), ""]
    markdown += [f"- {'PASS' if ok else 'FAIL'}: {text}" for ok, text in checks]
    write_table("soak.md", "\n".join(markdown) + "\n")
    plot(run, rows)
    return all(ok for ok, _ in checks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60, help="how long the clients play (default 60)")
    parser.add_argument("--clients", type=int, default=32, help="client processes (default 32)")
    parser.add_argument("--max-tokens", type=int, default=8, help="max_tokens of each call (default 8)")
    parser.add_argument(
        "--warmup", type=float, help="seconds before resources are compared (default: a quarter, at most 60)"
    )
    parser.add_argument("--window", type=float, help="latency window in seconds (default 60; 10 under 5 minutes)")
    parser.add_argument("--sample-every", type=float, default=2.0, help="seconds between /proc samples (default 2)")
    args = parser.parse_args()
    if args.seconds <= 0 or args.clients < 1 or args.max_tokens < 1:
        parser.error("--seconds, --clients and --max-tokens must be positive")
    run = Run(
        seconds=args.seconds,
        clients=args.clients,
        max_tokens=args.max_tokens,
        warmup_s=args.warmup if args.warmup is not None else min(60.0, args.seconds / 4),
        window_s=args.window or (60.0 if args.seconds >= 300 else 10.0),
    )
    soak(run, args.sample_every)
    return 0 if report(run) else 1


if __name__ == "__main__":
    sys.exit(main())
