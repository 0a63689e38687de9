"""The soak's pass criteria (bench.soak) fail when they should."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


@pytest.fixture(scope="module")
def soak() -> ModuleType:
    return importlib.import_module("bench.soak")


def run_with(soak: ModuleType, rss: list[int], fds: list[int], threads: list[int], ok: bool = True) -> object:
    run = soak.Run(seconds=60, clients=2, max_tokens=8, warmup_s=5, window_s=10, exit_code=0)
    run.samples = [
        soak.Sample(float(i * 5), r, f, t) for i, (r, f, t) in enumerate(zip(rss, fds, threads, strict=True))
    ]
    run.calls = [(1.0, 0.01, 0, True), (20.0, 0.01, 1, ok)]
    return run


def verdicts(soak: ModuleType, run: object) -> list[bool]:
    return [passed for passed, _ in soak.criteria(run)]


def test_a_steady_run_passes(soak: ModuleType) -> None:
    # the warm-up may grow; after it (from the second sample on) everything stays within bounds
    run = run_with(soak, [50_000, 100_000, 100_000, 105_000, 109_000], [10, 40, 44, 48, 48], [5, 10, 12, 14, 14])
    assert verdicts(soak, run) == [True] * 5


@pytest.mark.parametrize(
    ("rss", "fds", "threads", "ok", "failing"),
    [
        ([100_000] * 5, [40] * 5, [10] * 5, False, 0),  # a failed request
        ([100_000, 100_000, 100_000, 105_000, 111_000], [40] * 5, [10] * 5, True, 1),  # RSS grows past 10%
        ([100_000] * 4 + [89_000], [40] * 5, [10] * 5, True, 1),  # or drops past it
        ([100_000] * 5, [40, 40, 40, 45, 49], [10] * 5, True, 2),  # descriptors leak
        ([100_000] * 5, [40] * 5, [10, 10, 10, 12, 15], True, 3),  # threads leak
    ],
)
def test_each_criterion_fails(
    soak: ModuleType, rss: list[int], fds: list[int], threads: list[int], ok: bool, failing: int
) -> None:
    found = verdicts(soak, run_with(soak, rss, fds, threads, ok))
    assert [i for i, passed in enumerate(found) if not passed] == [failing]
