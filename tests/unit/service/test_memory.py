"""The memory estimate against real parameter counts, budget sizes, and the eviction order."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from clemserve.registry import ModelSpec
from clemserve.service.backends import estimate, footprint
from clemserve.service.backends.footprint import parameter_count
from clemserve.service.domain import ModelState
from clemserve.service.loaded import LoadedModel, Resident
from clemserve.service.memory import ResidencyPolicy, Sizing, parse_bytes
from clemserve.service.residency import Residency
from clemserve.service.resolver import cache_key
from tests.admission import admit, charged
from tests.tiny_model import build_tiny_llama, write_sparse_safetensors

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
    found = estimate(spec, Sizing(tmp_path, max_batch=4))
    real = _real_parameter_bytes(folder)
    assert found.source == "safetensors headers"
    assert abs(found.weights - real) <= 0.03 * real, (found.weights, real)
    assert found.kv_cache == _kv_by_hand(shape, max_batch=4)

    # without weight files, the parameter count comes from config.json
    (folder / "model.safetensors").unlink()
    from_config = estimate(spec, Sizing(tmp_path, max_batch=4))
    assert from_config.source == "config.json"
    assert abs(from_config.weights - real) <= 0.03 * real, (from_config.weights, real)


def test_tied_embeddings_count_once() -> None:
    config = {"vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    untied = parameter_count({**config, "tie_word_embeddings": False})
    assert untied - parameter_count({**config, "tie_word_embeddings": True}) == 1000 * 64


def test_declared_memory_and_remote_models() -> None:
    fault = ModelSpec(model_name="f", backend="fault", model_config={"memory_bytes": 12345})
    assert estimate(fault, Sizing(Path("."))).total == 12345
    assert estimate(ModelSpec(model_name="e", backend="echo", model_config={}), Sizing(Path("."))).total == 0


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

    def residents() -> list[Resident]:
        return [model.resident(key) for key, model in models.items()]

    residency = Residency(ResidencyPolicy(memory_budget="1GiB"), cache_dir=tmp_path)
    leased_key = cache_key(ModelSpec(model_name="old-leased", backend="fault", model_config={}))
    lease = residency.grant(leased_key, "caller", ttl_s=60)
    victim = residency.least_recently_used(residents())
    assert victim is not None and victim.name == "old-idle"
    assert residency.least_recently_used(residents(), exclude=victim.key) is not None
    models.pop(victim.key)
    second = residency.least_recently_used(residents())
    assert second is not None and second.name == "new-idle"
    residency.release(lease)  # the leased model is idle now, and used longer ago than new-idle
    found = residency.least_recently_used(residents())
    assert found is not None and found.key == leased_key


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
        ["--memory-budget", "8GiB", "--keep-alive", "0", "--load-timeout", "5", "--kv-cache-tokens", "4096"],
        {"CLEMSERVE_MAX_CONCURRENT_LOADS": "2", "CLEMSERVE_LEASE_TIMEOUT": "60"},
    )
    assert config.residency == ResidencyPolicy(
        memory_budget="8GiB",
        keep_alive_s=0,
        max_concurrent_loads=2,
        load_timeout_s=5,
        lease_timeout_s=60,
        kv_cache_tokens=4096,
    )
    twin = parse_server_config([], {"CLEMSERVE_KV_CACHE_TOKENS": "1000"})
    assert twin.residency.kv_cache_tokens == 1000


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--memory-budget", "lots"], "--memory-budget"),
        (["--lease-timeout", "0"], "--lease-timeout"),
        (["--keep-alive", "soon"], "--keep-alive"),
        (["--kv-cache-tokens", "0"], "--kv-cache-tokens"),
        (["--kv-cache-tokens", "lots"], "--kv-cache-tokens"),
    ],
)
def test_bad_residency_flags_stop_the_start(flags: list[str], message: str) -> None:
    from clemserve.service.config import parse_server_config

    with pytest.raises(SystemExit, match=message):
        parse_server_config(flags, {})


def test_vllm_on_cpu_counts_its_kv_cache_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:

    folder = build_tiny_llama(tmp_path / "model")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    spec = ModelSpec(model_name="v", backend="vllm", huggingface_id=str(folder), model_config={})
    weights = footprint.safetensors_bytes(folder)
    assert weights > 0 and estimate(spec, Sizing(tmp_path)).total == weights + 2 * 2**30
    engine_args = {"vllm_args": {"kv_cache_memory_bytes": 12345}}
    declared = ModelSpec(model_name="v", backend="vllm", huggingface_id=str(folder), model_config=engine_args)
    assert estimate(declared, Sizing(tmp_path)).total == weights + 12345


def test_the_demo_gguf_estimate_matches_its_converted_weights(tmp_path: Path) -> None:
    """Read from the GGUF header alone; compared with the converted folder where a cache holds one."""
    import os

    from clemserve.registry import ModelRegistry

    cache = Path(os.environ.get("CLEMSERVE_CACHE_DIR", Path.home() / ".cache" / "clemserve"))
    converted = sorted(cache.glob("gguf/SmolLM2-135M-Instruct*/model.safetensors"))
    if not converted:
        pytest.skip("the demo model has not been converted in this cache")
    from clemserve.service.backends.footprint import safetensors_bytes

    spec = ModelRegistry.from_files(()).resolve("smollm2-135m-instruct")
    found = estimate(spec, Sizing(tmp_path, max_batch=1))
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

    def entry(name: str, backend: str) -> ModelSpec:
        return ModelSpec(model_name=name, backend=backend, huggingface_id="org/m", model_config={})

    async def check() -> None:
        nonlocal available
        big = entry("big", "huggingface_local")
        with pytest.raises(ResourceExhaustedError, match=r"big needs about 1\.2 GiB to load; 0\.5 GiB is available"):
            await admit(residency, models, big)
        assert residency.charged(cache_key(big)) == 0
        engine = await admit(residency, models, entry("engine", "vllm"))
        assert charged(residency, engine) == 2**30
        available = 2**31
        assert charged(residency, await admit(residency, models, big)) == 2**30

    residency = Residency(ResidencyPolicy(memory_budget="100GiB"), cache_dir=tmp_path)
    asyncio.run(check())


# -- real models' configs: what an 80 GiB GPU admits ------------------------------------------------

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}  # fmt: skip
QWEN25_14B = {
    "architectures": ["Qwen2ForCausalLM"], "vocab_size": 152064, "hidden_size": 5120, "intermediate_size": 13824,
    "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8, "max_position_embeddings": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}  # fmt: skip
LLAMA_31_70B = {
    **LLAMA_31_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
    "num_attention_heads": 64,
}  # fmt: skip


def _config_only(tmp_path: Path, name: str, config: dict[str, object], **model_config: object) -> ModelSpec:
    """An entry whose folder holds config.json alone: the estimate reads nothing else."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return ModelSpec(
        model_name=name, backend="huggingface_local", huggingface_id=str(folder), model_config=model_config
    )


