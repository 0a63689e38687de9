"""Wall time of whole clembench games: in-process clemcore and ``clem run`` through clemserve vs ``clemserve run``.

One run, on real games copied from ../shared/clembench-games into a temporary clemcore working directory (the
game machine's environment, .venv-clemcore, plays them; a clemserve process serves the models):

- a remote model behind the provider stand-in answering after ``--delay`` seconds: in-process clemcore's own
  ``openai`` backend (the baseline), ``clem run`` through clemserve, and ``clemserve run -j J``;
- the local demo model (``--local``, when prepared): in-process clemcore's ``huggingface_local`` backend (the
  baseline, as clembench runs it today), ``clem run`` through clemserve, ``clem run -b 8`` and ``clemserve run
  -j J``. The game machine's environment holds no torch: the in-process run borrows torch, transformers and
  accelerate from the server's environment (.venv) and peft from .cache/clemserve-bench (installed there with
  pip, without dependencies, the first time).

Every mode plays the same episodes; ratios are against the baseline measured in this run. Each command's
output goes to a file, so a time is the command's own, as a shell sees it. Prints a table, writes
docs/bench/benchmark_run.md and docs/bench/benchmark_run.png.

    python -m bench.benchmark_run [--games hellogame] [--instances N] [--jobs 8,16] [--delay 0.5]
        [--max-tokens 20] [--local] [--no-remote] [--no-clem-run] [--local-jobs 4,8,16] [--local-max-tokens 20]
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

from bench.plots import pyplot, save, write_table
from tests.providers import openai_reply
from tests.serving import DEMO_CACHE, REPO, start_server
from tests.standin import Reply, StandIn

GAMES = REPO.parent / "shared" / "clembench-games"
CLEMCORE = Path(os.environ.get("CLEMSERVE_CLEMCORE_PYTHON") or REPO / ".venv-clemcore" / "bin" / "python")
FAKE_KEY = "sk-benchmark-not-a-key"
SERVER_SITE = REPO / ".venv" / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
BORROWED = REPO / ".cache" / "clemserve-bench" / "inproc"
#: ``clem`` with torch, transformers and accelerate of the server's environment (and peft) in front of the game
#: machine's packages, for in-process clemcore's huggingface_local backend
INPROC_CLEM = (
    "import sys; import site; sys.path[:0] = [{site!r}, {borrowed!r}]; sys.argv[0] = 'clem'; "
    "from clemcore.cli import main; sys.exit(main())"
)


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


def timed(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[float, int]:
    """Wall seconds and exit code of one game-machine command; its output goes to ``log``."""
    with open(log, "wb") as output:
        started = time.monotonic()
        done = subprocess.run(command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT)
        took = time.monotonic() - started
    if done.returncode not in (0, 1):  # 1: some episodes failed (clemserve run); recorded all the same
        print(log.read_text(errors="replace")[-2000:], file=sys.stderr)
    return took, done.returncode


def first_instances(game: Path, count: int) -> None:
    """An instances file ``first<count>`` in the game's copy: the first ``count`` instances of each experiment."""
    instances = json.loads((game / "in" / "instances.json").read_text())
    for experiment in instances["experiments"]:
        experiment["game_instances"] = experiment["game_instances"][:count]
    (game / "in" / f"first{count}.json").write_text(json.dumps(instances))


def borrow_peft() -> None:
    """clemcore's huggingface_local imports peft, which the server's environment does not hold."""
    if (BORROWED / "peft").is_dir() or (SERVER_SITE / "peft").is_dir():
        return
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(BORROWED), "peft"], check=True
    )


def episodes(results: Path) -> int:
    return sum(1 for _ in results.rglob("interactions.json"))


