"""The transformers backend without a server: its load-time checks of the entry (spec section 5.1), merged rows
that fail on their own, loading onto (stand-in) GPUs, and failures on the device."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from clemserve.registry import KeyRegistry, ModelSpec
from clemserve.registry.errors import (
    ContextExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from clemserve.service.backends import BackendContext, BackendDeadError, estimate, placement
from clemserve.service.backends.huggingface_local import HuggingfaceLocalBackend
from clemserve.service.domain import GenArgs, Generation, Message, Row
from clemserve.service.memory import Sizing
from tests import device_failures


def msg(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


def backend(tmp_path: Path, **config: Any) -> HuggingfaceLocalBackend:
    spec = ModelSpec(
        model_name="m",
        backend="huggingface_local",
        huggingface_id="some/model",
        model_config={"premade_chat_template": True, "eos_to_cull": "</s>", **config},
    )
    return HuggingfaceLocalBackend(spec, BackendContext(KeyRegistry(tmp_path / "key.json"), tmp_path))


@pytest.mark.parametrize(
    ("config", "subject"),
    [
        ({"eos_to_cull": None}, "model_config.eos_to_cull"),
        ({"eos_to_cull": "(unclosed"}, "model_config.eos_to_cull"),
        ({"cot_output": True}, "model_config.cot_end_tag"),
        ({"chat_template_kwargs": "x"}, "model_config.chat_template_kwargs"),
    ],
)
def test_config_that_cannot_be_honoured_fails_at_load(tmp_path: Path, config: dict[str, Any], subject: str) -> None:
    b = backend(tmp_path, **config)
    with pytest.raises(FailedPreconditionError) as caught:
        b._check_config(b.model_config)
    assert caught.value.subject == subject


def test_missing_required_keys_are_named(tmp_path: Path) -> None:
    spec = ModelSpec(model_name="m", backend="huggingface_local", huggingface_id="x", model_config={})
    b = HuggingfaceLocalBackend(spec, BackendContext(KeyRegistry(tmp_path / "k.json"), tmp_path))
    with pytest.raises(FailedPreconditionError) as caught:
        b._check_config(b.model_config)
    assert caught.value.subject == "model_config.premade_chat_template"


def test_unknown_config_keys_are_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    b = backend(tmp_path, shiny_new_flag=True)
    with caplog.at_level(logging.WARNING):
        b._check_config(b.model_config)
    assert "shiny_new_flag" in caplog.text


def test_merged_rows_fail_on_their_own_and_answer_as_if_alone(tmp_path: Path, tiny_model_dir: Path) -> None:
    """One generate_rows call: a row with an image and one over the context get their own errors, the others
    exactly their answers alone (no padding in their texts), and a streamed row's pieces are its reply."""
    from tests.serving import hf_entry

    spec = ModelSpec(**hf_entry("m", tiny_model_dir))
    b = HuggingfaceLocalBackend(spec, BackendContext(KeyRegistry(tmp_path / "key.json"), tmp_path))
    short, longer = msg("Hi"), msg("Tell me the name of the capital of Australia, please.")
    pieces: list[str] = []

    async def run() -> tuple[list[Any], list[Any]]:
        await b.load(lambda line, fraction=None: None)
        args = GenArgs(max_tokens=8)
        rows = [
            Row(short),
            Row([{"role": "user", "content": "look", "image": ["x.png"]}]),
            Row(msg("word " * 600)),
            Row(longer, sink=pieces.append),
        ]
        merged = await b.generate_rows(rows, args)
        alone = [(await b.generate_rows([Row(m)], args))[0] for m in (short, longer)]
        await b.unload()
        return merged, alone

    merged, alone = asyncio.run(run())
    assert isinstance(merged[1], InvalidArgumentError) and merged[1].field == "messages[0].image"
    assert isinstance(merged[2], ContextExceededError)
    for got, want in zip([merged[0], merged[3]], alone, strict=True):
        assert (got.prompt, got.response, got.text) == (want.prompt, want.response, want.text)
        assert (got.prompt_tokens, got.completion_tokens, got.finish_reason) == (
            want.prompt_tokens,
            want.completion_tokens,
            want.finish_reason,
        )
    assert pieces and merged[3].response["response"] == merged[3].prompt["inputs"] + "".join(pieces)


