"""clemserve on a CUDA device, with random-weight Llamas of about 0.5B parameters built here (bfloat16 and
float32): memory estimated vs measured, admission of real model sizes under the GPU budget, the budget read
per device, placement (number_gpus, no silent offload), a CUDA error and out of memory while generating,
and greedy replies merged in a batch against alone.

Skipped, with the reason, where torch sees no CUDA device (see conftest.py); ``make gpu-check`` runs them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import clemserve.client as backends
from clemserve.registry import KeyRegistry, ModelRegistry, ModelSpec
from clemserve.registry.errors import FailedPreconditionError, ResourceExhaustedError
from clemserve.service.backends import BackendContext, BackendDeadError, placement
from clemserve.service.backends.huggingface_local import HuggingfaceLocalBackend
from clemserve.service.domain import GenArgs, Generation, ModelState, Row
from clemserve.service.model_cache import ModelCache
from clemserve.service.scheduler import SchedulingPolicy
from tests.gpu.conftest import SIZE, needs_cuda
from tests.gpu.random_llama import parameter_count
from tests.serving import ServerProcess, hf_entry, start_server

pytestmark = pytest.mark.gpu

GiB = 2**30
HI = [{"role": "user", "content": "Hello! How can I help you?"}]

#: real models' shapes (config.json only: the estimate reads metadata, never weights)
BIG = {
    "llama-8b-128k": {
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
    },
    "qwen-14b-32k": {
        "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 48, "num_attention_heads": 40,
        "num_key_value_heads": 8, "vocab_size": 152064, "max_position_embeddings": 32768,
    },
    "llama-70b": {
        "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
        "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
    },
}  # fmt: skip


def conversations(n: int) -> list[list[dict[str, str]]]:
    return [
        [{"role": "user", "content": f"Question {i}: " + "what is the capital of France? " * (1 + i % 5)}]
        for i in range(n)
    ]


def config_only(folder: Path, shape: dict[str, int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16", **shape}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_bf16: Path, model_fp32: Path) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("gpu-server")
    entries = [hf_entry("random-bf16", model_bf16), hf_entry("random-fp32", model_fp32)]
    entries += [hf_entry(name, config_only(folder / name, shape)) for name, shape in BIG.items()]
    (folder / "registry.json").write_text(json.dumps(entries))
    proc = start_server(folder, "--registry", str(folder / "registry.json"), timeout=180)
    yield proc
    assert proc.stop(timeout=120) == 0, proc.log()


def _status(server: ServerProcess, name: str) -> Any:
    return next(s for s in backends.list_models(address=server.address) if s.name == name)


# -- 1. memory: estimated vs measured ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "dtype_bytes"), [("random-bf16", 2), ("random-fp32", 4)])
def test_memory_estimated_and_measured_agree_with_the_weights(
    server: ServerProcess, name: str, dtype_bytes: int
) -> None:
    weights = parameter_count(SIZE) * dtype_bytes
    status = backends.preload(name, address=server.address, timeout=600)
    assert status.state == "ready"
    listed = _status(server, name)
    estimated_weights = getattr(listed, "estimated_weights_bytes", 0) or listed.estimated_memory_bytes
    assert 0.95 * weights <= estimated_weights <= 1.05 * weights, (estimated_weights, weights)
    assert listed.estimated_memory_bytes >= estimated_weights
    # what the load took on the device: the weights, within the allocator's rounding and small buffers
    assert 0.9 * weights <= listed.measured_memory_bytes <= 1.3 * weights, (listed.measured_memory_bytes, weights)
    model = backends.get_model_for(name, address=server.address, lease=False)
    model.set_gen_args(temperature=0.0, max_tokens=16)
    assert isinstance(model.generate_response(HI)[2], str)
    assert backends.unload(name, address=server.address)


# -- 1, 2. admission of real model sizes under this GPU's budget; the budget per device ----------------


def test_real_model_sizes_are_admitted_or_refused_by_the_gpu_budget(server: ServerProcess, device: str) -> None:
    needs_cuda(device, "the GPU budget")
    import torch

    _, budget = backends.list_models_and_budget(address=server.address)
    assert budget.kind == "gpu" and budget.total_bytes > 0
    devices = getattr(budget, "devices", ())
    if devices:  # the budget per device (NVML, else torch)
        assert len(devices) == torch.cuda.device_count()
        for gpu in devices:
            total = torch.cuda.get_device_properties(gpu.index).total_memory
            assert abs(gpu.total_bytes - total) <= 0.03 * total, (gpu, total)
    for name, weights in (("llama-8b-128k", 16.1e9), ("qwen-14b-32k", 29.5e9), ("llama-70b", 141e9)):
        try:
            backends.preload(name, address=server.address, timeout=120)
        except backends.ResourceExhaustedError as exc:
            refused = exc
        except backends.ClemserveError:  # admitted: the load then finds no weights (config.json only)
            refused = None
        else:
            raise AssertionError(f"{name} loaded without weights")
        if weights > budget.total_bytes:
            assert refused is not None, f"{name} ({weights / GiB:.0f} GiB of weights) admitted on {budget}"
            assert refused.required_bytes >= weights * 0.95 and refused.available_bytes <= budget.total_bytes
        elif weights * 1.25 < budget.total_bytes:  # room for its weights and a real batch's KV cache
            assert refused is None, f"{name} refused on {budget.total_bytes / GiB:.0f} GiB: {refused}"


# -- 4. placement ---------------------------------------------------------------------------------------


def _backend(tmp_path: Path, folder: Path, *, allow_offload: bool = False, **config: Any) -> HuggingfaceLocalBackend:
    spec = ModelSpec(**hf_entry("m", folder, **config))
    return HuggingfaceLocalBackend(
        spec, BackendContext(KeyRegistry(tmp_path / "key.json"), tmp_path, compute_nice=10, allow_offload=allow_offload)
    )


def _load(b: HuggingfaceLocalBackend) -> None:
    asyncio.run(b.load(lambda line, fraction=None: None))


def test_number_gpus_bounds_the_devices_and_the_real_map_is_logged(
    tmp_path: Path, model_bf16: Path, device: str, caplog: pytest.LogCaptureFixture
) -> None:
    needs_cuda(device, "placement on GPUs")
    import torch

    b = _backend(tmp_path, model_bf16, number_gpus=1)
    with caplog.at_level("INFO"):
        _load(b)
    try:
        used = {placement._device_name(v) for v in b.model.hf_device_map.values()}
        assert used == {"cuda:0"} and "m placed: cuda:0:" in caplog.text
        assert b._nice == 0  # a GPU model's thread keeps the server's priority
        (reply,) = asyncio.run(b.generate_rows([Row(HI)], GenArgs(max_tokens=8)))
        assert isinstance(reply, Generation)
    finally:
        asyncio.run(b.unload())
    too_many = _backend(tmp_path, model_bf16, number_gpus=torch.cuda.device_count() + 1)
    with pytest.raises(FailedPreconditionError) as caught:
        _load(too_many)
    assert caught.value.subject == "model_config.number_gpus"


def test_a_model_that_does_not_fit_its_gpu_is_refused_not_offloaded(
    tmp_path: Path, model_bf16: Path, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    needs_cuda(device, "offload from a GPU")
    # the GPU offers a tenth of the weights: accelerate would put the rest on the CPU or disk
    weights = parameter_count(SIZE) * 2
    monkeypatch.setattr(placement, "visible_gpus", lambda: [weights // 10])
    refused = _backend(tmp_path, model_bf16, number_gpus=1)
    with pytest.raises(ResourceExhaustedError) as caught:
        _load(refused)
    assert "--allow-offload" in str(caught.value)
    asyncio.run(refused.unload())
    allowed = _backend(tmp_path, model_bf16, number_gpus=1, allow_offload=True)
    _load(allowed)
    try:
        assert placement.offloaded(allowed.model.hf_device_map)  # it runs, partly on the CPU
        (reply,) = asyncio.run(allowed.generate_rows([Row(HI)], GenArgs(max_tokens=4)))
        assert isinstance(reply, Generation)
    finally:
        asyncio.run(allowed.unload())


# -- 5. a CUDA error kills the model and frees it; out of memory fails its call --------------------------


def test_a_cuda_error_unloads_the_model_and_the_next_request_loads_it_again(
    tmp_path: Path, model_bf16: Path, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    entry = ModelSpec.from_dict(hf_entry("random-bf16", model_bf16))
    manager = ModelCache(
        ModelRegistry([entry]), BackendContext(KeyRegistry(tmp_path / "key.json"), tmp_path), policy=SchedulingPolicy()
    )
    real = HuggingfaceLocalBackend._generate_blocking
    failing = {"left": 1}

    def inject(self: Any, rows: Any, args: Any, ended: Any) -> Any:
        if failing["left"]:
            failing["left"] -= 1
            # what torch raises after an illegal memory access (a real one would poison this test process too)
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        return real(self, rows, args, ended)

    monkeypatch.setattr(HuggingfaceLocalBackend, "_generate_blocking", inject)

    async def check() -> None:
        before = torch.cuda.memory_allocated() if device == "cuda" else 0
        with pytest.raises(BackendDeadError):
            await manager.generate("random-bf16", HI, GenArgs(max_tokens=8))
        assert manager.snapshot().models == ()
        if device == "cuda":  # the weights are given back
            assert torch.cuda.memory_allocated() <= before + 64 * 2**20
        _, again = await manager.generate("random-bf16", HI, GenArgs(max_tokens=8))
        assert isinstance(again.text, str)
        assert manager.snapshot().models[0].state is ModelState.READY
        await manager.shutdown()

    asyncio.run(check())


def test_out_of_memory_while_generating_fails_the_call_frees_the_cache_and_keeps_the_model(
    tmp_path: Path, model_bf16: Path, device: str
) -> None:
    needs_cuda(device, "a real CUDA out of memory")
    import torch

    b = _backend(tmp_path, model_bf16)
    _load(b)
    try:
        torch.cuda.synchronize()
        total = torch.cuda.get_device_properties(0).total_memory
        # the allocator may hold the weights and 32 MiB more: a batch of long prompts cannot fit
        torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + 32 * 2**20) / total)
        long = [[{"role": "user", "content": "word " * 1000}] for _ in range(8)]
        # inside the context, so that what fails is the memory, not the context check (3 tokens a word)
        count = asyncio.run(b.count_tokens(long[0]))
        assert count.prompt_tokens + 64 <= count.context_size, (count.prompt_tokens, count.context_size)
        with pytest.raises(ResourceExhaustedError) as caught:
            asyncio.run(b.generate_rows([Row(m) for m in long], GenArgs(max_tokens=64)))
        assert "out of memory while generating" in str(caught.value)
        assert torch.cuda.memory_reserved() <= torch.cuda.memory_allocated() + 64 * 2**20  # the cache is freed
        torch.cuda.set_per_process_memory_fraction(1.0)
        (reply,) = asyncio.run(b.generate_rows([Row(HI)], GenArgs(max_tokens=8)))
        assert isinstance(reply, Generation)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        asyncio.run(b.unload())


# -- 7. greedy replies merged in a batch are the replies alone, in float32 -----------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merged_greedy_replies_equal_replies_alone(
    tmp_path: Path, model_fp32: Path, model_bf16: Path, dtype: str, capsys: pytest.CaptureFixture[str]
) -> None:
    b = _backend(tmp_path, model_fp32 if dtype == "float32" else model_bf16)
    _load(b)
    rows = conversations(16)
    args = GenArgs(max_tokens=32)
    try:
        merged = asyncio.run(b.generate_rows([Row(m) for m in rows[:8]], args))
        merged += asyncio.run(b.generate_rows([Row(m) for m in rows[8:]], args))
        alone = [asyncio.run(b.generate_rows([Row(m)], args))[0] for m in rows]
    finally:
        asyncio.run(b.unload())
    differing = [i for i, (m, a) in enumerate(zip(merged, alone, strict=True)) if m.text != a.text]
    with capsys.disabled():
        print(f"\n{dtype}: {len(differing)} of {len(rows)} merged rows differ from their replies alone: {differing}")
    if dtype == "float32":
        assert differing == []
