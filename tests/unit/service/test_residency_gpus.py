"""The GPUs of the memory budget, read through a fake NVML (and a fake torch), the checks that use them, and
vLLM's estimate, admission and start-up errors: what only a GPU machine reaches, tested with fakes."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import types
from pathlib import Path
from typing import Any

import pytest

import clemserve.service.backends.footprint as footprint
import clemserve.service.gpus as gpus
import clemserve.service.memory as memory
import clemserve.service.residency as residency_module
from clemserve.registry import ModelSpec
from clemserve.registry.errors import FailedPreconditionError, ResourceExhaustedError
from clemserve.service.backends import estimate
from clemserve.service.backends.vllm_engine import ENGINE_OVERHEAD, KV_FLOOR
from clemserve.service.domain import GpuMemory, ModelState
from clemserve.service.loaded import LoadedModel
from clemserve.service.memory import ResidencyPolicy, Sizing, budget_from_setting
from clemserve.service.residency import Residency
from clemserve.service.resolver import cache_key
from tests.admission import admit, charged, unload, unload_all
from tests.tiny_model import write_sparse_safetensors

GiB = 2**30
UUIDS = ["GPU-aaaa1111", "GPU-bbbb2222", "GPU-cccc3333", "GPU-dddd4444"]


class FakeNvml(types.ModuleType):
    """A pynvml module with 80 GiB GPUs, by default three: GPU 1 has 20 GiB held by another process, GPU 2
    holds 5 GiB of this process's own (and 1 GiB of another's). ``processes``: each GPU's (pid, bytes)."""

    def __init__(self, processes: dict[int, list[tuple[int, int]]] | None = None) -> None:
        super().__init__("pynvml")
        self.started = self.stopped = 0
        pid = __import__("os").getpid()
        self.processes = processes or {0: [], 1: [(pid + 1, 20 * GiB)], 2: [(pid, 5 * GiB), (pid + 2, 1 * GiB)]}

    def nvmlInit(self) -> None:
        self.started += 1

    def nvmlShutdown(self) -> None:
        self.stopped += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.processes)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return UUIDS[handle].encode()

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        used = sum(n for _, n in self.processes[handle]) + 512 * 2**20  # the driver's own
        return types.SimpleNamespace(total=80 * GiB, used=used, free=80 * GiB - used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Any]:
        return [types.SimpleNamespace(pid=p, usedGpuMemory=n) for p, n in self.processes[handle]]


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake


