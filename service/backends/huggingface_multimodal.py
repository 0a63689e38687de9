"""``huggingface_local`` entries with ``model_config.multimodal``: vision-language models, as clembench runs them.

Follows clembench's HuggingfaceLocalMultimodalModel (spec sections 4.3 and 5.1): ``AutoProcessor``, the
model loaded as the text models are (``dtype`` auto, quantization, remote code, attention implementation,
PEFT adapters; placed by the same rules, :mod:`.placement`: ``number_gpus``, no silent CPU or disk offload,
a CUDA error drops the model, out of memory fails the call), the context size from ``AutoConfig`` without
the tokenizer's limit, each message's images as ``{"type": "image"}`` parts before its text, one
conversation per call (clembench does not batch these models), the context check on the processor's ids
(image tokens included), greedy at temperature 0. The prompt object is the processor-templated text (images
are not recorded), the response object the whole sequence decoded with special tokens kept, the text the
new tokens decoded without them, stripped.

clembench loads the model with ``AutoModelForCausalLM``, which knows only some vision-language families
(Gemma 3, Mllama, remote-code models such as InternVL's); the others (LLaVA, Idefics3, SmolVLM, Qwen2-VL,
...) load here with ``AutoModelForImageTextToText``, the class transformers names for them.

Images arrive as bytes the client read; the server never opens a path or URL a caller names.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import threading
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from clemserve.registry.errors import InvalidArgumentError

from ..domain import FinishReason, GenArgs, Generation, ImagePart, Message, Row, TextSink, TokenCount
from ..memory import free_memory
from . import placement
from .base import Backend, Progress, missing_dependency
from .chat import check_context, context_size, precondition, weights_missing
from .stream_decoding import BatchStreamer, on_loop

log = logging.getLogger(__name__)

#: model_config keys clembench's multimodal class reads, plus those its registry entries carry and it ignores
KNOWN_CONFIG = frozenset(
    {
        "multimodal", "multimodality", "trust_remote_code", "requires_api_key", "load_in_8bit", "load_in_4bit",
        "attn_implementation", "peft_model", "premade_chat_template", "eos_to_cull", "do_sample", "number_gpus",
        "memory_bytes",  # read by service/memory.py
    }
)  # fmt: skip


class HuggingfaceMultimodalBackend(placement.DeviceWorker, Backend):
    """A vision-language model; ``HuggingfaceLocalBackend`` hands entries with ``multimodal`` to this class."""

    name = "huggingface_local"
    # one conversation at a time, in the worker thread; clembench does not batch vision-language models
    concurrency = 1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._start_worker()

    # -- loading ------------------------------------------------------------------------------

    async def load(self, progress: Progress) -> None:
        config = self.model_config
        check_config(self.spec.get("huggingface_id"), config, self.model_name)
        try:
            import accelerate  # noqa: F401  (device_map="auto" needs it)
            import PIL  # noqa: F401
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as exc:
            raise missing_dependency(self.name, "hf", exc) from None
        await self._load_placed(config, functools.partial(self._load_blocking, config, progress))

    def _load_blocking(self, config: dict[str, Any], progress: Progress) -> None:
        from transformers import AutoConfig, AutoProcessor

        source = str(self.spec["huggingface_id"])
        remote_code: dict[str, Any] = {"trust_remote_code": True} if config.get("trust_remote_code") else {}
        token: dict[str, Any] = {}
        if config.get("requires_api_key"):
            token["token"] = self.context.keys.get_key_for("huggingface")["api_key"]

        progress(f"loading processor and config from {source}", 0.3)
        try:
            processor = AutoProcessor.from_pretrained(source, **remote_code, **token)  # type: ignore[no-untyped-call]
            hf_config = AutoConfig.from_pretrained(source, **remote_code)  # clembench passes no token here
        except (OSError, ValueError) as exc:
            raise weights_missing(self.model_name, source, exc) from None

        auto_class = model_class(hf_config)
        progress(f"loading weights ({auto_class.__name__})", 0.4)
        model, where = self._load_weights(auto_class, source, config, {**remote_code, **token})

        self.processor = processor
        self.model = model
        self.device = next(model.parameters()).device
        self.context_size = context_size(hf_config, None, self.spec)  # clembench: no tokenizer fallback
        self.eos_ids = eos_ids(model, processor)
        progress(f"ready: context size {self.context_size}, device {where}", 1.0)

    async def unload(self) -> None:
        def drop() -> None:  # what they held is collected by the server's free_memory, right after
            self.__dict__.pop("model", None)
            self.__dict__.pop("processor", None)

        await self._stop_worker(drop)

    # -- generation ---------------------------------------------------------------------------

    async def generate(self, messages: Sequence[Message], args: GenArgs, sink: TextSink | None = None) -> Generation:
        check_images(messages, self.model_config, self.model_name)
        loop = asyncio.get_running_loop()
        row = Row(messages, sink=on_loop(loop, sink))
        generate = functools.partial(self._generate_blocking, row, args)
        try:
            return await loop.run_in_executor(
                self._executor, placement.on_device, self.model_name, "generating", generate, free_memory
            )
        except asyncio.CancelledError:
            row.cancel.set()  # the caller left: the worker stops at the next token
            raise

    async def count_tokens(self, messages: Sequence[Message]) -> TokenCount:
        check_images(messages, self.model_config, self.model_name)
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._count_blocking, messages)

    def _count_blocking(self, messages: Sequence[Message]) -> TokenCount:
        inputs, prompt = self._inputs(messages, on_device=False)
        return TokenCount(int(inputs["input_ids"].shape[-1]), self.context_size, prompt)

    def _inputs(self, messages: Sequence[Message], on_device: bool = True) -> tuple[Any, str]:
        """The processor's tensors (on the model's device unless counting), and the templated prompt text."""
        conversation, images = processor_messages(messages)
        prompt = str(self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False))
        inputs = self.processor(text=prompt, images=images or None, return_tensors="pt")
        return (inputs.to(self.device) if on_device else inputs), prompt

    def _generate_blocking(self, row: Row, args: GenArgs) -> Generation:
        inputs, prompt = self._inputs(row.messages)
        length = int(inputs["input_ids"].shape[-1])
        check_context(self.model_name, length, args.max_tokens, self.context_size, " at batch index 0")
        sampling: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None}
        if args.temperature > 0.0:
            top_p = getattr(self.model.generation_config, "top_p", None)
            sampling = {"do_sample": True, "temperature": args.temperature, "top_p": top_p}
        sampling["stopping_criteria"] = _stop_when_set(row.cancel)
        if row.sink is not None:
            sampling["streamer"] = BatchStreamer(self._text_decoder(), [row], self.eos_ids)
        output = self.model.generate(**inputs, max_new_tokens=args.max_tokens, return_dict_in_generate=True, **sampling)
        sequence = output.sequences[0]
        new_tokens = sequence[length:].tolist()
        stopped = bool(new_tokens) and new_tokens[-1] in self.eos_ids
        return Generation(
            prompt={"inputs": prompt, "max_new_tokens": args.max_tokens, "temperature": args.temperature},
            response={"response": str(self.processor.decode(sequence, skip_special_tokens=False))},
            text=str(self.processor.decode(sequence[length:], skip_special_tokens=True)).strip(),
            prompt_tokens=length,
            completion_tokens=len(new_tokens),
            finish_reason=FinishReason.STOP if stopped else FinishReason.LENGTH,
        )

    def _text_decoder(self) -> Any:
        """What the streamer decodes with: the text as the reply's text decodes it (special tokens skipped)."""

        def decode(ids: list[int]) -> str:
            return str(self.processor.decode(ids, skip_special_tokens=True))

        return SimpleNamespace(decode=decode)


