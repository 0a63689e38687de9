"""Metrics without a server: bounded labels, the do-nothing twin, registries of their own, scheduler hooks,
the public-bind check and the options."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from clemserve.registry import KeyRegistry, ModelRegistry, ModelSpec
from clemserve.service.backends import BackendContext
from clemserve.service.config import parse_server_config
from clemserve.service.domain import GenArgs, Generation, Message, Outcome, Row
from clemserve.service.labels import RequestLabels, backend_label, model_label
from clemserve.service.metrics import OTHER, Metrics, MetricsSink, NoMetrics, create
from clemserve.service.model_cache import ModelManager
from clemserve.service.scheduler import Scheduler, SchedulingPolicy
from clemserve.service.security.settings import metrics_exposure_problem as exposure_problem
from clemserve.v1 import clemserve_pb2 as pb

ECHO = ModelSpec.from_dict({"model_name": "echo-a", "backend": "echo", "model_id": "echo", "model_config": {}})
HI = [{"role": "user", "content": "hi"}]


def manager(tmp_path: Path, metrics: MetricsSink | None = None) -> ModelManager:
    context = BackendContext(keys=KeyRegistry(tmp_path / "key.json"), cache_dir=tmp_path)
    return ModelManager(ModelRegistry([ECHO]), context, metrics=metrics)


# -- labels ------------------------------------------------------------------------------------------


def test_model_label_keeps_registry_and_loaded_names_and_folds_the_rest(tmp_path: Path) -> None:
    async def check() -> None:
        models = manager(tmp_path)
        assert model_label("echo-a", frozenset({"echo-a"}), models.loaded_names()) == "echo-a"
        assert model_label("my model; api_key=sk-123456789", frozenset({"echo-a"}), models.loaded_names()) == OTHER
        # a loaded model keeps its name even where the registry's names are not given
        assert model_label("echo-a", frozenset(), models.loaded_names()) == OTHER
        await models.load("echo-a")
        assert model_label("echo-a", frozenset(), models.loaded_names()) == "echo-a"
        await models.shutdown()
        assert model_label("echo-a", frozenset(), models.loaded_names()) == OTHER

    asyncio.run(check())


def test_backend_label_only_names_known_backends() -> None:
    assert backend_label("huggingface_local") == "huggingface_local"
    assert backend_label("llamacpp") == "llamacpp"  # known, not served
    assert backend_label("my.module:Class") == OTHER


def samples(metrics: Metrics, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {
        frozenset(s.labels.items()): s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == name
    }


def test_request_labels_come_from_the_resolved_selector(tmp_path: Path) -> None:
    metrics = Metrics(process=False)
    models = manager(tmp_path, metrics)
    labels = RequestLabels(models.resolve, models.resolver.names, models.loaded_names)

    def request(method: str, request: object, code: str) -> None:
        metrics.request(method, *labels(request), code, 0.01)

    spec_selector = pb.ModelSelector(spec=pb.ModelSpec(json=ECHO.to_string()))
    request("Generate", pb.GenerateRequest(model=pb.ModelSelector(name="echo-a")), "OK")
    request("Generate", pb.GenerateRequest(model=spec_selector), "OK")
    request("Generate", pb.GenerateRequest(model=pb.ModelSelector(name="sk-secret-model-name")), "NOT_FOUND")
    request("Generate", pb.GenerateRequest(), "INVALID_ARGUMENT")
    request("ListModels", pb.ListModelsRequest(), "OK")
    counted = samples(metrics, "clemserve_requests_total")
    label = {"method": "Generate", "model": "echo-a", "backend": "echo", "code": "OK"}
    assert counted[frozenset(label.items())] == 2
    assert counted[frozenset({"method": "Generate", "model": OTHER, "backend": "", "code": "NOT_FOUND"}.items())] == 1
    unnamed = {"method": "Generate", "model": "", "backend": "", "code": "INVALID_ARGUMENT"}
    assert counted[frozenset(unnamed.items())] == 1
    assert counted[frozenset({"method": "ListModels", "model": "", "backend": "", "code": "OK"}.items())] == 1
    assert all("sk-secret" not in value for labels in counted for _, value in labels)


# -- the twin and the registries ---------------------------------------------------------------------


def test_no_metrics_has_every_hook_of_metrics() -> None:
    hooks = {name for name, _ in inspect.getmembers(Metrics, inspect.isfunction) if not name.startswith("_")}
    assert hooks == {name for name, _ in inspect.getmembers(NoMetrics, inspect.isfunction) if not name.startswith("_")}
    for name in hooks:
        assert inspect.signature(getattr(Metrics, name)) == inspect.signature(getattr(NoMetrics, name)), name


def test_create_is_off_for_port_0() -> None:
    assert type(create(0)) is NoMetrics and not create(0).enabled
    assert type(create(9100)) is Metrics and create(9100).enabled
    off = NoMetrics()
    assert off.serve("127.0.0.1", 9100) == 0
    assert off.tokens("m", 3, 0) is None


def test_metrics_off_never_imports_prometheus_client() -> None:
    code = (
        "import sys\n"
        "from clemserve.service import cli, server\n"
        "from clemserve.service.metrics import create\n"
        "create(0).request('Generate', '', '', 'OK', 0.0)\n"
        "assert 'prometheus_client' not in sys.modules, 'imported'\n"
        "create(1)\n"
        "assert 'prometheus_client' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_each_metrics_has_its_own_registry() -> None:
    first, second = Metrics(process=False), Metrics(process=False)  # the same family names, no clash
    first.queued("m", 0.5)
    assert samples(first, "clemserve_queue_wait_seconds_count") == {frozenset({("model", "m")}): 1}
    assert samples(second, "clemserve_queue_wait_seconds_count") == {}


# -- scheduler hooks ---------------------------------------------------------------------------------


def test_scheduler_records_batch_sizes_and_queue_waits() -> None:
    metrics = Metrics(process=False)
    gate: asyncio.Event

    async def run_batch(rows: list[Row], args: GenArgs, *_: object) -> list[Outcome]:
        await gate.wait()
        return [Generation(prompt={}, response={}, text="") for _ in rows]

    async def run_one(messages: Sequence[Message], args: GenArgs, *_: object) -> Generation:
        return Generation(prompt={}, response={}, text="")

    async def check() -> None:
        nonlocal gate
        gate = asyncio.Event()
        policy = SchedulingPolicy(max_batch=4, max_wait_s=0)
        batching = Scheduler("b", policy, concurrency=1, run_one=run_one, run_batch=run_batch, metrics=metrics)
        first = asyncio.create_task(batching.submit(HI, GenArgs(), "a"))
        await asyncio.sleep(0.01)  # the first runs alone and holds the only slot
        rest = [asyncio.create_task(batching.submit(HI, GenArgs(), f"c{i}")) for i in range(3)]
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(first, *rest)
        await batching.close()
        alone = Scheduler("one", policy, concurrency=1, run_one=run_one, metrics=metrics)
        await alone.submit(HI, GenArgs(), "a")  # the fast path
        await alone.close()

    asyncio.run(check())
    sizes = samples(metrics, "clemserve_batch_size_bucket")
    assert sizes[frozenset({("model", "b"), ("le", "1.0")})] == 1
    assert sizes[frozenset({("model", "b"), ("le", "4.0")})] == 2  # one batch of 1, one of 3
    assert samples(metrics, "clemserve_batch_size_sum") == {frozenset({("model", "b")}): 4}
    waits = samples(metrics, "clemserve_queue_wait_seconds_count")
    assert waits == {frozenset({("model", "b")}): 4, frozenset({("model", "one")}): 1}
    assert samples(metrics, "clemserve_queue_wait_seconds_sum")[frozenset({("model", "one")})] == 0
    assert samples(metrics, "clemserve_queue_wait_seconds_sum")[frozenset({("model", "b")})] > 0


# -- the bind check and the options ------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_loopback_metrics_hosts_pass(host: str) -> None:
    assert exposure_problem(host, public=False) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "metrics.example"])
def test_public_metrics_hosts_need_the_flag(host: str) -> None:
    problem = exposure_problem(host, public=False)
    assert problem is not None and host in problem and "--metrics-public" in problem
    assert exposure_problem(host, public=True) is None


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
