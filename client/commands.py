"""``clemserve models | health | generate | load | unload``: operator commands that talk to a running server.

They are clients: they need the client's dependencies only (grpcio, protobuf) and run on game machines
without the server installed. ``clemserve.client.cli`` adds them to the ``clemserve`` command.

Exit codes: 0 success, 2 usage error, 3 the server refused or failed the request, 4 no server reachable.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

EXIT_OK, EXIT_USAGE, EXIT_SERVER, EXIT_UNREACHABLE = 0, 2, 3, 4
DEFAULT_ADDRESS = "localhost:50051"


def add_connection_flags(parser: argparse.ArgumentParser, environ: Mapping[str, str], several: bool = False) -> None:
    """Where the server is and how to reach it: ``clemserve`` and each client command take these flags, so they
    go before or after the command's name. No flag has a default here (one not given leaves no attribute), so
    that a command's own parser cannot overwrite what came before its name: given in both places, the later
    one wins. ``connect`` fills in the rest from the environment. ``several``: the command's ``--address`` may
    be repeated, naming several servers, each with its own models."""
    address = environ.get("CLEMSERVE_ADDRESS") or DEFAULT_ADDRESS
    flags = parser.add_argument_group("connection (before or after the command; given twice, the later wins)")
    unset = argparse.SUPPRESS
    if several:
        flags.add_argument(
            "--address",
            action="append",
            default=unset,
            help="server host:port; repeat it for several servers, each with its own models (replicas of one "
            f"server are one address: ipv4:A,B) [env CLEMSERVE_ADDRESS; now {address}]",
        )
    else:
        flags.add_argument("--address", default=unset, help=f"server host:port [env CLEMSERVE_ADDRESS; now {address}]")
    flags.add_argument("--timeout", type=float, default=unset, help="seconds before giving up on the server")
    flags.add_argument(
        "--token",
        default=unset,
        help="the server's token; the admin token for load and unload on a server that has one [env CLEMSERVE_TOKEN]",
    )
    flags.add_argument(
        "--tls", action="store_true", default=unset, help="TLS with the system's CA certificates [env CLEMSERVE_TLS=1]"
    )
    flags.add_argument(
        "--tls-ca", metavar="FILE", default=unset, help="TLS, checking the server with this CA [env CLEMSERVE_TLS_CA]"
    )
    flags.add_argument(
        "--tls-cert", metavar="FILE", default=unset, help="a client certificate (mutual TLS) [env CLEMSERVE_TLS_CERT]"
    )
    flags.add_argument("--tls-key", metavar="FILE", default=unset, help="its key [env CLEMSERVE_TLS_KEY]")


def connect(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """Fill in the connection flags not given from the environment; later calls to ``args.address`` go with the
    token and over TLS where the flags or the environment ask for it."""
    from clemserve.client.channel import use
    from clemserve.client.credentials import ConnectionSettings

    defaults: dict[str, Any] = {
        "address": environ.get("CLEMSERVE_ADDRESS") or DEFAULT_ADDRESS,
        "timeout": None,
        "token": None,  # None: CLEMSERVE_TOKEN, read by the client
        "tls": False,
        # each file flag falls back to its own variable: --tls-cert with CLEMSERVE_TLS_CA set uses both
        "tls_ca": environ.get("CLEMSERVE_TLS_CA") or None,
        "tls_cert": environ.get("CLEMSERVE_TLS_CERT") or None,
        "tls_key": environ.get("CLEMSERVE_TLS_KEY") or None,
    }
    for name, value in defaults.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    # a repeatable --address (models, clemcore-setup) is a list: every server named, each called the same way
    args.addresses = list(dict.fromkeys(args.address)) if isinstance(args.address, list) else [args.address]
    args.address = args.addresses[0]
    every = [
        ConnectionSettings(
            address,
            args.token,
            True if args.tls else None,  # None: plain text unless CLEMSERVE_TLS or a file says TLS
            args.tls_ca,
            args.tls_cert,
            args.tls_key,
        )
        for address in args.addresses
    ]
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key:
        # read the files now: a missing one, or a certificate without its key, is the caller's mistake (OSError,
        # ValueError), not a failed call
        every[0].files.credentials()
    for settings in reversed(every):  # the first is the default address
        use(settings)


def add_commands(commands: Any, environ: Mapping[str, str]) -> None:
    """Add the client-side subcommands to the ``clemserve`` parser."""

    def command(name: str, help_text: str, several: bool = False) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = commands.add_parser(name, help=help_text)
        add_connection_flags(parser, environ, several)
        return parser

    models = command(
        "models",
        "the server's models as a table: name, backend, state, availability, load time, memory (ESTIMATE before "
        "loading; MEASURED once loaded: N/params the bytes of its tensors on the CPU, N/cuda the CUDA memory its "
        "load allocated, or estimate where the model is out of reach; RSS the server process's growth across the "
        "load, imports included, for information only), SPENT since the server started (US dollars for a paid "
        "API, compute seconds for a model the server runs) and the share of prompt tokens REUSED from a cache; with "
        "--address repeated, every server's models, each row with its SERVER, and a note for each name that more "
        "than one server lists",
        several=True,
    )
    models.add_argument(
        "--available", action="store_true", help="only the models that can run on the server now (ready or can load)"
    )
    models.add_argument(
        "--memory",
        action="store_true",
        help="after the table, each loaded model's prefix reuse, the memory budget and each GPU's figures",
    )
    command("health", "is the server SERVING?")
    generate = command("generate", "one reply from a model; prints the response text")
    generate.add_argument("-m", "--model", required=True, help="model name from the server's registry")
    generate.add_argument("-t", "--temperature", type=float, default=0.0)
    generate.add_argument("-l", "--max-tokens", type=int, default=300)
    generate.add_argument("--system", default=None, help="a system message before the text")
    generate.add_argument("--json", action="store_true", help="print the whole (prompt, response, text) triple")
    generate.add_argument(
        "--stream", action="store_true", help="print the text as it is generated, the request's state to stderr"
    )
    generate.add_argument("text", nargs="+", help="the user message")
    load = command("load", "load a model on the server now, showing its progress")
    load.add_argument("model")
    unload = command("unload", "free a model on the server")
    unload.add_argument("model")


CLIENT_COMMANDS = ("models", "health", "generate", "load", "unload")


def run(args: argparse.Namespace) -> int:
    import clemserve.client as backends

    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "models": _models,
        "health": _health,
        "generate": _generate,
        "load": _load,
        "unload": _unload,
    }
    # every call below goes to args.address, connected by clemserve.client.cli with the token and TLS flags
    try:
        return handlers[args.command](args)
    except backends.ClemserveError as exc:
        return report(exc)


def report(exc: Exception) -> int:
    """Print why the server did not answer (unreachable) or refused; the exit code that says which."""
    from clemserve.client import ShuttingDownError, UnavailableError

    if isinstance(exc, UnavailableError):
        print(f"clemserve: {exc}", file=sys.stderr)
        if not isinstance(exc, ShuttingDownError):  # one is there, on its way out
            print(UNREACHABLE_HINT, file=sys.stderr)
        return EXIT_UNREACHABLE
    print(f"clemserve: {type(exc).__name__}: {exc}", file=sys.stderr)
    return EXIT_SERVER


#: what to do when no server answers at the address
UNREACHABLE_HINT = (
    "  is a server running there? Start one (clemserve serve), or name the one to use: --address HOST:PORT "
    "(before or after the command) or the CLEMSERVE_ADDRESS environment variable"
)


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _models(args: argparse.Namespace) -> int:
    """One server's models as a table; several servers' (--address repeated) with a SERVER column, a note for
    each name that more than one lists, and a report for each server that did not answer."""
    from clemserve.client.admin import list_servers, shared_names

    several = len(args.addresses) > 1
    rows = [
        [
            *(["SERVER"] if several else []), "NAME", "BACKEND", "STATE", "AVAILABILITY", "LOAD S", "IN FLIGHT",
            "QUEUED", "LEASES", "ESTIMATE MIB", "MEASURED MIB", "RSS MIB", "SPENT", "REUSED", "SOURCE",
            "AVAILABILITY DETAIL",
        ]
    ]  # fmt: skip
    listings = list_servers(args.addresses, timeout=args.timeout)
    if not several and listings[0].error is not None:
        raise listings[0].error
    for listing in listings:
        server = [listing.address] if several else []
        rows.extend(
            [*server, *_model_row(status)] for status in listing.models if status.runnable or not args.available
        )
    if any(listing.error is None for listing in listings):
        print(_table(rows))
    for name, servers in shared_names(listings).items():
        print(f"note: {name} is on {len(servers)} servers: {', '.join(servers)}", file=sys.stderr)
    if args.memory:
        reusing = [(listing, status) for listing in listings for status in listing.models if status.prefix_caching]
        for listing, status in reusing:
            print(f"{f'{listing.address} ' if several else ''}{status.name} prefix reuse: {_prefix_reuse(status)}")
        for listing in listings:
            if listing.budget is not None:
                print(("" if not several else f"{listing.address}: ") + _budget_lines(listing.budget))
    codes = [report(listing.error) for listing in listings if listing.error is not None]
    return max(codes, default=EXIT_OK)


def _prefix_reuse(status: Any) -> str:
    """How a loaded model reuses prompt prefixes, what its prefix cache holds, and the share of its prompt
    tokens a cache served since the server started."""
    held = f", holding {status.prefix_cache_bytes / 2**20:.1f} MiB" if status.prefix_cache_bytes else ""
    spend = status.spend
    if not spend.prompt_tokens:
        return f"{status.prefix_caching}{held}"
    return f"{status.prefix_caching}{held}; {spend.cached_share:.0%} of {spend.prompt_tokens} prompt tokens reused"


def _model_row(status: Any) -> list[str]:
    spec = status.model_spec
    state = status.state if not status.state_reason else f"{status.state}: {status.state_reason[:60]}"
    return [
        status.name,
        str(spec.get("backend", "")),
        state,
        status.availability,
        f"{status.load_seconds:.1f}" if status.load_seconds else "-",
        str(status.requests_in_flight),
        str(status.requests_queued),
        str(status.leases),
        _mib(status.estimated_memory_bytes),
        _measured(status),
        _mib(status.rss_delta_bytes),
        _spent(status.spend),
        f"{status.spend.cached_share:.0%}" if status.spend.prompt_tokens else "-",
        str(spec.get("lookup_source", "")),
        status.availability_detail,
    ]


def _spent(spend: Any) -> str:
    """What a model's calls cost since the server started: US dollars for a paid API (with ``+?`` where some
    calls had no price), compute seconds for a model the server runs, ``-`` before its first call."""
    if not spend.calls:
        return "-"
    if spend.cost_usd or spend.unpriced_calls:
        return f"${spend.cost_usd:.4f}" + ("+?" if spend.unpriced_calls else "")
    return f"{spend.compute_seconds:.1f}s"


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f}" if size else "-"


def _measured(status: Any) -> str:
    """What the loaded model holds, and how that was measured: /params the bytes of its tensors on the CPU,
    /cuda CUDA memory its load allocated; "estimate": not measurable here (charged its estimate)."""
    labels = {"parameters and buffers": "params", "cuda allocated": "cuda"}
    if status.measured_by == "estimate":
        return "estimate"
    if not status.measured_memory_bytes:
        return "-"
    label = labels.get(status.measured_by, status.measured_by.replace(" ", "-"))
    return f"{status.measured_memory_bytes / 2**20:.0f}" + (f"/{label}" if label else "")


def _budget_lines(budget: Any) -> str:
    """The budget under the table: its size, its use, where it came from, and each GPU's figures."""
    if not budget.kind:
        return "memory budget: not found yet (no local model has asked for it)"
    lines = [
        f"memory budget: {budget.used_bytes / 2**20:.0f} of {budget.total_bytes / 2**20:.0f} MiB {budget.kind} used "
        f"({budget.source}); KV-cache allowance {budget.kv_cache_tokens} tokens per model"
    ]
    for gpu in budget.devices:
        lines.append(
            f"  cuda:{gpu.index} {gpu.name}: {gpu.total_bytes / 2**30:.1f} GiB, budget {gpu.budget_bytes / 2**30:.1f}, "
            f"others {gpu.used_by_others_bytes / 2**30:.1f}, this server {gpu.process_bytes / 2**30:.1f} "
            f"(tensors {gpu.allocated_bytes / 2**30:.1f}, allocator cache {gpu.allocator_cache_bytes / 2**30:.1f}, "
            f"CUDA context {gpu.cuda_context_bytes / 2**30:.1f})"
        )
    return "\n".join(lines)


