"""What the vllm backend knows without vLLM: its GPUs, its estimate, and the share of each GPU it takes."""

from __future__ import annotations

from pathlib import Path

import pytest

from clemserve.registry import ModelSpec
from clemserve.service.backends.vllm_engine import estimate, tensor_parallel_size
from clemserve.service.domain import GenArgs
from clemserve.service.memory import Sizing
from tests.tiny_model import write_sparse_safetensors

GiB = 2**30


def entry(folder: Path, **config: object) -> ModelSpec:
    return ModelSpec(model_name="v", backend="vllm", huggingface_id=str(folder), model_config=config)


def test_the_gpus_an_entry_runs_on() -> None:
    assert tensor_parallel_size({}) == 1
    assert tensor_parallel_size({"number_gpus": 2}) == 2
    assert tensor_parallel_size({"number_gpus": 2, "vllm_args": {"tensor_parallel_size": 4}}) == 4
    assert tensor_parallel_size({"number_gpus": "lots"}) == 1


def test_the_estimate_takes_the_engines_share_of_each_gpu(tmp_path: Path) -> None:
    write_sparse_safetensors(tmp_path / "model.safetensors", {"w": ("F16", [1024, 1024])})
    on_gpu = estimate(entry(tmp_path, number_gpus=2), Sizing(tmp_path, gpu_bytes=80 * GiB))
    assert on_gpu.weights == 2 * 2**20 and on_gpu.total == 2 * int(80 * GiB * 0.9)
    assert (on_gpu.gpu_share, on_gpu.gpus, on_gpu.share_field) == (
        0.9, 2, "model_config.vllm_args.gpu_memory_utilization",
    )  # fmt: skip
    fixed = estimate(entry(tmp_path, vllm_args={"kv_cache_memory_bytes": 1000}), Sizing(tmp_path, gpu_bytes=80 * GiB))
    assert (fixed.kv_cache, fixed.gpu_share) == (1000, 0.0)  # a KV cache of a given size: no share taken


def test_on_a_cpu_the_kv_space_is_vllms_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_sparse_safetensors(tmp_path / "model.safetensors", {"w": ("F32", [8, 8])})
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    found = estimate(entry(tmp_path), Sizing(tmp_path))
    assert (found.kv_cache, found.source) == (GiB, "vllm VLLM_CPU_KVCACHE_SPACE")


def test_its_arguments_are_checked_by_vllm_itself_when_the_sampling_is_built(tmp_path: Path) -> None:
    from clemserve.registry import KeyRegistry
    from clemserve.service.backends import BackendContext
    from clemserve.service.backends.vllm_engine import VLLMBackend

    backend = VLLMBackend(entry(tmp_path), BackendContext(KeyRegistry(tmp_path / "k.json"), tmp_path))
    backend.check_args(GenArgs(extra={"repetition_penalty": 1.1, "anything": 1}))  # not refused before queueing


def test_the_engines_workers_are_spawned_unless_the_operator_says_otherwise() -> None:
    from clemserve.service.backends.vllm_engine import spawn_workers

    environ: dict[str, str] = {}
    spawn_workers(environ)
    assert environ == {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    chosen = {"VLLM_WORKER_MULTIPROC_METHOD": "forkserver"}
    spawn_workers(chosen)
    assert chosen == {"VLLM_WORKER_MULTIPROC_METHOD": "forkserver"}