def plot(rows: list[dict[str, Any]], name: str) -> None:
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
    save(fig, name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--games", default="hellogame", help="comma-separated, from ../shared/clembench-games")
    parser.add_argument("--jobs", default="8,16", help="clemserve run's -j for the remote model")
    parser.add_argument("--delay", type=float, default=0.5, help="the stand-in provider's answer time, seconds")
    parser.add_argument("--max-tokens", type=int, default=20, help="-l of the remote model's runs")
    parser.add_argument(
        "--instances", type=int, default=0, help="only the first N instances of each experiment (default: all)"
    )
    parser.add_argument("--local", action="store_true", help="also the demo model (slow on a small machine)")
    parser.add_argument("--no-remote", action="store_true", help="the demo model only")
    parser.add_argument("--local-jobs", default="4,8,16", help="clemserve run's -j for the demo model")
    parser.add_argument("--local-max-tokens", type=int, default=20, help="-l of the demo model's runs")
    parser.add_argument("--local-batch", type=int, default=8, help="clem run -b for the demo model")
    parser.add_argument(
        "--no-clem-run", action="store_true", help="demo model: leave out clem run through clemserve (-b too)"
    )
    args = parser.parse_args()
    if not CLEMCORE.exists():
        sys.exit(f"no clemcore environment at {CLEMCORE}: make clemcore-env")
    games = args.games.split(",")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name, StandIn() as standin:
        tmp = Path(tmp_name)
        standin.script("POST", r"/chat/completions$", Reply(200, openai_reply("GREET: Hello"), delay_s=args.delay))
        entries = [{"model_name": "bench-remote", "backend": "openai", "model_id": "gpt-4o-mini", "model_config": {}}]
        demo = demo_entry() if args.local else None
        if args.local and demo is None:
            print("the demo model is not prepared (clemserve prepare smollm2-135m-instruct): skipped", file=sys.stderr)
        if demo:
            borrow_peft()
        entries += [demo] if demo else []
        (tmp / "server").mkdir()
        (tmp / "server" / "registry.json").write_text(json.dumps(entries))
        (tmp / "server" / "key.json").write_text(json.dumps({"openai": {"api_key": FAKE_KEY, "base_url": standin.url}}))
        # --compute-nice 0: the server's generation threads at the priority of in-process clemcore's (on a
        # machine shared with other work, its default of 5 would lose the CPU to that work, not to the server)
        server = start_server(
            tmp / "server", "--registry", str(tmp / "server" / "registry.json"),
            "--key-file", str(tmp / "server" / "key.json"), "--compute-nice", "0", timeout=300,
        )  # fmt: skip
        try:
            work = tmp / "work"
            work.mkdir()
            for game in games:
                shutil.copytree(GAMES / game, work / game)
                if args.instances:
                    first_instances(work / game, args.instances)
            selection = ["-i", f"first{args.instances}"] if args.instances else []
            bin_dir = CLEMCORE.parent
            env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(work), "OPENAI_BASE_URL": standin.url,
                   "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
            subprocess.run([str(bin_dir / "clemserve"), "clemcore-setup", "--address", server.address], cwd=work,
                           env=env, check=True, capture_output=True)  # fmt: skip
            # in-process clemcore: its own openai backend, its own key.json, the same stand-in; and its own
            # huggingface_local backend on the demo model's files
            registry = json.loads((work / "model_registry.json").read_text())
            inproc = [{"model_name": "inproc-remote", "backend": "openai", "model_id": "gpt-4o-mini"}]
            if demo:
                inproc.append({**demo, "model_name": "inproc-demo"})
            (work / "model_registry.json").write_text(json.dumps([*inproc, *registry]))
            (work / "key.json").write_text(json.dumps({"openai": {"api_key": FAKE_KEY}}))
            clem, clemserve = str(bin_dir / "clem"), str(bin_dir / "clemserve")
            plans: list[tuple[str, str, list[str]]] = []
            if not args.no_remote:
                common = ["-g", *games, *selection, "-l", str(args.max_tokens)]
                plans += [
                    ("remote", "in-process clemcore (openai)", [clem, "run", *common, "-m", "inproc-remote"]),
                    ("remote", "clem run via clemserve", [clem, "run", *common, "-m", "bench-remote"]),
                    *(
                        ("remote", f"clemserve run -j {j}", [clemserve, "run", *common, "-m", "bench-remote", "-j", j])
                        for j in args.jobs.split(",")
                    ),
                ]
            if demo:
                common = ["-g", *games, *selection, "-l", str(args.local_max_tokens), "-t", "0.0"]
                borrowing = INPROC_CLEM.format(site=str(SERVER_SITE), borrowed=str(BORROWED))
                batch = ["-b", str(args.local_batch)]
                plans += [
                    ("demo", "in-process clemcore (huggingface_local)",
                     [str(CLEMCORE), "-c", borrowing, "run", *common, "-m", "inproc-demo"]),
                    *(() if args.no_clem_run else (
                        ("demo", "clem run via clemserve", [clem, "run", *common, "-m", "bench-demo"]),
                        ("demo", f"clem run -b {args.local_batch} via clemserve",
                         [clem, "run", *common, "-m", "bench-demo", *batch]),
                    )),
                    *(
                        ("demo", f"clemserve run -j {j}", [clemserve, "run", *common, "-m", "bench-demo", "-j", j])
                        for j in args.local_jobs.split(",")
                    ),
                ]  # fmt: skip
            baseline: dict[str, float] = {}
            for index, (model, mode, command) in enumerate(plans):
                results = work / f"results-{index}"
                load = os.getloadavg()[0]  # other work on the machine slows the CPU-bound modes most
                seconds, code = timed([*command, "-r", str(results)], work, env, tmp / f"log-{index}.txt")
                baseline.setdefault(model, seconds)
                row = {"model": model, "mode": mode, "seconds": seconds, "episodes": episodes(results),
                       "exit": code, "speedup": baseline[model] / seconds, "load": load}  # fmt: skip
                rows.append(row)
                print(
                    f"{model:6} {mode:40} {seconds:7.1f} s  {row['episodes']:3} episodes  exit {code}  "
                    f"{row['speedup']:5.1f}x  (load average {load:.1f} at its start)",
                    flush=True,
                )
        finally:
            server.stop()
    settings = [f"the first {args.instances} instances of each experiment"] if args.instances else []
    if not args.no_remote:
        settings.append(f"remote: -l {args.max_tokens}, the stand-in answers after {args.delay} s")
    if demo:
        settings.append(f"demo: -l {args.local_max_tokens} -t 0.0")
    lines = [
        f"games: {', '.join(games)}; {'; '.join(settings)}; {os.cpu_count()} CPUs",
        "",
        "| model | mode | wall s | episodes | exit | vs first row | load average at start |",
        "|---|---|---:|---:|---:|---:|---:|",
        *(
            f"| {r['model']} | {r['mode']} | {r['seconds']:.1f} | {r['episodes']} | {r['exit']} | {r['speedup']:.1f}x "
            f"| {r['load']:.1f} |"
            for r in rows
        ),
    ]
    name = "benchmark_run_local.md" if args.no_remote else "benchmark_run.md"
    write_table(name, "\n".join(lines) + "\n")
    plot(rows, name.replace(".md", ".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