GiB = 2**30


# -- placement: number_gpus, the real device map, no silent offload --------------------------------------------


class _FakeLoad:
    """from_pretrained of a model that accelerate placed as ``device_map`` says (the weights: the tiny model's,
    on the CPU); records the keyword arguments it was called with."""

    def __init__(self, folder: Path, device_map: dict[str, Any]) -> None:
        from transformers import AutoModelForCausalLM

        self.real = AutoModelForCausalLM.from_pretrained
        self.folder, self.device_map, self.kwargs = folder, device_map, {}

    def __call__(self, source: Any, **kwargs: Any) -> Any:
        self.kwargs = kwargs
        model = self.real(self.folder, dtype="auto")
        model.hf_device_map = self.device_map
        return model


def _load_on_fake_gpus(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, folder: Path, device_map: dict[str, Any], **config: Any
) -> tuple[HuggingfaceLocalBackend, _FakeLoad, BaseException | None]:
    from transformers import AutoModelForCausalLM

    from tests.serving import hf_entry

    allow = config.pop("allow_offload", False)
    fake = _FakeLoad(folder, device_map)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake)
    monkeypatch.setattr(placement, "visible_gpus", lambda: [8 * GiB, 8 * GiB])
    monkeypatch.setattr(placement, "host_available_bytes", lambda: 32 * GiB)
    spec = ModelSpec(**hf_entry("m", folder, **config))
    context = BackendContext(KeyRegistry(tmp_path / "key.json"), tmp_path, compute_nice=10, allow_offload=allow)
    b = HuggingfaceLocalBackend(spec, context)
    try:
        asyncio.run(b.load(lambda line, fraction=None: None))
    except Exception as exc:
        return b, fake, exc
    return b, fake, None


def test_a_gpu_model_placed_partly_on_cpu_or_disk_is_refused_saying_what_to_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir: Path
) -> None:
    device_map = {"model.embed_tokens": 0, "model.layers.0": 1, "model.layers.1": "cpu", "lm_head": "disk"}
    b, fake, error = _load_on_fake_gpus(monkeypatch, tmp_path, tiny_model_dir, device_map, number_gpus=2)
    assert fake.kwargs["device_map"] == "auto" and fake.kwargs["max_memory"] == {0: 8 * GiB, 1: 8 * GiB}
    assert isinstance(error, ResourceExhaustedError), error
    message = str(error)
    assert "1 module on the cpu and 1 module on the disk" in message and "does not fit on its 2 GPUs" in message
    for advice in ("--allow-offload", "model_config.number_gpus", "load_in_8bit"):
        assert advice in message
    assert "model" not in b.__dict__  # nothing kept
    asyncio.run(b.unload())


def test_offload_loads_when_allowed_and_the_real_device_map_is_logged(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device_map = {"model.embed_tokens": 0, "model.layers": 0, "model.norm": "cpu", "lm_head": "cpu"}
    with caplog.at_level(logging.INFO):
        b, fake, error = _load_on_fake_gpus(
            monkeypatch, tmp_path, tiny_model_dir, device_map, number_gpus=1, allow_offload=True
        )
    assert error is None
    assert fake.kwargs["max_memory"] == {0: 8 * GiB, "cpu": 32 * GiB}
    assert "m placed: cpu: 2 modules, cuda:0: 2 modules" in caplog.text
    assert "allowed by --allow-offload" in caplog.text
    assert b._nice == 0  # a GPU model's thread only launches kernels: it keeps the server's priority
    asyncio.run(b.unload())


def test_a_model_on_the_gpus_alone_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir: Path) -> None:
    b, fake, error = _load_on_fake_gpus(monkeypatch, tmp_path, tiny_model_dir, {"model": 0, "lm_head": 1})
    assert error is None and b.placement.gpus == (0, 1) and set(fake.kwargs["max_memory"]) == {0, 1}
    asyncio.run(b.unload())


