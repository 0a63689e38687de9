"""Channels shared per way of calling a server, and connect()'s settings, without a server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from clemserve.client import channel, credentials
from clemserve.client.credentials import ConnectionSettings, Tls


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("CLEMSERVE_ADDRESS", "CLEMSERVE_TOKEN", "CLEMSERVE_TLS", "CLEMSERVE_TLS_CA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(channel, "_default_address", None)
    yield
    for address in [a for a in credentials._settings if a.startswith("chan:")]:
        del credentials._settings[address]
    channel.close_all()


def test_connect_keeps_its_keywords_and_remembers_them_as_one_settings_object() -> None:
    channel.connect("chan:1", token="t", tls_ca=Path("ca.pem"), tls_cert="c.pem", tls_key=Path("k.pem"))
    assert credentials._settings["chan:1"] == ConnectionSettings("chan:1", "t", None, "ca.pem", "c.pem", "k.pem")
    assert channel.default_address() == "chan:1"
    assert channel.channel_key("chan:1") == ("chan:1", "t", Tls("ca.pem", "c.pem", "k.pem"))
    channel.connect("chan:2", tls=False)
    assert channel.default_address() == "chan:2"
    assert channel.channel_key("chan:2", "from-call") == ("chan:2", "from-call", None)


def test_the_default_address_falls_back_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert channel.default_address() == channel.DEFAULT_ADDRESS
    monkeypatch.setenv("CLEMSERVE_ADDRESS", "chan:env")
    assert channel.default_address() == "chan:env"
    channel.use(ConnectionSettings("chan:3"))
    assert channel.default_address() == "chan:3"


def test_one_channel_per_way_of_calling_a_server() -> None:
    channel.use(ConnectionSettings("chan:4", tls=False))
    plain = channel.channel_for("chan:4")
    assert channel.channel_for("chan:4") is plain
    assert channel.channel_for("chan:4", "a-token") is not plain  # another token, another channel
    channel.use(ConnectionSettings("chan:4", tls=True))
    assert channel.channel_for("chan:4") is not plain  # TLS now


def test_asyncio_channels_are_per_event_loop() -> None:
    async def two() -> tuple[object, object]:
        return channel.aio_channel_for("chan:5"), channel.aio_channel_for("chan:5")

    first, again = asyncio.run(two())
    assert first is again
    other, _ = asyncio.run(two())
    assert other is not first
