"""What the local backends share: clembench's chat-template rendering, context check and text cleaning.

``huggingface_local`` and ``vllm`` render prompts and clean answers the same way (spec section 5.1),
so a conversation gets the same prompt and the same cleaned text on either.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clemserve.registry import ModelSpec
from clemserve.registry.errors import ContextExceededError, FailedPreconditionError, InvalidArgumentError

from ..domain import GenArgs, Message
from .context import parse_context_size

log = logging.getLogger(__name__)

#: model_config keys that both local backends read
CHAT_CONFIG = frozenset(
    {
        "premade_chat_template", "eos_to_cull", "custom_chat_template", "requires_api_key", "output_split_prefix",
        "chat_template_kwargs", "chat_template_language", "cot_output", "cot_start_tag", "cot_end_tag",
        "cot_bypass", "cot_effort", "trust_remote_code",
        "memory_bytes",  # read by service/memory.py: the footprint the memory budget counts
    }
)  # fmt: skip
_FALLBACK_CONTEXT = 256


def precondition(message: str, subject: str) -> FailedPreconditionError:
    return FailedPreconditionError(message, subject=subject)


def check_chat_config(spec: ModelSpec, config: dict[str, Any], backend: str, known: frozenset[str]) -> None:
    """Refuse at load what cannot be honoured, instead of failing at the first call; warn about the unknown."""
    name = spec["model_name"]
    unknown = sorted(set(config) - known)
    if unknown:
        log.warning("%s: model_config keys %s are not read by %s", name, unknown, backend)
    if "huggingface_id" not in spec and "gguf" not in config:
        raise precondition(f"registry entry {name} has no huggingface_id", "huggingface_id")
    for key in ("premade_chat_template", "eos_to_cull"):
        if key not in config:
            raise precondition(
                f"registry entry {name} lacks model_config.{key}, which {backend} requires", f"model_config.{key}"
            )
    try:
        re.compile(config["eos_to_cull"])
    except (re.error, TypeError) as exc:
        raise precondition(
            f"model_config.eos_to_cull of {name} is not a regular expression: {exc}", "model_config.eos_to_cull"
        ) from None
    if config.get("cot_output") and not config.get("cot_end_tag"):
        raise precondition("model_config.cot_output needs model_config.cot_end_tag", "model_config.cot_end_tag")
    if not isinstance(config.get("chat_template_kwargs", {}), dict):
        raise precondition("model_config.chat_template_kwargs must be an object", "model_config.chat_template_kwargs")


def refuse_images(messages: Sequence[Message], model_name: str) -> None:
    """The local backends serve text models: an image is refused, naming the message it came in."""
    for i, message in enumerate(messages):
        if message.get("image"):
            raise InvalidArgumentError(f"messages[{i}].image", f"{model_name} is a text model and takes no images")


def engine_prompt(prompt: str, args: GenArgs) -> dict[str, Any]:
    """The prompt object of clembench's llama.cpp and vLLM backends: the templated text and the arguments."""
    return {
        "inputs": prompt,
        "max_new_tokens": args.max_tokens,
        "temperature": args.temperature,
        "return_full_text": False,
    }


def weights_missing(model_name: str, source: str | Path, exc: Exception) -> FailedPreconditionError:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    why = "this server is offline and the hub cache does not hold it" if offline else str(exc).splitlines()[0]
    return precondition(
        f"cannot load {model_name} from {source}: {why}. Put the model in a local folder "
        "and point huggingface_id at it, or pre-download it into the Hugging Face cache",
        f"huggingface_id {source}",
    )


def context_size(hf_config: Any, tokenizer: Any, spec: ModelSpec) -> int:
    """clembench's order: config fields, the registry's context_size, the tokenizer's limit, 256."""
    text_config = getattr(hf_config, "text_config", None)
    for value in (
        getattr(hf_config, "max_position_embeddings", None),
        getattr(hf_config, "n_positions", None),
        getattr(text_config, "max_position_embeddings", None),
        parse_context_size(spec.get("context_size")),
    ):
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < 1_000_000:
        return limit
    return _FALLBACK_CONTEXT


def check_context(model_name: str, length: int, max_tokens: int, context: int, where: str = "") -> None:
    """clembench's check: prompt length plus max_tokens must fit, before anything is generated. ``where``
    ends the message as clembench's backend does (`` at batch index 0`` for its multimodal one)."""
    tokens_used = length + max_tokens
    if tokens_used > context:
        raise ContextExceededError(
            f"Context token limit for {model_name} exceeded{where}", tokens_used, context - tokens_used, context
        )


class ChatTokenizer:
    """A tokenizer prepared as clembench prepares it, with its rendering and cleaning rules."""

    def __init__(self, tokenizer: Any, config: dict[str, Any], model_name: str) -> None:
        if not config.get("premade_chat_template") and config.get("custom_chat_template"):
            tokenizer.chat_template = config["custom_chat_template"]
        if not tokenizer.chat_template:
            raise precondition(
                f"{model_name}: the tokenizer has no chat template; set model_config.custom_chat_template",
                "model_config.custom_chat_template",
            )
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.config = config
        self.model_name = model_name
        self.template_kwargs: dict[str, Any] = dict(config.get("chat_template_kwargs", {}))
        if config.get("chat_template_language"):
            self.template_kwargs["chat_template"] = config["chat_template_language"]

    def render(self, rows: Sequence[Sequence[Message]]) -> list[str]:
        """The prompt text of each conversation, as clembench's apply_chat_template call makes it."""
        kwargs = dict(self.template_kwargs)
        conversations = [[{k: v for k, v in m.items() if k != "image"} for m in row] for row in rows]
        if self.config.get("cot_bypass"):
            for conversation in conversations:
                conversation.append({"role": "assistant", "content": self.config["cot_bypass"]})
            kwargs.update(continue_final_message=True, add_generation_prompt=False)
        else:
            if self.config.get("cot_effort"):
                kwargs.setdefault("reasoning_effort", self.config["cot_effort"])
            kwargs["add_generation_prompt"] = True
        return list(self.tokenizer.apply_chat_template(conversations, tokenize=False, **kwargs))

    def token_ids(self, prompt: str) -> list[int]:
        """The prompt's ids without added special tokens: the template has them already (no double BOS)."""
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def check_context(self, length: int, max_tokens: int, context: int) -> None:
        check_context(self.model_name, length, max_tokens, context)

    def clean(self, output: str, prompt_text: str, max_tokens: int) -> tuple[str, str | None]:
        """clembench's cleaning order; returns the text and, with cot_output, the thinking part."""
        config = self.config
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
