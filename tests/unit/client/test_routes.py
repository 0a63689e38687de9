"""The route table (CLEMSERVE_ROUTES, CLEMSERVE_ROUTES_FILE) without a server: parsing, first match, the file
form, errors that name the variable or file and the entry, and where it stands among the ways to name a server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from clemserve.client import channel, model
from clemserve.client.convert import Selector
from clemserve.client.model import AsyncModel, Model, get_async_model_for, get_model_for, resolve
from clemserve.client.routes import Route, RoutesError, from_environment, parse, route_for
from clemserve.registry import ModelSpec

TABLE = "llama-3-70b*=10.0.0.5:50051; llama-*=ipv4:10.0.0.6:50051,10.0.0.7:50051 ;*-small=dns:///small.lab:50051"


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("CLEMSERVE_ADDRESS", "CLEMSERVE_ROUTES", "CLEMSERVE_ROUTES_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(channel, "_default_address", None)
    yield


def test_the_first_route_whose_pattern_matches_gives_the_server() -> None:
    env = {"CLEMSERVE_ROUTES": TABLE}
    assert route_for("llama-3-70b-instruct", env) == "10.0.0.5:50051"  # the later llama-* matches too
    assert route_for("llama-3-8b", env) == "ipv4:10.0.0.6:50051,10.0.0.7:50051"  # replicas of one server
    assert route_for("echo-small", env) == "dns:///small.lab:50051"
    assert route_for("gpt-4o", env) is None and route_for(None, env) is None
    # case-sensitive, as the registry matches names; ? and [...] are globs too
    assert route_for("Llama-3-8b", env) is None
    assert route_for("m7", {"CLEMSERVE_ROUTES": "m[0-5]=a:1;m?=b:2"}) == "b:2"


def test_empty_entries_and_spaces_around_them_are_left_out() -> None:
    assert parse(["", " a = b:1 ", "  "], "X {}") == [Route("a", "b:1")]
    assert from_environment({"CLEMSERVE_ROUTES": ";a=b:1;"}) == [Route("a", "b:1")]
    assert from_environment({"CLEMSERVE_ROUTES": ""}) == []


def test_the_file_has_one_entry_a_line_with_comments_and_comes_after_the_variable(tmp_path: Path) -> None:
    table = tmp_path / "routes"
    table.write_text("# the lab's servers\nllama-*=10.0.0.5:50051  # the 70B node\n\n*=[::1]:50051\n")
    env = {"CLEMSERVE_ROUTES_FILE": str(table)}
    assert from_environment(env) == [Route("llama-*", "10.0.0.5:50051"), Route("*", "[::1]:50051")]
    assert route_for("gpt-4o", env) == "[::1]:50051"
    env["CLEMSERVE_ROUTES"] = "llama-3*=unix:/run/clemserve.sock"
    assert route_for("llama-3-8b", env) == "unix:/run/clemserve.sock"
    assert route_for("llama-2-7b", env) == "10.0.0.5:50051"


@pytest.mark.parametrize(
    ("table", "said"),
    [
        ("a=b:1;llama", "CLEMSERVE_ROUTES entry 2 'llama': no '=': write MODEL_PATTERN=ADDRESS"),
        ("=b:1", "CLEMSERVE_ROUTES entry 1 '=b:1': no model pattern before '='"),
        ("llama-*= ", "CLEMSERVE_ROUTES entry 1 'llama-*=': no address after '='"),
        ("a=gpu1", "CLEMSERVE_ROUTES entry 1 'a=gpu1': the address 'gpu1' is not host:port"),
        ("a=gpu1:port", "the address 'gpu1:port' is not host:port"),
        ("a=gpu1:70000", "the address 'gpu1:70000' is not host:port"),
        ("a=h:1,h:2", "the address 'h:1,h:2' lists several servers: replicas of one server are ipv4:A,B"),
        ("a=ipv4:h:1,,h:2", "the address 'ipv4:h:1,,h:2' has '', not host:port"),
        ("a=dns:///", "the address 'dns:///' names no server after dns:"),
        ("a=h :1", "the address 'h :1' has a space in it"),
    ],
)
def test_a_bad_entry_is_refused_naming_the_variable_and_the_entry(table: str, said: str) -> None:
    with pytest.raises(RoutesError) as caught:
        from_environment({"CLEMSERVE_ROUTES": table})
    assert str(caught.value).startswith("CLEMSERVE_ROUTES entry ") and said in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_a_bad_file_is_refused_naming_the_file_and_the_line(tmp_path: Path) -> None:
    table = tmp_path / "routes"
    table.write_text("# ok\na=b:1\nllama-* 10.0.0.5:50051\n")
    with pytest.raises(RoutesError) as caught:
        from_environment({"CLEMSERVE_ROUTES_FILE": str(table)})
    assert str(caught.value) == (
        f"CLEMSERVE_ROUTES_FILE {table} line 3 'llama-* 10.0.0.5:50051': no '=': write MODEL_PATTERN=ADDRESS"
    )
    missing = tmp_path / "nowhere"
    with pytest.raises(RoutesError) as caught:
        from_environment({"CLEMSERVE_ROUTES_FILE": str(missing)})
    assert str(caught.value) == f"CLEMSERVE_ROUTES_FILE: cannot read {missing}: No such file or directory"


class Reached(Exception):
    """Where a model would have sent its first call (no server here)."""


def server_asked(first_call: Callable[..., object], *args: object, **kwargs: object) -> str:
    with pytest.raises(Reached) as caught:
        first_call(*args, **kwargs)
    return str(caught.value)


def get_async(selector: Selector) -> AsyncModel:
    return asyncio.run(get_async_model_for(selector))


def test_address_wins_then_the_route_then_connect_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ModelSpec(model_name="llama-3-8b", backend="echo")
    assert Model(spec).address == channel.DEFAULT_ADDRESS
    monkeypatch.setenv("CLEMSERVE_ADDRESS", "env:1")
    assert Model(spec).address == "env:1"
    monkeypatch.setattr(channel, "_default_address", "connected:1")
    assert Model(spec).address == "connected:1"
    monkeypatch.setenv("CLEMSERVE_ROUTES", "llama-*=routed:1")
    assert Model(spec).address == "routed:1" and AsyncModel(spec).address == "routed:1"
    assert Model(ModelSpec(model_name="gpt-4o")).address == "connected:1"
    assert Model(spec, address="given:1").address == "given:1"


def test_resolving_goes_where_the_route_sends_the_selector_s_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """get_model_for, its asyncio twin and resolve ask the routed server, for a name, a dict or a spec."""

    def reached(address: str, token: str | None = None) -> None:
        raise Reached(address)

    monkeypatch.setattr(model, "channel_for", reached)
    monkeypatch.setattr(model, "aio_channel_for", reached)
    monkeypatch.setenv("CLEMSERVE_ADDRESS", "env:1")
    monkeypatch.setenv("CLEMSERVE_ROUTES", "llama-*=routed:1")
    selectors: list[Selector] = ["llama-3-8b", {"model_name": "llama-3-8b"}, ModelSpec(model_name="llama-3-8b")]
    for selector in selectors:
        assert server_asked(get_model_for, selector) == "routed:1"
        assert server_asked(get_async, selector) == "routed:1"
        assert server_asked(resolve, selector) == "routed:1"
    assert server_asked(resolve, "gpt-4o") == "env:1"
    assert server_asked(get_model_for, "llama-3-8b", address="given:1") == "given:1"
    monkeypatch.setenv("CLEMSERVE_ROUTES", "llama-*")
    with pytest.raises(RoutesError, match="CLEMSERVE_ROUTES entry 1 'llama-\\*'"):
        get_model_for("llama-3-8b")
