"""One admitted load: the backend loaded within the timeout, measured and charged, or failed and let go."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from clemserve.registry import KeyRegistry, ModelSpec
from clemserve.registry.errors import FailedPreconditionError, ResourceExhaustedError
from clemserve.service.backends import BackendContext, BackendDeadError
from clemserve.service.domain import ModelState
from clemserve.service.loaded import LoadedModel
from clemserve.service.loading import Loader, LoadTimeoutError, reason
from clemserve.service.memory import ResidencyPolicy
from clemserve.service.metrics import NoMetrics
from clemserve.service.residency import Residency
from clemserve.service.resolver import cache_key
from clemserve.service.scheduler import SchedulingPolicy


def loader(tmp_path: Path, **policy: float) -> Loader:
    residency = Residency(ResidencyPolicy(**policy), cache_dir=tmp_path)  # type: ignore[arg-type]
    context = BackendContext(keys=KeyRegistry(tmp_path / "key.json"), cache_dir=tmp_path)
    return Loader(residency, context, SchedulingPolicy(), NoMetrics())


def entry(name: str = "m", **config: object) -> tuple[str, LoadedModel]:
    spec = ModelSpec.from_dict({"model_name": name, "backend": "fault", "model_config": config})
    return cache_key(spec), LoadedModel(spec)


def test_a_load_makes_the_model_ready_charged_at_the_larger_of_estimate_and_measurement(tmp_path: Path) -> None:
    found = loader(tmp_path)
    key, model = entry(memory_bytes=1234)

    async def run() -> None:
        model.admitted(1234)
        backend = await found.load(key, model)
        assert model.ready and model.backend is backend and model.scheduler is not None
        assert model.loads == 1 and model.reason == "" and model.progress == 1.0
        assert found.residency.charged(key) == 1234
        await model.scheduler.close()

    asyncio.run(run())


def test_a_load_past_the_timeout_fails_and_its_bytes_are_handed_back(tmp_path: Path) -> None:
    found = loader(tmp_path, load_timeout_s=0.05)
    key, model = entry(load_delay_s=5)

    async def run() -> None:
        found.residency.charge(key, 999)  # what admission reserved
        with pytest.raises(LoadTimeoutError, match="took longer than --load-timeout"):
            await found.load(key, model)
        assert model.state is ModelState.FAILED and "--load-timeout" in model.reason
        await asyncio.sleep(0.05)  # the timed-out backend is let go of in the background
        assert found.residency.used() == 0

    asyncio.run(run())


def test_running_out_of_memory_while_loading_is_resource_exhausted(tmp_path: Path) -> None:
    found = loader(tmp_path)
    key, model = entry("oom-once", oom_on_load=True)  # the fault backend counts loads per name and process
    with pytest.raises(ResourceExhaustedError, match="out of memory while loading oom-once"):
        asyncio.run(found.load(key, model))
    assert model.state is ModelState.FAILED and model.reason.startswith("MemoryError")


def test_a_failed_load_reason_is_the_message_or_the_exception_type() -> None:
    assert reason(FailedPreconditionError("no weights")) == "no weights"
    assert reason(RuntimeError("bug")) == "RuntimeError: bug"


@pytest.mark.parametrize(("failure", "cuda"), [(BackendDeadError("a CUDA error"), False), (RuntimeError("bug"), True)])
def test_a_failed_load_is_let_go_of_without_cuda_after_a_cuda_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException, cuda: bool
) -> None:
    """After a CUDA error every CUDA call fails: emptying torch's cache then could replace the dead backend's
    UNAVAILABLE with an INTERNAL."""
    from clemserve.service import loading
    from clemserve.service.backends.fault import FaultBackend

    class Failing(FaultBackend):
        async def load(self, progress: Any) -> None:
            raise failure

    freed: list[bool] = []
    monkeypatch.setattr(loading, "backend_for", lambda spec: Failing)
    monkeypatch.setattr(loading, "free_memory", lambda *, cuda=True: freed.append(cuda))
    found = loader(tmp_path)
    key, model = entry("dies")
    with pytest.raises(type(failure)):
        asyncio.run(found.load(key, model))
    assert freed == [cuda] and model.state is ModelState.FAILED