# -- pieces, pure where they can be -----------------------------------------------------------------


def check_config(huggingface_id: object, config: dict[str, Any], model_name: str) -> None:
    """Refuse at load what cannot be honoured, instead of failing at the first call; warn about the unknown."""
    unknown = sorted(set(config) - KNOWN_CONFIG)
    if unknown:
        log.warning("%s: model_config keys %s are not read by multimodal huggingface_local", model_name, unknown)
    if not huggingface_id:
        raise precondition(f"registry entry {model_name} has no huggingface_id", "huggingface_id")
    placement.check_loading_options(config)
    multimodality = config.get("multimodality")
    if multimodality is not None and not isinstance(multimodality, (dict, bool)):
        raise precondition(
            f"model_config.multimodality of {model_name} must be an object such as "
            '{"single_image": true, "multiple_images": true}',
            "model_config.multimodality",
        )


def check_images(messages: Sequence[Message], config: dict[str, Any], model_name: str) -> None:
    """The entry's image limits. clembench's multimodal Hugging Face class takes any number of images in any
    message; an entry that declares ``multimodality`` is held to it, as clembench's API backends hold theirs:
    no images when it is false (or says neither single nor multiple images), one per message unless it says
    ``multiple_images``. How many images a request holds in all is the server's ``--max-images``."""
    if "multimodality" not in config:
        return
    declared = config["multimodality"]
    flags = declared if isinstance(declared, dict) else {}
    takes_images = bool(declared) and (not flags or flags.get("single_image") or flags.get("multiple_images"))
    for i, message in enumerate(messages):
        images = message.get("image") or []
        if images and not takes_images:
            raise InvalidArgumentError(
                f"messages[{i}].image", f"{model_name} does not accept images (model_config.multimodality)"
            )
        if len(images) > 1 and not flags.get("multiple_images"):
            raise InvalidArgumentError(
                f"messages[{i}].image",
                f"{model_name} accepts one image per message, got {len(images)} "
                "(model_config.multimodality.multiple_images is not set)",
            )


