"""Who may call the server: tokens, TLS certificate files, and the refusal to listen unprotected.

Pure: parsed from the flags in ``main()``; ``auth.py`` turns it into a gRPC interceptor and credentials.
"""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

#: shorter tokens are refused: guessable, and too short for the log redactor to recognise their pieces
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class Security:
    #: callers send ``authorization: Bearer <auth_token>``; empty: no token needed
    auth_token: str = field(default="", repr=False)
    #: needed for LoadModel, UnloadModel and any other state-changing RPC; empty: the auth token suffices
    admin_token: str = field(default="", repr=False)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: CA of the client certificates to require (mutual TLS)
    tls_client_ca: Path | None = None
    #: listen on a non-loopback address with neither a token nor TLS
    insecure: bool = False
    #: selectors may add fields that choose what is loaded or called (service/security/client_specs.py)
    allow_client_specs: bool = False

    @property
    def tokens(self) -> tuple[str, ...]:
        return tuple(t for t in (self.auth_token, self.admin_token) if t)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def _token(args: argparse.Namespace, name: str) -> str:
    """A token from ``--NAME`` or ``--NAME-file``; SystemExit naming the flag or file when unusable."""
    flag = f"--{name.replace('_', '-')}"
    value = getattr(args, name) or ""
    path = getattr(args, f"{name}_file")
    if value and path:
        raise SystemExit(f"clemserve: give {flag} or {flag}-file, not both")
    if path:
        try:
            value = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise SystemExit(f"clemserve: {flag}-file {path}: cannot read the file: {reason}") from None
        flag = f"{flag}-file {path}"
    value = value.strip()
    if value and (len(value) < MIN_TOKEN_CHARS or any(c.isspace() for c in value)):
        raise SystemExit(f"clemserve: {flag}: a token needs at least {MIN_TOKEN_CHARS} characters and no spaces")
    return value


def security_from_args(args: argparse.Namespace) -> Security:
    def path(name: str) -> Path | None:
        value = getattr(args, name)
        return Path(value) if value else None

    tls_cert, tls_key, tls_client_ca = path("tls_cert"), path("tls_key"), path("tls_client_ca")
    if (tls_cert is None) != (tls_key is None):
        raise SystemExit("clemserve: TLS needs both --tls-cert and --tls-key")
    if tls_client_ca is not None and tls_cert is None:
        raise SystemExit("clemserve: --tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    auth_token, admin_token = _token(args, "auth_token"), _token(args, "admin_token")
    if auth_token and auth_token == admin_token:
        raise SystemExit("clemserve: --admin-token must differ from --auth-token, or every caller is an admin")
    return Security(
        auth_token=auth_token,
        admin_token=admin_token,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
        insecure=_switch(args.insecure),
        allow_client_specs=_switch(args.allow_client_specs),
    )


def _switch(value: object) -> bool:
    """A switch's value: True from the flag, or its environment twin's text."""
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def is_loopback(host: str) -> bool:
    """Only this machine can reach ``host``. A name other than localhost counts as reachable from outside."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_problem(host: str, security: Security) -> str | None:
    """Why the server must not start listening on ``host``, or None."""
    if is_loopback(host) or security.auth_token or security.tls or security.insecure:
        return None
    return (
        f"refusing to listen on {host}, an address other machines can reach, without protection: "
        "give --auth-token (or --auth-token-file) or --tls-cert and --tls-key, "
        "or --insecure to serve anyone who can connect"
    )


def metrics_exposure_problem(host: str, public: bool) -> str | None:
    """Why the metrics endpoint must not listen on ``host``, or None: it has no authentication or TLS."""
    if public or is_loopback(host):
        return None
    return (
        f"refusing to serve metrics on {host}, an address other machines can reach: the metrics endpoint has "
        "neither token nor TLS; give --metrics-public to serve them to anyone who can connect"
    )
