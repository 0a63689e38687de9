"""The client's connection settings and credentials, per address, without a server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from clemserve.client import credentials
from clemserve.client.credentials import ConnectionSettings, Tls

TOKEN = "user-token-0123456789abcdef"
GENERATE = "/clemserve.v1.ModelService/Generate"
TLS_VARIABLES = ("CLEMSERVE_TLS", "CLEMSERVE_TLS_CA", "CLEMSERVE_TLS_CERT", "CLEMSERVE_TLS_KEY")


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("CLEMSERVE_TOKEN", *TLS_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    yield
    for address in [a for a in credentials._settings if a.startswith("creds:")]:
        del credentials._settings[address]


def test_settings_say_what_the_channel_speaks() -> None:
    assert ConnectionSettings("creds:1").channel_tls is None  # as the environment says
    assert ConnectionSettings("creds:1", tls=False).channel_tls is False
    assert ConnectionSettings("creds:1", tls=True).channel_tls == Tls()
    # a file means TLS, whatever tls says
    assert ConnectionSettings("creds:1", tls_ca="ca.pem").channel_tls == Tls(ca="ca.pem")
    assert ConnectionSettings("creds:1", tls=False, tls_cert="c", tls_key="k").channel_tls == Tls(None, "c", "k")
    assert ConnectionSettings("creds:1", tls_ca="a", tls_cert="b", tls_key="c").files == Tls("a", "b", "c")


def test_settings_are_values_that_keep_the_token_out_of_their_repr() -> None:
    settings = ConnectionSettings("creds:1", TOKEN, True)
    assert settings == ConnectionSettings("creds:1", TOKEN, True) != ConnectionSettings("creds:1", "other", True)
    assert TOKEN not in repr(settings) and "creds:1" in repr(settings)
    with pytest.raises(AttributeError):
        settings.token = "changed"  # type: ignore[misc]


def test_client_token_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    address = "creds:2"
    credentials.remember(ConnectionSettings(address))
    assert credentials.token_for(address) is None
    monkeypatch.setenv("CLEMSERVE_TOKEN", "from-env")
    assert credentials.token_for(address) == "from-env"
    credentials.remember(ConnectionSettings(address, token="from-connect"))
    assert credentials.token_for(address) == "from-connect"
    assert credentials.token_for(address, "from-call") == "from-call"
    assert credentials.token_for("creds:other") == "from-env"  # settings are per address


def test_client_tls_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    address = "creds:3"
    credentials.remember(ConnectionSettings(address))
    assert credentials.tls_for(address) is None
    monkeypatch.setenv("CLEMSERVE_TLS_CA", "ca.pem")
    assert credentials.tls_for(address) == Tls(ca="ca.pem")
    credentials.remember(ConnectionSettings(address, tls=False))
    assert credentials.tls_for(address) is None
    credentials.remember(ConnectionSettings(address, tls=True))
    assert credentials.tls_for(address) == Tls()
    credentials.remember(ConnectionSettings(address, tls_ca="a", tls_cert="b", tls_key="c"))
    assert credentials.tls_for(address) == Tls("a", "b", "c")
    monkeypatch.delenv("CLEMSERVE_TLS_CA")
    monkeypatch.setenv("CLEMSERVE_TLS", "yes")
    assert credentials.tls_for("creds:other") == Tls()


def test_tls_files_are_read_when_credentials_are_made(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="both"):
        Tls(cert="b").credentials()
    with pytest.raises(OSError, match="CA file /nonexistent"):
        Tls(ca="/nonexistent").credentials()
    from tests.certs import make_pki

    pki = make_pki(tmp_path)
    mutual = Tls(str(pki.ca), str(pki.client_cert), str(pki.client_key))
    assert isinstance(mutual.credentials(), grpc.ChannelCredentials)
    with pytest.raises(OSError, match="key file"):
        Tls(str(pki.ca), str(pki.client_cert), str(tmp_path / "missing.pem")).credentials()


def test_client_interceptor_adds_the_token_and_keeps_other_metadata() -> None:
    seen: list[Any] = []
    details = credentials._CallDetails(GENERATE, 5.0, [("x-request-id", "r1")], None, None, None)
    credentials.BearerToken(TOKEN).intercept_unary_unary(lambda d, r: seen.append(d), details, object())
    assert seen[0].metadata == [("x-request-id", "r1"), ("authorization", f"Bearer {TOKEN}")]
    assert (seen[0].method, seen[0].timeout) == (GENERATE, 5.0)
    assert TOKEN not in repr(credentials.BearerToken(TOKEN))
    assert isinstance(seen[0], grpc.ClientCallDetails)
