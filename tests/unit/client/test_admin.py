"""Model management through a stand-in stub: list, preload and unload convert the server's answers and follow
the retry plan."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from clemserve.client import admin, calls, retry
from clemserve.registry import ModelSpec, errors
from clemserve.v1 import clemserve_pb2 as pb
from tests.unit.client.rpc import REFUSED, decided

SPEC = ModelSpec(model_name="tiny", backend="echo")
STATUS = pb.ModelStatus(
    model_spec=pb.ModelSpec(json=SPEC.to_string()),
    state=pb.MODEL_STATE_READY,
    availability=pb.MODEL_AVAILABILITY_READY,
    leases=2,
)


class Stub:
    def __init__(self, *failures: Exception) -> None:
        self.failures: list[Exception] = list(failures)
        self.requests: list[Any] = []

    def _answer(self, request: Any, reply: Any) -> Any:
        self.requests.append(request)
        if self.failures:
            raise self.failures.pop(0)
        return reply

    def ListModels(self, request: Any, **_: Any) -> pb.ListModelsResponse:
        return self._answer(request, pb.ListModelsResponse(models=[STATUS], memory_budget_bytes=8 << 30))

    def LoadModel(self, request: Any, **_: Any) -> pb.LoadModelResponse:
        return self._answer(request, pb.LoadModelResponse(status=STATUS))

    def UnloadModel(self, request: Any, **_: Any) -> pb.UnloadModelResponse:
        return self._answer(request, pb.UnloadModelResponse(was_loaded=True))


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stub]:
    monkeypatch.delenv("CLEMSERVE_WAIT_FOR_SERVER", raising=False)
    monkeypatch.setattr(calls.time, "sleep", lambda seconds: None)
    made = Stub()
    monkeypatch.setattr(admin, "_stub", lambda address, token: made)
    yield made
    retry._reached.clear()


def test_list_preload_and_unload_convert_the_answers(stub: Stub) -> None:
    models, budget = admin.list_models_and_budget(address="admin:1")
    assert [(m.name, m.state, m.runnable, m.leases) for m in models] == [("tiny", "ready", True, 2)]
    assert budget.total_bytes == 8 << 30
    assert admin.preload("tiny", address="admin:1").state == "ready"
    assert admin.unload("tiny", address="admin:1") is True
    assert [type(r).__name__ for r in stub.requests] == ["ListModelsRequest", "LoadModelRequest", "UnloadModelRequest"]


def test_a_server_that_answered_before_is_waited_for(stub: Stub) -> None:
    admin.list_models(address="admin:2")
    stub.failures = [REFUSED, REFUSED]
    assert admin.unload("tiny", address="admin:2") is True and len(stub.requests) == 4
    stub.failures = [decided(errors.PermissionDeniedError("the admin token is needed"))]
    with pytest.raises(errors.PermissionDeniedError):
        admin.preload("tiny", address="admin:2")