def processor_messages(messages: Sequence[Message]) -> tuple[list[dict[str, Any]], list[Any]]:
    """clembench's form for the processor: each message's content as its image parts, then its text part;
    the images, decoded, in order. Other keys of a message are not passed on."""
    conversation: list[dict[str, Any]] = []
    images: list[Any] = []
    for i, message in enumerate(messages):
        content: list[dict[str, Any]] = []
        for j, image in enumerate(message.get("image") or ()):
            content.append({"type": "image"})
            images.append(decode_image(image, f"messages[{i}].image[{j}]"))
        content.append({"type": "text", "text": message["content"]})
        conversation.append({"role": message["role"], "content": content})
    return conversation, images


def decode_image(image: object, field: str) -> Any:
    """The image's bytes as the RGB picture clembench's ``load_image`` makes of a file (EXIF orientation
    applied); bytes that are not an image are refused, naming the field."""
    from PIL import Image
    from transformers.image_utils import load_image

    if not isinstance(image, ImagePart):
        raise InvalidArgumentError(field, "must be an image's bytes")
    try:
        opened = Image.open(io.BytesIO(image.data))
        opened.load()
        return load_image(opened)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidArgumentError(field, f"is not an image this server can read ({exc})") from None


def model_class(hf_config: Any) -> Any:
    """clembench's ``AutoModelForCausalLM`` where it knows the architecture (or the remote code names it),
    else ``AutoModelForImageTextToText``."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto_map = getattr(hf_config, "auto_map", None) or {}
    if "AutoModelForCausalLM" in auto_map or type(hf_config) in AutoModelForCausalLM._model_mapping:
        return AutoModelForCausalLM
    return AutoModelForImageTextToText


def eos_ids(model: Any, processor: Any) -> set[int]:
    ids = model.generation_config.eos_token_id
    found = set(ids) if isinstance(ids, list) else ({ids} if ids is not None else set())
    tokenizer = getattr(processor, "tokenizer", processor)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        found.add(tokenizer.eos_token_id)
    return found


def _stop_when_set(cancel: threading.Event) -> Any:
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class CallerGone(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), cancel.is_set(), device=input_ids.device)

    return StoppingCriteriaList([CallerGone()])


def is_multimodal(config: object) -> bool:
    """Whether a huggingface_local entry's model_config selects this class (clembench: ``multimodal`` truthy)."""
    return isinstance(config, dict) and bool(config.get("multimodal"))


__all__ = ["HuggingfaceMultimodalBackend", "is_multimodal"]
