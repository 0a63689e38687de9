"""The Prometheus endpoint of a real server: exact counts by label after known calls, token counters that
match the replies' usage, a batch of more than one row, the scrape-time gauges, off by default, no public
bind without --metrics-public, and no secret in a scrape."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import clemserve.client as backends
from clemserve.v1 import clemserve_pb2 as pb
from tests.providers import FAKE_KEYS, assert_no_key_leaks, openai_reply
from tests.serving import ServerProcess, free_port, start_server
from tests.standin import Reply, StandIn

ECHO_CALLS = 3
TINY_CALLS = 6
#: a model name no registry holds: it must reach no label
UNKNOWN_MODEL = "no-such-model-Xq7Rw2Lp"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def samples(text: str) -> Samples:
    """Every sample by (name, labels), parsed with prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in found, f"no sample {name}{labels}"
    return found[key]


def generate(model: Any, content: str) -> pb.GenerateResponse:
    """One Generate through the client's own request and channel, keeping the reply's usage."""
    return model._stub().Generate(model._request([{"role": "user", "content": content}]), timeout=120)


@pytest.fixture(scope="module")
def metrics_server(
    tmp_path_factory: pytest.TempPathFactory, test_registry: Path
) -> Iterator[tuple[ServerProcess, int]]:
    folder = tmp_path_factory.mktemp("metrics")
    port = free_port()
    flags = ("--registry", str(test_registry), "--metrics-port", str(port), "--max-wait-ms", "50")
    proc = start_server(folder, *flags, "--preload", "tiny-llama", "--log-level", "DEBUG")
    yield proc, port
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def after_calls(metrics_server: tuple[ServerProcess, int]) -> tuple[Samples, dict[str, list[pb.Usage]], str]:
    """Known calls on both models, one INVALID_ARGUMENT and one NOT_FOUND; then one scrape."""
    server, port = metrics_server
    echo = backends.get_model_for("echo", address=server.address, timeout=60)
    tiny = backends.get_model_for("tiny-llama", address=server.address, timeout=120)
    tiny.set_gen_args(temperature=0.0, max_tokens=8)
    usage: dict[str, list[pb.Usage]] = {"echo": [], "tiny-llama": []}
    for i in range(ECHO_CALLS):
        usage["echo"].append(generate(echo, f"echo number {i}").usage)
    replies: list[pb.GenerateResponse | None] = [None] * TINY_CALLS
    barrier = threading.Barrier(TINY_CALLS)

    def call(i: int) -> None:
        barrier.wait()
        replies[i] = generate(tiny, f"Tell me about the number {i}.")

    threads = [threading.Thread(target=call, args=(i,)) for i in range(TINY_CALLS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    usage["tiny-llama"] = [r.usage for r in replies if r is not None]
    assert len(usage["tiny-llama"]) == TINY_CALLS
    bad = pb.GenerateRequest(model=echo._selector, messages=[pb.Message(role="user", content="x", extra_json="[")])
    with pytest.raises(grpc.RpcError) as refused:
        echo._stub().Generate(bad, timeout=30)  # the client would refuse it itself: the stub sends it as is
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(backends.ModelNotFoundError):
        backends.get_model_for(UNKNOWN_MODEL, address=server.address, timeout=30)
    text = scrape(port)
    return samples(text), usage, text


def test_requests_are_counted_by_method_model_backend_and_code(after_calls: Any) -> None:
    found, _, text = after_calls
    requests = "clemserve_requests_total"
    assert value(found, requests, method="Generate", model="echo", backend="echo", code="OK") == ECHO_CALLS
    tiny = {"method": "Generate", "model": "tiny-llama", "backend": "huggingface_local"}
    assert value(found, requests, **tiny, code="OK") == TINY_CALLS
    assert value(found, requests, method="Generate", model="echo", backend="echo", code="INVALID_ARGUMENT") == 1
    assert value(found, requests, method="ResolveModel", model="other", backend="", code="NOT_FOUND") == 1
    assert UNKNOWN_MODEL not in text
    # the latency histogram has no code label: the refused call is one more observation
    latency = "clemserve_request_duration_seconds_count"
    assert value(found, latency, method="Generate", model="echo", backend="echo") == ECHO_CALLS + 1
    assert value(found, latency, **tiny) == TINY_CALLS
    models = {dict(labels).get("model") for (name, labels) in found if name.startswith("clemserve_")}
    assert models <= {None, "", "echo", "tiny-llama", "other"}


def test_token_counters_equal_the_replies_usage(after_calls: Any) -> None:
    found, usage, _ = after_calls
    for model, replies in usage.items():
        assert sum(u.completion_tokens for u in replies) > 0, model
        prompt = value(found, "clemserve_prompt_tokens_total", model=model)
        completion = value(found, "clemserve_completion_tokens_total", model=model)
        assert prompt == sum(u.prompt_tokens for u in replies), model
        assert completion == sum(u.completion_tokens for u in replies), model
        # a prompt's tokens are served from a cache or computed, each counted where the reply says
        cached = value(found, "clemserve_cached_prompt_tokens_total", model=model)
        assert cached == sum(u.cached_prompt_tokens for u in replies), model
        assert value(found, "clemserve_computed_prompt_tokens_total", model=model) == prompt - cached, model


def test_local_models_cost_compute_seconds_not_money(
    metrics_server: tuple[ServerProcess, int], after_calls: Any
) -> None:
    """Each local call reports its generation seconds and no money; ListModels and Prometheus sum them."""
    from clemserve.client.admin import list_models

    found, _, _ = after_calls
    server, _ = metrics_server
    tiny = backends.get_model_for("tiny-llama", address=server.address, timeout=120)
    tiny.set_gen_args(temperature=0.0, max_tokens=8)
    reply = generate(tiny, "One more number.")
    assert reply.cost.usd == 0 and reply.cost.unpriced == "" and reply.cost.price_source == "local"
    assert 0 < reply.cost.compute_seconds < 60
    (listed,) = (s for s in list_models(address=server.address, timeout=30) if s.name == "tiny-llama")
    assert listed.spend.calls == TINY_CALLS + 1 and listed.spend.cost_usd == 0
    scraped = value(found, "clemserve_compute_seconds_total", model="tiny-llama")  # before the last call
    assert listed.spend.compute_seconds == pytest.approx(scraped + reply.cost.compute_seconds)
    assert value(found, "clemserve_cost_usd_total", model="tiny-llama") == 0


def test_batches_and_queue_waits(after_calls: Any) -> None:
    found, _, _ = after_calls
    batches = value(found, "clemserve_batch_size_count", model="tiny-llama")
    assert value(found, "clemserve_batch_size_sum", model="tiny-llama") == TINY_CALLS  # every row, once
    assert value(found, "clemserve_batch_size_bucket", model="tiny-llama", le="1.0") < batches, "no batch > 1"
    assert value(found, "clemserve_queue_wait_seconds_count", model="tiny-llama") == TINY_CALLS
    # echo takes the fast path: no queue, recorded as a wait of 0
    assert value(found, "clemserve_queue_wait_seconds_count", model="echo") == ECHO_CALLS
    assert value(found, "clemserve_queue_wait_seconds_sum", model="echo") == 0
    assert ("clemserve_batch_size_count", frozenset({("model", "echo")})) not in found


def test_scrape_time_gauges(after_calls: Any) -> None:
    found, _, _ = after_calls
    assert value(found, "clemserve_models_loaded") == 2
    assert value(found, "clemserve_model_state", model="tiny-llama", backend="huggingface_local", state="ready") == 1
    assert value(found, "clemserve_model_state", model="echo", backend="echo", state="ready") == 1
    assert value(found, "clemserve_model_loads_total", model="tiny-llama", outcome="ok") == 1
    assert value(found, "clemserve_model_load_seconds", model="tiny-llama") > 0
    for model in ("echo", "tiny-llama"):
        assert value(found, "clemserve_queue_depth", model=model) == 0
        assert value(found, "clemserve_requests_in_flight", model=model) == 0
    assert value(found, "process_resident_memory_bytes") > 0


def test_in_flight_is_read_at_scrape_time(metrics_server: tuple[ServerProcess, int]) -> None:
    server, port = metrics_server
    tiny = backends.get_model_for("tiny-llama", address=server.address, timeout=120)
    tiny.set_gen_args(temperature=0.0, max_tokens=300)
    threads = [threading.Thread(target=generate, args=(tiny, f"Count to {i}00.")) for i in range(1, 5)]
    for thread in threads:
        thread.start()
    busiest, most = 0.0, 0.0
    key = ("clemserve_requests_in_flight", frozenset({("model", "tiny-llama")}))
    queue = ("clemserve_queue_depth", frozenset({("model", "tiny-llama")}))
    while any(thread.is_alive() for thread in threads):
        found = samples(scrape(port))
        busiest = max(busiest, found.get(key, 0))
        most = max(most, found.get(key, 0) + found.get(queue, 0))  # a waiting request is not also running
        time.sleep(0.02)  # scrapes take the server's time too: not back to back
    for thread in threads:
        thread.join(timeout=120)
    assert 1 <= busiest <= len(threads) and most <= len(threads)
    assert value(samples(scrape(port)), "clemserve_requests_in_flight", model="tiny-llama") == 0


# -- off by default, and the bind check --------------------------------------------------------------


def test_metrics_are_off_by_default(server: ServerProcess) -> None:
    assert "metrics off (--metrics-port 0)" in server.log()
    assert "/metrics" not in server.log()


def serve_command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A server start that must stop before binding anything."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CLEMSERVE_")}
    return subprocess.run(
        [sys.executable, "-m", "clemserve.service.cli", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **(env or {})},
    )


