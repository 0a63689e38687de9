"""Flags and their CLEMSERVE_* environment twins, parsed once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from clemserve.service.config import parse_server_config


def test_defaults() -> None:
    config = parse_server_config([], {})
    assert (config.host, config.port, config.registries, config.log_level) == ("127.0.0.1", 50051, (), "INFO")
    assert config.address == "127.0.0.1:50051"
    assert config.compute_nice == 5 and config.scheduling.max_wait_s == 0.005


def test_environment_twins_and_flags_win() -> None:
    env = {
        "CLEMSERVE_HOST": "0.0.0.0",
        "CLEMSERVE_PORT": "6000",
        "CLEMSERVE_REGISTRY": os.pathsep.join(["a.json", "b.json"]),
        "CLEMSERVE_LOG_LEVEL": "debug",
        "CLEMSERVE_PRELOAD": "echo,tiny",
        "CLEMSERVE_GRACE_PERIOD": "5",
    }
    config = parse_server_config([], env)
    assert (config.host, config.port, config.log_level, config.grace_period_s) == (
        "0.0.0.0",
        6000,
        "DEBUG",
        5.0,
    )
    assert config.registries == (Path("a.json"), Path("b.json"))
    assert config.preload == ("echo", "tiny")
    flagged = parse_server_config(["--port", "7000", "--registry", "c.json"], env)
    assert flagged.port == 7000 and flagged.registries == (Path("c.json"),)


@pytest.mark.parametrize(
    "argv",
    [
        ["--port", "x"],
        ["--log-level", "LOUD"],
        ["--grace-period", "soon"],
        ["--compute-nice", "20"],
        ["--compute-nice", "-1"],
    ],
)
def test_bad_values_stop_with_a_message(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_server_config(argv, {})
    assert argv[0] in str(caught.value)


def test_help_shows_the_environment_twins(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_server_config(["--help"], {})
    out = capsys.readouterr().out
    for twin in ("CLEMSERVE_HOST", "CLEMSERVE_PORT", "CLEMSERVE_REGISTRY", "CLEMSERVE_LOG_LEVEL"):
        assert twin in out


def test_metrics_options_and_their_twins() -> None:
    defaults = parse_server_config([], {}).metrics
    assert (defaults.port, defaults.host, defaults.public) == (0, "127.0.0.1", False)
    env = {"CLEMSERVE_METRICS_PORT": "9100", "CLEMSERVE_METRICS_HOST": "0.0.0.0", "CLEMSERVE_METRICS_PUBLIC": "yes"}
    config = parse_server_config([], env).metrics
    assert (config.port, config.host, config.public) == (9100, "0.0.0.0", True)
    flags = parse_server_config(["--metrics-port", "9200", "--metrics-host", "::1"], env).metrics
    assert (flags.port, flags.host) == (9200, "::1")
    with pytest.raises(SystemExit, match="--metrics-port must be 0"):
        parse_server_config(["--metrics-port", "-1"], {})
