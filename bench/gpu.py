"""clemserve on a GPU: load time, memory estimated vs measured, throughput and time to first token at 1, 8
and 32 concurrent callers batched vs unbatched, batched-vs-alone identity per dtype, and --compute-nice.

One random-weight Llama built here (``--size 0.5b``: about 0.5 billion parameters; ``tiny``/``small`` for a
quick run on a CPU), served by real clemserve processes on loopback:

- ``load``: LoadModel's load time, and ListModels' estimated and measured memory (their ratio).
- ``throughput``: N callers (gRPC tasks, each its own ``x-clemserve-caller``) stream ``--calls`` greedy
  calls each; calls and tokens per second, time to first token (median, p95); the batched server (default
  ``--max-batch 8``) against one with ``--max-batch 1``, measured in the same run.
- ``identity``: in process, through the backend's own batching path: each conversation merged with seven
  others against alone, greedy, for float32, bfloat16 and float16: rows whose text differs.
- ``nice``: servers with ``--compute-nice`` 0, 5 and 10 (``--nice-values``): a call's time alone and with
  every core busy (one busy-loop process per core), and a request-path call (``echo``) while the model
  generates without pause. On a GPU the model's thread keeps the server's priority whatever the flag says.

Prints a table per section and writes docs/bench/gpu-<device>.md.

    python -m bench.gpu [--device cuda|cpu] [--size 0.5b] [--dtype bfloat16] [--clients 1,8,32] [--calls 4]
                        [--max-tokens 32] [--only load,throughput,identity,nice]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.plots import write_table
from tests.gpu.random_llama import build_random_llama, parameter_count
from tests.serving import ServerProcess, hf_entry, start_server

NAME = "random-llama"
SECTIONS = ("load", "throughput", "identity", "nice")
DTYPES = ("float32", "bfloat16", "float16")


def questions(n: int, offset: int = 0) -> list[list[dict[str, str]]]:
    """Conversations of different lengths (so that a batch pads them differently)."""
    return [
        [{"role": "user", "content": f"Question {i}: " + "what is the capital of France? " * (1 + i % 5)}]
        for i in range(offset, offset + n)
    ]


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


class Report:
    def __init__(self, device: str) -> None:
        self.device, self.lines = device, []

    def table(self, title: str, header: Sequence[str], rows: Sequence[Sequence[Any]], note: str = "") -> None:
        text = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        text += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
        if note:
            text += ["", note]
        print("\n".join(text) + "\n", flush=True)
        self.lines += [*text, ""]

    def write(self, header: str) -> Path:
        return write_table(f"gpu-{self.device}.md", f"{header}\n\n" + "\n".join(self.lines))


def serve(folder: Path, model: Path, env: dict[str, str], *flags: str) -> ServerProcess:
    registry = folder / "registry.json"
    entries = [hf_entry(NAME, model), {"model_name": "echo", "backend": "echo", "model_id": "echo"}]
    registry.write_text(json.dumps(entries))
    return start_server(folder, "--registry", str(registry), *flags, env=env, timeout=180)


# -- load and memory ------------------------------------------------------------------------------


def load_section(report: Report, server: ServerProcess, params: int, dtype: str) -> None:
    import clemserve.client as backends

    started = time.perf_counter()
    status = backends.preload(NAME, address=server.address, timeout=900)
    wall = time.perf_counter() - started
    listed = next(s for s in backends.list_models(address=server.address) if s.name == NAME)
    weights = params * {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    estimated, measured = listed.estimated_memory_bytes, listed.measured_memory_bytes
    mib = 2**20
    report.table(
        "Load and memory",
        [
            "parameters",
            "weights (params x dtype)",
            "load (server)",
            "load (LoadModel wall)",
            "estimated",
            "of which KV allowance",
            "measured",
            "measured by",
            "estimated / measured",
        ],
        [
            [
                f"{params / 1e6:.1f} M",
                f"{weights / mib:.0f} MiB",
                f"{status.load_seconds:.2f} s",
                f"{wall:.2f} s",
                f"{estimated / mib:.0f} MiB",
                f"{getattr(listed, 'estimated_kv_cache_bytes', 0) / mib:.0f} MiB",
                f"{measured / mib:.0f} MiB",
                getattr(listed, "measured_by", "") or "-",
                f"{estimated / measured:.2f}" if measured else "-",
            ]
        ],
    )


# -- throughput and time to first token -----------------------------------------------------------


async def _callers(address: str, clients: int, calls: int, max_tokens: int) -> dict[str, Any]:
    import grpc

    from clemserve.v1 import clemserve_pb2 as pb
    from clemserve.v1 import clemserve_pb2_grpc as pb_grpc

    first: list[float] = []
    tokens = 0

    async def caller(stub: Any, index: int) -> None:
        nonlocal tokens
        metadata = (("x-clemserve-caller", f"bench-{index}"),)
        for conversation in questions(calls, offset=index * calls):
            request = pb.GenerateStreamRequest(
                model=pb.ModelSelector(name=NAME),
                messages=[pb.Message(role=m["role"], content=m["content"]) for m in conversation],
                args=pb.GenerationArgs(temperature=0.0, max_tokens=max_tokens),
            )
            sent, seen = time.perf_counter(), False
            async for event in stub.GenerateStream(request, metadata=metadata, timeout=900):
                kind = event.WhichOneof("event")
                if kind == "delta" and not seen:
                    first.append(time.perf_counter() - sent)
                    seen = True
                elif kind == "reply":
                    tokens += event.reply.usage.completion_tokens

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        started = time.perf_counter()
        await asyncio.gather(*(caller(stub, i) for i in range(clients)))
        elapsed = time.perf_counter() - started
    return {"calls_s": clients * calls / elapsed, "tokens_s": tokens / elapsed, "ttft": first, "elapsed": elapsed}


def throughput_section(
    report: Report, servers: dict[str, ServerProcess], clients: Sequence[int], calls: int, max_tokens: int
) -> None:
    rows = []
    for n in clients:
        found = {}
        for mode, server in servers.items():
            asyncio.run(_callers(server.address, 1, 1, 4))  # warm: the first generate in a process is slow
            found[mode] = asyncio.run(_callers(server.address, n, calls, max_tokens))
        batched, unbatched = found["batched"], found["unbatched"]
        rows.append(
            [
                n,
                f"{batched['calls_s']:.2f}",
                f"{unbatched['calls_s']:.2f}",
                f"{batched['calls_s'] / unbatched['calls_s']:.2f}x",
                f"{batched['tokens_s']:.0f}",
                f"{unbatched['tokens_s']:.0f}",
                f"{statistics.median(batched['ttft']) * 1000:.0f} / {percentile(batched['ttft'], 0.95) * 1000:.0f}",
                f"{statistics.median(unbatched['ttft']) * 1000:.0f} / {percentile(unbatched['ttft'], 0.95) * 1000:.0f}",
            ]
        )
    report.table(
        f"Throughput ({calls} calls per caller, max_tokens {max_tokens}, greedy, streamed)",
        [
            "callers",
            "calls/s batched",
            "calls/s unbatched",
            "batched / unbatched",
            "tokens/s batched",
            "tokens/s unbatched",
            "first token ms batched (p50 / p95)",
            "first token ms unbatched (p50 / p95)",
        ],
        rows,
        "batched: the default scheduler (--max-batch 8, --max-wait-ms 5); unbatched: --max-batch 1.",
    )


# -- batched vs alone, per dtype -------------------------------------------------------------------


def identity_section(report: Report, folder: Path, size: str, rows: int, max_tokens: int) -> None:
    from clemserve.registry import KeyRegistry, ModelSpec
    from clemserve.service.backends import BackendContext
    from clemserve.service.backends.huggingface_local import HuggingfaceLocalBackend
    from clemserve.service.domain import GenArgs, Row

    table = []
    for dtype in DTYPES:
        model = build_random_llama(folder / f"identity-{dtype}", size, dtype)
        backend = HuggingfaceLocalBackend(
            ModelSpec(**hf_entry(NAME, model)), BackendContext(KeyRegistry(folder / "key.json"), folder)
        )
        args = GenArgs(max_tokens=max_tokens)
        conversations = questions(rows)

        async def run(b: Any = backend, convs: Any = conversations, a: Any = args) -> tuple[list[Any], list[Any]]:
            await b.load(lambda line, fraction=None: None)
            merged: list[Any] = []
            for start in range(0, len(convs), 8):
                merged += await b.generate_rows([Row(c) for c in convs[start : start + 8]], a)
            alone = [(await b.generate_rows([Row(c)], a))[0] for c in convs]
            await b.unload()
            return merged, alone

        try:
            merged, alone = asyncio.run(run())
        except Exception as exc:
            table.append([dtype, "-", "-", f"{type(exc).__name__}: {str(exc)[:80]}"])
            continue
        differing = [i for i, (m, a) in enumerate(zip(merged, alone, strict=True)) if m.text != a.text]
        table.append([dtype, len(conversations), len(differing), ", ".join(map(str, differing)) or "-"])
    report.table(
        f"Greedy replies merged in batches of 8 vs alone ({size}, max_tokens {max_tokens})",
        ["dtype", "rows", "rows that differ", "which"],
        table,
    )


# -- --compute-nice -------------------------------------------------------------------------------


def _timed_calls(address: str, name: str, n: int, max_tokens: int) -> list[float]:
    import clemserve.client as backends

    model = backends.get_model_for(name, address=address, timeout=900, lease=False)
    model.set_gen_args(temperature=0.0, max_tokens=max_tokens)
    times = []
    for conversation in questions(n):
        started = time.perf_counter()
        model.generate_response(conversation)
        times.append(time.perf_counter() - started)
    return times


def nice_section(
    report: Report,
    folder: Path,
    model: Path,
    env: dict[str, str],
    calls: int,
    max_tokens: int,
    seconds: float,
    nice_values: Sequence[int],
) -> None:
    cores = os.cpu_count() or 1
    table = []
    for nice in nice_values:
        work = folder / f"nice-{nice}"
        work.mkdir()
        server = serve(work, model, env, "--compute-nice", str(nice))
        try:
            _timed_calls(server.address, NAME, 1, 4)  # load and warm
            alone = _timed_calls(server.address, NAME, calls, max_tokens)
            busy = [
                subprocess.Popen([sys.executable, "-c", "while True: pass"], stdout=subprocess.DEVNULL)
                for _ in range(cores)
            ]
            try:
                loaded = _timed_calls(server.address, NAME, calls, max_tokens)
            finally:
                for process in busy:
                    process.kill()
                    process.wait()
            # the request path while the model generates without pause: echo calls
            stop = threading.Event()

            def generate(address: str = server.address, stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    _timed_calls(address, NAME, 1, max_tokens)

            generator = threading.Thread(target=generate)
            generator.start()
            time.sleep(0.5)
            echo: list[float] = []
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                echo += _timed_calls(server.address, "echo", 1, 8)
                time.sleep(0.02)
            stop.set()
            generator.join()
        finally:
            server.stop()
        table.append(
            [
                nice,
                f"{statistics.median(alone) * 1000:.0f}",
                f"{statistics.median(loaded) * 1000:.0f}",
                f"{statistics.median(loaded) / statistics.median(alone):.1f}x",
                f"{statistics.median(echo) * 1000:.1f} / {percentile(echo, 0.95) * 1000:.1f}",
            ]
        )
    report.table(
        f"--compute-nice: a call (max_tokens {max_tokens}) alone and with {cores} busy-loop processes; "
        "echo calls while the model generates",
        [
            "--compute-nice",
            "call ms, idle CPU",
            f"call ms, {cores} busy loops",
            "slowdown",
            "echo ms while generating (p50 / p95)",
        ],
        table,
        "The busy loops run in this benchmark's session (the same scheduler autogroup as the server), the worst "
        "case of a shared host.",
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--size", choices=("tiny", "small", "0.5b"), default=None, help="default: 0.5b, tiny on cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--calls", type=int, default=4, help="calls per caller")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--identity-rows", type=int, default=32)
    parser.add_argument("--identity-size", choices=("tiny", "small", "0.5b"), default=None, help="default: --size")
    parser.add_argument("--nice-seconds", type=float, default=3.0)
    parser.add_argument("--nice-values", default="0,5,10", help="--compute-nice values compared")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"sections, of {', '.join(SECTIONS)}")
    args = parser.parse_args(argv)
    size = args.size or ("tiny" if args.device == "cpu" else "0.5b")
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    sections = [s for s in args.only.split(",") if s]
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    env = {"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {}
    os.environ.update(env)  # before torch is imported: the in-process sections see the same devices

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"bench.gpu: no CUDA device (torch {torch.__version__}); run with --device cpu")
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    report = Report(args.device)
    clients = [int(n) for n in args.clients.split(",")]
    with tempfile.TemporaryDirectory(prefix="clemserve-bench-gpu-") as tmp:
        folder = Path(tmp)
        model = build_random_llama(folder / "model", size, dtype)
        if "load" in sections or "throughput" in sections:
            servers: dict[str, ServerProcess] = {}
            try:
                for mode, flags in (("batched", ()), ("unbatched", ("--max-batch", "1"))):
                    (folder / mode).mkdir()
                    servers[mode] = serve(folder / mode, model, env, *flags)
                if "load" in sections:
                    load_section(report, servers["batched"], parameter_count(size), dtype)
                if "throughput" in sections:
                    throughput_section(report, servers, clients, args.calls, args.max_tokens)
            finally:
                for server in servers.values():
                    server.stop()
        if "identity" in sections:
            identity_section(report, folder, args.identity_size or size, args.identity_rows, args.max_tokens)
        if "nice" in sections:
            nice_values = [int(n) for n in args.nice_values.split(",")]
            nice_section(report, folder, model, env, args.calls, args.max_tokens, args.nice_seconds, nice_values)
    report.write(
        f"## bench/gpu.py on {device}: random Llama {size} ({parameter_count(size) / 1e6:.1f} M parameters), "
        f"{dtype}\n\n`python -m bench.gpu {' '.join(argv if argv is not None else sys.argv[1:])}`"
    )


if __name__ == "__main__":
    main()