# a documentation address, assigned to no machine: even a broken check could not listen on it
@pytest.mark.parametrize("how", ["flag", "env"])
def test_public_metrics_host_is_refused_without_the_flag(how: str, test_registry: Path) -> None:
    if how == "flag":
        done = serve_command("--metrics-port", "9", "--metrics-host", "192.0.2.10", "--registry", str(test_registry))
    else:
        env = {"CLEMSERVE_METRICS_PORT": "9", "CLEMSERVE_METRICS_HOST": "192.0.2.10"}
        done = serve_command("--registry", str(test_registry), env=env)
    assert done.returncode == 2, done.stderr
    assert "refusing to serve metrics on 192.0.2.10" in done.stderr
    assert "--metrics-public" in done.stderr


def test_metrics_public_passes_the_check(tmp_path: Path) -> None:
    """Nothing binds: the start goes past the check and stops at the next step, a missing registry file."""
    missing = tmp_path / "missing-registry.json"
    flags = ("--metrics-port", "9", "--metrics-host", "192.0.2.10", "--metrics-public", "--registry", str(missing))
    done = serve_command(*flags)
    assert done.returncode == 2, done.stderr
    assert "refusing" not in done.stderr
    assert f"{missing}: file not found" in done.stderr


def test_a_metrics_port_in_use_stops_the_start(test_registry: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve_command("--metrics-port", str(port), "--registry", str(test_registry))
    assert done.returncode == 2, done.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in done.stderr
    assert "listening on" not in done.stderr  # the gRPC server never started


def test_a_bad_metrics_port_is_a_usage_error() -> None:
    done = serve_command("--metrics-port", "70000")
    assert done.returncode != 0
    assert "--metrics-port must be 0 (off) or a port number up to 65535" in done.stderr


# -- no secret in a scrape ---------------------------------------------------------------------------

OPENAI_REPLY = openai_reply("fine")


def test_no_secret_reaches_a_scrape(tmp_path: Path) -> None:
    token = secrets.token_urlsafe(32)
    with StandIn() as standin:
        key_file = tmp_path / "key.json"
        key_file.write_text(
            json.dumps({name: {"api_key": key, "base_url": standin.url} for name, key in FAKE_KEYS.items()})
        )
        registry = tmp_path / "registry.json"
        entry = {"model_name": "metrics-openai", "backend": "openai", "model_id": "gpt-x", "model_config": {}}
        registry.write_text(json.dumps([entry]))
        port = free_port()
        flags = ("--registry", str(registry), "--key-file", str(key_file), f"--auth-token={token}")
        server = start_server(tmp_path, *flags, "--metrics-port", str(port), "--remote-attempts", "1")
        try:
            model = backends.get_model_for("metrics-openai", address=server.address, timeout=30, token=token)
            standin.script("POST", r"/chat/completions$", Reply(200, OPENAI_REPLY))
            assert model.generate_response([{"role": "user", "content": "hi"}])[2] == "fine"
            echoed = f"Incorrect API key provided: {FAKE_KEYS['openai']}"
            standin.script("POST", r"/chat/completions$", Reply(401, {"error": {"message": echoed}}))
            with pytest.raises(backends.ClemserveError):
                model.generate_response([{"role": "user", "content": "hi"}])
            with pytest.raises(backends.UnauthenticatedError):
                backends.get_model_for("metrics-openai", address=server.address, timeout=30, token=token[::-1])
            text = scrape(port)
        finally:
            assert server.stop() == 0, server.log()
        assert FAKE_KEYS["openai"] in json.dumps([r.headers for r in standin.requests])  # the key was sent
    found = samples(text)
    counted = {"method": "Generate", "model": "metrics-openai", "backend": "openai"}
    assert value(found, "clemserve_requests_total", **counted, code="OK") == 1
    assert_no_key_leaks(text)
    for i in range(len(token) - 4):
        assert token[i : i + 5] not in text and token[::-1][i : i + 5] not in text


def test_streamed_requests_record_time_to_first_token(
    metrics_server: tuple[ServerProcess, int], after_calls: Any
) -> None:
    server, port = metrics_server
    echo = backends.get_model_for("echo", address=server.address, timeout=60)
    for i in range(2):
        pieces = [e.text for e in echo.generate_stream([{"role": "user", "content": f"one two three {i}"}])
                  if isinstance(e, backends.TextDelta)]  # fmt: skip
        assert "".join(pieces).split() == ["one", "two", "three", str(i)]
    found = samples(scrape(port))
    assert value(found, "clemserve_time_to_first_token_seconds_count", model="echo") == 2
    first = value(found, "clemserve_time_to_first_token_seconds_sum", model="echo")
    whole = value(
        found, "clemserve_request_duration_seconds_sum", method="GenerateStream", model="echo", backend="echo"
    )
    assert 0 < first <= whole
    assert (
        value(found, "clemserve_requests_total", method="GenerateStream", model="echo", backend="echo", code="OK") == 2
    )


def test_a_call_whose_caller_left_is_counted_cancelled(metrics_server: tuple[ServerProcess, int]) -> None:
    server, port = metrics_server
    tiny = backends.get_model_for("tiny-llama", address=server.address, timeout=120)
    tiny.set_gen_args(temperature=0.0, max_tokens=400)
    labels = {"method": "GenerateStream", "model": "tiny-llama", "backend": "huggingface_local"}
    key = ("clemserve_requests_total", frozenset({**labels, "code": "CANCELLED"}.items()))
    before = samples(scrape(port)).get(key, 0)
    for event in tiny.generate_stream([{"role": "user", "content": "Count to a thousand."}]):
        if isinstance(event, backends.TextDelta):
            break  # the game leaves after the first piece: the call is cancelled on the server
    deadline = time.monotonic() + 30
    while samples(scrape(port)).get(key, 0) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert samples(scrape(port)).get(key, 0) == before + 1
