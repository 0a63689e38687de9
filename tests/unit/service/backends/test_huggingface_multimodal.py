"""The multimodal huggingface_local pieces without a server: class choice, image limits, the processor's message
form, image decoding, the model class, load-time refusals, and the text models' placement rules and handling of
failures on the device (number_gpus, no silent offload, a CUDA error kills the backend, out of memory fails the
call), with fake GPUs and injected errors."""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path
from typing import Any

import pytest

from clemserve.registry import KeyRegistry, ModelSpec
from clemserve.registry.errors import FailedPreconditionError, InvalidArgumentError, ResourceExhaustedError
from clemserve.service.backends import BackendContext, BackendDeadError, backend_for
from clemserve.service.backends.huggingface_local import HuggingfaceLocalBackend
from clemserve.service.backends.huggingface_multimodal import (
    HuggingfaceMultimodalBackend,
    check_config,
    check_images,
    decode_image,
    model_class,
    processor_messages,
)
from clemserve.service.domain import GenArgs, ImagePart
from tests import device_failures
from tests.tiny_vlm import draw_png


def png(seed: int = 0, size: tuple[int, int] = (40, 30)) -> ImagePart:
    return ImagePart(draw_png(seed, size), "image/png", f"picture{seed}.png")


def spec(**config: Any) -> ModelSpec:
    return ModelSpec.from_dict(
        {
            "model_name": "vlm",
            "backend": "huggingface_local",
            "huggingface_id": "/nowhere/vlm",
            "model_config": {"premade_chat_template": True, "eos_to_cull": "", **config},
        }
    )


def test_multimodal_entries_get_their_own_class(tmp_path: Path) -> None:
    context = BackendContext(KeyRegistry(tmp_path / "key.json"), tmp_path)
    vlm = backend_for(spec(multimodal=True))(spec(multimodal=True), context)
    assert isinstance(vlm, HuggingfaceMultimodalBackend)
    assert (vlm.batches, vlm.concurrency, vlm.name) == (False, 1, "huggingface_local")
    text = backend_for(spec(multimodal=False))(spec(multimodal=False), context)
    assert type(text) is HuggingfaceLocalBackend and text.batches


def messages(*counts: int) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"m{i}", "image": [png(j) for j in range(n)]} for i, n in enumerate(counts)]


@pytest.mark.parametrize(
    ("config", "counts", "field", "words"),
    [
        ({}, (0, 3, 1), None, ""),  # clembench's multimodal class: no declared limit
        ({"multimodality": {"single_image": True, "multiple_images": True}}, (2, 3), None, ""),
        ({"multimodality": {"single_image": True, "multiple_images": False}}, (1, 1), None, ""),
        ({"multimodality": {"single_image": True, "multiple_images": False}}, (1, 2), "messages[1].image", "one image"),
        ({"multimodality": True}, (1, 2), "messages[1].image", "one image"),
        ({"multimodality": False}, (0, 1), "messages[1].image", "does not accept images"),
        ({"multimodality": {"single_image": False, "multiple_images": False}}, (1,), "messages[0].image", "accept"),
        ({"multimodality": False}, (0, 0), None, ""),
    ],
)
def test_image_limits(config: dict[str, Any], counts: tuple[int, ...], field: str | None, words: str) -> None:
    conversation = messages(*counts)
    if field is None:
        check_images(conversation, {"multimodal": True, **config}, "vlm")
        return
    with pytest.raises(InvalidArgumentError) as caught:
        check_images(conversation, {"multimodal": True, **config}, "vlm")
    assert caught.value.field == field and words in str(caught.value) and "vlm" in str(caught.value)


def test_processor_messages_put_each_messages_images_before_its_text() -> None:
    conversation = [
        {"role": "user", "content": "Look.", "image": [png(0), png(1)], "turn": 3},
        {"role": "assistant", "content": "Two squares."},
        {"role": "user", "content": "And now?", "image": [png(2, (20, 50))]},
    ]
    parts, images = processor_messages(conversation)
    assert parts == [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Look."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Two squares."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And now?"}]},
    ]
    assert [(image.mode, image.size) for image in images] == [("RGB", (40, 30)), ("RGB", (40, 30)), ("RGB", (20, 50))]
    assert images[0].tobytes() != images[1].tobytes()


