"""Provenance tells the dtype and device a loaded engine really runs in, over what its config asks for."""

from __future__ import annotations

from types import SimpleNamespace

from clemserve.registry import ModelSpec
from clemserve.service import provenance


class Device:
    """torch.device's shape: a type and an index."""

    def __init__(self, name: str) -> None:
        self.type, _, index = name.partition(":")
        self.index = int(index) if index else None


def test_a_transformers_model_tells_its_own_dtype_and_device() -> None:
    model = SimpleNamespace(dtype="torch.bfloat16", device=Device("cuda:0"))
    assert provenance.engine_facts(SimpleNamespace(model=model, device=Device("cuda:0"))) == ("bfloat16", "cuda")


def test_a_model_spread_by_a_device_map_names_every_kind_of_device() -> None:
    model = SimpleNamespace(dtype="torch.float16", hf_device_map={"embed": 0, "layers.0": 1, "lm_head": "cpu"})
    assert provenance.engine_facts(SimpleNamespace(model=model)) == ("float16", "cpu+cuda")


def test_a_vllm_engine_tells_its_model_configs_dtype() -> None:
    engine = SimpleNamespace(engine=SimpleNamespace(model_config=SimpleNamespace(dtype="torch.bfloat16")))
    assert provenance.engine_facts(engine) == ("bfloat16", "")


def test_describe_prefers_the_loaded_engine_over_the_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    spec = ModelSpec.from_dict({"model_name": "m", "backend": "huggingface_local", "huggingface_id": str(tmp_path)})
    asked = provenance.describe(spec)
    assert asked.dtype == "bfloat16" and asked.revision.startswith("sha256:")
    engine = SimpleNamespace(model=SimpleNamespace(dtype="torch.float32"), device=Device("cpu"))
    loaded = provenance.describe(spec, engine)
    assert (loaded.dtype, loaded.device) == ("float32", "cpu")
    assert loaded.revision == asked.revision


def test_describe_says_how_the_loaded_model_reuses_prompt_prefixes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from clemserve.registry import KeyRegistry
    from clemserve.service.backends import BackendContext
    from clemserve.service.backends.llamacpp import LlamaCppBackend

    (tmp_path / "model.safetensors").write_bytes(b"weights")
    spec = ModelSpec.from_dict({"model_name": "m", "backend": "huggingface_local", "huggingface_id": str(tmp_path)})
    engine = LlamaCppBackend(spec, BackendContext(KeyRegistry(tmp_path / "key.json"), tmp_path))
    engine.model = SimpleNamespace()  # as a load leaves it
    assert provenance.describe(spec, engine).prefix_caching == "llama.cpp previous prompt"
    assert provenance.describe(spec).prefix_caching == ""  # not loaded: what is in force is not known yet


def test_a_description_says_whether_the_server_can_price_the_models_calls() -> None:
    from clemserve.service.pricing import Pricing

    pricing = Pricing()
    stand_in = ModelSpec.from_dict({"model_name": "s", "backend": "openai_compatible", "model_id": "m"})
    assert "openai_compatible has no price list" in provenance.described(stand_in, None, pricing).unpriced
    priced = ModelSpec.from_dict(
        {**stand_in, "model_config": {"price": {"input_per_mtok": 1, "output_per_mtok": 2}}}  # type: ignore[dict-item]
    )
    assert provenance.described(priced, None, pricing).unpriced == ""
    assert (
        provenance.described(ModelSpec.from_dict({"model_name": "e", "backend": "echo"}), None, pricing).unpriced == ""
    )
