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
    prefix_caching="prefix cache up to 1024 MiB",
    prefix_cache_bytes=3 << 20,
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
    assert (models[0].prefix_caching, models[0].prefix_cache_bytes) == ("prefix cache up to 1024 MiB", 3 << 20)
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


def listing(*statuses: tuple[str, int]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(
        models=[
            pb.ModelStatus(
                model_spec=pb.ModelSpec(json=ModelSpec(model_name=name, backend="echo").to_string()),
                availability=availability,
            )
            for name, availability in statuses
        ]
    )


CAN_LOAD, NEEDS_KEY = pb.MODEL_AVAILABILITY_CAN_LOAD, pb.MODEL_AVAILABILITY_NEEDS_KEY


class Servers:
    """A stand-in stub per address: each server's listing, or the failure it answers with."""

    def __init__(self, answers: dict[str, pb.ListModelsResponse | Exception]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def stub(self, address: str, token: str | None) -> Any:
        servers = self

        class One:
            def ListModels(self, request: Any, **_: Any) -> pb.ListModelsResponse:
                servers.asked.append(address)
                answer = servers.answers[address]
                if isinstance(answer, Exception):
                    raise answer
                return answer

        return One()


def test_several_servers_are_listed_each_with_its_own_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLEMSERVE_WAIT_FOR_SERVER", "0")
    servers = Servers(
        {
            "a:1": listing(("model-a", CAN_LOAD), ("echo", CAN_LOAD), ("gpt", NEEDS_KEY)),
            "b:1": listing(("model-b", CAN_LOAD), ("echo", CAN_LOAD), ("gpt", NEEDS_KEY)),
            "gone:1": REFUSED,
        }
    )
    monkeypatch.setattr(admin, "_stub", servers.stub)
    listings = admin.list_servers(["a:1", "b:1", "a:1", "gone:1"], timeout=5)
    assert [(one.address, [m.name for m in one.models]) for one in listings] == [
        ("a:1", ["model-a", "echo", "gpt"]),
        ("b:1", ["model-b", "echo", "gpt"]),
        ("gone:1", []),
    ]
    assert sorted(servers.asked) == ["a:1", "b:1", "gone:1"]  # an address given twice is asked once
    assert isinstance(listings[2].error, errors.UnavailableError) and listings[0].error is None
    assert listings[0].budget is not None and listings[2].budget is None
    # a name that two servers can run is reported; one both only list (no key on either) is not
    assert admin.shared_names(listings) == {"echo": ["a:1", "b:1"]}


def test_preload_and_unload_follow_the_model_s_route(monkeypatch: pytest.MonkeyPatch, stub: Stub) -> None:
    asked: list[str] = []
    monkeypatch.setattr(admin, "_stub", lambda address, token: asked.append(address) or stub)
    from clemserve.client import channel

    monkeypatch.setattr(channel, "_default_address", None)  # what an earlier connect() chose
    monkeypatch.setenv("CLEMSERVE_ADDRESS", "default:1")
    monkeypatch.setenv("CLEMSERVE_ROUTES", "tin*=routed:2")
    admin.preload("tiny")
    admin.unload({"model_name": "tiny"})
    admin.preload("other")
    admin.unload("tiny", address="explicit:3")  # an address given wins over the route
    assert asked == ["routed:2", "routed:2", "default:1", "explicit:3"]
