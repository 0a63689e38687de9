"""Wall time of whole clembench games: in-process clemcore and ``clem run`` through clemserve vs ``clemserve run``.

One run, on real games copied from ../shared/clembench-games into a temporary clemcore working directory (the
game machine's environment, .venv-clemcore, plays them; a clemserve process serves the models):

- a remote model behind the provider stand-in answering after ``--delay`` seconds: in-process clemcore's own
  ``openai`` backend (the baseline), ``clem run`` through clemserve, and ``clemserve run -j J``;
- the local demo model (``--local``, when prepared): ``clem run`` through clemserve (the baseline here: the game
  machine has no torch, so in-process clemcore cannot load it), ``clem run -b 8``, and ``clemserve run -j J``.

Every mode plays the same episodes; ratios are against the baseline measured in this run. Prints a table,
writes bench/results/benchmark_run.md and bench/results/benchmark_run.png.

    python -m bench.benchmark_run [--games hellogame] [--jobs 4,8,16] [--delay 0.5] [--max-tokens 20] [--local]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.plots import RESULTS, pyplot, save
from tests.providers import openai_reply
from tests.serving import DEMO_CACHE, REPO, start_server
from tests.standin import Reply, StandIn

GAMES = REPO.parent / "shared" / "clembench-games"
CLEMCORE = Path(os.environ.get("CLEMSERVE_CLEMCORE_PYTHON") or REPO / ".venv-clemcore" / "bin" / "python")
FAKE_KEY = "sk-benchmark-not-a-key"


def demo_entry() -> dict[str, Any] | None:
    prepared = sorted((DEMO_CACHE / "gguf").glob("SmolLM2-135M-Instruct*"))
    if not prepared:
        return None
    return {
        "model_name": "bench-demo",
        "backend": "huggingface_local",
        "huggingface_id": str(prepared[0]),
        "model_config": {"premade_chat_template": True, "eos_to_cull": "<\\|im_end\\|>", "padding_side": "left"},
    }


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and exit code of one game-machine command."""
    started = time.monotonic()
    done = subprocess.run(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    took = time.monotonic() - started
    if done.returncode not in (0, 1):  # 1: some episodes failed (clemserve run); recorded all the same
        print(done.stderr[-2000:], file=sys.stderr)
    return took, done.returncode


def episodes(results: Path) -> int:
    return sum(1 for _ in results.rglob("interactions.json"))


def plot(rows: list[dict[str, Any]]) -> None:
    plt = pyplot()
    models = list(dict.fromkeys(row["model"] for row in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [row for row in rows if row["model"] == model]
        ax.barh([row["mode"] for row in mine], [row["seconds"] for row in mine])
        for y, row in enumerate(mine):
            ax.text(row["seconds"], y, f" {row['speedup']:.1f}x", va="center")
        ax.invert_yaxis()
        ax.set_xlabel("wall seconds for the whole selection")
        ax.set_title(model)
        ax.grid(True, axis="x", alpha=0.3)
    save(fig, "benchmark_run.png")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--games", default="hellogame", help="comma-separated, from ../shared/clembench-games")
    parser.add_argument("--jobs", default="4,8,16")
    parser.add_argument("--delay", type=float, default=0.5, help="the stand-in provider's answer time, seconds")
    parser.add_argument("--max-tokens", type=int, default=20)
    parser.add_argument("--local", action="store_true", help="also the demo model (slow on a small machine)")
    args = parser.parse_args()
    if not CLEMCORE.exists():
        sys.exit(f"no clemcore environment at {CLEMCORE}: make clemcore-env")
    games = args.games.split(",")
    jobs = [int(j) for j in args.jobs.split(",")]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name, StandIn() as standin:
        tmp = Path(tmp_name)
        standin.script("POST", r"/chat/completions$", Reply(200, openai_reply("GREET: Hello"), delay_s=args.delay))
        entries = [{"model_name": "bench-remote", "backend": "openai", "model_id": "gpt-4o-mini", "model_config": {}}]
        demo = demo_entry() if args.local else None
        if args.local and demo is None:
            print("the demo model is not prepared (clemserve prepare smollm2-135m-instruct): skipped", file=sys.stderr)
        entries += [demo] if demo else []
        (tmp / "server").mkdir()
        (tmp / "server" / "registry.json").write_text(json.dumps(entries))
        (tmp / "server" / "key.json").write_text(json.dumps({"openai": {"api_key": FAKE_KEY, "base_url": standin.url}}))
        server = start_server(
            tmp / "server", "--registry", str(tmp / "server" / "registry.json"),
            "--key-file", str(tmp / "server" / "key.json"), timeout=300,
        )  # fmt: skip
        try:
            work = tmp / "work"
            work.mkdir()
            for game in games:
                shutil.copytree(GAMES / game, work / game)
            bin_dir = CLEMCORE.parent
            env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(work), "OPENAI_BASE_URL": standin.url}
            subprocess.run([str(bin_dir / "clemserve"), "clemcore-setup", "--address", server.address], cwd=work,
                           env=env, check=True, capture_output=True)  # fmt: skip
            # in-process clemcore: its own openai backend, its own key.json, the same stand-in
            registry = json.loads((work / "model_registry.json").read_text())
            inproc = {"model_name": "inproc-remote", "backend": "openai", "model_id": "gpt-4o-mini"}
            (work / "model_registry.json").write_text(json.dumps([inproc, *registry]))
            (work / "key.json").write_text(json.dumps({"openai": {"api_key": FAKE_KEY}}))
            common = ["-g", *games, "-l", str(args.max_tokens)]
            clem, clemserve = str(bin_dir / "clem"), str(bin_dir / "clemserve")
            plans: list[tuple[str, str, list[str]]] = [
                ("remote", "in-process clemcore (openai)", [clem, "run", *common, "-m", "inproc-remote"]),
                ("remote", "clem run via clemserve", [clem, "run", *common, "-m", "bench-remote"]),
                *(
                    ("remote", f"clemserve run -j {j}", [clemserve, "run", *common, "-m", "bench-remote", "-j", str(j)])
                    for j in jobs
                ),
            ]
            if demo:
                plans += [
                    ("demo", "clem run via clemserve", [clem, "run", *common, "-m", "bench-demo"]),
                    ("demo", "clem run -b 8 via clemserve", [clem, "run", *common, "-m", "bench-demo", "-b", "8"]),
                    *(
                        ("demo", f"clemserve run -j {j}", [clemserve, "run", *common, "-m", "bench-demo", "-j", str(j)])
                        for j in jobs
                    ),
                ]
            baseline: dict[str, float] = {}
            for index, (model, mode, command) in enumerate(plans):
                results = work / f"results-{index}"
                seconds, code = timed([*command, "-r", str(results)], work, env)
                baseline.setdefault(model, seconds)
                row = {"model": model, "mode": mode, "seconds": seconds, "episodes": episodes(results),
                       "exit": code, "speedup": baseline[model] / seconds}  # fmt: skip
                rows.append(row)
                print(
                    f"{model:6} {mode:32} {seconds:7.1f} s  {row['episodes']:3} episodes  {row['speedup']:5.1f}x",
                    flush=True,
                )
        finally:
            server.stop()
    lines = [
        f"games: {', '.join(games)}; -l {args.max_tokens}; remote answers after {args.delay} s; {os.cpu_count()} CPUs",
        "",
        "| model | mode | wall s | episodes | vs first row |",
        "|---|---|---:|---:|---:|",
        *(f"| {r['model']} | {r['mode']} | {r['seconds']:.1f} | {r['episodes']} | {r['speedup']:.1f}x |" for r in rows),
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "benchmark_run.md").write_text("\n".join(lines) + "\n")
    print("table written to bench/results/benchmark_run.md")
    plot(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
