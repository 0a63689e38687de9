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
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from clemserve.registry.errors import ContextExceededError, InvalidArgumentError, ResourceExhaustedError

from ..domain import FinishReason, GenArgs, Generation, Message, TokenCount
from ..streaming import TextSink
from ..validation import reject_unsupported_args
from . import gguf
from .base import Backend, Progress, RowDone, lower_thread_priority, missing_dependency
from .chat import (
    CHAT_CONFIG,
    ChatTokenizer,
    check_chat_config,
    context_size,
    precondition,
    refuse_images,
    weights_missing,
)

log = logging.getLogger(__name__)

#: model_config keys this backend reads
KNOWN_CONFIG = CHAT_CONFIG | {
    "padding_side", "load_in_8bit", "load_in_4bit", "attn_implementation", "peft_model", "multimodal", "gguf",
}  # fmt: skip
_ENCODER_ONLY = {"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta"}


class HuggingfaceLocalBackend(Backend):
    name = "huggingface_local"
    # one generate call at a time (the worker thread); the scheduler merges waiting requests into it
    concurrency = 1
    batches = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the worker (and torch's threads, started from it) yields the CPU to the request path: on a busy
        # CPU machine, refusals and new requests are then not held up behind generation
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"hf-{self.model_name}",
            initializer=lower_thread_priority,
            initargs=(self.context.compute_nice,),
        )

    # -- loading ------------------------------------------------------------------------------

    async def load(self, progress: Progress) -> None:
        config = self.model_config
        self._check_config(config)
        try:
            import accelerate  # noqa: F401  (device_map="auto" needs it)
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as exc:
            raise missing_dependency(self.name, "hf", exc) from None
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load_blocking, config, progress)

    def _check_config(self, config: dict[str, Any]) -> None:
        """Refuse what cannot be honoured here at load time, instead of at the first call."""
        check_chat_config(self.spec, config, self.name, KNOWN_CONFIG)
        if config.get("multimodal"):
            raise precondition(
                f"{self.model_name} is a multimodal model; clemserve serves text models only on {self.name}",
                "model_config.multimodal",
            )
        quantized = config.get("load_in_8bit") or config.get("load_in_4bit")
        if quantized and importlib.util.find_spec("bitsandbytes") is None:
            raise precondition(
                "model_config.load_in_8bit/load_in_4bit need the bitsandbytes package (and a GPU)",
                "pip install bitsandbytes",
            )
        if config.get("peft_model") and importlib.util.find_spec("peft") is None:
            raise precondition("model_config.peft_model needs the peft package", "pip install peft")

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

        progress(f"loading tokenizer and config from {source}", 0.35)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **token_kwargs)
            hf_config = AutoConfig.from_pretrained(source, **token_kwargs)
        except (OSError, ValueError) as exc:  # ValueError: a folder without tokenizer files
            raise weights_missing(self.model_name, source, exc) from None
        chat = ChatTokenizer(tokenizer, config, self.model_name)
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

        progress("loading weights", 0.4)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
        except OSError as exc:
            raise weights_missing(self.model_name, source, exc) from None
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

        self.chat = chat
        self.tokenizer = tokenizer
        self.model = model
        self.device = next(model.parameters()).device
        self.context_size = context_size(hf_config, tokenizer, self.spec)
        progress(f"ready: context size {self.context_size}, device {self.device}", 1.0)

    def _padding_side(self, config: dict[str, Any], hf_config: Any) -> str:
        side = config.get("padding_side")
        if side is not None:
            side = str(side).lower()
            if side not in ("left", "right"):
                raise precondition(
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

    async def generate_rows(
        self,
        rows: Sequence[Sequence[Message]],
        args: GenArgs,
        cancels: Sequence[threading.Event],
        sinks: Sequence[TextSink | None] | None = None,
        done: RowDone | None = None,
    ) -> list[Generation | BaseException]:
        """Independent requests merged into one batched call by the scheduler; a row's error is its own.
        A row with a sink (a streamed request) gets its text token by token as it is generated. A row that
        ends (its end-of-sequence token) before the batch does is handed to ``done`` at once, on the event
        loop, so that its caller has its answer without waiting for the batch's longest row."""
        reject_unsupported_args(args.extra, self.supported_args, self.name)
        results: list[Generation | BaseException | None] = [None] * len(rows)
        live = []
        for i, row in enumerate(rows):
            try:
                refuse_images(row, self.model_name)
                live.append(i)
            except InvalidArgumentError as exc:
                results[i] = exc
        if live:
            loop = asyncio.get_running_loop()
            streamed = None if sinks is None else [_on_loop(loop, sinks[i]) for i in live]
            ended = None
            if done is not None:

                def ended(row: int, generation: Generation) -> None:  # called in the generation thread
                    loop.call_soon_threadsafe(done, live[row], generation)

            outcomes = await loop.run_in_executor(
                self._executor,
                self._generate_blocking,
                [rows[i] for i in live],
                args,
                [cancels[i] for i in live],
                streamed,
                ended,
            )
            for i, result in zip(live, outcomes, strict=True):
                results[i] = result
        return [r for r in results if r is not None]

    async def generate_batch(self, rows: Sequence[Sequence[Message]], args: GenArgs) -> list[Generation]:
        reject_unsupported_args(args.extra, self.supported_args, self.name)
        for row in rows:
            refuse_images(row, self.model_name)
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._executor, self._generate_blocking, rows, args)
        return [r for r in results if isinstance(r, Generation)]

    async def count_tokens(self, messages: Sequence[Message]) -> TokenCount:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._count_blocking, messages)

    def _count_blocking(self, messages: Sequence[Message]) -> TokenCount:
        prompt = self.chat.render([messages])[0]
        return TokenCount(len(self.chat.token_ids(prompt)), self.context_size, prompt)

    def _generate_blocking(
        self,
        rows: Sequence[Sequence[Message]],
        args: GenArgs,
        cancels: Sequence[threading.Event] | None = None,
        sinks: Sequence[TextSink | None] | None = None,
        ended: Callable[[int, Generation], None] | None = None,
    ) -> list[Generation | BaseException]:
        """One ``model.generate`` call for all rows (``sinks``: each merged request's text, as it comes;
        ``ended``: told each merged row's result as soon as that row has ended, in this thread).

        Without ``cancels`` the rows are one clembench batch: every row is checked at the padded length,
        one row over the limit fails them all, and the prompt and response texts keep the padding, as
        clembench's do. With ``cancels`` the rows are independent requests merged by the scheduler: each
        is checked and reported on its own, and its texts are exactly what it would get alone.
        """
        config = self.model_config
        tokenizer, model = self.tokenizer, self.model
        prompts = self.chat.render(rows)
        results: list[Generation | BaseException | None] = [None] * len(rows)
        if cancels is None:
            encoded = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
            for i in range(len(rows)):  # clembench checks every row at the padded length
                self.chat.check_context(
                    int(encoded["input_ids"].shape[1]), args.max_tokens, self.context_size, i if len(rows) > 1 else None
                )
            live = list(range(len(rows)))
        else:
            live = []
            for i, prompt in enumerate(prompts):
                try:
                    self.chat.check_context(len(self.chat.token_ids(prompt)), args.max_tokens, self.context_size)
                    live.append(i)
                except ContextExceededError as exc:
                    results[i] = exc
            if not live:
                return [r for r in results if r is not None]
            encoded = tokenizer([prompts[i] for i in live], add_special_tokens=False, padding=True, return_tensors="pt")
        encoded = encoded.to(self.device)
        input_ids, attention = encoded["input_ids"], encoded["attention_mask"]
        padded_length = int(input_ids.shape[1])

        max_new_tokens = args.max_tokens
        if config.get("cot_output"):
            # clembench lets thinking models use the whole context; the room left is the real bound
            max_new_tokens = max(1, self.context_size - padded_length)
        sampling: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None}
        if args.temperature > 0.0:
            sampling = {"do_sample": True, "temperature": args.temperature, "top_p": model.generation_config.top_p}
        eos_ids = _eos_ids(model, tokenizer)

        def generation(row: int, sequence: Any) -> Generation:
            """Row ``row`` of the batch from its tokens (the prompt's, padded, and what was generated)."""
            new_tokens = sequence[padded_length:].tolist()
            stop = next((n for n, t in enumerate(new_tokens) if t in eos_ids), None)
            if cancels is None:  # a clembench batch keeps its padding on both sides, as clembench's does
                start, end = 0, len(sequence)
            else:  # a merged request gets exactly its own tokens, as if it had run alone
                start = int((attention[row] == 0).sum())
                end = len(sequence) if stop is None else padded_length + stop + 1
            raw = str(tokenizer.decode(sequence[start:end]))
            prompt_text = str(tokenizer.decode(input_ids[row, start:]))
            text, cot = self.chat.clean(raw, prompt_text, args.max_tokens)
            response: dict[str, Any] = {"response": raw}
            if cot is not None:
                response["cot_content"] = cot
            return Generation(
                prompt={"inputs": prompt_text, "max_new_tokens": args.max_tokens, "temperature": args.temperature},
                response=response,
                text=text,
                prompt_tokens=int(attention[row].sum()),
                completion_tokens=len(new_tokens) if stop is None else stop + 1,
                finish_reason=FinishReason.LENGTH if stop is None else FinishReason.STOP,
            )

        early: dict[int, Generation] = {}

        def row_ended(row: int, sequence: Any) -> None:
            early[row] = generation(row, sequence)
            if ended is not None:
                ended(live[row], early[row])

        if cancels is not None:
            watch = row_ended if ended is not None else None
            sampling["stopping_criteria"] = _stop_on([cancels[i] for i in live], eos_ids, watch)
            if sinks is not None:
                rows_live = [(sinks[i], cancels[i]) for i in live]
                sampling["streamer"] = BatchStreamer(tokenizer, rows_live, eos_ids)
        try:
            output = model.generate(
                input_ids,
                attention_mask=attention,
                max_new_tokens=max_new_tokens,
                return_dict_in_generate=True,
                **sampling,
            )
        except (MemoryError, RuntimeError) as exc:
            if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
                raise ResourceExhaustedError(f"out of memory while generating with {self.model_name}") from None
            raise
        sequences = output.sequences
        if cancels is not None and (gone := sum(cancels[i].is_set() for i in live)):
            steps = int(sequences.shape[1]) - padded_length
            log.info("%s: stopped %d row(s) early: their callers went away (%d steps)", self.model_name, gone, steps)
        for row, i in enumerate(live):
            results[i] = early.get(row) or generation(row, sequences[row])
        return [r for r in results if r is not None]


