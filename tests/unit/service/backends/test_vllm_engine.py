"""What the vllm backend knows without vLLM: its GPUs, its estimate, the share of each GPU it takes, and the
engine arguments it builds from what admission granted."""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import pytest

from clemserve.registry import KeyRegistry, ModelSpec
from clemserve.service.backends import BackendContext
from clemserve.service.backends.vllm_engine import (
    ENGINE_OVERHEAD,
    KV_FLOOR,
    VLLMBackend,
    estimate,
    tensor_parallel_size,
)
from clemserve.service.devices import Grant
from clemserve.service.domain import GenArgs, PrefixReuse
from clemserve.service.memory import Estimate, Sizing
from tests.tiny_model import write_sparse_safetensors

GiB = 2**30


def entry(folder: Path, **config: object) -> ModelSpec:
    return ModelSpec(model_name="v", backend="vllm", huggingface_id=str(folder), model_config=config)


def test_the_gpus_an_entry_runs_on() -> None:
    assert tensor_parallel_size({}) == 1
    assert tensor_parallel_size({"number_gpus": 2}) == 2
    assert tensor_parallel_size({"number_gpus": 2, "vllm_args": {"tensor_parallel_size": 4}}) == 4
    assert tensor_parallel_size({"number_gpus": "lots"}) == 1


def test_an_explicit_share_is_the_estimate_on_each_gpu(tmp_path: Path) -> None:
    write_sparse_safetensors(tmp_path / "model.safetensors", {"w": ("F16", [1024, 1024])})
    share = {"gpu_memory_utilization": 0.9}
    on_gpu = estimate(entry(tmp_path, number_gpus=2, vllm_args=share), Sizing(tmp_path, gpu_bytes=80 * GiB))
    assert on_gpu.weights == 2 * 2**20 and on_gpu.total == 2 * int(80 * GiB * 0.9)
    assert (on_gpu.gpu_share, on_gpu.gpus, on_gpu.share_field) == (
        0.9, 2, "model_config.vllm_args.gpu_memory_utilization",
    )  # fmt: skip
    fixed = estimate(entry(tmp_path, vllm_args={"kv_cache_memory_bytes": 1000}), Sizing(tmp_path, gpu_bytes=80 * GiB))
    assert (fixed.kv_cache, fixed.gpu_share) == (1000, 0.0)  # a KV cache of a given size: no share taken


def _llama_like(folder: Path) -> None:
    """An 8B-like shape: 32 layers, 8 KV heads of 128 dims in bf16 (128 KiB of KV cache a token), 128k context."""
    write_sparse_safetensors(folder / "model.safetensors", {"w": ("BF16", [1024, 1024])})
    config = {
        "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "torch_dtype": "bfloat16", "max_position_embeddings": 131072, "vocab_size": 128256,
    }  # fmt: skip
    (folder / "config.json").write_text(__import__("json").dumps(config))


def test_without_a_share_the_estimate_is_a_kv_cache_for_the_tokens_not_90_percent_of_the_gpu(tmp_path: Path) -> None:
    """vLLM's default share would take 72 of 80 GiB whatever the model; the estimate is what the model needs:
    its weights, a KV cache for --kv-cache-tokens or one request at its whole context (vLLM needs room for one),
    and the engine's overhead on each GPU."""
    _llama_like(tmp_path)
    sizing = Sizing(tmp_path, kv_tokens=32768, gpu_bytes=80 * GiB)
    whole_context = estimate(entry(tmp_path), sizing)
    assert (whole_context.weights, whole_context.kv_cache) == (2 * 2**20, 131072 * 128 * 2**10)  # 16 GiB
    assert (whole_context.overhead, whole_context.gpu_share) == (ENGINE_OVERHEAD, 0.0)
    assert whole_context.source == "vllm KV cache for 131072 tokens"
    shorter = estimate(entry(tmp_path, number_gpus=2, vllm_args={"max_model_len": 8192}), sizing)
    assert (shorter.kv_cache, shorter.overhead, shorter.gpus) == (32768 * 128 * 2**10, 2 * ENGINE_OVERHEAD, 2)
    fp8 = estimate(entry(tmp_path, vllm_args={"max_model_len": 8192, "kv_cache_dtype": "fp8"}), sizing)
    assert fp8.kv_cache == 32768 * 64 * 2**10