#: grpc.health.v1's HealthCheckResponse.ServingStatus
_SERVING_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
_SERVING = 1


def _health(args: argparse.Namespace) -> int:
    import grpc

    from clemserve.client.channel import channel_for

    check = channel_for(args.address).unary_unary(
        "/grpc.health.v1.Health/Check", response_deserializer=_health_check_response().FromString
    )
    try:
        # HealthCheckRequest(service="") is empty on the wire
        reply = check(b"", timeout=args.timeout or 5)
    except grpc.RpcError as exc:
        print(f"clemserve: no server at {args.address}: {exc.code().name}", file=sys.stderr)
        print(UNREACHABLE_HINT, file=sys.stderr)
        return EXIT_UNREACHABLE
    status = _SERVING_STATUS.get(reply.status, str(reply.status))
    print(f"{args.address}: {status}")
    return EXIT_OK if reply.status == _SERVING else EXIT_SERVER


def _health_check_response() -> Any:
    """grpc.health.v1.HealthCheckResponse, declared here (its status enum as the int32 it is on the wire): the
    generated module ships in grpcio-health-checking, which only the server installs."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    field = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="clemserve_health_check.proto", package="grpc.health.v1")
    file.syntax = "proto3"
    response = file.message_type.add(name="HealthCheckResponse")
    response.field.add(name="status", number=1, type=field.TYPE_INT32, label=field.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()  # a pool of its own: the real module may be loaded beside it
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse"))


def _generate(args: argparse.Namespace) -> int:
    import clemserve.client as backends

    model = backends.get_model_for(args.model, address=args.address, timeout=args.timeout)
    model.set_gen_args(temperature=args.temperature, max_tokens=args.max_tokens)
    messages: list[dict[str, Any]] = []
    if args.system is not None:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": " ".join(args.text)})
    prompt, response, text = _streamed(model, messages, args.json) if args.stream else model.generate_response(messages)
    if args.json:
        print(json.dumps({"prompt": prompt, "response": response, "response_text": text}, indent=2, ensure_ascii=False))
    elif not args.stream:
        print(text)
    return EXIT_OK


def _streamed(model: Any, messages: list[dict[str, Any]], quiet: bool) -> Any:
    """generate_stream's events as they come: states to stderr, the text to stdout (unless only the JSON
    triple is wanted); the reply's triple."""
    from clemserve.client import StreamReply, StreamState, TextDelta

    for event in model.generate_stream(messages):
        if isinstance(event, StreamState):
            progress = f" {event.progress:.0%}" if event.phase == "loading" else ""
            ahead = f" behind {event.requests_ahead}" if event.phase == "queued" else ""
            print(f"[{event.phase}{progress}{ahead}] {event.detail}".rstrip(), file=sys.stderr, flush=True)
        elif isinstance(event, TextDelta) and not quiet:
            print(event.text, end="", flush=True)
        elif isinstance(event, StreamReply):
            if not quiet:
                print()
            return event.triple
    raise RuntimeError("the stream ended without a reply")


def _load(args: argparse.Namespace) -> int:
    """LoadModel blocks until the model is ready; meanwhile ListModels shows what the load is doing."""
    import clemserve.client as backends

    done = threading.Event()
    outcome: dict[str, Any] = {}

    def load() -> None:
        try:
            outcome["status"] = backends.preload(args.model, address=args.address, timeout=args.timeout)
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=load, daemon=True).start()
    last = ""
    while not done.wait(0.5):
        try:
            for status in backends.list_models(address=args.address, timeout=5):
                if status.name == args.model and status.state == "loading" and status.state_reason != last:
                    last = status.state_reason
                    print(f"{args.model}: {last}", file=sys.stderr, flush=True)
        except backends.ClemserveError:
            pass
    if "error" in outcome:
        raise outcome["error"]
    print(f"{args.model}: ready (loaded in {outcome['status'].load_seconds:.1f} s)")
    return EXIT_OK


def _unload(args: argparse.Namespace) -> int:
    import clemserve.client as backends

    was_loaded = backends.unload(args.model, address=args.address, timeout=args.timeout)
    print(f"{args.model}: {'unloaded' if was_loaded else 'was not loaded'}")
    return EXIT_OK