def _on_loop(loop: asyncio.AbstractEventLoop, sink: TextSink | None) -> TextSink | None:
    """``sink``, callable from the generation thread: each piece is handed to the event loop."""
    if sink is None:
        return None

    def hand_over(piece: str) -> None:
        loop.call_soon_threadsafe(sink, piece)

    return hand_over


class IncrementalDecoder:
    """One row's text as its tokens arrive: each new token yields the text it adds. A token that ends in
    the middle of a multi-byte character (decoded as U+FFFD) is held back until the character is whole."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._tokens: list[int] = []
        self._sent = 0

    def push(self, token: int) -> str:
        self._tokens.append(token)
        text = self._decode(self._tokens)  # the whole row each time: exactly the final decode's text
        if text.endswith("\ufffd"):
            return ""
        piece, self._sent = text[self._sent :], len(text)
        return piece

    def flush(self) -> str:
        """What is still held back once no token follows (an incomplete character, as the final decode has it)."""
        text = self._decode(self._tokens)
        piece, self._sent = text[self._sent :], len(text)
        return piece


class BatchStreamer:
    """transformers' streamer interface for a whole batch, called from the generation thread: the first
    ``put`` is the prompts, then one new token per row per step. A row's text goes to its sink until its
    end-of-sequence token (included, as the reply's raw text keeps special tokens) or its caller leaves;
    padding after that and rows without a sink emit nothing."""

    def __init__(self, tokenizer: Any, rows: Sequence[tuple[TextSink | None, threading.Event]], eos: set[int]) -> None:
        self._rows = [(sink, cancel, IncrementalDecoder(tokenizer.decode)) for sink, cancel in rows]
        self._eos = eos
        self._open = [sink is not None for sink, _ in rows]

    def put(self, value: Any) -> None:
        if value.dim() > 1:
            return  # the prompts
        for row, token in enumerate(value.tolist()):
            sink, cancel, decoder = self._rows[row]
            if not self._open[row] or cancel.is_set():
                continue
            self._send(sink, decoder.push(int(token)))
            if token in self._eos:
                self._open[row] = False

    def end(self) -> None:
        """The rows cut at max_tokens: what they held back, so the pieces add up to the decoded text."""
        for row, (sink, cancel, decoder) in enumerate(self._rows):
            if self._open[row] and not cancel.is_set():
                self._send(sink, decoder.flush())

    @staticmethod
    def _send(sink: TextSink | None, piece: str) -> None:
        if piece and sink is not None:
            sink(piece)


def _stop_on(cancels: Sequence[threading.Event], eos: set[int], ended: Callable[[int, Any], None] | None = None) -> Any:
    """A stopping criterion, checked after each token: a row stops once its caller has gone. With
    ``ended``, a row that has just produced its end-of-sequence token is handed over with its tokens."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    finished: set[int] = set()

    class CallerGone(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            gone = [event.is_set() for event in cancels]
            if ended is not None:
                for row, token in enumerate(input_ids[:, -1].tolist()):
                    if token in eos and row not in finished and not gone[row]:
                        finished.add(row)  # later tokens of a finished row are padding
                        ended(row, input_ids[row])
            return torch.tensor(gone, device=input_ids.device)

    return StoppingCriteriaList([CallerGone()])


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = model.generation_config.eos_token_id
    found = set(ids) if isinstance(ids, list) else ({ids} if ids is not None else set())
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return found


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