@dataclasses.dataclass
class _EngineArgs:
    """The fields of vLLM's AsyncEngineArgs that the backend sets."""

    model: str = ""
    tokenizer: str = ""
    tensor_parallel_size: int = 1
    max_model_len: int = 0
    disable_log_stats: bool = False
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    enable_prefix_caching: bool | None = None  # vLLM 0.32: None, the model's default (on for generative models)


def _engine_args(tmp_path: Path, grant: Grant, **config: object) -> dict[str, object]:
    context = BackendContext(KeyRegistry(tmp_path / "k.json"), tmp_path, grant=grant)
    backend = VLLMBackend(entry(tmp_path, **config), context)
    backend.context_size = 8192
    return backend._engine_args(_EngineArgs, str(tmp_path), None)


def test_the_engine_is_given_the_kv_cache_admission_granted_room_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """20 GiB granted on each of 2 GPUs for 16 GiB of weights and 4 GiB of overhead: 12 GiB of KV cache on each,
    and a share of each 80 GiB GPU that vLLM finds free at start (the weights and the KV cache)."""
    found = Estimate(16 * GiB, 24 * GiB, "vllm KV cache for 8192 tokens", gpus=2, overhead=2 * ENGINE_OVERHEAD)
    grant = Grant((1, 3), ("GPU-b", "GPU-d"), 20 * GiB, 80 * GiB, found)
    with caplog.at_level("INFO"):
        args = _engine_args(tmp_path, grant, number_gpus=2)
    assert args["kv_cache_memory_bytes"] == 20 * GiB - 8 * GiB - ENGINE_OVERHEAD
    assert args["gpu_memory_utilization"] == 0.225  # (8 + 10) / 80
    assert args["tensor_parallel_size"] == 2
    assert "from the 20.00 GiB admitted there less 8.00 GiB of weights and 2.00 GiB of engine overhead" in caplog.text
    assert grant.cuda_visible_devices == "GPU-b,GPU-d"  # its process sees these GPUs alone


def test_an_entry_that_sizes_the_engine_itself_is_left_alone_and_a_cpu_engine_too(tmp_path: Path) -> None:
    found = Estimate(GiB, GiB, "x", gpus=1, overhead=ENGINE_OVERHEAD)
    grant = Grant((0,), ("",), 4 * GiB, 80 * GiB, found)
    own = _engine_args(tmp_path, grant, vllm_args={"gpu_memory_utilization": 0.5})
    assert (own["gpu_memory_utilization"], own.get("kv_cache_memory_bytes")) == (0.5, None)
    fixed = _engine_args(tmp_path, grant, vllm_args={"kv_cache_memory_bytes": 1000})
    assert (fixed.get("gpu_memory_utilization"), fixed["kv_cache_memory_bytes"]) == (None, 1000)
    cpu = _engine_args(tmp_path, Grant())
    assert "gpu_memory_utilization" not in cpu and "kv_cache_memory_bytes" not in cpu
    # a grant smaller than the weights and overhead still leaves the engine the floor
    tight = _engine_args(tmp_path, Grant((0,), ("",), 2 * GiB, 80 * GiB, found))
    assert tight["kv_cache_memory_bytes"] == KV_FLOOR


def test_prefix_caching_is_asked_for_unless_the_entry_turns_it_off(tmp_path: Path) -> None:
    assert _engine_args(tmp_path, Grant())["enable_prefix_caching"] is True
    off = _engine_args(tmp_path, Grant(), vllm_args={"enable_prefix_caching": False})
    assert off["enable_prefix_caching"] is False


def test_the_running_engine_says_whether_it_caches_prefixes(tmp_path: Path) -> None:
    backend = VLLMBackend(entry(tmp_path), BackendContext(KeyRegistry(tmp_path / "k.json"), tmp_path))
    assert backend.prefix_reuse() == PrefixReuse()  # not started: nothing to say
    for on, said in ((True, "vllm automatic prefix caching"), (False, "off (vllm_args)")):
        cache = types.SimpleNamespace(enable_prefix_caching=on)
        backend.engine = types.SimpleNamespace(vllm_config=types.SimpleNamespace(cache_config=cache))
        assert backend.prefix_reuse().in_force == said


def test_on_a_cpu_the_kv_space_is_vllms_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_sparse_safetensors(tmp_path / "model.safetensors", {"w": ("F32", [8, 8])})
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    found = estimate(entry(tmp_path), Sizing(tmp_path))
    assert (found.kv_cache, found.source) == (GiB, "vllm VLLM_CPU_KVCACHE_SPACE")


def test_its_arguments_are_checked_by_vllm_itself_when_the_sampling_is_built(tmp_path: Path) -> None:
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
