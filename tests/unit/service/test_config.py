"""Flags and their CLEMSERVE_* environment twins, parsed once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from clemserve.service.backends.rate_limits import RateLimit
from clemserve.service.config import hub_environment, parse_server_config


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


def test_the_server_is_offline_unless_told_online() -> None:
    assert parse_server_config([], {}).online is False
    assert parse_server_config([], {"CLEMSERVE_ONLINE": "1"}).online is True
    assert parse_server_config(["--online"], {}).online is True
    # offline whatever the environment says; --online with an environment that says offline is refused
    assert hub_environment(False, {"HF_HUB_OFFLINE": "0"}) == {"HF_HUB_OFFLINE": "1"}
    assert hub_environment(True, {"TRANSFORMERS_OFFLINE": "0"}) == {"HF_HUB_OFFLINE": "0"}
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        with pytest.raises(SystemExit, match=f"--online, but {name}=1 in the environment"):
            hub_environment(True, {name: "1"})


def test_one_cache_directory_by_default() -> None:
    # make serve passes none: it and clemserve serve typed by hand share the prepared models
    assert parse_server_config([], {}).cache_dir == Path.home() / ".cache" / "clemserve"
    assert parse_server_config([], {"CLEMSERVE_CACHE_DIR": "/srv/c"}).cache_dir == Path("/srv/c")


def test_rate_limits_from_the_flag_or_its_twin_whose_values_are_separated_by_semicolons() -> None:
    env = {"CLEMSERVE_RATE_LIMIT": "openai=concurrency:8,rpm:500;azure=tpm:200000"}
    assert parse_server_config([], env).rate_limits == (
        ("openai", RateLimit(concurrency=8, rpm=500)),
        ("azure", RateLimit(tpm=200000)),
    )
    flagged = parse_server_config(["--rate-limit", "anthropic=concurrency:4"], env)
    assert flagged.rate_limits == (("anthropic", RateLimit(concurrency=4)),)
    assert parse_server_config([], {}).rate_limits == ()


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("opneai=rpm:5", "--rate-limit: unknown name 'opneai'; a key.json entry or remote backend: anthropic, azure,"),
        ("echo=rpm:5", "--rate-limit: unknown name 'echo'"),  # a backend with no key: nothing to limit
        ("openai=rpm:-5", "--rate-limit: openai: rpm must be a whole number above 0, got '-5'"),
        ("openai=burst:5", "--rate-limit: openai: unknown field 'burst'"),
        ("openai:8", "--rate-limit: 'openai:8' is not NAME=FIELD:NUMBER"),
    ],
)
def test_a_malformed_rate_limit_stops_the_start_naming_the_flag_and_field(value: str, says: str) -> None:
    with pytest.raises(SystemExit, match=says):
        parse_server_config(["--rate-limit", value], {})


def test_a_rate_limit_given_twice_for_one_name_stops_the_start() -> None:
    with pytest.raises(SystemExit, match="--rate-limit: openai is given twice"):
        parse_server_config(["--rate-limit", "openai=rpm:5", "--rate-limit", "openai=tpm:9"], {})


def test_spend_limits_from_the_flag_or_its_twin_whose_values_are_separated_by_semicolons() -> None:
    env = {"CLEMSERVE_SPEND_LIMIT": "openai=50/day;openai=900/month;azure_gpt=2.5/hour"}
    assert [str(limit) for limit in parse_server_config([], env).spend_limits] == [
        "openai=50/day",
        "openai=900/month",
        "azure_gpt=2.5/hour",
    ]
    flagged = parse_server_config(["--spend-limit", "anthropic=$5/month"], env)
    assert [str(limit) for limit in flagged.spend_limits] == ["anthropic=5/month"]
    assert parse_server_config([], {}).spend_limits == ()


@pytest.mark.parametrize(
    ("values", "says"),
    [
        (["opneai=5/day"], "--spend-limit: unknown name 'opneai'; a key.json entry or remote backend: anthropic,"),
        (["echo=5/day"], "--spend-limit: unknown name 'echo'"),
        (["openai=5/week"], "--spend-limit: openai: the period must be one of hour, day, month"),
        (["openai=lots/day"], "--spend-limit: openai: the amount must be a number of US dollars above 0"),
        (["openai=5/day", "openai=6/day"], "--spend-limit: openai has two limits per day"),
    ],
)
def test_a_malformed_spend_limit_stops_the_start_naming_the_flag_and_field(values: list[str], says: str) -> None:
    with pytest.raises(SystemExit, match=says):
        parse_server_config([arg for value in values for arg in ("--spend-limit", value)], {})
