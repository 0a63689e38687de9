"""Security settings, the bind check, token roles and the client's credentials, without a server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from clemserve.client import credentials
from clemserve.service.config import parse_server_config
from clemserve.service.security.auth import ADMIN_METHODS, USER_METHODS, Role, TokenAuth, bearer_token
from clemserve.service.security.settings import Security, exposure_problem, is_loopback

USER = "user-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"
GENERATE = "/clemserve.v1.ModelService/Generate"
LOAD = "/clemserve.v1.ModelService/LoadModel"


def test_tokens_from_flags_files_and_twins(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"  {USER}\n")
    config = parse_server_config(["--auth-token-file", str(token_file)], {"CLEMSERVE_ADMIN_TOKEN": ADMIN})
    assert (config.security.auth_token, config.security.admin_token) == (USER, ADMIN)
    assert USER not in repr(config) and ADMIN not in repr(config)
    assert parse_server_config([], {}).security == Security()


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--auth-token", "short"], "at least 16"),
        (["--auth-token", "has a space in the middle"], "no spaces"),
        (["--auth-token", USER, "--auth-token-file", "f"], "not both"),
        (["--auth-token", USER, "--admin-token", USER], "must differ"),
        (["--admin-token-file", "/nonexistent/token"], "--admin-token-file /nonexistent/token: cannot read"),
        (["--tls-cert", "c.pem"], "both --tls-cert and --tls-key"),
        (["--tls-client-ca", "ca.pem"], "needs --tls-cert"),
    ],
)
def test_bad_security_settings_stop_with_a_message(argv: list[str], says: str) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_server_config(argv, {})
    assert says in str(caught.value)


def test_switches_and_their_twins() -> None:
    assert parse_server_config(["--insecure", "--allow-client-specs"], {}).security.insecure
    assert parse_server_config([], {"CLEMSERVE_ALLOW_CLIENT_SPECS": "true"}).security.allow_client_specs
    assert not parse_server_config([], {"CLEMSERVE_INSECURE": "0"}).security.insecure


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.1", "localhost", "::1", "[::1]"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)
    assert exposure_problem(host, Security()) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "192.0.2.10", "model-host", ""])
def test_other_hosts_need_protection(host: str) -> None:
    assert not is_loopback(host)
    problem = exposure_problem(host, Security())
    assert problem is not None and "--auth-token" in problem and "--insecure" in problem
    for protected in (
        Security(auth_token=USER),
        Security(tls_cert=Path("c"), tls_key=Path("k")),
        Security(insecure=True),
    ):
        assert exposure_problem(host, protected) is None
    # an admin token alone leaves Generate open to everyone
    assert exposure_problem(host, Security(admin_token=ADMIN)) is not None


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ((("authorization", f"Bearer {USER}"),), USER),
        ((("x-request-id", "r"), ("authorization", f"bearer  {USER} ")), USER),
        ((("authorization", f"Basic {USER}"),), None),
        ((("authorization", "Bearer "),), None),
        ((), None),
        (None, None),
    ],
)
def test_bearer_token(metadata: Any, token: str | None) -> None:
    assert bearer_token(metadata) == token


def test_roles() -> None:
    both = TokenAuth(USER, ADMIN)
    assert [both.role(t) for t in (USER, ADMIN, None, "", USER + "x", ADMIN[:-1])] == [
        Role.USER, Role.ADMIN, None, None, None, None,
    ]  # fmt: skip
    user_only = TokenAuth(USER, "")
    assert [user_only.role(t) for t in (USER, None, ADMIN)] == [Role.ADMIN, None, None]
    admin_only = TokenAuth("", ADMIN)
    assert [admin_only.role(t) for t in (ADMIN, None, USER)] == [Role.ADMIN, Role.USER, Role.USER]


def test_refusals() -> None:
    auth = TokenAuth(USER, ADMIN)

    def bearer(token: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token}"),)

    assert auth.refusal(GENERATE, ()).code == "UNAUTHENTICATED"  # type: ignore[union-attr]
    assert auth.refusal(GENERATE, bearer("wrong-token-0123456789")).code == "UNAUTHENTICATED"  # type: ignore[union-attr]
    assert auth.refusal(GENERATE, bearer(USER)) is None
    assert auth.refusal(LOAD, bearer(USER)).code == "PERMISSION_DENIED"  # type: ignore[union-attr]
    assert auth.refusal(LOAD, bearer(ADMIN)) is None
    assert auth.refusal(GENERATE, bearer(ADMIN)) is None
    # RPCs added later need the admin token until listed
    assert auth.refusal("/clemserve.v1.ModelService/Reset", bearer(USER)).code == "PERMISSION_DENIED"  # type: ignore[union-attr]
    for open_method in (
        "/grpc.health.v1.Health/Check",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ):
        assert auth.refusal(open_method, ()) is None
    assert "/clemserve.v1.ModelService/UnloadModel" not in USER_METHODS


def test_every_rpc_is_classified() -> None:
    """A new RPC must be listed as a caller's or an admin's: the admin token guards it until then."""
    from clemserve.v1 import clemserve_pb2 as pb

    methods = {f"/clemserve.v1.ModelService/{m.name}" for m in pb.DESCRIPTOR.services_by_name["ModelService"].methods}
    assert methods <= USER_METHODS | ADMIN_METHODS, sorted(methods - USER_METHODS - ADMIN_METHODS)
    assert not USER_METHODS & ADMIN_METHODS
    auth = TokenAuth(USER, ADMIN)
    for method in methods:
        refused = auth.refusal(method, (("authorization", f"Bearer {USER}"),))
        assert (refused is not None) == (method in ADMIN_METHODS), method


def test_client_token_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLEMSERVE_TOKEN", raising=False)
    address = "127.0.0.1:1"
    credentials.remember(address)
    assert credentials.token_for(address) is None
    monkeypatch.setenv("CLEMSERVE_TOKEN", "from-env")
    assert credentials.token_for(address) == "from-env"
    credentials.remember(address, token="from-connect")
    assert credentials.token_for(address) == "from-connect"
    assert credentials.token_for(address, "from-call") == "from-call"
    credentials.remember(address)


def test_client_tls_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CLEMSERVE_TLS", "CLEMSERVE_TLS_CA", "CLEMSERVE_TLS_CERT", "CLEMSERVE_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    address = "127.0.0.1:2"
    credentials.remember(address)
    assert credentials.tls_for(address) is None
    monkeypatch.setenv("CLEMSERVE_TLS_CA", "ca.pem")
    assert credentials.tls_for(address) == credentials.Tls(ca="ca.pem")
    credentials.remember(address, tls=False)
    assert credentials.tls_for(address) is None
    credentials.remember(address, tls=True)
    assert credentials.tls_for(address) == credentials.Tls()
    credentials.remember(address, tls_ca=Path("a"), tls_cert="b", tls_key="c")
    assert credentials.tls_for(address) == credentials.Tls("a", "b", "c")
    with pytest.raises(ValueError, match="both"):
        credentials.Tls(cert="b").credentials()
    with pytest.raises(OSError, match="CA file /nonexistent"):
        credentials.Tls(ca="/nonexistent").credentials()
    credentials.remember(address)


def test_client_interceptor_adds_the_token_and_keeps_other_metadata() -> None:
    seen: list[Any] = []
    details = credentials._CallDetails(GENERATE, 5.0, [("x-request-id", "r1")], None, None, None)
    credentials.BearerToken(USER).intercept_unary_unary(lambda d, r: seen.append(d), details, object())
    assert seen[0].metadata == [("x-request-id", "r1"), ("authorization", f"Bearer {USER}")]
    assert (seen[0].method, seen[0].timeout) == (GENERATE, 5.0)
    assert USER not in repr(credentials.BearerToken(USER))
    assert isinstance(seen[0], grpc.ClientCallDetails)