def test_images_decode_as_clembench_loads_files(tmp_path: Path) -> None:
    from PIL import Image
    from transformers.image_utils import load_image

    picture = Image.new("L", (40, 20), 128)  # a grey JPEG turned on its side by its EXIF orientation
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    picture.save(out, format="JPEG", exif=exif)
    (tmp_path / "side.jpg").write_bytes(out.getvalue())
    decoded = decode_image(ImagePart(out.getvalue(), "image/jpeg", "side.jpg"), "messages[0].image[0]")
    from_file = load_image(str(tmp_path / "side.jpg"))
    assert (decoded.mode, decoded.size) == (from_file.mode, from_file.size) == ("RGB", (20, 40))
    assert decoded.tobytes() == from_file.tobytes()


@pytest.mark.parametrize("data", [b"", b"\x89PNG\r\n\x1a\n broken", b"GIF89a" + b"\x00" * 10, b"hello"])
def test_bytes_that_are_not_an_image_are_refused_naming_the_image(data: bytes) -> None:
    conversation = [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b", "image": [png(), ImagePart(data, "", "x")]},
    ]
    with pytest.raises(InvalidArgumentError) as caught:
        processor_messages(conversation)
    assert caught.value.field == "messages[1].image[1]"


def test_model_class_is_clembenchs_where_it_can_load_the_family() -> None:
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        Gemma3Config,
        LlavaConfig,
        PretrainedConfig,
    )

    assert model_class(Gemma3Config()) is AutoModelForCausalLM
    assert model_class(LlavaConfig()) is AutoModelForImageTextToText
    remote = PretrainedConfig(auto_map={"AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"})
    assert model_class(remote) is AutoModelForCausalLM


@pytest.mark.parametrize(
    ("config", "subject"),
    [
        ({"multimodality": "yes"}, "model_config.multimodality"),
        ({"peft_model": "adapters/x"}, "pip install peft"),
    ],
)
def test_load_refuses_what_it_cannot_honour(config: dict[str, Any], subject: str) -> None:
    with pytest.raises(FailedPreconditionError) as caught:
        check_config("/some/model", {"multimodal": True, **config}, "vlm")
    assert caught.value.subject == subject
    with pytest.raises(FailedPreconditionError) as no_id:
        check_config(None, {"multimodal": True}, "vlm")
    assert no_id.value.subject == "huggingface_id"


def test_missing_weights_are_a_precondition(tmp_path: Path) -> None:
    backend = HuggingfaceMultimodalBackend(spec(multimodal=True), BackendContext(KeyRegistry(tmp_path / "k"), tmp_path))
    with pytest.raises(FailedPreconditionError) as caught:
        asyncio.run(backend.load(lambda line, fraction=None: None))
    assert "/nowhere/vlm" in caught.value.subject


def test_vllm_refuses_multimodal_entries_at_load(tmp_path: Path) -> None:
    from clemserve.service.backends.vllm_engine import VLLMBackend

    entry = {**spec(multimodal=True).to_dict(), "backend": "vllm"}
    backend = VLLMBackend(ModelSpec.from_dict(entry), BackendContext(KeyRegistry(tmp_path / "k"), tmp_path))
    with pytest.raises(FailedPreconditionError) as caught:
        asyncio.run(backend.load(lambda line, fraction=None: None))
    assert caught.value.subject == "model_config.multimodal" and "huggingface_local" in str(caught.value)


# -- placement and failures on the device: the same rules as the text models (service/backends/placement.py) -----

GiB = 2**30


@pytest.fixture(scope="module")
def gemma3_dir() -> Path:
    from tests.tiny_vlm import tiny_vlm, vlm_cache

    return tiny_vlm("gemma3", vlm_cache())