def test_a_cpu_model_keeps_the_compute_nice(tmp_path: Path, tiny_model_dir: Path) -> None:
    from tests.serving import hf_entry

    context = BackendContext(KeyRegistry(tmp_path / "key.json"), tmp_path, compute_nice=7)
    b = HuggingfaceLocalBackend(ModelSpec(**hf_entry("m", tiny_model_dir)), context)
    asyncio.run(b.load(lambda line, fraction=None: None))
    assert not b.placement.on_gpu and b._nice == 7
    asyncio.run(b.unload())


# -- failures on the device: a CUDA error kills the backend, out of memory fails the call -----------------------


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Any:
    from tests.serving import hf_entry

    folder = tmp_path_factory.mktemp("loaded")
    b = HuggingfaceLocalBackend(
        ModelSpec(**hf_entry("m", tiny_model_dir)), BackendContext(KeyRegistry(folder / "key.json"), folder)
    )
    asyncio.run(b.load(lambda line, fraction=None: None))
    yield b
    asyncio.run(b.unload())


@pytest.mark.parametrize(("failure", "becomes", "says"), device_failures.failures("m"))
def test_a_failure_while_generating_becomes_what_it_means(
    loaded: Any, monkeypatch: pytest.MonkeyPatch, failure: str, becomes: type[BaseException], says: str
) -> None:
    from clemserve.service.backends import huggingface_local

    freed: list[bool] = []
    monkeypatch.setattr(huggingface_local, "free_memory", lambda: freed.append(True))

    def generate(*args: Any, **kwargs: Any) -> Any:
        raise device_failures.raised(failure)

    monkeypatch.setattr(loaded.model, "generate", generate)
    with pytest.raises(becomes) as caught:
        asyncio.run(loaded.generate_rows([Row(msg("Hi")), Row(msg("Hello"))], GenArgs(max_tokens=4)))
    assert says in str(caught.value)
    assert type(caught.value) is becomes  # a dead backend is UNAVAILABLE, not the RuntimeError behind it
    assert freed == ([True] if becomes is ResourceExhaustedError else [])
    monkeypatch.undo()
    (after,) = asyncio.run(loaded.generate_rows([Row(msg("Hi"))], GenArgs(max_tokens=4)))
    assert isinstance(after, Generation)  # the worker thread survives


def test_a_cuda_error_while_loading_is_a_dead_backend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(HuggingfaceLocalBackend, "_load_blocking", lambda self, config, progress: fail())
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fail)
    b = backend(tmp_path)
    with pytest.raises(BackendDeadError) as caught:
        asyncio.run(b.load(lambda line, fraction=None: None))
    assert "CUDA error while loading with m" in str(caught.value) and caught.value.code == "UNAVAILABLE"


# -- the estimate: rough rather than none -----------------------------------------------------------------

INTERNVL = {  # InternVL3's config.json keeps its language model under llm_config
    "architectures": ["InternVLChatModel"],
    "llm_config": {
        "hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 8, "num_hidden_layers": 4,
        "intermediate_size": 4096, "vocab_size": 1000, "max_position_embeddings": 2048, "torch_dtype": "bfloat16",
    },
    "vision_config": {"hidden_size": 1024},
}  # fmt: skip


def _entry(folder: Path, **config: object) -> ModelSpec:
    return ModelSpec(model_name="vl", backend="huggingface_local", huggingface_id=str(folder), model_config=config)


def test_an_llm_config_sizes_the_weights_and_the_kv_cache(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(INTERNVL))
    found = estimate(_entry(tmp_path), Sizing(tmp_path, max_batch=1))
    assert found.source == "config.json" and found.weights > 0
    assert found.kv_per_token == 2 * 4 * 8 * 64 * 2 and found.context == 2048


def test_unreadable_headers_fall_back_to_the_weight_files_sizes(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Odd"]}))  # no shape to count from
    (tmp_path / "model-00001.safetensors").write_bytes(b"\0" * 4096)  # not a safetensors file
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0" * 1000)
    found = estimate(_entry(tmp_path), Sizing(tmp_path))
    assert (found.weights, found.source, found.kv_cache) == (5096, "weight files", 0)