def _residency(tmp_path: Path, budget: str, models: dict[str, LoadedModel], **policy: object) -> Residency:
    return Residency(
        ResidencyPolicy(memory_budget=budget, **policy),  # type: ignore[arg-type]
        cache_dir=tmp_path,
        max_batch=8,
    )


def test_an_80_gib_budget_admits_an_8b_and_a_14b_model_and_refuses_a_70b_with_the_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    import clemserve.service.residency as residency_module
    from clemserve.registry.errors import ResourceExhaustedError

    monkeypatch.setattr(residency_module, "available_ram", lambda: 2**40)  # the machine's memory is not tested
    models: dict[str, LoadedModel] = {}
    residency = _residency(tmp_path, "80GiB", models)
    specs = [_config_only(tmp_path, n, c) for n, c in (("8b", LLAMA_31_8B), ("14b", QWEN25_14B), ("70b", LLAMA_31_70B))]

    async def check() -> None:
        eight, fourteen = await admit(residency, models, specs[0]), await admit(residency, models, specs[1])
        # 8.03e9 bf16 parameters, and 32768 tokens of 128 KiB: 4 GiB, not 128k x 8 rows (128 GiB)
        assert 14.9 * 2**30 < residency.estimate_parts(cache_key(specs[0]), specs[0]).weights < 15.1 * 2**30
        assert residency.estimate_parts(cache_key(specs[0]), specs[0]).kv_cache == 32768 * 128 * 2**10
        assert residency.estimate_parts(cache_key(specs[1]), specs[1]).kv_cache == 32768 * 192 * 2**10
        assert charged(residency, eight) + charged(residency, fourteen) < 80 * 2**30
        with pytest.raises(ResourceExhaustedError) as caught:
            await admit(residency, models, specs[2])
        message = str(caught.value)
        # 70.6e9 bf16 parameters (131 GiB), and 32768 tokens of 320 KiB
        assert "cannot load 70b: it needs about 144811 MiB (134571 MiB of weights, 10240 MiB of KV-cache" in message
        assert "of the 81920 MiB ram budget is free and it is larger than the whole budget" in message
        assert round(caught.value.required_bytes / 2**20) == 144811

    asyncio.run(check())


