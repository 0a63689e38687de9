"""``clemserve run`` across servers without a server: the servers ``--address`` names, each model routed to the
first server that has it, each model loaded with its server, and the servers the loaded models play on."""

from __future__ import annotations

import argparse
import os
import sys
import types
from typing import Any

import pytest

from clemserve.client import run_servers
from clemserve.client.run_servers import NotServedError, load_models, route, servers_named, servers_of
from clemserve.registry.errors import ModelNotFoundError, UnavailableError

HOLDING = {"s1:1": {"a", "both"}, "s2:2": {"b", "both"}}


def resolve(selector: Any, address: str) -> Any:
    """Each server of HOLDING resolves its own models; "gone:3" does not answer."""
    name = selector["model_name"] if isinstance(selector, dict) else selector
    if address == "gone:3":
        raise UnavailableError(f"no server at {address}")
    if name not in HOLDING[address]:
        raise ModelNotFoundError(f"{name}: no such model")
    return {"model_name": name}


@pytest.mark.parametrize(
    ("given", "servers", "address"),
    [
        (["s1:1", "s2:2", "s1:1"], ["s1:1", "s2:2"], None),  # several: routed, no one address for all
        (["s1:1", "s1:1"], [], "s1:1"),  # one server, named twice: as --address once
        ("s1:1", [], "s1:1"),  # before the command (clemserve --address A run): one server
    ],
)
def test_the_servers_that_address_repeated_names(given: Any, servers: list[str], address: str | None) -> None:
    args = argparse.Namespace(address=given)
    assert servers_named(args) == servers
    assert args.address == address


def test_no_address_leaves_each_model_to_its_entry() -> None:
    args = argparse.Namespace()
    assert servers_named(args) == [] and not hasattr(args, "address")


def test_each_model_goes_to_the_first_server_that_has_it(capsys: pytest.CaptureFixture[str]) -> None:
    models = ["a", '{"model_name": "b"}', "both", "a"]
    assert route(models, ["s1:1", "s2:2"], resolve) == {"a": "s1:1", '{"model_name": "b"}': "s2:2", "both": "s1:1"}
    assert capsys.readouterr().err == "note: both is on 2 servers (s1:1, s2:2): the run plays it on s1:1\n"
    assert route(["both"], ["s2:2", "s1:1"], resolve) == {"both": "s2:2"}  # the order given decides


def test_a_model_no_server_has_stops_the_run_naming_the_servers_asked() -> None:
    with pytest.raises(NotServedError, match=r"model c is on none of the servers named with --address: s1:1, s2:2"):
        route(["a", "c"], ["s1:1", "s2:2"], resolve)
    # a server that did not answer may be the one that has it: its error, not a guess
    with pytest.raises(UnavailableError, match="gone:3"):
        route(["c"], ["s1:1", "gone:3"], resolve)
    assert route(["a"], ["gone:3", "s1:1"], resolve) == {"a": "s1:1"}  # found elsewhere: the run goes on


@pytest.fixture
def clemcore(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], str | None]]:
    """A stand-in for clemcore's backends: each load_models call, its model names and the CLEMSERVE_ADDRESS it saw."""
    loads: list[tuple[list[str], str | None]] = []

    class ModelSpec:
        @staticmethod
        def from_strings(names: list[str]) -> list[str]:
            return [f"spec:{name}" for name in names]

    def load(specs: list[str], gen_args: dict[str, Any]) -> list[str]:
        loads.append((list(specs), os.environ.get("CLEMSERVE_ADDRESS")))
        return [f"model:{spec}" for spec in specs]

    backends = types.SimpleNamespace(ModelSpec=ModelSpec, load_models=load)
    monkeypatch.setitem(sys.modules, "clemcore", types.SimpleNamespace(backends=backends))
    monkeypatch.setenv("CLEMSERVE_ADDRESS", "before:9")
    return loads


def test_each_model_is_loaded_with_its_server_as_the_address(clemcore: list[tuple[list[str], str | None]]) -> None:
    models = load_models(["a", "b"], {"temperature": 0.0}, {"a": "s1:1", "b": "s2:2"})
    assert models == ["model:spec:a", "model:spec:b"]
    assert clemcore == [(["spec:a"], "s1:1"), (["spec:b"], "s2:2")]
    assert os.environ["CLEMSERVE_ADDRESS"] == "before:9"  # as it was, after the loads


def test_without_routes_clemcore_loads_them_as_it_does(clemcore: list[tuple[list[str], str | None]]) -> None:
    assert load_models(["a", "b"], {}, {}) == ["model:spec:a", "model:spec:b"]
    assert clemcore == [(["spec:a", "spec:b"], "before:9")]


def test_the_servers_the_loaded_models_play_on() -> None:
    def played_at(address: str) -> Any:
        return types.SimpleNamespace(remote=types.SimpleNamespace(address=address))

    models = [played_at("s2:2"), types.SimpleNamespace(), played_at("s1:1"), played_at("s2:2")]
    assert servers_of(models) == ["s2:2", "s1:1"]


def test_an_address_not_set_before_is_unset_after(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLEMSERVE_ADDRESS", raising=False)
    with run_servers._address("s1:1"):
        assert os.environ["CLEMSERVE_ADDRESS"] == "s1:1"
    assert "CLEMSERVE_ADDRESS" not in os.environ
