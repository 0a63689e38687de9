"""``clemserve clemcore-setup``'s registry merge: each server replaces its own entries only, so several
servers' models live side by side in one clemcore working directory; and its repeatable ``--address``."""

from __future__ import annotations

from typing import Any

import pytest

from clemserve.client import channel, commands, credentials
from clemserve.client.clemcore_setup import merge, registry_entries, served_twice
from clemserve.client.cli import parser
from clemserve.registry import ModelSpec

OTHER = {"model_name": "gpt-4o", "backend": "openai"}


def entries(address: str, *names: str) -> list[dict[str, Any]]:
    return registry_entries((ModelSpec(model_name=name, backend="echo") for name in names), address)


def listed(merged: list[Any]) -> list[tuple[str, str]]:
    return [(e["model_name"], e.get("model_config", {}).get("clemserve_address", "")) for e in merged]


def test_a_second_server_keeps_the_first_server_s_entries() -> None:
    first = merge([OTHER], entries("a:1", "model-a", "echo"), ["a:1"])
    second = merge(first, entries("b:1", "model-b", "echo"), ["b:1"])
    assert listed(second) == [("gpt-4o", ""), ("model-a", "a:1"), ("echo", "a:1"), ("model-b", "b:1"), ("echo", "b:1")]
    assert served_twice(second) == {"echo": ["a:1", "b:1"]}


def test_a_server_set_up_again_replaces_its_own_entries_in_their_place() -> None:
    """Which of two servers wins a shared name (the first entry, in clemcore's lookup) stays as it was."""
    both = merge([], [*entries("a:1", "model-a", "echo"), *entries("b:1", "model-b", "echo")], ["a:1", "b:1"])
    again = merge(both, entries("a:1", "echo", "model-a2"), ["a:1"])
    assert listed(again) == [("echo", "a:1"), ("model-a2", "a:1"), ("model-b", "b:1"), ("echo", "b:1")]
    # a server that now runs nothing loses its entries, and the others stay
    assert listed(merge(again, [], ["a:1"])) == [("model-b", "b:1"), ("echo", "b:1")]


def test_other_backends_come_first_whatever_the_order_of_the_file() -> None:
    merged = merge([*entries("a:1", "m"), OTHER], entries("b:1", "n"), ["b:1"])
    assert listed(merged) == [("gpt-4o", ""), ("m", "a:1"), ("n", "b:1")]


def test_address_is_repeatable_for_the_commands_that_list_several_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--address A --address B`` names two servers; given before and after the command, the later wins as for
    every connection flag; a single address is one server (a multi-address target is replicas of one)."""
    # connect() remembers each address's settings and the default address: both restored after the test
    monkeypatch.setattr(channel, "_default_address", None)
    monkeypatch.setattr(credentials, "_settings", {})
    for argv, expected in [
        (["clemcore-setup", "--address", "a:1", "--address", "b:1", "dir"], ["a:1", "b:1"]),
        (["models", "--address", "a:1", "--address", "b:1", "--address", "a:1"], ["a:1", "b:1"]),
        (["--address", "x:1", "models", "--address", "a:1", "--address", "b:1"], ["a:1", "b:1"]),
        (["--address", "ipv4:a:1,b:1", "clemcore-setup"], ["ipv4:a:1,b:1"]),
    ]:
        args = parser().parse_args(argv)
        commands.connect(args, {})
        assert (args.addresses, args.address) == (expected, expected[0]), argv
        assert channel.default_address() == expected[0]
