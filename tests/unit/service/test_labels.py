"""Metric labels without a server: model and backend names kept bounded, and a request's labels from its resolved
selector."""

from __future__ import annotations

import asyncio
from pathlib import Path

from clemserve.registry import KeyRegistry, ModelRegistry, ModelSpec
from clemserve.service.backends import BackendContext
from clemserve.service.labels import RequestLabels, backend_label, model_label
from clemserve.service.metrics import OTHER, Metrics, MetricsSink
from clemserve.service.model_cache import ModelCache
from clemserve.v1 import clemserve_pb2 as pb
from tests.unit.service.test_metrics import samples

ECHO = ModelSpec.from_dict({"model_name": "echo-a", "backend": "echo", "model_id": "echo", "model_config": {}})
HI = [{"role": "user", "content": "hi"}]


def manager(tmp_path: Path, metrics: MetricsSink | None = None) -> ModelCache:
    context = BackendContext(keys=KeyRegistry(tmp_path / "key.json"), cache_dir=tmp_path)
    return ModelCache(ModelRegistry([ECHO]), context, metrics=metrics)


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
