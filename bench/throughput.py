"""Throughput against concurrency: many game processes sharing one clemserve vs one model each.

For 1, 2, 4, ... client processes (each a separate process, like a game), in one run:
- clemserve with batching (the default scheduler),
- clemserve without batching (``--max-batch 1``),
- the in-process baseline: every process loads the model itself and generates, as clembench does today.
Every client makes the same number of greedy calls; throughput is calls per second over the time all
clients were busy. Peak memory: the server's, and the sum of the in-process clients'. Prints a table,
writes docs/bench/throughput.md and plots docs/bench/throughput.png.

    python -m bench.throughput [--models tiny,demo] [--clients 1,2,4,8,16,32] [--calls 12] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.plots import pyplot, save, write_table
from tests.serving import DEMO_CACHE, hf_entry, start_server

MODES = ("batched", "unbatched", "in-process")
#: in-process copies of the demo model beyond this do not fit a 24 GiB machine next to everything else
MAX_INPROC_DEMO = 8


def questions(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Question {i}: what is {i} plus {i + 1}? Answer briefly."}] for i in range(n)]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def server_client(address: str, name: str, calls: int, max_tokens: int, barrier: Any, out: Any) -> None:
    import clemserve.client as backends

    model = backends.get_model_for(name, address=address, timeout=600)
    model.set_gen_args(temperature=0.0, max_tokens=max_tokens)
    rows = questions(calls)
    barrier.wait()
    started = time.monotonic()
    for row in rows:
        model.generate_response(row)
    out.put((started, time.monotonic(), 0.0))


def warm_up(address: str, name: str) -> None:
    """torch's first generate in a process is slow; measure the steady state."""
    import clemserve.client as backends

    model = backends.get_model_for(name, address=address, timeout=600)
    model.set_gen_args(temperature=0.0, max_tokens=4)
    model.generate_response(questions(1)[0])


def inproc_client(folder: str, calls: int, max_tokens: int, barrier: Any, out: Any) -> None:
    """clembench today: this process loads its own copy and generates with it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)  # as clembench's get_model_for does
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    rows = questions(calls)
    warm = tokenizer(tokenizer.apply_chat_template(rows[0], tokenize=False), return_tensors="pt")
    model.generate(**warm, max_new_tokens=2, do_sample=False, temperature=None, top_p=None)  # slow first call
    barrier.wait()
    started = time.monotonic()
    for row in rows:
        prompt = tokenizer.apply_chat_template(row, tokenize=False, add_generation_prompt=True)
        encoded = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        model.generate(**encoded, max_new_tokens=max_tokens, do_sample=False, temperature=None, top_p=None)
    out.put((started, time.monotonic(), peak_rss_mib(os.getpid())))


def run_clients(target: Any, args: tuple[Any, ...], clients: int) -> tuple[float, float]:
    """(calls per second while all clients ran, summed peak memory reported by the clients)."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(clients), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, out)) for _ in range(clients)]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=3600) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    start, end = min(r[0] for r in results), max(r[1] for r in results)
    calls = clients * args[-2]
    return calls / (end - start), sum(r[2] for r in results)


def model_folder(kind: str, tmp: Path) -> tuple[str, dict[str, Any]]:
    if kind == "tiny":
        from tests.tiny_model import build_tiny_llama

        folder = build_tiny_llama(tmp / "tiny")
        return str(folder), hf_entry("bench-tiny", folder)
    prepared = sorted((DEMO_CACHE / "gguf").glob("SmolLM2-135M-Instruct*"))
    if not prepared:
        sys.exit(f"the demo model is not prepared in {DEMO_CACHE}: run `clemserve prepare smollm2-135m-instruct`")
    return str(prepared[0]), {
        "model_name": "bench-demo",
        "backend": "huggingface_local",
        "huggingface_id": str(prepared[0]),
        "model_config": {"premade_chat_template": True, "eos_to_cull": "<\\|im_end\\|>", "padding_side": "left"},
    }


