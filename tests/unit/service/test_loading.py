"""One admitted load: the backend loaded within the timeout, measured and charged, or failed and let go."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
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
from clemserve.service.streaming import StreamObserver
from tests.standin_hub import StandInHub, serve_as_hub
from tests.unit.service.backends.test_hub import REPO, checkpoint


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


# -- weights downloaded from the hub before the load -----------------------------------------------


@pytest.fixture
def hub_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StandInHub]:
    """Every entry's weights are a stand-in hub's repository, not cached: 256 KiB of weights in 16 KiB pieces
    50 ms apart (about 0.8 s), their bytes read every 20 ms."""
    from clemserve.service import loading
    from clemserve.service.backends import download, hub
    from clemserve.service.backends.weights import Weights, transformers_files

    with StandInHub(chunk=16384, delay_s=0.05) as served:
        served.add(REPO, checkpoint(tmp_path / "repo"))
        serve_as_hub(monkeypatch, served, tmp_path / "hf")
        monkeypatch.setattr(hub, "HUB", hub.Hub())
        monkeypatch.setattr(download, "POLL_S", 0.02)
        weights = Weights(REPO, missing="not cached", download=True, fetch=transformers_files)
        monkeypatch.setattr(loading, "locate_weights", lambda spec: weights)
        yield served


def test_the_load_timeout_counts_from_the_end_of_the_download(tmp_path: Path, hub_repo: StandInHub) -> None:
    """The download takes longer than --load-timeout, the load itself less: the load succeeds, and streamed
    requests saw the download's bytes."""
    found = loader(tmp_path, load_timeout_s=0.4)
    key, model = entry(load_delay_s=0.05)
    seen: list[tuple[float, str]] = []

    class Watching(StreamObserver):
        def loading(self, progress: float, detail: str) -> None:
            seen.append((progress, detail))

    async def run() -> float:
        model.load_observers.add(Watching())
        started = time.monotonic()
        await found.load(key, model)
        assert model.ready and model.scheduler is not None
        await model.scheduler.close()
        return time.monotonic() - started

    assert asyncio.run(run()) > 0.4
    downloading = [(p, d) for p, d in seen if d.startswith(f"downloading {REPO} from the Hugging Face hub: ")]
    assert any(0 < p < 0.3 for p, _ in downloading), seen
    assert any(d.startswith(f"downloaded {REPO}") and p == 0.3 for p, d in seen), seen
    assert "model.safetensors" in hub_repo.resolved()


def test_a_stalled_download_fails_the_load_with_its_reason(tmp_path: Path, hub_repo: StandInHub) -> None:
    from clemserve.service.backends.download import DownloadStalledError

    hub_repo.stall_after = 32768
    found = loader(tmp_path, download_stall_s=0.3)
    key, model = entry()

    async def run() -> None:
        found.residency.charge(key, 999)  # what admission reserved
        with pytest.raises(DownloadStalledError):
            await found.load(key, model)
        assert model.state is ModelState.FAILED and "stalled: no byte for 0.3 s" in model.reason
        await asyncio.sleep(0.05)
        assert found.residency.used() == 0

    asyncio.run(run())
    hub_repo.release()
