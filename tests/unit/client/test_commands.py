"""The client commands' connection flags: defaults from the environment, and one settings object for the
address they name."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from clemserve.client import channel, commands, credentials
from clemserve.client.credentials import ConnectionSettings


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(channel, "_default_address", None)
    yield
    for address in [a for a in credentials._settings if a.startswith("cmd:")]:
        del credentials._settings[address]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    commands.add_connection_flags(parser, {})
    return parser.parse_args(argv)


def test_flags_not_given_come_from_the_environment() -> None:
    args = parse(["--token", "t"])
    commands.connect(args, {"CLEMSERVE_ADDRESS": "cmd:1"})
    assert (args.address, args.timeout, args.tls, args.tls_ca, args.tls_key) == ("cmd:1", None, False, None, None)
    assert credentials._settings["cmd:1"] == ConnectionSettings("cmd:1", "t")
    assert channel.default_address() == "cmd:1"


def test_each_tls_file_flag_falls_back_to_its_own_variable(tmp_path: Path) -> None:
    from tests.certs import make_pki

    pki = make_pki(tmp_path)
    args = parse(["--address", "cmd:4", "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)])
    commands.connect(args, {"CLEMSERVE_TLS_CA": str(pki.ca)})
    files = credentials.Tls(str(pki.ca), str(pki.client_cert), str(pki.client_key))
    assert credentials._settings["cmd:4"].channel_tls == files


def test_tls_flags_are_checked_before_any_call(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="CA file"):
        commands.connect(parse(["--address", "cmd:2", "--tls-ca", str(tmp_path / "missing.pem")]), {})
    with pytest.raises(ValueError, match="both"):
        commands.connect(parse(["--address", "cmd:2", "--tls-cert", "c.pem"]), {})
    assert "cmd:2" not in credentials._settings
    commands.connect(parse(["--address", "cmd:3", "--tls"]), {})
    assert credentials._settings["cmd:3"].channel_tls == credentials.Tls()


def test_no_server_reachable_says_how_to_name_another(capsys: pytest.CaptureFixture[str]) -> None:
    from clemserve.client import ShuttingDownError, UnavailableError

    assert commands.report(UnavailableError("cannot reach clemserve at localhost:50051: connection refused")) == 4
    said = capsys.readouterr().err
    assert "cannot reach clemserve at localhost:50051" in said
    assert "--address HOST:PORT" in said and "CLEMSERVE_ADDRESS" in said
    # a server that is there, shutting down, needs no other address
    assert commands.report(ShuttingDownError("the server is shutting down")) == 4
    assert "--address" not in capsys.readouterr().err


def test_the_models_prefix_reuse_says_what_its_cache_holds_and_the_share_of_prompt_tokens_reused() -> None:
    from clemserve.client.admin import ModelStatus
    from clemserve.client.spend import Spend
    from clemserve.registry import ModelSpec

    spec = ModelSpec(model_name="tiny", backend="huggingface_local")
    status = ModelStatus(spec, "ready", "", 1.0, 0, prefix_caching="prefix cache up to 1024 MiB")
    assert commands._prefix_reuse(status) == "prefix cache up to 1024 MiB"
    used = dataclasses.replace(status, prefix_cache_bytes=3 << 20, spend=Spend(4, 1000, cached_prompt_tokens=800))
    assert commands._prefix_reuse(used) == (
        "prefix cache up to 1024 MiB, holding 3.0 MiB; 80% of 1000 prompt tokens reused"
    )


def test_the_models_table_says_what_each_model_spent_and_the_share_of_prompt_tokens_reused() -> None:
    from clemserve.client.admin import ModelStatus
    from clemserve.client.spend import Spend
    from clemserve.registry import ModelSpec

    paid = ModelStatus(ModelSpec(model_name="gpt", backend="openai"), "ready", "", 0.0, 0)
    local = dataclasses.replace(paid, model_spec=ModelSpec(model_name="tiny", backend="huggingface_local"))

    def cells(status: ModelStatus) -> list[str]:
        row = commands._model_row(status)
        return [row[0], row[11], row[12]]

    assert cells(paid) == ["gpt", "-", "-"]  # no call yet
    assert cells(dataclasses.replace(paid, spend=Spend(2, 1000, 10, cached_prompt_tokens=250, cost_usd=0.0123))) == [
        "gpt", "$0.0123", "25%",
    ]  # fmt: skip
    unpriced = Spend(1, 10, 10, cost_usd=0.0, unpriced_calls=1, unpriced="no price")
    assert cells(dataclasses.replace(paid, spend=unpriced))[1] == "$0.0000+?"
    ran = Spend(3, 900, 30, cached_prompt_tokens=600, compute_seconds=4.5)
    assert cells(dataclasses.replace(local, spend=ran)) == ["tiny", "4.5s", "67%"]
