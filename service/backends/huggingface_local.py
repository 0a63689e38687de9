"""``huggingface_local``: transformers models in the server process, as clembench runs them.

Follows clembench's HuggingfaceLocalModel (spec section 5.1): chat template choice, pad token and
padding side, context size, the context check before generating, greedy at temperature 0, decoding
each row with special tokens kept, and the cleaning order. Generation runs in one worker thread per
model, off the event loop.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from clemserve.registry.errors import (
    ContextExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
)

from ..domain import FinishReason, GenArgs, Generation, Message, TokenCount
from ..validation import reject_unsupported_args
from . import gguf
from .base import Backend, Progress, missing_dependency
from .context import parse_context_size

log = logging.getLogger(__name__)

#: model_config keys this backend reads
KNOWN_CONFIG = frozenset(
    {
        "premade_chat_template", "eos_to_cull", "custom_chat_template", "requires_api_key", "padding_side",
        "output_split_prefix", "chat_template_kwargs", "chat_template_language", "cot_output",
        "cot_start_tag", "cot_end_tag", "cot_bypass", "cot_effort", "load_in_8bit", "load_in_4bit",
        "trust_remote_code", "attn_implementation", "peft_model", "multimodal", "gguf",
    }
)  # fmt: skip
_ENCODER_ONLY = {"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta"}
_FALLBACK_CONTEXT = 256


def _precondition(message: str, subject: str) -> FailedPreconditionError:
    return FailedPreconditionError(message, subject=subject)


class HuggingfaceLocalBackend(Backend):
    name = "huggingface_local"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"hf-{self.model_name}")

    # -- loading ------------------------------------------------------------------------------

    async def load(self, progress: Progress) -> None:
        config = self.model_config
        self._check_config(config)
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as exc:
            raise missing_dependency(self.name, "hf", exc) from None
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load_blocking, config, progress)

    def _check_config(self, config: dict[str, Any]) -> None:
        """Refuse what cannot be honoured here at load time, instead of at the first call."""
        unknown = sorted(set(config) - KNOWN_CONFIG)
        if unknown:
            log.warning("%s: model_config keys %s are not read by %s", self.model_name, unknown, self.name)
        if "huggingface_id" not in self.spec and "gguf" not in config:
            raise _precondition(f"registry entry {self.model_name} has no huggingface_id", "huggingface_id")
        for key in ("premade_chat_template", "eos_to_cull"):
            if key not in config:
                raise _precondition(
                    f"registry entry {self.model_name} lacks model_config.{key}, which {self.name} requires",
                    f"model_config.{key}",
                )
        try:
            re.compile(config["eos_to_cull"])
        except (re.error, TypeError) as exc:
            raise _precondition(
                f"model_config.eos_to_cull of {self.model_name} is not a regular expression: {exc}",
                "model_config.eos_to_cull",
            ) from None
        if config.get("cot_output") and not config.get("cot_end_tag"):
            raise _precondition("model_config.cot_output needs model_config.cot_end_tag", "model_config.cot_end_tag")
        if config.get("multimodal"):
            raise _precondition(
                f"{self.model_name} is a multimodal model; clemserve serves text models only on {self.name}",
                "model_config.multimodal",
            )
        quantized = config.get("load_in_8bit") or config.get("load_in_4bit")
        if quantized and importlib.util.find_spec("bitsandbytes") is None:
            raise _precondition(
                "model_config.load_in_8bit/load_in_4bit need the bitsandbytes package (and a GPU)",
                "pip install bitsandbytes",
            )
        if config.get("peft_model") and importlib.util.find_spec("peft") is None:
            raise _precondition("model_config.peft_model needs the peft package", "pip install peft")
        kwargs = config.get("chat_template_kwargs", {})
        if not isinstance(kwargs, dict):
            raise _precondition(
                "model_config.chat_template_kwargs must be an object", "model_config.chat_template_kwargs"
            )

    def _load_blocking(self, config: dict[str, Any], progress: Progress) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        source: str | Path
        if "gguf" in config:
            source = gguf.prepared_folder(config["gguf"], self.context.cache_dir, progress)
        else:
            source = str(self.spec["huggingface_id"])
        token_kwargs: dict[str, Any] = {}
        if config.get("requires_api_key"):
            token_kwargs["token"] = self.context.keys.get_key_for("huggingface")["api_key"]
        _check_memory(source, self.model_name)

        progress(f"loading tokenizer and config from {source}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **token_kwargs)
            hf_config = AutoConfig.from_pretrained(source, **token_kwargs)
        except (OSError, ValueError) as exc:  # ValueError: a folder without tokenizer files
            raise self._weights_missing(source, exc) from None

        if not config.get("premade_chat_template") and config.get("custom_chat_template"):
            tokenizer.chat_template = config["custom_chat_template"]
        if not tokenizer.chat_template:
            raise _precondition(
                f"{self.model_name}: the tokenizer has no chat template; set model_config.custom_chat_template",
                "model_config.custom_chat_template",
            )
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = self._padding_side(config, hf_config)

        model_kwargs: dict[str, Any] = {"device_map": "auto", "dtype": "auto", **token_kwargs}
        if config.get("load_in_8bit") or config.get("load_in_4bit"):
            from transformers import BitsAndBytesConfig

            model_kwargs["quantization_config"] = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
                load_in_8bit=bool(config.get("load_in_8bit")), load_in_4bit=bool(config.get("load_in_4bit"))
            )
        if config.get("trust_remote_code"):
            model_kwargs["trust_remote_code"] = True
        if config.get("attn_implementation"):
            model_kwargs["attn_implementation"] = config["attn_implementation"]

        progress("loading weights")
        try:
            model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
        except OSError as exc:
            raise self._weights_missing(source, exc) from None
        except (MemoryError, RuntimeError) as exc:
            if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
                raise ResourceExhaustedError(f"out of memory while loading {self.model_name}") from None
            raise
        if config.get("peft_model"):
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, config["peft_model"])
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.eos_token_id
        model.eval()  # type: ignore[no-untyped-call]

        self.tokenizer = tokenizer
        self.model = model
        self.device = next(model.parameters()).device
        self.context_size = self._context_size(hf_config, tokenizer)
        self.template_kwargs: dict[str, Any] = dict(config.get("chat_template_kwargs", {}))
        if config.get("chat_template_language"):
            self.template_kwargs["chat_template"] = config["chat_template_language"]
        progress(f"ready: context size {self.context_size}, device {self.device}")

    def _weights_missing(self, source: str | Path, exc: Exception) -> FailedPreconditionError:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        why = "this server is offline and the hub cache does not hold it" if offline else str(exc).splitlines()[0]
        return _precondition(
            f"cannot load {self.model_name} from {source}: {why}. Put the model in a local folder "
            "and point huggingface_id at it, or pre-download it into the Hugging Face cache",
            f"huggingface_id {source}",
        )

    def _padding_side(self, config: dict[str, Any], hf_config: Any) -> str:
        side = config.get("padding_side")
        if side is not None:
            side = str(side).lower()
            if side not in ("left", "right"):
                raise _precondition(
                    f"Invalid 'padding_side={config['padding_side']}' for {self.model_name}. "
                    "Must be 'left' or 'right'.",
                    "model_config.padding_side",
                )
            return side
        log.warning("%s: no model_config.padding_side; deriving it from the model type", self.model_name)
        model_type = getattr(hf_config, "model_type", "")
        encoder_only = model_type in _ENCODER_ONLY or (
            getattr(hf_config, "is_encoder_decoder", False) and not getattr(hf_config, "decoder", None)
        )
        return "right" if encoder_only else "left"

    def _context_size(self, hf_config: Any, tokenizer: Any) -> int:
        text_config = getattr(hf_config, "text_config", None)
        for value in (
            getattr(hf_config, "max_position_embeddings", None),
            getattr(hf_config, "n_positions", None),
            getattr(text_config, "max_position_embeddings", None),
            parse_context_size(self.spec.get("context_size")),
        ):
            if isinstance(value, int) and value > 0:
                return value
        limit = getattr(tokenizer, "model_max_length", None)
        if isinstance(limit, int) and limit < 1_000_000:
            return limit
        return _FALLBACK_CONTEXT

    async def unload(self) -> None:
        def drop() -> None:
            self.__dict__.pop("model", None)
            self.__dict__.pop("tokenizer", None)
            import gc

            gc.collect()

        await asyncio.get_running_loop().run_in_executor(self._executor, drop)
        self._executor.shutdown(wait=False)

    # -- generation ---------------------------------------------------------------------------

    async def generate(self, messages: Sequence[Message], args: GenArgs) -> Generation:
        return (await self.generate_batch([messages], args))[0]

    async def generate_batch(self, rows: Sequence[Sequence[Message]], args: GenArgs) -> list[Generation]:
        reject_unsupported_args(args.extra, self.supported_args, self.name)
        for row in rows:
            _refuse_images(row, self.model_name)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._generate_blocking, rows, args)

    async def count_tokens(self, messages: Sequence[Message]) -> TokenCount:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._count_blocking, messages)

    def _render(self, rows: Sequence[Sequence[Message]]) -> list[str]:
        config = self.model_config
        kwargs = dict(self.template_kwargs)
        conversations = [[{k: v for k, v in m.items() if k != "image"} for m in row] for row in rows]
        if config.get("cot_bypass"):
            for conversation in conversations:
                conversation.append({"role": "assistant", "content": config["cot_bypass"]})
            kwargs.update(continue_final_message=True, add_generation_prompt=False)
        else:
            if config.get("cot_effort"):
                kwargs.setdefault("reasoning_effort", config["cot_effort"])
            kwargs["add_generation_prompt"] = True
        rendered = self.tokenizer.apply_chat_template(conversations, tokenize=False, **kwargs)
        return list(rendered)

    def _count_blocking(self, messages: Sequence[Message]) -> TokenCount:
        prompt = self._render([messages])[0]
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return TokenCount(len(ids), self.context_size, prompt)

    def _generate_blocking(self, rows: Sequence[Sequence[Message]], args: GenArgs) -> list[Generation]:
        config = self.model_config
        tokenizer, model = self.tokenizer, self.model
        prompts = self._render(rows)
        encoded = tokenizer(
            prompts, add_special_tokens=False, padding=True, return_attention_mask=True, return_tensors="pt"
        ).to(self.device)
        input_ids = encoded["input_ids"]
        padded_length = int(input_ids.shape[1])
        for i in range(len(rows)):
            tokens_used = padded_length + args.max_tokens
            if tokens_used > self.context_size:
                where = f" at batch index {i}" if len(rows) > 1 else ""
                raise ContextExceededError(
                    f"Context token limit for {self.model_name} exceeded{where}",
                    tokens_used,
                    self.context_size - tokens_used,
                    self.context_size,
                )

        max_new_tokens = args.max_tokens
        if config.get("cot_output"):
            # clembench lets thinking models use the whole context; the room left is the real bound
            max_new_tokens = max(1, self.context_size - padded_length)
        sampling: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None}
        if args.temperature > 0.0:
            sampling = {
                "do_sample": True,
                "temperature": args.temperature,
                "top_p": model.generation_config.top_p,
            }
        try:
            output = model.generate(
                input_ids,
                attention_mask=encoded["attention_mask"],
                max_new_tokens=max_new_tokens,
                return_dict_in_generate=True,
                **sampling,
            )
        except (MemoryError, RuntimeError) as exc:
            if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
                raise ResourceExhaustedError(f"out of memory while generating with {self.model_name}") from None
            raise
        sequences = output.sequences
        outputs = tokenizer.batch_decode(sequences)
        prompt_texts = tokenizer.batch_decode(input_ids)
        eos_ids = _eos_ids(model, tokenizer)
        results = []
        for i, (raw, prompt_text) in enumerate(zip(outputs, prompt_texts, strict=True)):
            text, cot = self._clean(raw, prompt_text, args.max_tokens)
            response: dict[str, Any] = {"response": raw}
            if cot is not None:
                response["cot_content"] = cot
            new_tokens = sequences[i, padded_length:].tolist()
            stop = next((n for n, t in enumerate(new_tokens) if t in eos_ids), None)
            results.append(
                Generation(
                    prompt={
                        "inputs": prompt_text,
                        "max_new_tokens": args.max_tokens,
                        "temperature": args.temperature,
                    },
                    response=response,
                    text=text,
                    prompt_tokens=int(encoded["attention_mask"][i].sum()),
                    completion_tokens=len(new_tokens) if stop is None else stop + 1,
                    finish_reason=FinishReason.LENGTH if stop is None else FinishReason.STOP,
                )
            )
        return results

    def _clean(self, output: str, prompt_text: str, max_tokens: int) -> tuple[str, str | None]:
        """clembench's cleaning order; returns the text and, with cot_output, the thinking part."""
        config = self.model_config
        text = output.replace(prompt_text, "").strip()
        prefix = config.get("output_split_prefix")
        if prefix and prefix in text:
            text = text.rsplit(prefix, 1)[1]
        pad = self.tokenizer.pad_token
        if pad and (text.startswith(pad) or text.endswith(pad)):
            text = text.replace(pad, "")
        text = re.sub(config["eos_to_cull"], "", text)
        if not config.get("cot_output"):
            return text, None
        start_tag = config.get("cot_start_tag")
        if start_tag:
            text = text.replace(start_tag, "")
        parts = re.split(config["cot_end_tag"], text)
        answer = parts[-1] if len(parts) >= 2 else ""
        answer_ids = self.tokenizer(answer).input_ids[:max_tokens]
        return str(self.tokenizer.decode(answer_ids)).strip(), parts[0]


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = model.generation_config.eos_token_id
    found = set(ids) if isinstance(ids, list) else ({ids} if ids is not None else set())
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return found


def _refuse_images(messages: Sequence[Message], model_name: str) -> None:
    for i, message in enumerate(messages):
        if message.get("image"):
            raise InvalidArgumentError(f"messages[{i}].image", f"{model_name} is a text model and takes no images")


def _check_memory(source: str | Path, model_name: str) -> None:
    """Refuse a local model whose weight files exceed the memory available now (a first, coarse check)."""
    folder = Path(source)
    if not folder.is_dir():
        return
    weights = sum(p.stat().st_size for p in folder.glob("*") if p.suffix in (".safetensors", ".bin", ".pt"))
    available = _available_memory()
    if weights and available and weights * 1.2 > available:
        raise ResourceExhaustedError(
            f"{model_name} needs about {weights * 1.2 / 2**30:.1f} GiB to load; {available / 2**30:.1f} GiB "
            "is available",
            required_bytes=int(weights * 1.2),
            available_bytes=available,
        )


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
