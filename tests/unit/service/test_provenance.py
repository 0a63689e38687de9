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
