"""The gateway benchmark's pure parts (bench.gateway): what it reports as added, its verdict, its alternation."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


@pytest.fixture(scope="module")
def gateway() -> ModuleType:
    return importlib.import_module("bench.gateway")


def stats(gateway: ModuleType, label: str, micros: list[int]) -> object:
    return gateway.Stats(label, [us * 1000 for us in micros])


def test_added_is_the_difference_at_the_percentile_in_ms(gateway: ModuleType) -> None:
    direct = stats(gateway, "direct", [800, 900, 1000, 1100, 5000])
    through = stats(gateway, "gateway", [1000, 1150, 1250, 1400, 9000])
    assert gateway.added_ms(direct, through, 50) == pytest.approx(0.25)
    assert gateway.added_ms(direct, through, 90) == pytest.approx(4.0)


@pytest.mark.parametrize(("added_us", "holds"), [(200, True), (300, True), (400, False)])
def test_verdict_judges_the_median_of_repeats_against_the_target(
    gateway: ModuleType, added_us: int, holds: bool
) -> None:
    direct = stats(gateway, "direct", [1000] * 9)
    repeats = [
        (direct, stats(gateway, "gateway", [1000 + added_us] * 9)),
        (direct, stats(gateway, "gateway", [1000 + added_us] * 9)),
        (direct, stats(gateway, "gateway", [1000 + 5000] * 9)),  # one busy repeat does not decide it
    ]
    first = gateway.verdict(repeats)[0]
    assert first.startswith(f"added at p50: {added_us / 1000:.3f} ms (median of 3 repeats")
    assert first.endswith("target 0.3 ms: holds" if holds else "target 0.3 ms: does NOT hold")


def test_measure_alternates_which_path_goes_first(gateway: ModuleType) -> None:
    order: list[str] = []
    direct = gateway.Path_("direct", lambda: order.append("d"), ())
    through = gateway.Path_("gateway", lambda: order.append("g"), ())
    timed_direct, timed_gateway = gateway.measure(direct, through, gateway.BLOCKS * 2)
    blocks = ["".join(order[i : i + 2]) for i in range(0, len(order), 2)]
    assert blocks[:4] == ["dd", "gg", "gg", "dd"]
    assert len(timed_direct.latencies_ns) == len(timed_gateway.latencies_ns) == gateway.BLOCKS * 2
    assert direct.latencies_ns == []  # the paths given are not changed: each repeat gets fresh copies