@pytest.fixture(scope="module")
def gemma3_model(gemma3_dir: Path) -> Any:
    """The tiny Gemma 3 loaded once; the fake GPU loads below hand it out with the device map they pretend."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype="auto")


def vlm_backend(folder: Path, tmp_path: Path, allow_offload: bool = False, **config: Any) -> Any:
    from tests.tiny_vlm import registry_entry

    context = BackendContext(KeyRegistry(tmp_path / "k"), tmp_path, compute_nice=10, allow_offload=allow_offload)
    return HuggingfaceMultimodalBackend(ModelSpec.from_dict(registry_entry("vlm", folder, **config)), context)


def load_on_fake_gpus(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, folder: Path, model: Any, device_map: dict[str, Any], **config: Any
) -> tuple[Any, dict[str, Any], BaseException | None]:
    """Load with two visible 8 GiB GPUs, accelerate pretending to have placed the model as ``device_map`` says
    -> the backend, the keyword arguments ``from_pretrained`` got, and the load's error."""
    from clemserve.service.backends import huggingface_multimodal, placement

    got: dict[str, Any] = {}

    class Loader:
        __name__ = "FakeAutoModel"

        @staticmethod
        def from_pretrained(source: Any, **kwargs: Any) -> Any:
            got.update(kwargs)
            model.hf_device_map = device_map
            return model

    monkeypatch.setattr(huggingface_multimodal, "model_class", lambda hf_config: Loader)
    monkeypatch.setattr(placement, "visible_gpus", lambda: [8 * GiB, 8 * GiB])
    monkeypatch.setattr(placement, "host_available_bytes", lambda: 32 * GiB)
    b = vlm_backend(folder, tmp_path, **config)
    try:
        asyncio.run(b.load(lambda line, fraction=None: None))
    except Exception as exc:
        return b, got, exc
    return b, got, None


def test_number_gpus_bounds_the_gpus_a_vision_language_model_takes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, gemma3_dir: Path, gemma3_model: Any
) -> None:
    b, got, error = load_on_fake_gpus(
        monkeypatch, tmp_path, gemma3_dir, gemma3_model, {"model": 0, "lm_head": 0}, number_gpus=1
    )
    assert error is None, error
    assert got["device_map"] == "auto" and got["max_memory"] == {0: 8 * GiB} and got["dtype"] == "auto"
    assert b.placement.gpus == (0,) and b._nice == 0  # a GPU model's thread keeps the server's priority
    asyncio.run(b.unload())
    b, got, error = load_on_fake_gpus(monkeypatch, tmp_path, gemma3_dir, gemma3_model, {"model": 0, "lm_head": 1})
    assert error is None and set(got["max_memory"]) == {0, 1}
    asyncio.run(b.unload())
    b, got, error = load_on_fake_gpus(monkeypatch, tmp_path, gemma3_dir, gemma3_model, {"": 0}, number_gpus=3)
    assert isinstance(error, FailedPreconditionError) and error.subject == "model_config.number_gpus"
    assert "asks for 3 GPUs" in str(error) and not got  # refused before any weights were read


def test_offload_of_a_vision_language_model_is_refused_unless_allowed(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    gemma3_dir: Path,
    gemma3_model: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    device_map = {"model.vision_tower": 0, "model.language_model": "cpu", "lm_head": "disk"}
    b, got, error = load_on_fake_gpus(monkeypatch, tmp_path, gemma3_dir, gemma3_model, device_map, number_gpus=2)
    assert isinstance(error, ResourceExhaustedError), error
    assert "1 module on the cpu and 1 module on the disk" in str(error) and "--allow-offload" in str(error)
    assert "model" not in b.__dict__  # nothing kept
    asyncio.run(b.unload())
    with caplog.at_level(logging.INFO):
        b, got, error = load_on_fake_gpus(
            monkeypatch, tmp_path, gemma3_dir, gemma3_model, device_map, number_gpus=1, allow_offload=True
        )
    assert error is None, error
    assert got["max_memory"] == {0: 8 * GiB, "cpu": 32 * GiB}
    assert "vlm placed: cpu: 1 module, cuda:0: 1 module, disk: 1 module" in caplog.text
    assert "allowed by --allow-offload" in caplog.text
    asyncio.run(b.unload())


def test_a_cpu_vision_language_model_keeps_the_compute_nice(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, gemma3_dir: Path
) -> None:
    from clemserve.service.backends import placement

    monkeypatch.setattr(placement, "visible_gpus", lambda: [])
    b = vlm_backend(gemma3_dir, tmp_path, number_gpus=2)
    asyncio.run(b.load(lambda line, fraction=None: None))
    assert not b.placement.on_gpu and b._nice == 10 and b.context_size > 0
    asyncio.run(b.unload())


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory, gemma3_dir: Path) -> Any:
    b = vlm_backend(gemma3_dir, tmp_path_factory.mktemp("loaded-vlm"))
    asyncio.run(b.load(lambda line, fraction=None: None))
    yield b
    asyncio.run(b.unload())