@pytest.fixture
def no_gpu_reader(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """No NVML, no driver entries in /proc; torch, if asked, is a fake whose calls are recorded."""
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    monkeypatch.setattr(gpus, "DRIVER_GPUS", tmp_path / "no-driver")
    asked: list[str] = []

    def fake_torch(engines: object = None) -> list[GpuMemory]:
        asked.append("torch")
        return [GpuMemory(0, "fake", total_bytes=24 * GiB, used_by_others_bytes=GiB)]

    monkeypatch.setattr(gpus, "read_torch", fake_torch)
    return asked


def test_the_budget_covers_every_visible_gpu_less_what_others_hold(nvml: FakeNvml) -> None:
    budget = budget_from_setting("auto")
    assert budget.kind == "gpu" and budget.source == "nvml" and [d.index for d in budget.devices] == [0, 1, 2]
    driver = 512 * 2**20
    others = [driver, 20 * GiB + driver, GiB + driver]
    assert [d.used_by_others_bytes for d in budget.devices] == others
    assert [d.process_bytes for d in budget.devices] == [0, 0, 5 * GiB]  # this process is not "others"
    # 90% of each, or what others leave where that is less (the driver's hold fits in the headroom)
    assert [d.budget_bytes for d in budget.devices] == [int(72 * GiB), 80 * GiB - others[1], int(72 * GiB)]
    assert budget.total == sum(d.budget_bytes for d in budget.devices)
    assert nvml.started == nvml.stopped == 1
    explicit = budget_from_setting("100GiB")
    assert (explicit.total, explicit.kind, explicit.source, len(explicit.devices)) == (
        100 * GiB,
        "gpu",
        "--memory-budget",
        3,
    )
    # a size: each GPU's part is what others leave of it (the operator's total bounds the sum)
    assert [d.budget_bytes for d in explicit.devices] == [80 * GiB - n for n in others]


@pytest.mark.parametrize(
    ("setting", "physical"),
    [
        ("2,0", [2, 0]),
        ("GPU-cccc3333", [2]),
        ("GPU-bbbb", [1]),  # a unique prefix, as CUDA takes it
        ("cccc3333,1", [2, 1]),
        ("1,7,0", [1]),  # an index that names no device ends the list
        ("0,0", [0]),
        ("", []),
        ("-1", []),
        ("GPU-", []),  # not unique
    ],
)
def test_cuda_visible_devices_indices_and_uuids(setting: str, physical: list[int]) -> None:
    assert gpus.visible_order(setting, UUIDS) == physical


def test_the_budget_respects_cuda_visible_devices(nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-cccc3333,1")
    budget = budget_from_setting("auto")
    assert [(d.index, d.uuid) for d in budget.devices] == [(0, "GPU-cccc3333"), (1, "GPU-bbbb2222")]
    assert budget.devices[0].process_bytes == 5 * GiB


def test_without_nvml_or_driver_entries_torch_is_asked_only_when_a_gpu_backend_loads(
    no_gpu_reader: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # a server that has not imported it (restored after)
    assert budget_from_setting("auto").kind == "ram" and no_gpu_reader == []
    found = budget_from_setting("auto", may_import_torch=True)
    assert found.kind == "gpu" and found.source == "torch" and no_gpu_reader == ["torch"]


def test_the_driver_entries_in_proc_let_torch_be_asked(
    no_gpu_reader: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    driver = tmp_path / "driver" / "gpus"
    (driver / "0000:01:00.0").mkdir(parents=True)
    monkeypatch.setattr(gpus, "DRIVER_GPUS", driver)
    assert gpus.read_gpus(may_import_torch=False) == (
        [GpuMemory(0, "fake", total_bytes=24 * GiB, used_by_others_bytes=GiB)],
        "torch",
    )


def test_residency_finds_the_budget_off_the_loop_and_asks_torch_once_for_a_gpu_backend(
    no_gpu_reader: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(gpus, "driver_lists_gpus", lambda: False)
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # the fake reader stands for it
    threads: list[str] = []
    real = memory.budget_from_setting

    def recording(setting: str, *, may_import_torch: bool = False, engines: Any = None) -> memory.Budget:
        import threading

        threads.append(threading.current_thread().name)
        return real(setting, may_import_torch=may_import_torch, engines=engines)

    monkeypatch.setattr(residency_module, "budget_from_setting", recording)
    residency = _residency(tmp_path, "auto", {})
    echo = ModelSpec(model_name="e", backend="echo", model_config={})
    local = ModelSpec(model_name="l", backend="huggingface_local", huggingface_id="x", model_config={})

    async def check() -> None:
        import threading

        assert (await residency.find_budget(echo)).kind == "ram"
        assert (await residency.find_budget(local)).kind == "gpu"
        await residency.find_budget(local)
        assert threading.current_thread().name not in threads

    asyncio.run(check())
    assert len(threads) == 2 and no_gpu_reader == ["torch"]


# -- admission on GPUs --------------------------------------------------------------------------


def _residency(tmp_path: Path, budget: str, models: dict[str, LoadedModel]) -> Residency:
    return Residency(ResidencyPolicy(memory_budget=budget), cache_dir=tmp_path)


def _admit(residency: Residency, models: dict[str, LoadedModel], spec: ModelSpec) -> LoadedModel:
    return asyncio.run(admit(residency, models, spec))


def test_gpu_bound_weights_go_to_gpus_with_free_memory_whatever_the_ram(
    nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(residency_module, "available_ram", lambda: 1 * GiB)  # a small host: not where it goes
    monkeypatch.setattr(residency_module, "estimate", lambda *_, **__: memory.Estimate(weights=100 * GiB))
    models: dict[str, LoadedModel] = {}
    residency = _residency(tmp_path, "1TiB", models)
    spec = ModelSpec(model_name="big", backend="huggingface_local", huggingface_id="org/big", model_config={})
    model = _admit(residency, models, spec)
    # no GPU holds 100 GiB: the two with the most room (79.5 and 73.5 GiB free; GPU 1 has 59.5) take half each
    assert charged(residency, model) == 100 * GiB
    grant = residency.granted(cache_key(spec))
    assert (grant.gpus, grant.uuids, grant.per_gpu) == ((0, 2), (UUIDS[0], UUIDS[2]), 50 * GiB)
    nvml.processes[0].append((1, 70 * GiB))
    nvml.processes[1].append((1, 50 * GiB))
    unload_all(residency, models)
    assert residency.granted(cache_key(spec)).gpus == ()
    with pytest.raises(ResourceExhaustedError) as caught:  # 9.5, 9.5 and 73.5 GiB free: no set holds it
        _admit(residency, models, spec)
    message = str(caught.value)
    assert "cannot load big: it needs about 34133 MiB on the GPUs it would span, and no GPUs have that room" in message
    assert (
        "cuda:0 9728 MiB (its budget part 81408 MiB, this server's models 0 MiB, other processes 72192 MiB)" in message
    )
    assert "not even with no model of this server loaded" in message


def _fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> FakeNvml:
    fake = FakeNvml({i: [] for i in range(count)})
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake


def _local(name: str, gib: int, **config: Any) -> ModelSpec:
    return ModelSpec(
        model_name=name,
        backend="huggingface_local",
        huggingface_id=f"org/{name}",
        model_config={"memory_bytes": gib * GiB, **config},
    )


def test_a_second_one_gpu_model_goes_to_the_empty_gpu_not_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Two 80 GiB GPUs (72 GiB of budget each): a 60 GiB model on each, where the pool alone would have put the
    second on GPU 0 too (and the backend refused it as offload)."""
    _fake_gpus(monkeypatch, 2)
    models: dict[str, LoadedModel] = {}
    residency = _residency(tmp_path, "auto", models)
    first = _admit(residency, models, _local("first", 60, number_gpus=1))
    second = _admit(residency, models, _local("second", 60, number_gpus=1))
    assert residency.granted(cache_key(first.spec)).gpus == (0,)
    assert residency.granted(cache_key(second.spec)).gpus == (1,)
    assert first.spec["model_name"] in [m.name for m in models.values()]  # nothing was evicted


def test_a_two_gpu_model_on_four_gpus_goes_where_two_have_room(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = _fake_gpus(monkeypatch, 4)
    fake.processes[1].append((1, 50 * GiB))  # another process's model on GPU 1
    models: dict[str, LoadedModel] = {}
    residency = _residency(tmp_path, "auto", models)
    resident = _admit(residency, models, _local("resident", 60, number_gpus=1))
    assert residency.granted(cache_key(resident.spec)).gpus == (0,)  # the most room: GPU 0, then 2, then 3
    pair = _admit(residency, models, _local("pair", 100, number_gpus=2))
    grant = residency.granted(cache_key(pair.spec))
    assert (grant.gpus, grant.per_gpu) == ((2, 3), 50 * GiB)
    assert len(models) == 2  # nothing was evicted


def test_eviction_only_when_no_set_of_gpus_has_room(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_gpus(monkeypatch, 2)
    models: dict[str, LoadedModel] = {}
    residency = _residency(tmp_path, "auto", models)
    older = _admit(residency, models, _local("older", 50, number_gpus=1))  # on GPU 0
    newer = _admit(residency, models, _local("newer", 50, number_gpus=1))  # on GPU 1
    for each in (older, newer):
        each.state = ModelState.READY
    older.last_used -= 60
    # 22 GiB left on each GPU: a 20 GiB model fits beside them, evicting nothing
    small = _admit(residency, models, _local("small", 20, number_gpus=1))
    assert set(models) == {cache_key(m.spec) for m in (older, newer, small)}
    small.state = ModelState.READY
    unload(residency, models, cache_key(small.spec))
    # 40 GiB: no GPU has it; the least recently used idle model goes, and the load takes its GPU
    big = _admit(residency, models, _local("big", 40, number_gpus=1))
    assert cache_key(older.spec) not in models and cache_key(newer.spec) in models
    assert residency.granted(cache_key(big.spec)).gpus == (0,)


def test_an_engines_charge_is_this_servers_memory_not_other_processes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Inside a container NVML reports the host's process ids: an engine this server started (a child process
    torch here does not see) is counted by its charge as the server's, and the rest of the used memory as others'."""
    fake = _fake_gpus(monkeypatch, 2)
    models: dict[str, LoadedModel] = {}
    residency = _residency(tmp_path, "auto", models)
    engine = _vllm(tmp_path, "engine", vllm_args={"kv_cache_memory_bytes": 10 * GiB})
    _admit(residency, models, engine)
    held = residency.charged(cache_key(engine))
    (gpu,) = residency.granted(cache_key(engine)).gpus
    fake.processes[gpu].append((4242, held))  # the engine core, under a host pid
    fake.processes[1 - gpu].append((4343, 30 * GiB))  # a stranger
    devices = asyncio.run(residency.devices())
    assert (devices[gpu].process_bytes, devices[gpu].used_by_others_bytes) == (held, 512 * 2**20)
    assert (devices[1 - gpu].process_bytes, devices[1 - gpu].used_by_others_bytes) == (0, 30 * GiB + 512 * 2**20)
    unload_all(residency, models)
    assert asyncio.run(residency.devices())[gpu].process_bytes == 0  # gone from the ledger: no longer counted


def _vllm(tmp_path: Path, name: str, **config: Any) -> ModelSpec:
    folder = tmp_path / "weights"
    if not folder.exists():  # one 1 MiB tensor, its data a hole: the estimate reads the header only
        folder.mkdir()
        write_sparse_safetensors(folder / "model.safetensors", {"w": ("F32", [512, 512])})
    return ModelSpec(model_name=name, backend="vllm", huggingface_id=str(folder), model_config=config)


def test_the_vllm_estimate_counts_its_share_of_each_tensor_parallel_gpu(tmp_path: Path) -> None:
    share = {"gpu_memory_utilization": 0.9}
    one = estimate(_vllm(tmp_path, "one", vllm_args=share), Sizing(tmp_path, gpu_bytes=80 * GiB))
    two = estimate(_vllm(tmp_path, "two", number_gpus=2, vllm_args=share), Sizing(tmp_path, gpu_bytes=80 * GiB))
    args = estimate(
        _vllm(tmp_path, "tp", vllm_args={"tensor_parallel_size": 2, **share}), Sizing(tmp_path, gpu_bytes=80 * GiB)
    )
    assert one.total == int(80 * GiB * 0.9) and two.total == args.total == 2 * int(80 * GiB * 0.9)
    kv_args = {"kv_cache_memory_bytes": 1000}
    per_gpu = estimate(_vllm(tmp_path, "kv", number_gpus=2, vllm_args=kv_args), Sizing(tmp_path))
    assert per_gpu.kv_cache == 2000


def test_a_tensor_parallel_model_larger_than_one_gpu_is_admitted_when_it_fits_two(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fake_gpus(monkeypatch, 2)
    monkeypatch.setattr(footprint, "safetensors_bytes", lambda folder: 100 * GiB)  # a 100 GiB model
    models: dict[str, LoadedModel] = {}
    residency = _residency(tmp_path, "auto", models)
    tp2 = _admit(residency, models, _vllm(tmp_path, "tp2", number_gpus=2))
    # the weights, a KV cache for --kv-cache-tokens (at least the floor) and the engine's overhead on each GPU
    assert charged(residency, tp2) == 100 * GiB + 2 * KV_FLOOR + 2 * ENGINE_OVERHEAD <= residency.budget.total
    assert residency.granted(cache_key(tp2.spec)).gpus == (0, 1)


def test_an_engine_with_an_explicit_share_counts_what_this_process_already_holds(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = _fake_gpus(monkeypatch, 1)
    models: dict[str, LoadedModel] = {}
    residency = _residency(tmp_path, "1TiB", models)
    pid = __import__("os").getpid()
    fake.processes[0].append((pid, 45 * GiB))  # this server's CUDA context and an earlier engine
    half = {"vllm_args": {"gpu_memory_utilization": 0.5}}
    with pytest.raises(ResourceExhaustedError) as caught:
        _admit(residency, models, _vllm(tmp_path, "engine", **half))
    message = str(caught.value)
    assert "takes 0.5 of each of its 1 GPU(s) (40.0 GiB on cuda:0), and cuda:0" in message
    assert "has 34.5 GiB free: this server holds 45.0 GiB there" in message
    assert caught.value.metadata["field"] == "model_config.vllm_args.gpu_memory_utilization"
    fake.processes[0].clear()
    unload_all(residency, models)
    assert charged(residency, _admit(residency, models, _vllm(tmp_path, "engine", **half))) > 0
    # an explicit 0.9 is checked the same way: a 10 GiB CUDA context leaves 69.5 GiB of 80
    fake.processes[0].append((pid, 10 * GiB))
    unload_all(residency, models)
    with pytest.raises(ResourceExhaustedError, match=r"takes 0\.9 of each .* has 69\.5 GiB free"):
        _admit(residency, models, _vllm(tmp_path, "share", vllm_args={"gpu_memory_utilization": 0.9}))


def test_an_engine_whose_share_one_gpu_lacks_goes_to_another(nvml: FakeNvml, tmp_path: Path) -> None:
    models: dict[str, LoadedModel] = {}
    residency = _residency(tmp_path, "1TiB", models)
    nvml.processes[0].append((__import__("os").getpid(), 45 * GiB))
    engine = _vllm(tmp_path, "engine", vllm_args={"gpu_memory_utilization": 0.5})
    _admit(residency, models, engine)
    assert residency.granted(cache_key(engine)).gpus == (2,)  # 73.5 GiB free there, 59.5 on GPU 1, 34.5 on 0


# -- vLLM's start-up errors are what they are ---------------------------------------------------


@pytest.mark.parametrize(
    ("error", "kind", "words"),
    [
        (
            ValueError(
                "To serve at least one request with the model's max seq len (131072), (16.0 GiB KV cache is "
                "needed, which is larger than the available KV cache memory (4.2 GiB)."
            ),
            ResourceExhaustedError,
            "does not fit: To serve at least one request",
        ),
        (
            ValueError("No available memory for the cache blocks. Try increasing"),
            ResourceExhaustedError,
            "cache blocks",
        ),
        (
            ValueError("Free memory on device cuda:0 (10.0/79.2 GiB) on startup is less than desired GPU memory"),
            ResourceExhaustedError,
            "Free memory on device",
        ),
        (OSError("model.safetensors not found"), FailedPreconditionError, "cannot load m from org/m"),
        (ValueError("max_model_len must be positive"), FailedPreconditionError, "vLLM refused the engine of m"),
        (
            RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {}"),
            FailedPreconditionError,
            "failed to start: Engine core initialization failed",
        ),
    ],
)
def test_engine_start_failures(error: Exception, kind: type[Exception], words: str) -> None:
    from clemserve.service.backends.vllm_engine import engine_start_failure

    found = engine_start_failure("m", "org/m", error)
    assert type(found) is kind and words in str(found)
    assert "weights" not in str(found) or isinstance(error, OSError)


def test_idle_models_are_evicted_before_an_engine_that_wants_its_share_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The budget has room, but the GPU does not have the engine's share free while an idle model holds it:
    that model is evicted first; a busy one is not, and the refusal says so."""
    nvml = _fake_gpus(monkeypatch, 1)
    pid = __import__("os").getpid()
    models: dict[str, LoadedModel] = {}
    residency = _residency(tmp_path, "1TiB", models)
    idle = _local("idle", 1)
    idle_key = cache_key(idle)
    _admit(residency, models, idle).state = ModelState.READY
    nvml.processes[0].append((pid, 45 * GiB))  # what the idle model holds on GPU 0
    engine = _vllm(tmp_path, "engine", vllm_args={"gpu_memory_utilization": 0.5})

    async def admit_engine() -> list[str]:
        named = []
        residents = [m.resident(k) for k, m in models.items()]
        async with contextlib.aclosing(residency.admit(cache_key(engine), engine, residents)) as victims:
            async for key in victims:
                named.append(key)
                nvml.processes[0].remove((pid, 45 * GiB))  # its unload hands the GPU memory back
                unload(residency, models, key)
        return named

    assert asyncio.run(admit_engine()) == [idle_key]
    assert residency.charged(cache_key(engine)) > 0 and idle_key not in models

    unload_all(residency, models)
    busy = _admit(residency, models, _local("busy", 1))
    busy.state, busy.in_flight = ModelState.READY, 1
    nvml.processes[0].append((pid, 45 * GiB))
    with pytest.raises(ResourceExhaustedError, match=r"takes 0\.5 of each .* has 34\.5 GiB free"):
        asyncio.run(admit_engine())


def test_the_cache_estimates_a_load_after_the_budget_has_found_the_gpus(nvml: FakeNvml, tmp_path: Path) -> None:
    """vLLM's estimate depends on the GPUs: made before the budget is found, it would count the CPU's KV space."""
    from clemserve.registry import KeyRegistry, ModelRegistry
    from clemserve.service.backends import BackendContext
    from clemserve.service.model_cache import ModelCache

    engine = _vllm(tmp_path, "engine")
    context = BackendContext(KeyRegistry(tmp_path / "key.json"), tmp_path)
    cache = ModelCache(ModelRegistry([engine]), context, residency=ResidencyPolicy(memory_budget="1TiB"))

    async def load() -> int:
        with contextlib.suppress(Exception):  # vLLM is not installed here: the load fails after admission
            await cache.load("engine")
        (model,) = cache.snapshot().models
        return model.estimated_bytes

    # the weights (1 MiB), the least KV cache (no config.json tells its shape) and the engine's overhead: not
    # the CPU's 4 GiB of KV space, nor 90% of the GPU
    assert asyncio.run(load()) == 2**20 + KV_FLOOR + ENGINE_OVERHEAD


def test_the_loader_hands_each_backend_the_gpus_admission_chose(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Through the cache: two 42 GiB engines on two GPUs, the second on GPU 1 (its backend is told so)."""
    from clemserve.registry import KeyRegistry, ModelRegistry
    from clemserve.service.backends import BackendContext
    from clemserve.service.backends.vllm_engine import VLLMBackend
    from clemserve.service.model_cache import ModelCache

    _fake_gpus(monkeypatch, 2)
    told: dict[str, tuple[int, ...]] = {}

    async def load(self: VLLMBackend, progress: Any) -> None:  # vLLM is not installed here
        told[self.model_name] = self.context.grant.gpus

    monkeypatch.setattr(VLLMBackend, "load", load)
    kv = {"vllm_args": {"kv_cache_memory_bytes": 40 * GiB}}
    context = BackendContext(KeyRegistry(tmp_path / "key.json"), tmp_path)
    registry = ModelRegistry([_vllm(tmp_path, "a", **kv), _vllm(tmp_path, "b", **kv)])
    cache = ModelCache(registry, context, residency=ResidencyPolicy(memory_budget="auto"))

    async def both() -> None:
        await cache.load("a")
        await cache.load("b")
        await cache.shutdown()

    asyncio.run(both())
    assert told == {"a": (0,), "b": (1,)}
