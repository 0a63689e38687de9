#!/usr/bin/env python3
"""Render clemserve.conf.template into nginx configuration: clemserve's gateway for several servers.

    python3 deploy/nginx/render.py --listen 0.0.0.0:8443 \\
        --route 'llama-3.1-70b*=10.0.0.5:50051' \\
        --route 'qwen2.5-72b=10.0.0.6:50051,10.0.0.7:50051' \\
        --default 10.0.0.5:50051 \\
        --tls-cert gateway.pem --tls-key gateway-key.pem > /etc/nginx/conf.d/clemserve.conf

Each ``--route PATTERN=TARGET`` sends the calls for the models whose name matches PATTERN (a glob: ``*`` any
characters, ``?`` one; the first pattern that matches wins) to TARGET, one server or several servers that hold
the same models (a replicated pair: nginx spreads calls over them, and leaves one that fails for the other).
``--default`` takes every other call (ListModels, which names no model, and names no route matches).

Python's standard library only: it runs on a gateway machine without clemserve.
"""

from __future__ import annotations

import argparse
import re
import sys
import urllib.parse
from pathlib import Path

TEMPLATE = Path(__file__).with_name("clemserve.conf.template")
#: what a model name keeps as it is in the clemserve-model metadata: printable ASCII but space and "%"
_KEPT = "".join(chr(code) for code in range(0x21, 0x7F) if chr(code) != "%")
#: a server that fails at the connection is not tried again for this long (nginx's passive health check)
FAIL_TIMEOUT_S = 10


def pattern_regex(pattern: str) -> str:
    """The nginx map regex for a glob over model names, matched against the header as the client encodes it."""
    parts = []
    for char in pattern:
        if char == "*":
            parts.append(".*")
        elif char == "?":
            parts.append(".")
        elif char == '"':  # in nginx's quoted string
            parts.append('\\"')
        elif char == "\\":  # escaped for the regex, and each backslash again for nginx's quoted string
            parts.append("\\" * 4)
        else:
            parts.append(re.escape(urllib.parse.quote(char, safe=_KEPT)))
    return "~^" + "".join(parts) + "$"


def fill(template: str, **fields: str) -> str:
    """``template`` with each ``@name@`` replaced by ``fields[name]`` (nginx's own ``$`` stays as it is)."""
    missing = set(re.findall(r"@([a-z_]+)@", template)) - set(fields)
    if missing:
        raise ValueError(f"{TEMPLATE.name}: no value for {', '.join(sorted(missing))}")
    return re.sub(r"@([a-z_]+)@", lambda found: fields[found.group(1)], template)


def parse_target(text: str, what: str) -> tuple[str, ...]:
    servers = tuple(part.strip() for part in text.removeprefix("ipv4:").split(",") if part.strip())
    for server in servers:
        host, _, port = server.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{what}: {server!r} is not host:port")
    if not servers:
        raise ValueError(f"{what}: no server")
    return servers


def render(
    routes: list[tuple[str, tuple[str, ...]]],
    default: tuple[str, ...],
    listen: str,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    backend_tls_ca: str | None = None,
    backend_tls_name: str | None = None,
) -> str:
    """The configuration for ``routes`` (pattern, servers) in order, ``default`` for the rest."""
    upstreams: dict[tuple[str, ...], str] = {}

    def upstream(servers: tuple[str, ...]) -> str:
        return upstreams.setdefault(servers, f"clemserve_{len(upstreams)}")

    default_name = upstream(default)
    route_lines = "".join(f'    "{pattern_regex(pattern)}" {upstream(servers)};\n' for pattern, servers in routes)
    blocks = []
    for servers, name in upstreams.items():
        lines = "".join(f"    server {s} max_fails=1 fail_timeout={FAIL_TIMEOUT_S}s;\n" for s in servers)
        blocks.append(f"\nupstream {name} {{\n{lines}    keepalive 64;\n}}\n")
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    tls = ""
    if tls_cert:
        tls = (
            f"    ssl_certificate {tls_cert};\n    ssl_certificate_key {tls_key};\n    ssl_protocols TLSv1.2 TLSv1.3;\n"
        )
    upstream_tls = ""
    if backend_tls_ca:
        upstream_tls = (
            f"        grpc_ssl_trusted_certificate {backend_tls_ca};\n        grpc_ssl_verify on;\n"
            "        grpc_ssl_server_name on;\n"
            f"        grpc_ssl_name {backend_tls_name or 'localhost'};\n"
        )
    return fill(
        TEMPLATE.read_text(),
        default_upstream=default_name,
        routes=route_lines,
        upstreams="".join(blocks),
        listen=f"{listen} {'ssl http2' if tls_cert else 'http2'}",
        tls=tls,
        upstream_scheme="grpcs" if backend_tls_ca else "grpc",
        upstream_tls=upstream_tls,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="0.0.0.0:8443", help="nginx's listen address (default: 0.0.0.0:8443)")
    parser.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="PATTERN=TARGET",
        help="models matching the glob PATTERN go to TARGET: host:port, or host:port,host:port for servers "
        "holding the same models; repeatable, the first match wins",
    )
    parser.add_argument("--default", required=True, metavar="TARGET", help="where every other call goes")
    parser.add_argument("--tls-cert", help="the gateway's certificate (PEM): clients connect with TLS")
    parser.add_argument("--tls-key", help="its private key (PEM)")
    parser.add_argument(
        "--backend-tls-ca",
        help="the servers serve TLS (clemserve serve --tls-cert): the CA that signed their certificates",
    )
    parser.add_argument(
        "--backend-tls-name",
        help="the name every server's certificate carries, checked on each connection (default: localhost)",
    )
    args = parser.parse_args(argv)
    try:
        routes = []
        for route in args.route:
            pattern, sep, target = route.partition("=")
            if not sep or not pattern:
                raise ValueError(f"--route {route!r}: not PATTERN=TARGET")
            routes.append((pattern, parse_target(target, f"--route {route!r}")))
        text = render(
            routes,
            parse_target(args.default, "--default"),
            args.listen,
            args.tls_cert,
            args.tls_key,
            args.backend_tls_ca,
            args.backend_tls_name,
        )
    except ValueError as exc:
        parser.error(str(exc))
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
