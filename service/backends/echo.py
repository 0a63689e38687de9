"""The diagnostic ``echo`` backend: answers with the last user message.

For connectivity checks and for measuring the server's own overhead. "Tokens" are whitespace-separated
words; ``max_tokens`` truncates the answer and the registry's ``context_size`` bounds prompt + answer,
so the context error can be exercised without a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..domain import FinishReason, GenArgs, Generation, ImagePart, Message, TextSink, TokenCount
from .base import Backend, Progress, stream_words
from .chat import check_context
from .context import parse_context_size

DEFAULT_CONTEXT = 131072


def _loggable(message: Message) -> dict[str, Any]:
    """The message as the prompt object records it: images by what the caller named."""
    out = dict(message)
    if "image" in out:
        out["image"] = [img.source if isinstance(img, ImagePart) else img for img in out["image"]]
    return out


class EchoBackend(Backend):
    name = "echo"

    async def load(self, progress: Progress) -> None:
        self.context_size = parse_context_size(self.spec.get("context_size")) or DEFAULT_CONTEXT

    async def count_tokens(self, messages: Sequence[Message]) -> TokenCount:
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        return TokenCount(len(prompt.split()), self.context_size, prompt)

    async def generate(self, messages: Sequence[Message], args: GenArgs, sink: TextSink | None = None) -> Generation:
        # count_tokens' figure without building its prompt: "role:" and the words of each message
        prompt_tokens, last_user = 0, ""
        words: list[str] = []
        for message in messages:
            split = message["content"].split()
            prompt_tokens += 1 + len(split)
            if message["role"] == "user":
                last_user, words = message["content"], split
        check_context(self.model_name, prompt_tokens, args.max_tokens, self.context_size)
        truncated = len(words) > args.max_tokens
        text = " ".join(words[: args.max_tokens]) if truncated else last_user
        stream_words(text, sink)
        return Generation(
            prompt=[_loggable(m) for m in messages],
            response={"response": text},
            text=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=min(len(words), args.max_tokens),
            finish_reason=FinishReason.LENGTH if truncated else FinishReason.STOP,
        )