def test_quantised_entries_are_estimated_at_their_quantised_size(tmp_path: Path) -> None:
    plain = estimate(_config_only(tmp_path, "plain", LLAMA_31_70B), Sizing(tmp_path))
    eight = estimate(_config_only(tmp_path, "eight", LLAMA_31_70B, load_in_8bit=True), Sizing(tmp_path))
    four = estimate(_config_only(tmp_path, "four", LLAMA_31_70B, load_in_4bit=True), Sizing(tmp_path))
    embeddings = 2 * 128256 * 8192 * 2  # input and output embeddings stay bf16
    assert plain.weights > 131 * 2**30
    assert abs((eight.weights - embeddings) * 2 - (plain.weights - embeddings)) < 0.01 * plain.weights
    assert abs((four.weights - embeddings) / (plain.weights - embeddings) - 0.5625 / 2) < 0.01
    assert four.source == "config.json, linear layers at 4 bits"
    assert four.kv_cache == plain.kv_cache  # the KV cache is not quantised


def _fake_safetensors(folder: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A safetensors file whose tensors hold no disk: its header, then a hole as long as their data (the
    estimate reads the header only)."""
    write_sparse_safetensors(folder / "model.safetensors", tensors)


def test_quantised_sizes_from_safetensors_headers(tmp_path: Path) -> None:
    config = {**LLAMA_31_8B, "num_hidden_layers": 1}
    spec = _config_only(tmp_path, "m", config, load_in_4bit=True)
    _fake_safetensors(
        Path(spec["huggingface_id"]),
        {
            "model.embed_tokens.weight": ("BF16", [128256, 4096]),
            "model.layers.0.mlp.up_proj.weight": ("BF16", [14336, 4096]),
            "model.layers.0.input_layernorm.weight": ("BF16", [4096]),
            "lm_head.weight": ("BF16", [128256, 4096]),
        },
    )
    found = estimate(spec, Sizing(tmp_path))
    kept = (2 * 128256 * 4096 + 4096) * 2
    assert found.weights == kept + int(14336 * 4096 * 0.5625)
    assert found.source == "safetensors headers, linear layers at 4 bits"
    assert estimate(ModelSpec.from_dict({**spec.to_dict(), "model_config": {}}), Sizing(tmp_path)).weights == (
        kept + 14336 * 4096 * 2
    )


def test_the_kv_allowance_is_the_setting_capped_by_a_full_batch_at_the_whole_context(tmp_path: Path) -> None:
    spec = _config_only(tmp_path, "m", {**LLAMA_31_8B, "max_position_embeddings": 1024})
    per_token = 128 * 2**10
    assert estimate(spec, Sizing(tmp_path, max_batch=8)).kv_cache == 8 * 1024 * per_token  # capped: 8 rows x 1024
    assert estimate(spec, Sizing(tmp_path, max_batch=8, kv_tokens=2048)).kv_cache == 2048 * per_token
    found = estimate(spec, Sizing(tmp_path, max_batch=8, kv_tokens=2048))
    assert (found.kv_per_token, found.context) == (per_token, 1024)


# -- each batch admitted against its KV room ----------------------------------------------------


def _room(allowance_tokens: int, free: int, context: int = 1000) -> tuple[object, list[int]]:
    from clemserve.service.memory import Estimate, KvRoom

    charges: list[int] = []
    found = Estimate(weights=0, kv_cache=allowance_tokens * 10, kv_per_token=10, context=context)
    return KvRoom("m", found, lambda: free, charges.append), charges


def test_a_batch_that_fits_runs_whole_and_borrows_nothing() -> None:
    room, charges = _room(allowance_tokens=800, free=0)
    runs, refused = room.groups({0: 90, 1: 50, 2: 100, 3: 10}, 100)  # type: ignore[attr-defined]
    assert runs == [[0, 1, 2, 3]] and refused == {}  # 4 rows x (100 + 100) = 800 tokens
    with room.holding(4, 200):  # type: ignore[attr-defined]
        pass
    assert charges == []


def test_a_batch_too_large_for_its_room_runs_as_smaller_batches_and_a_row_too_large_alone_is_refused() -> None:
    from clemserve.registry.errors import ResourceExhaustedError

    room, charges = _room(allowance_tokens=500, free=100 * 10)  # room: 600 tokens
    runs, refused = room.groups({0: 100, 1: 200, 2: 900, 3: 50, 4: 10}, 100)  # type: ignore[attr-defined]
    # rows 0, 1: 2 x 300 = 600 fit; row 3 joins a new run (3 x 300 > 600); row 2 needs 1000 tokens alone
    assert runs == [[0, 1], [3, 4]]
    assert list(refused) == [2] and isinstance(refused[2], ResourceExhaustedError)
    assert refused[2].required_bytes == 1000 * 10 and refused[2].available_bytes == 600 * 10
    assert "900 prompt + 100 new tokens" in str(refused[2])
    with room.holding(2, 300):  # type: ignore[attr-defined]
        assert charges == [100 * 10]  # borrowed beyond its allowance while it runs
    assert charges == [100 * 10, -100 * 10]


def test_the_context_caps_each_row() -> None:
    room, _ = _room(allowance_tokens=100, free=0, context=50)
    assert room.need(2, 400) == 2 * 50 * 10  # type: ignore[attr-defined]


def test_the_kv_bytes_per_token_are_what_transformers_allocates(tmp_path: Path) -> None:
    """The formula against a real cache: a batch of 3 rows, padded to 7 prompt tokens, after 5 new tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = build_tiny_llama(tmp_path / "model", hidden=64, layers=2, heads=4, kv_heads=2)
    spec = ModelSpec(model_name="m", backend="huggingface_local", huggingface_id=str(folder), model_config={})
    per_token = estimate(spec, Sizing(tmp_path)).kv_per_token
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.ones((3, 7), dtype=torch.long)
    out = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    # the last token's keys are not written until a next step would read them
    assert held in (per_token * 3 * (7 + 5), per_token * 3 * (7 + 5 - 1)), (held, per_token)


# -- measuring what a loaded model holds -----------------------------------------------------------


def test_a_cpu_model_is_measured_by_its_tensors_not_the_process_growth(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from clemserve.service.memory import Estimate, measure, reading

    folder = build_tiny_llama(tmp_path / "model", tied=True)
    before = reading()
    ballast = bytearray(64 * 2**20)  # the process grows by far more than the model: an import, say
    ballast[::4096] = b"x" * len(ballast[::4096])

    class Backend:
        model = AutoModelForCausalLM.from_pretrained(folder)

    measured, figures = measure(before, Backend(), Estimate(weights=1, source="s"))
    params = {p.data_ptr(): p.numel() * p.element_size() for p in Backend.model.parameters()}
    buffers = sum(b.numel() * b.element_size() for b in Backend.model.buffers())
    assert measured == sum(params.values()) + buffers  # the tied embedding once
    assert figures.measured_by == "parameters and buffers" and figures.devices == ()
    assert figures.rss_delta_bytes >= 60 * 2**20 > measured
    del ballast


def test_a_gpu_model_is_measured_by_what_its_load_allocated_on_every_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import clemserve.service.memory as memory
    from clemserve.service.memory import Estimate, measure

    allocated = {0: 100, 1: 5000, 2: 7}
    monkeypatch.setattr(memory.gpu_reader, "allocated_by_device", lambda: dict(allocated))
    before = memory.reading()
    allocated.update({0: 3100, 1: 5000, 2: 2007})
    measured, figures = measure(before, object(), Estimate(weights=10))
    assert measured == 5000 and figures.devices == ((0, 3000), (2, 2000)) and figures.measured_by == "cuda allocated"
    # a model out of this process's reach (an engine process) is charged its estimate, and says so
    measured, figures = measure(memory.reading(), object(), Estimate(weights=10))
    assert measured == 0 and figures.measured_by == "estimate"
