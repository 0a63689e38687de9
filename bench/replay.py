"""Replay speed: a whole ``clemserve run`` of the shared games recorded against a slow remote model, then the
same run replayed from the record, against the original run's wall time.

A stand-in OpenAI API answers every chat completion after ``--delay`` seconds; clemserve serves it as an
``openai`` model with ``--record``. ``clemserve run`` plays the games (the game machine's environment,
.venv-clemcore), then plays them again with ``--replay`` (its own replay server, run by this environment's
Python): the replayed run makes no provider call, and its episodes' interactions are the recorded ones but for
their times. Prints a table and writes docs/bench/replay.md.

    python -m bench.replay [--games hellogame,guesswhat] [--instances 4] [--jobs 8] [--delay 0.5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.benchmark_run import CLEMCORE, FAKE_KEY, GAMES, episodes, first_instances, timed
from bench.plots import write_table
from tests.providers import openai_reply
from tests.serving import start_server
from tests.standin import Reply, StandIn

MODEL = "bench-recorded"
#: what changes from one run to the next however the episodes are played
VOLATILE = {"timestamp", "duration", "call_start", "call_duration"}


def timeless(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: timeless(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [timeless(v) for v in value]
    return value


def interactions(run_dir: Path) -> dict[str, Any]:
    return {
        str(path.relative_to(run_dir)): timeless(json.loads(path.read_text()))
        for path in sorted(run_dir.rglob("interactions.json"))
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--games", default="hellogame,guesswhat", help="comma-separated, from ../shared/clembench-games"
    )
    parser.add_argument("--instances", type=int, default=4, help="the first N instances of each experiment")
    parser.add_argument("--jobs", type=int, default=8, help="clemserve run's -j, for both runs")
    parser.add_argument("--delay", type=float, default=0.5, help="the stand-in provider's answer time, seconds")
    args = parser.parse_args()
    if not CLEMCORE.exists():
        sys.exit(f"no clemcore environment at {CLEMCORE}: make clemcore-env")
    games = args.games.split(",")
    with tempfile.TemporaryDirectory() as tmp_name, StandIn() as standin:
        tmp = Path(tmp_name)
        standin.script("POST", r"/chat/completions$", Reply(200, openai_reply("GREET: Hello"), delay_s=args.delay))
        (tmp / "server").mkdir()
        registry, keys, record = tmp / "server" / "registry.json", tmp / "server" / "key.json", tmp / "calls.jsonl"
        registry.write_text(json.dumps([{"model_name": MODEL, "backend": "openai", "model_id": "gpt-4o-mini"}]))
        keys.write_text(json.dumps({"openai": {"api_key": FAKE_KEY, "base_url": standin.url}}))
        server = start_server(
            tmp / "server", "--registry", str(registry), "--key-file", str(keys), "--record", str(record)
        )
        work = tmp / "work"
        work.mkdir()
        for game in games:
            shutil.copytree(GAMES / game, work / game)
            first_instances(work / game, args.instances)
        bin_dir = CLEMCORE.parent
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(work), "HF_HUB_OFFLINE": "1"}
        clemserve = str(bin_dir / "clemserve")
        subprocess.run([clemserve, "clemcore-setup", "--address", server.address], cwd=work, env=env, check=True,
                       capture_output=True)  # fmt: skip
        run = [clemserve, "run", "-g", *games, "-i", f"first{args.instances}", "-m", MODEL, "-j", str(args.jobs)]
        try:
            original, code = timed([*run, "-r", "original"], work, env, tmp / "original.log")
        finally:
            server.stop()
        calls = len(list(standin.matching(r"/chat/completions$")))
        standin.reset()
        replay = [*run, "-r", "replayed", "--replay", str(record), "--replay-python", sys.executable]
        replayed, replay_code = timed(replay, work, env, tmp / "replayed.log")
        upstream = len(list(standin.matching(r"/chat/completions$")))
        summary = (tmp / "replayed.log").read_text().strip().splitlines()[-1]
        same = interactions(work / "original" / MODEL) == interactions(work / "replayed" / MODEL)
        played = episodes(work / "original" / MODEL)
        recorded = len(record.read_text().splitlines())
    lines = [
        "| run | wall time | provider calls | exit code |",
        "|---|---:|---:|---:|",
        f"| original (provider answers in {args.delay:g} s, -j {args.jobs}) | {original:.1f} s | {calls} | {code} |",
        f"| replayed from the record | {replayed:.1f} s | {upstream} | {replay_code} |",
        "",
        f"- games {', '.join(games)}, first {args.instances} instances of each experiment: {played} episodes, "
        f"{recorded} calls recorded",
        f"- replay / original wall time: {replayed / original:.2f}x; replayed interactions identical but for "
        f"times: {'yes' if same else 'NO'}",
        f"- the replay's summary: {summary.split(': ', 1)[1] if ': ' in summary else summary}",
    ]
    print("\n".join(lines))
    write_table("replay.md", "\n".join(lines) + "\n")
    return 0 if same and upstream == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