@pytest.mark.parametrize(("failure", "becomes", "says"), device_failures.failures("vlm"))
def test_a_failure_while_generating_becomes_what_it_means(
    loaded: Any, monkeypatch: pytest.MonkeyPatch, failure: str, becomes: type[BaseException], says: str
) -> None:
    from clemserve.service.backends import huggingface_multimodal

    freed: list[bool] = []
    monkeypatch.setattr(huggingface_multimodal, "free_memory", lambda: freed.append(True))

    def generate(*args: Any, **kwargs: Any) -> Any:
        raise device_failures.raised(failure)

    monkeypatch.setattr(loaded.model, "generate", generate)
    look = [{"role": "user", "content": "What is in this picture?", "image": [png(1)]}]
    with pytest.raises(becomes) as caught:
        asyncio.run(loaded.generate(look, GenArgs(max_tokens=4)))
    assert says in str(caught.value)
    assert type(caught.value) is becomes  # a dead backend is UNAVAILABLE, not the RuntimeError behind it
    if becomes is BackendDeadError:
        assert caught.value.code == "UNAVAILABLE" and "loads it again" in str(caught.value)
    assert freed == ([True] if becomes is ResourceExhaustedError else [])
    monkeypatch.undo()
    after = asyncio.run(loaded.generate(look, GenArgs(max_tokens=4)))
    assert after.completion_tokens > 0  # the worker thread survives and the model still answers


def test_a_cuda_error_while_loading_is_a_dead_backend(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, gemma3_dir: Path
) -> None:
    from clemserve.service.backends import huggingface_multimodal, placement

    class Failing:
        __name__ = "FailingAutoModel"

        @staticmethod
        def from_pretrained(source: Any, **kwargs: Any) -> Any:
            raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(huggingface_multimodal, "model_class", lambda hf_config: Failing)
    monkeypatch.setattr(placement, "visible_gpus", lambda: [8 * GiB])
    b = vlm_backend(gemma3_dir, tmp_path)
    with pytest.raises(BackendDeadError) as caught:
        asyncio.run(b.load(lambda line, fraction=None: None))
    assert "CUDA error while loading with vlm" in str(caught.value) and caught.value.code == "UNAVAILABLE"
    asyncio.run(b.unload())


def test_the_estimate_reserves_the_kv_cache_of_one_row(gemma3_dir: Path) -> None:
    """Vision-language models run one conversation at a time: their KV allowance is one row's whole context,
    not a full batch's (a text model's, the same weights, is the batch's)."""
    from clemserve.service.backends import estimate
    from clemserve.service.memory import Sizing
    from tests.tiny_vlm import registry_entry

    vlm = ModelSpec.from_dict(registry_entry("vlm", gemma3_dir))
    text = ModelSpec.from_dict({**vlm.to_dict(), "model_config": {**vlm["model_config"], "multimodal": False}})
    one_row, batch = (estimate(spec, Sizing(gemma3_dir, max_batch=8, kv_tokens=10**6)) for spec in (vlm, text))
    assert one_row.kv_per_token > 0 and one_row.weights == batch.weights > 0
    assert one_row.kv_cache == one_row.kv_per_token * 512  # the tiny model's context
    assert batch.kv_cache == 8 * one_row.kv_cache
