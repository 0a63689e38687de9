"""The memory estimate against real parameter counts, budget sizes, and the eviction order."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from clemserve.registry import ModelSpec
from clemserve.service.domain import ModelState
from clemserve.service.loaded import LoadedModel
from clemserve.service.memory import ResidencyPolicy, estimate, parameter_count, parse_bytes
from clemserve.service.residency import Residency
from clemserve.service.resolver import cache_key
from tests.tiny_model import build_tiny_llama

SHAPES = [
    {"hidden": 64, "layers": 2, "heads": 2, "kv_heads": 2, "tied": False},
    {"hidden": 96, "layers": 3, "heads": 4, "kv_heads": 2, "tied": True},
    {"hidden": 128, "layers": 1, "heads": 8, "kv_heads": 1, "tied": False, "max_positions": 1024},
]


def _real_parameter_bytes(folder: Path) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    return sum(p.numel() * p.element_size() for p in model.parameters())  # a tied weight counts once


def _kv_by_hand(shape: dict[str, int], max_batch: int) -> int:
    head_dim = shape["hidden"] // shape["heads"]
    keys_and_values, float32 = 2, 4
    return (
        keys_and_values
        * shape["layers"]
        * shape["kv_heads"]
        * head_dim
        * float32
        * shape.get("max_positions", 512)
        * max_batch
    )


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"h{s['hidden']}-l{s['layers']}-tied{s['tied']}")
def test_estimate_is_the_parameter_bytes_plus_the_kv_allowance(tmp_path: Path, shape: dict[str, int]) -> None:
    folder = build_tiny_llama(tmp_path / "model", **shape)  # type: ignore[arg-type]
    spec = ModelSpec(model_name="m", backend="huggingface_local", huggingface_id=str(folder))
    found = estimate(spec, tmp_path, max_batch=4)
    real = _real_parameter_bytes(folder)
    assert found.source == "safetensors headers"
    assert abs(found.weights - real) <= 0.03 * real, (found.weights, real)
    assert found.kv_cache == _kv_by_hand(shape, max_batch=4)

    # without weight files, the parameter count comes from config.json
    (folder / "model.safetensors").unlink()
    from_config = estimate(spec, tmp_path, max_batch=4)
    assert from_config.source == "config.json"
    assert abs(from_config.weights - real) <= 0.03 * real, (from_config.weights, real)


def test_tied_embeddings_count_once() -> None:
    config = {"vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    untied = parameter_count({**config, "tie_word_embeddings": False})
    assert untied - parameter_count({**config, "tie_word_embeddings": True}) == 1000 * 64


def test_declared_memory_and_remote_models() -> None:
    fault = ModelSpec(model_name="f", backend="fault", model_config={"memory_bytes": 12345})
    assert estimate(fault, Path(".")).total == 12345
    assert estimate(ModelSpec(model_name="e", backend="echo", model_config={}), Path(".")).total == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8GiB", 8 * 2**30), ("512MiB", 512 * 2**20), ("1.5G", int(1.5 * 2**30)), ("4GB", 4 * 10**9), ("1000", 1000)],
)
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "8 parsecs", "-1GiB"])
def test_parse_bytes_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes(text)


def _loaded(name: str, last_used: float, **fields: object) -> tuple[str, LoadedModel]:
    spec = ModelSpec(model_name=name, backend="fault", model_config={})
    return cache_key(spec), LoadedModel(spec, last_used=last_used, **{"state": ModelState.READY, **fields})  # type: ignore[arg-type]


def test_eviction_takes_the_least_recently_used_idle_model(tmp_path: Path) -> None:
    now = time.monotonic()
    models = dict(
        (
            _loaded("oldest-busy", now - 50, in_flight=1),
            _loaded("old-leased", now - 40),
            _loaded("old-idle", now - 30),
            _loaded("new-idle", now - 1),
            _loaded("loading", now - 60, state=ModelState.LOADING),
        )
    )

    async def unload(key: str) -> bool:
        return models.pop(key, None) is not None

    residency = Residency(ResidencyPolicy(memory_budget="1GiB"), models, unload, cache_dir=tmp_path)
    leased_key = cache_key(ModelSpec(model_name="old-leased", backend="fault", model_config={}))
    lease = residency.grant(leased_key, "caller", ttl_s=60)
    victim = residency.least_recently_used()
    assert victim is not None and models[victim].name == "old-idle"
    assert residency.least_recently_used(exclude=victim) is not None
    models.pop(victim)
    second = residency.least_recently_used()
    assert second is not None and models[second].name == "new-idle"
    residency.release(lease)  # the leased model is idle now, and used longer ago than new-idle
    assert residency.least_recently_used() == leased_key


def test_cache_key_ignores_what_does_not_change_the_loaded_model() -> None:
    entry = {"model_name": "m", "backend": "huggingface_local", "huggingface_id": "org/m", "model_config": {"a": 1}}
    key = cache_key(ModelSpec.from_dict(entry))
    assert cache_key(ModelSpec.from_dict({**entry, "temperature": 0.5, "lookup_source": "x.json"})) == key
    assert cache_key(ModelSpec.from_dict({**entry, "huggingface_id": "org/other"})) != key
    assert cache_key(ModelSpec.from_dict({**entry, "model_config": {"a": 2}})) != key
    assert json.loads(key)["model_config"] == {"a": 1}


def test_residency_flags_and_their_environment_twins() -> None:
    from clemserve.service.config import parse_server_config

    assert parse_server_config([], {}).residency == ResidencyPolicy()
    config = parse_server_config(
        ["--memory-budget", "8GiB", "--keep-alive", "0", "--load-timeout", "5"],
        {"CLEMSERVE_MAX_CONCURRENT_LOADS": "2", "CLEMSERVE_LEASE_TIMEOUT": "60"},
    )
    assert config.residency == ResidencyPolicy(
        memory_budget="8GiB", keep_alive_s=0, max_concurrent_loads=2, load_timeout_s=5, lease_timeout_s=60
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--memory-budget", "lots"], "--memory-budget"),
        (["--lease-timeout", "0"], "--lease-timeout"),
        (["--keep-alive", "soon"], "--keep-alive"),
    ],
)
def test_bad_residency_flags_stop_the_start(flags: list[str], message: str) -> None:
    from clemserve.service.config import parse_server_config

    with pytest.raises(SystemExit, match=message):
        parse_server_config(flags, {})


def test_vllm_on_cpu_counts_its_kv_cache_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import clemserve.service.memory as memory

    folder = build_tiny_llama(tmp_path / "model")
    monkeypatch.setattr(memory, "_has_gpu", lambda: False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    spec = ModelSpec(model_name="v", backend="vllm", huggingface_id=str(folder), model_config={})
    weights = memory.safetensors_bytes(folder)
    assert weights > 0 and estimate(spec, tmp_path).total == weights + 2 * 2**30
    engine_args = {"vllm_args": {"kv_cache_memory_bytes": 12345}}
    declared = ModelSpec(model_name="v", backend="vllm", huggingface_id=str(folder), model_config=engine_args)
    assert estimate(declared, tmp_path).total == weights + 12345


def test_the_demo_gguf_estimate_matches_its_converted_weights() -> None:
    """Read from the GGUF header alone; compared with the converted folder where a cache holds one."""
    import os

    from clemserve.registry import ModelRegistry

    cache = Path(os.environ.get("CLEMSERVE_CACHE_DIR", Path.home() / ".cache" / "clemserve"))
    converted = sorted(cache.glob("gguf/SmolLM2-135M-Instruct*/model.safetensors"))
    if not converted:
        pytest.skip("the demo model has not been converted in this cache")
    from clemserve.service.memory import safetensors_bytes

    spec = ModelRegistry.from_files(()).resolve("smollm2-135m-instruct")
    found = estimate(spec, Path("unused"), max_batch=1)
    assert found.source == "gguf header"
    assert found.weights == safetensors_bytes(converted[0].parent)
    assert found.kv_cache > 0


def test_admission_refuses_weights_the_machine_cannot_take_now(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the budget says, a transformers model whose weights exceed the memory available now is
    refused before it loads; other backends are not held to it."""
    import asyncio

    import clemserve.service.residency as residency_module
    from clemserve.registry.errors import ResourceExhaustedError
    from clemserve.service.memory import Estimate

    monkeypatch.setattr(residency_module, "estimate", lambda *_, **__: Estimate(weights=2**30))
    available = 2**29
    monkeypatch.setattr(residency_module, "available_ram", lambda: available)
    models: dict[str, LoadedModel] = {}

    async def unload(key: str) -> bool:
        return models.pop(key, None) is not None

    def entry(name: str, backend: str) -> tuple[str, LoadedModel]:
        spec = ModelSpec(model_name=name, backend=backend, huggingface_id="org/m", model_config={})
        return cache_key(spec), LoadedModel(spec, estimated_bytes=residency.estimate(cache_key(spec), spec))

    async def check() -> None:
        nonlocal available
        key, model = entry("big", "huggingface_local")
        with pytest.raises(ResourceExhaustedError, match=r"big needs about 1\.2 GiB to load; 0\.5 GiB is available"):
            await residency.admit(key, model)
        assert model.charged_bytes == 0
        other_key, other = entry("engine", "vllm")
        await residency.admit(other_key, other)
        assert other.charged_bytes == 2**30
        available = 2**31
        await residency.admit(key, model)
        assert model.charged_bytes == 2**30

    residency = Residency(ResidencyPolicy(memory_budget="100GiB"), models, unload, cache_dir=tmp_path)
    asyncio.run(check())
