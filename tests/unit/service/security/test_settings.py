"""Security settings from flags, files and environment twins, and the bind check: which hosts need a token, TLS or
--insecure (and --metrics-public for the metrics endpoint), without a server."""

from __future__ import annotations

from pathlib import Path

import pytest

from clemserve.service.config import parse_server_config
from clemserve.service.security.settings import Security, exposure_problem, is_loopback, metrics_exposure_problem

USER = "user-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"


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


# -- the metrics endpoint: loopback, or public only with --metrics-public ----------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_loopback_metrics_hosts_pass(host: str) -> None:
    assert metrics_exposure_problem(host, public=False) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "metrics.example"])
def test_public_metrics_hosts_need_the_flag(host: str) -> None:
    problem = metrics_exposure_problem(host, public=False)
    assert problem is not None and host in problem and "--metrics-public" in problem
    assert metrics_exposure_problem(host, public=True) is None
