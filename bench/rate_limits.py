"""Rate limits held by the server: ``clemserve run -j 64`` against a provider that takes 8 calls at once.

The provider stand-in answers each chat completion after ``--answer-ms`` and refuses a call above its 8 in
flight with HTTP 429 and a Retry-After (tests/providers.py ``ConcurrencyCap``). The same run of hellogame
(``--episodes`` episodes, one call each) is played twice, each against a server of its own: without a
server-side limiter (the baseline: every 429 goes back to the call's own retries) and with
``--rate-limit openai=concurrency:12`` (the server's limiter, which starts above the provider's 8 and finds
it from the 429s). Printed for each: failed episodes, the share of upstream calls answered 429, and the wall
time of the provider's work (its first call to its last answer) and of the whole run against the ideal,
calls x answer time / 8.

    python -m bench.rate_limits [--episodes 256] [--jobs 64] [--answer-ms 250] [--limit openai=concurrency:12]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.plots import write_table
from tests.providers import ConcurrencyCap, openai_reply
from tests.serving import REPO, start_server
from tests.standin import StandIn

GAMES = REPO.parent / "shared" / "clembench-games"
CLEMCORE = REPO / ".venv-clemcore" / "bin" / "python"
PROVIDER_LIMIT = 8
TARGETS = {"failed": 0, "refused_share": 0.05, "wall_ratio": 1.5}


def hellogame_episodes(work: Path, episodes: int) -> str:
    """A copy of hellogame in ``work`` with an instances file of ``episodes`` episodes (its ten, repeated);
    returns the file's name."""
    game = shutil.copytree(GAMES / "hellogame", work / "hellogame")
    instances = json.loads((game / "in" / "instances.json").read_text())
    (experiment,) = instances["experiments"]
    ten = experiment["game_instances"]
    experiment["game_instances"] = [{**ten[i % len(ten)], "game_id": i} for i in range(episodes)]
    (game / "in" / "many.json").write_text(json.dumps(instances))
    return "many"


def play(server_flags: list[str], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """One ``clemserve run`` against a fresh server and a fresh provider; what the provider and the run saw."""
    provider = ConcurrencyCap(openai_reply("GREET: Hello, welcome!"), PROVIDER_LIMIT, args.answer_ms / 1000)
    with StandIn() as standin:
        standin.script("POST", r"/chat/completions$", provider)
        (tmp / "server").mkdir()
        (tmp / "server" / "registry.json").write_text(
            json.dumps([{"model_name": "gpt-capped", "backend": "openai", "model_id": "gpt-4o-mini"}])
        )
        (tmp / "server" / "key.json").write_text(
            json.dumps({"openai": {"api_key": "sk-bench-not-a-key", "base_url": standin.url}})
        )
        server = start_server(
            tmp / "server", "--registry", str(tmp / "server" / "registry.json"),
            "--key-file", str(tmp / "server" / "key.json"), "--remote-retry-delay", "0.05", *server_flags,
        )  # fmt: skip
        try:
            work = tmp / "work"
            work.mkdir()
            instances = hellogame_episodes(work, args.episodes)
            env = {"PATH": f"{CLEMCORE.parent}:/usr/bin:/bin", "HOME": str(work)}
            clemserve = str(CLEMCORE.parent / "clemserve")
            setup = [clemserve, "clemcore-setup", "--address", server.address]
            subprocess.run(setup, cwd=work, env=env, check=True, capture_output=True)
            command = [clemserve, "run", "-g", "hellogame", "-i", instances, "-m", "gpt-capped", "-l", "20"]
            started = time.monotonic()
            run = subprocess.run([*command, "-j", str(args.jobs)], cwd=work, env=env, capture_output=True, text=True)
            wall = time.monotonic() - started
        finally:
            server.stop()
    said = re.search(r"(\d+) episodes failed", run.stdout + run.stderr)
    ideal = provider.answered * provider.answer_s / PROVIDER_LIMIT
    return {
        "exit": run.returncode,
        "failed": int(said.group(1)) if said else 0,
        "answered": provider.answered,
        "refused": provider.refused,
        "refused_share": provider.refused_share,
        "most_at_once": provider.most_at_once,
        "busy_s": provider.busy_s,
        "wall_s": wall,
        "ideal_s": ideal,
        "wall_ratio": provider.busy_s / ideal if ideal else float("inf"),
        "tail": run.stdout[-600:] + run.stderr[-600:],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=256)
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--answer-ms", type=float, default=250.0)
    parser.add_argument("--limit", default="openai=concurrency:12", help="the --rate-limit of the limited run")
    args = parser.parse_args()
    if not CLEMCORE.exists() or not (GAMES / "hellogame").is_dir():
        sys.exit("needs .venv-clemcore (make clemcore-env) and the clembench games next to the checkout")
    runs = {}
    for label, flags in (("no server-side limiter", []), (f"--rate-limit {args.limit}", ["--rate-limit", args.limit])):
        with tempfile.TemporaryDirectory() as tmp:
            runs[label] = play(flags, args, Path(tmp))
    lines = [
        f"{args.episodes} episodes of hellogame (one call each), clemserve run -j {args.jobs}; the provider takes "
        f"{PROVIDER_LIMIT} calls at once, answers in {args.answer_ms:.0f} ms and refuses more with 429",
        "",
        "| server | failed episodes | upstream calls | answered 429 | most at once | provider busy / ideal "
        "| run wall |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in runs.items():
        lines.append(
            f"| {label} | {r['failed']} | {r['answered'] + r['refused']} | {r['refused']} "
            f"({r['refused_share']:.1%}) | {r['most_at_once']} | {r['busy_s']:.2f} s / {r['ideal_s']:.2f} s = "
            f"{r['wall_ratio']:.2f}x | {r['wall_s']:.1f} s |"
        )
    print("\n".join(lines))
    limited = runs[f"--rate-limit {args.limit}"]
    holds = (
        limited["failed"] == TARGETS["failed"]
        and limited["refused_share"] <= TARGETS["refused_share"]
        and limited["wall_ratio"] <= TARGETS["wall_ratio"]
    )
    print(
        f"target with the limiter: 0 failed episodes, at most {TARGETS['refused_share']:.0%} answered 429, the "
        f"provider's work within {TARGETS['wall_ratio']}x of calls x answer time / {PROVIDER_LIMIT}: "
        + ("holds" if holds else "MISSED")
    )
    for label, r in runs.items():
        if r["exit"] not in (0, 1):
            print(f"{label}: clemserve run exited {r['exit']}:\n{r['tail']}", file=sys.stderr)
    write_table("rate_limits.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