def plot(measured: list[dict[str, Any]]) -> None:
    """Per model: calls/s against client processes for the three set-ups, and peak memory."""
    plt = pyplot()
    kinds = list(dict.fromkeys(m["model"] for m in measured))
    fig, axes = plt.subplots(2, len(kinds), figsize=(5.5 * len(kinds), 7), squeeze=False)
    for column, kind in enumerate(kinds):
        rows = [m for m in measured if m["model"] == kind]
        clients = [m["clients"] for m in rows]
        rate, memory = axes[0][column], axes[1][column]
        for mode in MODES:
            points = [(m["clients"], m[mode]) for m in rows if m[mode] == m[mode]]  # NaN: not measured
            rate.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=mode)
        rate.set_title(f"{kind} model: throughput")
        rate.set_ylabel("calls per second")
        memory.plot(clients, [m["server_mib"] for m in rows], marker="o", label="clemserve (one copy)")
        points = [(m["clients"], m["inproc_mib"]) for m in rows if m["inproc_mib"] == m["inproc_mib"]]
        memory.plot([p[0] for p in points], [p[1] for p in points], marker="o", label="in-process (sum)")
        memory.set_title(f"{kind} model: peak memory")
        memory.set_ylabel("MiB")
        for ax in (rate, memory):
            ax.set_xscale("log", base=2)
            ax.set_xticks(clients, [str(c) for c in clients])
            ax.set_xlabel("client processes")
            ax.grid(True, alpha=0.3)
            ax.legend()
    save(fig, "throughput.png")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,demo")
    parser.add_argument("--clients", default="1,2,4,8,16,32")
    # a game makes many calls; a short run mostly measures the first batch, which starts before every
    # client has arrived
    parser.add_argument("--calls", type=int, default=12, help="calls per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    import json

    columns = (
        "model", "clients", "batched calls/s", "unbatched calls/s", "in-process calls/s", "batched/unbatched",
        "batched/in-process", "server peak MiB", "in-process peak MiB (sum)",
    )  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    measured: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for kind in args.models.split(","):
            folder, entry = model_folder(kind, tmp)
            registry = tmp / f"{kind}.json"
            registry.write_text(json.dumps([entry]))
            name = entry["model_name"]
            servers = {}
            for mode, flags in (("batched", ()), ("unbatched", ("--max-batch", "1"))):
                (tmp / mode).mkdir(exist_ok=True)
                servers[mode] = start_server(
                    tmp / mode, "--registry", str(registry), "--preload", name, *flags, timeout=300
                )
                warm_up(servers[mode].address, name)
            try:
                for clients in (int(c) for c in args.clients.split(",")):
                    rates = {}
                    for mode, server in servers.items():
                        rates[mode], _ = run_clients(
                            server_client, (server.address, name, args.calls, args.max_tokens), clients
                        )
                    inproc, inproc_mib = float("nan"), float("nan")
                    if kind == "tiny" or clients <= MAX_INPROC_DEMO:
                        inproc, inproc_mib = run_clients(inproc_client, (folder, args.calls, args.max_tokens), clients)
                    rates["in-process"] = inproc
                    server_mib = peak_rss_mib(servers["batched"].process.pid)
                    measured.append({"model": kind, "clients": clients, **rates, "server_mib": server_mib,
                                     "inproc_mib": inproc_mib})  # fmt: skip
                    row = (
                        f"| {kind} | {clients} | {rates['batched']:.2f} | {rates['unbatched']:.2f} | {inproc:.2f} | "
                        f"{rates['batched'] / rates['unbatched']:.2f}x | {rates['batched'] / inproc:.2f}x | "
                        f"{server_mib:.0f} | {inproc_mib:.0f} |"
                    )
                    lines.append(row)
                    print(row, flush=True)
            finally:
                for server in servers.values():
                    server.stop()
    print("\n".join(lines))
    write_table("throughput.md", "\n".join(lines) + "\n")
    plot(measured)
    return 0


if __name__ == "__main__":
    sys.exit(main())
