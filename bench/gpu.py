"""clemserve on a GPU, in parts: load time and memory estimated vs measured, throughput and time to first token
at 1, 8 and 32 concurrent callers batched vs unbatched, batched-vs-alone identity per dtype, and --compute-nice.

One random-weight Llama built here (``--size 0.5b``: about 0.5 billion parameters; ``tiny``/``small`` for a
quick run on a CPU), served by real clemserve processes on loopback:

- ``load``: LoadModel's load time on a fresh server, and ListModels' estimated and measured memory.
- ``throughput``: N callers (gRPC tasks, each its own ``x-clemserve-caller``) stream ``--calls`` greedy
  calls each; calls and tokens per second, time to first token (median, p95); the batched server (default
  ``--max-batch 8``) against one with ``--max-batch 1``, measured in the same run.
- ``identity``: in process, through the backend's own batching path: each conversation merged with seven
  others against alone, greedy, per dtype of ``--identity-dtypes``: rows whose text differs.
- ``nice``: servers with ``--compute-nice`` 0, 5 and 10 (``--nice-values``): a call's time alone and with
  every core busy (one busy-loop process per core), and a request-path call (``echo``) while the model
  generates without pause. On a GPU the model's thread keeps the server's priority whatever the flag says.

Prints a table per part. ``bench/gpu_check.sh`` (``make gpu-check``) runs it with ``--figures FILE``: each
part's figures, then its end (status, seconds, table), are appended to FILE as JSON lines while it runs, so
that a part cut at its time limit keeps what it had measured; the check writes the pages.

    python -m bench.gpu [--device cuda|cpu] [--size 0.5b] [--dtype bfloat16] [--clients 1,8,32] [--calls 2]
                        [--max-tokens 32] [--only load,throughput,identity,nice] [--figures FILE]
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
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.gpu_check import device_event
from tests.gpu.random_llama import parameter_count, random_llama
from tests.serving import ServerProcess, hf_entry, start_server

NAME = "random-llama"
PARTS = ("load", "throughput", "identity", "nice")
DTYPES = ("float32", "bfloat16", "float16")
#: the defaults that differ between a GPU and a CPU (where the same parts run tiny)
DEFAULTS = {
    "cuda": {"size": "0.5b", "dtype": "bfloat16", "clients": "1,8,32", "max_tokens": 32, "identity_rows": 16},
    "cpu": {"size": "tiny", "dtype": "float32", "clients": "1,8", "max_tokens": 8, "identity_rows": 8},
}


def questions(n: int, offset: int = 0) -> list[list[dict[str, str]]]:
    """Conversations of different lengths (so that a batch pads them differently)."""
    return [
        [{"role": "user", "content": f"Question {i}: " + "what is the capital of France? " * (1 + i % 5)}]
        for i in range(offset, offset + n)
    ]


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def size_text(n: float) -> str:
    """Bytes in GiB, or MiB below a tenth of one (a tiny model's figures are not all 0.00 GiB)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.1f} MiB"


class Report:
    """Each part's tables, printed; with a figures file, each part's figures and end appended to it as they come."""

    def __init__(self, figures: Path | None) -> None:
        self.figures_path = figures
        self.tables: list[str] = []
        self.failed: list[str] = []

    def _emit(self, event: dict[str, Any]) -> None:
        if self.figures_path is not None:
            with open(self.figures_path, "a") as out:
                out.write(json.dumps(event) + "\n")

    def device(self, torch: Any) -> None:
        """What the parts run on, for the check's heading."""
        self._emit(device_event(torch))

    def figures(self, part: str, summary: str, **values: Any) -> None:
        """What ``part`` has measured so far: ``summary`` for the check's table, ``values`` as numbers."""
        self._emit({"part": part, "event": "figures", "summary": summary, "values": values})

    def table(self, title: str, header: Sequence[str], rows: Sequence[Sequence[Any]], note: str = "") -> None:
        text = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        text += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
        if note:
            text += ["", note]
        print("\n".join(text) + "\n", flush=True)
        self.tables.append("\n".join(text))

    @contextmanager
    def part(self, name: str, logs: Callable[[], str] = str) -> Iterator[None]:
        """Run one part: an exception fails it (the traceback and ``logs()`` printed: the servers' logs are
        deleted with the run) and the next part still runs."""
        started, status, reason = time.perf_counter(), "passed", ""
        self.tables = []
        print(f"== bench.gpu: {name}", flush=True)
        try:
            yield
        except Exception as exc:
            traceback.print_exc()
            print(logs(), flush=True)
            text = str(exc).strip()
            status, reason = "failed", f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
            self.failed.append(name)
        seconds = time.perf_counter() - started
        self._emit({"part": name, "event": "end", "status": status, "reason": reason, "seconds": seconds,
                    "table": "\n\n".join(self.tables)})  # fmt: skip


class Bench:
    """What the parts share: the model (built once, kept in ``models``) and the servers (started at first use)."""

    def __init__(self, args: argparse.Namespace, folder: Path, env: dict[str, str], parts: Sequence[str]) -> None:
        self.args, self.folder, self.env = args, folder, env
        self.models = Path(args.models) if args.models else folder / "models"
        self.models.mkdir(parents=True, exist_ok=True)
        #: the servers the asked parts call, started together at the first call of one
        self.wanted = ["batched"] if {"load", "throughput"} & set(parts) else []
        self.wanted += ["unbatched"] if "throughput" in parts else []
        self.starting: dict[str, Future[ServerProcess]] = {}
        self.pool = ThreadPoolExecutor(max_workers=2)

    def model(self, dtype: str | None = None, size: str | None = None) -> Path:
        return random_llama(self.models, size or self.args.size, dtype or self.args.dtype)

    def server(self, mode: str) -> ServerProcess:
        """``batched`` (the default scheduler) or ``unbatched`` (``--max-batch 1``), once it serves; the first
        call starts every wanted server side by side (their start-ups overlap), none with the model loaded."""
        if mode not in self.starting:
            model = self.model()
            for starting in {*self.wanted, mode} - set(self.starting):
                flags = ("--max-batch", "1") if starting == "unbatched" else ()
                self.starting[starting] = self.pool.submit(serve, self.folder / starting, model, self.env, *flags)
        return self.starting[mode].result()

    def server_logs(self, lines: int = 30) -> str:
        """The end of every server's log of this run."""
        return "\n".join(
            f"-- the end of {path.relative_to(self.folder)}:\n" + "\n".join(path.read_text().splitlines()[-lines:])
            for path in sorted(self.folder.rglob("server-*.log"))
        )

    def stop(self) -> None:
        """Stop every server, side by side (each drains and unloads)."""
        servers = [starting.result() for starting in self.starting.values() if starting.exception() is None]
        list(self.pool.map(ServerProcess.stop, servers))
        self.starting.clear()


def serve(folder: Path, model: Path, env: dict[str, str], *flags: str) -> ServerProcess:
    folder.mkdir(parents=True, exist_ok=True)
    registry = folder / "registry.json"
    entries = [hf_entry(NAME, model), {"model_name": "echo", "backend": "echo", "model_id": "echo"}]
    registry.write_text(json.dumps(entries))
    return start_server(folder, "--registry", str(registry), *flags, env=env, timeout=180)


# -- load and memory ------------------------------------------------------------------------------


def load_part(report: Report, bench: Bench) -> None:
    import clemserve.client as backends

    server = bench.server("batched")
    started = time.perf_counter()
    status = backends.preload(NAME, address=server.address, timeout=900)
    wall = time.perf_counter() - started
    listed = next(s for s in backends.list_models(address=server.address) if s.name == NAME)
    params = parameter_count(bench.args.size)
    weights = params * {"float32": 4, "bfloat16": 2, "float16": 2}[bench.args.dtype]
    estimated, measured = listed.estimated_memory_bytes, listed.measured_memory_bytes
    ratio = f"{estimated / measured:.2f}" if measured else "-"
    report.figures(
        "load",
        f"load {status.load_seconds:.2f} s (LoadModel {wall:.2f} s); memory estimated {size_text(estimated)} "
        f"(weights {size_text(listed.estimated_weights_bytes)}, KV {size_text(listed.estimated_kv_cache_bytes)}) "
        f"vs measured {size_text(measured)} ({listed.measured_by or 'not measured'}): {ratio}x",
        load_s=status.load_seconds,
        load_wall_s=wall,
        estimated_bytes=estimated,
        estimated_weights_bytes=listed.estimated_weights_bytes,
        measured_bytes=measured,
        measured_by=listed.measured_by,
        weights_bytes=weights,
    )
    report.table(
        "Load and memory",
        ["parameters", "weights (params x dtype)", "load (server)", "load (LoadModel wall)", "estimated",
         "of which KV allowance", "measured", "measured by", "estimated / measured"],
        [[f"{params / 1e6:.1f} M", size_text(weights), f"{status.load_seconds:.2f} s", f"{wall:.2f} s",
          size_text(estimated), size_text(listed.estimated_kv_cache_bytes), size_text(measured),
          listed.measured_by or "-", ratio]],
    )  # fmt: skip


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


def throughput_part(report: Report, bench: Bench) -> None:
    calls, max_tokens = bench.args.calls, bench.args.max_tokens
    servers = {mode: bench.server(mode) for mode in ("batched", "unbatched")}
    rows, levels, said = [], {}, []
    for n in [int(c) for c in bench.args.clients.split(",")]:
        found = {}
        for mode, server in servers.items():
            asyncio.run(_callers(server.address, 1, 1, 4))  # warm: the first generate in a process is slow
            found[mode] = asyncio.run(_callers(server.address, n, calls, max_tokens))
        batched, unbatched = found["batched"], found["unbatched"]
        ratio = batched["calls_s"] / unbatched["calls_s"]
        levels[n] = {"batched_calls_s": batched["calls_s"], "unbatched_calls_s": unbatched["calls_s"], "ratio": ratio}
        said.append(f"{n}: {batched['calls_s']:.2f} vs {unbatched['calls_s']:.2f} ({ratio:.2f}x)")
        # after each number of callers: a part cut at its time limit keeps the numbers it finished
        report.figures("throughput", "callers: calls/s batched vs unbatched: " + "; ".join(said), levels=levels)
        rows.append(
            [
                n,
                f"{batched['calls_s']:.2f}",
                f"{unbatched['calls_s']:.2f}",
                f"{ratio:.2f}x",
                f"{batched['tokens_s']:.0f}",
                f"{unbatched['tokens_s']:.0f}",
                f"{statistics.median(batched['ttft']) * 1000:.0f} / {percentile(batched['ttft'], 0.95) * 1000:.0f}",
                f"{statistics.median(unbatched['ttft']) * 1000:.0f} / {percentile(unbatched['ttft'], 0.95) * 1000:.0f}",
            ]
        )
    report.table(
        f"Throughput ({calls} calls per caller, max_tokens {max_tokens}, greedy, streamed)",
        ["callers", "calls/s batched", "calls/s unbatched", "batched / unbatched", "tokens/s batched",
         "tokens/s unbatched", "first token ms batched (p50 / p95)", "first token ms unbatched (p50 / p95)"],
        rows,
        "batched: the default scheduler (--max-batch 8, --max-wait-ms 5); unbatched: --max-batch 1.",
    )  # fmt: skip


# -- batched vs alone, per dtype -------------------------------------------------------------------


def identity_part(report: Report, bench: Bench) -> None:
    from clemserve.registry import KeyRegistry, ModelSpec
    from clemserve.service.backends import BackendContext
    from clemserve.service.backends.huggingface_local import HuggingfaceLocalBackend
    from clemserve.service.domain import GenArgs, Row

    size = bench.args.identity_size or bench.args.size
    args = GenArgs(max_tokens=bench.args.max_tokens)
    conversations = questions(bench.args.identity_rows)
    table, found, said = [], {}, []
    for dtype in bench.args.identity_dtypes.split(","):
        backend = HuggingfaceLocalBackend(
            ModelSpec(**hf_entry(NAME, bench.model(dtype, size))),
            BackendContext(KeyRegistry(bench.folder / "key.json"), bench.folder),
        )

        async def run(b: Any = backend) -> tuple[list[Any], list[Any]]:
            await b.load(lambda line, fraction=None: None)
            try:
                merged: list[Any] = []
                for start in range(0, len(conversations), 8):
                    merged += await b.generate_rows([Row(c) for c in conversations[start : start + 8]], args)
                alone = [(await b.generate_rows([Row(c)], args))[0] for c in conversations]
            finally:
                await b.unload()
            return merged, alone

        try:
            merged, alone = asyncio.run(run())
        except Exception as exc:  # float16 on a CPU, say: the other dtypes still count
            table.append([dtype, "-", "-", f"{type(exc).__name__}: {str(exc)[:80]}"])
            said.append(f"{dtype} {type(exc).__name__}")
            continue
        differing = [i for i, (m, a) in enumerate(zip(merged, alone, strict=True)) if m.text != a.text]
        found[dtype] = {"rows": len(conversations), "differ": differing}
        said.append(f"{dtype} {len(differing)} of {len(conversations)}")
        report.figures("identity", "merged vs alone, rows that differ: " + "; ".join(said), dtypes=found)
        table.append([dtype, len(conversations), len(differing), ", ".join(map(str, differing)) or "-"])
    report.table(
        f"Greedy replies merged in batches of 8 vs alone ({size}, max_tokens {bench.args.max_tokens})",
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


def _nice_row(bench: Bench, nice: int) -> list[Any]:
    calls, max_tokens, cores = bench.args.calls, bench.args.max_tokens, os.cpu_count() or 1
    server = serve(bench.folder / f"nice-{nice}", bench.model(), bench.env, "--compute-nice", str(nice))
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

        def generate() -> None:
            while not stop.is_set():
                _timed_calls(server.address, NAME, 1, max_tokens)

        generator = threading.Thread(target=generate)
        generator.start()
        time.sleep(0.5)
        echo: list[float] = []
        deadline = time.monotonic() + bench.args.nice_seconds
        while time.monotonic() < deadline:
            echo += _timed_calls(server.address, "echo", 1, 8)
            time.sleep(0.02)
        stop.set()
        generator.join()
    finally:
        server.stop()
    return [nice, statistics.median(alone) * 1000, statistics.median(loaded) * 1000, echo]


def nice_part(report: Report, bench: Bench) -> None:
    cores = os.cpu_count() or 1
    table, said = [], []
    for nice in [int(n) for n in bench.args.nice_values.split(",")]:
        _, alone, loaded, echo = _nice_row(bench, nice)
        said.append(f"{nice}: {alone:.0f} -> {loaded:.0f} ms ({loaded / alone:.1f}x)")
        report.figures("nice", "--compute-nice: call idle -> busy CPU: " + "; ".join(said))
        table.append(
            [nice, f"{alone:.0f}", f"{loaded:.0f}", f"{loaded / alone:.1f}x",
             f"{statistics.median(echo) * 1000:.1f} / {percentile(echo, 0.95) * 1000:.1f}"]
        )  # fmt: skip
    report.table(
        f"--compute-nice: a call (max_tokens {bench.args.max_tokens}) alone and with {cores} busy-loop processes; "
        "echo calls while the model generates",
        ["--compute-nice", "call ms, idle CPU", f"call ms, {cores} busy loops", "slowdown",
         "echo ms while generating (p50 / p95)"],
        table,
        "The busy loops run in this benchmark's session (the same scheduler autogroup as the server), the worst "
        "case of a shared host.",
    )  # fmt: skip


RUNS = {"load": load_part, "throughput": throughput_part, "identity": identity_part, "nice": nice_part}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cuda if torch sees one"
    )
    parser.add_argument("--size", choices=("tiny", "small", "0.5b"), default=None, help="default: 0.5b, tiny on cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--clients", default=None, help="numbers of callers; default: 1,8,32, 1,8 on cpu")
    parser.add_argument("--calls", type=int, default=2, help="calls per caller")
    parser.add_argument("--max-tokens", type=int, default=None, help="default: 32, 8 on cpu")
    parser.add_argument("--identity-rows", type=int, default=None, help="default: 16, 8 on cpu")
    parser.add_argument("--identity-size", choices=("tiny", "small", "0.5b"), default=None, help="default: --size")
    parser.add_argument("--identity-dtypes", default="float32,bfloat16", help=f"of {', '.join(DTYPES)}")
    parser.add_argument("--nice-seconds", type=float, default=3.0)
    parser.add_argument("--nice-values", default="0,5,10", help="--compute-nice values compared")
    parser.add_argument("--only", default=",".join(PARTS), help=f"parts, of {', '.join(PARTS)}, run in that order")
    parser.add_argument("--models", default=None, help="folder that keeps the built models (default: temporary)")
    parser.add_argument("--figures", type=Path, default=None, help="append each part's figures here (JSON lines)")
    args = parser.parse_args(argv)
    if unknown := set(filter(None, args.only.split(","))) - set(PARTS):
        parser.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    if unknown := set(args.identity_dtypes.split(",")) - set(DTYPES):
        parser.error(f"unknown dtypes {sorted(unknown)}; choose from {', '.join(DTYPES)}")
    return args


def resolve(args: argparse.Namespace, cuda: bool) -> argparse.Namespace:
    """``--device auto`` made ``cuda`` or ``cpu``, and that device's defaults for what was not asked."""
    if args.device == "auto":
        args.device = "cuda" if cuda else "cpu"
    if args.device == "cuda" and not cuda:
        raise SystemExit("bench.gpu: no CUDA device; run with --device cpu")
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    env = {"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {}
    os.environ.update(env)  # before torch is imported: the in-process parts see the same devices

    import torch

    args = resolve(args, torch.cuda.is_available())
    report = Report(args.figures)
    report.device(torch)
    with tempfile.TemporaryDirectory(prefix="clemserve-bench-gpu-") as tmp:
        parts = [p for p in PARTS if p in args.only.split(",")]
        bench = Bench(args, Path(tmp), env, parts)
        try:
            for part in parts:
                with report.part(part, bench.server_logs):
                    RUNS[part](report, bench)
                if not {"load", "throughput"} & set(parts[parts.index(part) + 1 :]):
                    bench.stop()  # no later part calls them: their memory back before identity and nice
        finally:
            bench.stop()
            bench.pool.shutdown()
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
