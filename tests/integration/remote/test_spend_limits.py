"""Spend limits held by a real server (``--spend-limit``), driven through the real client against the provider
stand-in: concurrent calls at the limit never take the spend over it, a call that would is refused with
RESOURCE_EXHAUSTED / QUOTA_EXCEEDED and the numbers, a failed call spends nothing, an unpriced model under a
limit is refused, the spent amount survives a restart, and a corrupt spend file stops the start naming it.

One server of its own (its cache directory holds the spend file the restart must keep), started twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import clemserve.client as backends
from tests.integration.remote.conftest import RETRY_FLAGS, all_keys
from tests.providers import openai_reply, openai_usage
from tests.serving import NO_PROVIDER_KEYS, ServerProcess, start_server
from tests.standin import Reply, StandIn

CHAT = r"^/chat/completions$"
USER = [{"role": "user", "content": "Say hello."}]  # 10 bytes: 26 prompt tokens at most
#: a tenth of a cent per token: a call's worst case (26 + 50 tokens) is $0.076, its real cost (20 + 10) $0.03
PRICE = {"input_per_mtok": 1000.0, "output_per_mtok": 1000.0}
ENTRIES: list[dict[str, Any]] = [
    {"model_name": "budget-priced", "backend": "openai_compatible", "model_id": "m", "model_config": {"price": PRICE}},
    {"model_name": "budget-unpriced", "backend": "openai_compatible", "model_id": "m"},
]
LIMIT = ("--spend-limit", "openai_compatible=0.2/month")
WORST, REAL = 0.076, 0.03


@pytest.fixture(scope="module")
def flags(remote_registry: Path, standin: StandIn, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    key_file = tmp_path_factory.mktemp("spend-keys") / "key.json"
    key_file.write_text(json.dumps(all_keys(standin.url)))
    return ["--registry", str(remote_registry), "--key-file", str(key_file), *RETRY_FLAGS, *LIMIT]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("spend-cache")


@pytest.fixture(scope="module")
def limited(flags: list[str], cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(tmp_path_factory.mktemp("spend-server"), *flags, cache_dir=cache_dir, env=NO_PROVIDER_KEYS)
    yield proc
    proc.stop()


@pytest.fixture
def chat(standin: StandIn) -> None:
    standin.script("POST", CHAT, lambda _: Reply(200, openai_reply("Hello!", openai_usage(20, 10))))


def model(server: ServerProcess, name: str = "budget-priced", max_tokens: int = 50) -> backends.Model:
    found = backends.get_model_for(name, address=server.address, timeout=60)
    found.set_gen_args(temperature=0.0, max_tokens=max_tokens)
    return found


def call(server: ServerProcess, name: str = "budget-priced", max_tokens: int = 50) -> str | backends.ClemserveError:
    try:
        return str(model(server, name, max_tokens).generate_response(USER)[2])
    except backends.ClemserveError as exc:
        return exc


def spent(server: ServerProcess) -> float:
    """What the server says was spent this month: a call whose worst case ($1.026) no limit of $0.2 lets go."""
    refused = call(server, max_tokens=1000)
    assert isinstance(refused, backends.ClemserveError) and refused.reason == "QUOTA_EXCEEDED", refused
    return float(refused.metadata["spent_usd"])


def test_a_failed_call_spends_nothing_and_an_unpriced_model_is_refused(
    limited: ServerProcess, standin: StandIn
) -> None:
    standin.script("POST", CHAT, Reply(400, {"error": {"message": "bad request", "type": "invalid_request_error"}}))
    failed = call(limited)
    assert isinstance(failed, backends.ClemserveError) and failed.reason != "QUOTA_EXCEEDED"
    assert len(list(standin.matching(CHAT))) == 1
    assert spent(limited) == 0.0
    unpriced = call(limited, "budget-unpriced")
    assert isinstance(unpriced, backends.ClemserveError) and unpriced.code == "FAILED_PRECONDITION"
    assert "model budget-unpriced is under --spend-limit openai_compatible=0.2/month but has no price" in str(unpriced)
    assert len(list(standin.matching(CHAT))) == 1  # neither was sent


def test_calls_at_the_limit_never_take_the_spend_over_it_and_are_refused_with_the_numbers(
    limited: ServerProcess, standin: StandIn, chat: None
) -> None:
    standin.release.clear()  # every call forwarded waits: their reservations add up
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(call, limited) for _ in range(12)]
        deadline = time.monotonic() + 60
        while sum(f.done() for f in futures) < 10 or len(list(standin.matching(CHAT))) < 2:
            assert time.monotonic() < deadline, "the refusals did not come while two calls were held"
            time.sleep(0.01)
        time.sleep(0.2)  # a third call sent by mistake would show now
        standin.release.set()
        results = [f.result(timeout=60) for f in futures]
    errors = [r for r in results if isinstance(r, backends.ClemserveError)]
    assert (results.count("Hello!"), len(errors)) == (2, 10)  # 2 x $0.076 fit under $0.2, a third would not
    assert len(list(standin.matching(CHAT))) == 2
    err = errors[0]
    assert (err.code, err.reason) == ("RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED")
    assert {k: err.metadata[k] for k in ("limit", "limit_usd", "period", "call_worst_case_usd")} == {
        "limit": "openai_compatible",
        "limit_usd": "0.2",
        "period": "month",
        "call_worst_case_usd": f"{WORST:.6f}",
    }
    assert float(err.metadata["reserved_usd"]) == pytest.approx(2 * WORST)
    assert "period_end" in err.metadata and "--spend-limit openai_compatible=0.2/month" in str(err)
    # settled at what they cost: 3 more calls fit ($0.06 + 3 x $0.03 = $0.15), the next would pass $0.2
    assert spent(limited) == pytest.approx(2 * REAL)
    assert [call(limited) for _ in range(3)] == ["Hello!"] * 3
    over = call(limited)
    assert isinstance(over, backends.ClemserveError) and over.reason == "QUOTA_EXCEEDED"
    assert float(over.metadata["spent_usd"]) == pytest.approx(5 * REAL)


def test_a_restart_keeps_what_was_spent(
    limited: ServerProcess, flags: list[str], cache_dir: Path, tmp_path: Path, standin: StandIn, chat: None
) -> None:
    before = spent(limited)
    assert before > 0
    assert limited.stop() == 0
    again = start_server(tmp_path, *flags, cache_dir=cache_dir, env=NO_PROVIDER_KEYS)
    try:
        assert spent(again) == before
    finally:
        again.stop()


def test_a_corrupt_spend_file_stops_the_start_naming_it(flags: list[str], tmp_path: Path) -> None:
    (tmp_path / "spend.sqlite3").write_bytes(b"\x00 this is not SQLite " * 64)
    done = subprocess.run(
        [sys.executable, "-m", "clemserve.service.cli", "serve", "--port", "0", "--cache-dir", str(tmp_path), *flags],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **NO_PROVIDER_KEYS},
    )
    assert done.returncode == 2
    assert f"spend file {tmp_path / 'spend.sqlite3'}: not a clemserve spend file" in done.stderr
