"""``huggingface_local``: transformers models in the server process, as clembench runs them.

Follows clembench's HuggingfaceLocalModel (spec section 5.1): chat template choice, pad token and
padding side, context size, the context check before generating, greedy at temperature 0, decoding
each row with special tokens kept, and the cleaning order. Generation runs in one worker thread per
model, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from clemserve.registry import ModelSpec
from clemserve.registry.errors import ContextExceededError, InvalidArgumentError

from ..domain import FinishReason, GenArgs, Generation, Message, Outcome, PrefixReuse, Row, TokenCount
from ..memory import Estimate, KvRoom, Sizing, free_memory
from . import footprint, gguf, hub, placement, prefix_cache
from .base import BatchingBackend, Progress, RowDone, missing_dependency
from .chat import (
    CHAT_CONFIG,
    ChatTokenizer,
    check_chat_config,
    context_size,
    precondition,
    refuse_images,
    weights_missing,
)
from .huggingface_multimodal import is_multimodal
from .prefix_cache import PrefixCache
from .stream_decoding import BatchStreamer, on_loop
from .weights import model_config

log = logging.getLogger(__name__)

#: model_config keys this backend reads
KNOWN_CONFIG = CHAT_CONFIG | {
    "padding_side", "load_in_8bit", "load_in_4bit", "attn_implementation", "peft_model", "multimodal", "gguf",
    "number_gpus",
}  # fmt: skip
_ENCODER_ONLY = {"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta"}


class HuggingfaceLocalBackend(placement.DeviceWorker, BatchingBackend):
    name = "huggingface_local"
    # one generate call at a time (the worker thread); the scheduler merges waiting requests into it
    concurrency = 1
    #: the KV cache its batches may hold (residency hands it over once the model is loaded; None: unchecked)
    kv: KvRoom | None = None
    #: KV states kept by prompt prefix (None: off; docs/prefix-cache.md), and why it is off
    prefix: PrefixCache | None = None
    prefix_off = "--prefix-cache 0"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._start_worker()

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
        await self._load_placed(config, functools.partial(self._load_blocking, config, progress))

    def _check_config(self, config: dict[str, Any]) -> None:
        """Refuse what cannot be honoured here at load time, instead of at the first call."""
        check_chat_config(self.spec, config, self.name, KNOWN_CONFIG)
        placement.check_loading_options(config)

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

        progress(f"loading tokenizer and config from {source}", 0.35)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **token_kwargs)
            hf_config = AutoConfig.from_pretrained(source, **token_kwargs)
        except (OSError, ValueError) as exc:  # ValueError: a folder without tokenizer files
            raise weights_missing(self.model_name, source, exc) from None
        chat = ChatTokenizer(tokenizer, config, self.model_name)
        tokenizer.padding_side = self._padding_side(config, hf_config)

        remote_code: dict[str, Any] = {"trust_remote_code": True} if config.get("trust_remote_code") else {}
        progress("loading weights", 0.4)
        model, where = self._load_weights(AutoModelForCausalLM, source, config, {**token_kwargs, **remote_code})
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.eos_token_id

        self.chat = chat
        self.tokenizer = tokenizer
        self.model = model
        self.prefix = self._prefix_cache(model, tokenizer.padding_side)
        self.device = next(model.parameters()).device
        self.context_size = context_size(hf_config, tokenizer, self.spec)
        self.eos_ids = _eos_ids(model, tokenizer)
        progress(f"ready: context size {self.context_size}, device {where}", 1.0)

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

    def _prefix_cache(self, model: Any, padding_side: str) -> PrefixCache | None:
        """The model's prefix cache: --prefix-cache's bytes, else by default one for float32 weights only, where
        reusing states was measured to give the same greedy outputs as computing them (docs/prefix-cache.md)."""
        import torch

        setting = self.context.prefix_cache_bytes
        if setting == 0:
            return None
        why = prefix_cache.unsupported(model) or (None if padding_side == "left" else "right padding")
        if why is None and setting is None and model.dtype != torch.float32:
            why = f"{str(model.dtype).removeprefix('torch.')} weights (a size for --prefix-cache turns it on)"
        if why is not None:
            log.info("%s: no prefix cache: %s", self.model_name, why)
            self.prefix_off = why
            return None
        return PrefixCache(setting or prefix_cache.DEFAULT_BYTES)

    def prefix_reuse(self) -> PrefixReuse:
        if self.prefix is None:
            return PrefixReuse(f"off: {self.prefix_off}")
        return PrefixReuse(f"prefix cache up to {self.prefix.limit / 2**20:.0f} MiB", self.prefix.bytes)

    async def unload(self) -> None:
        def drop() -> None:  # what they held is collected by the server's free_memory, right after
            self.__dict__.pop("model", None)
            self.__dict__.pop("tokenizer", None)
            self.__dict__.pop("prefix", None)

        await self._stop_worker(drop)

    # -- generation ---------------------------------------------------------------------------

    async def generate_rows(self, rows: Sequence[Row], args: GenArgs, done: RowDone | None = None) -> list[Outcome]:
        """Independent requests merged into one batched call by the scheduler; a row's error is its own.
        A row with a sink (a streamed request) gets its text token by token as it is generated. A row that
        ends (its end-of-sequence token) before the batch does is handed to ``done`` at once, on the event
        loop, so that its caller has its answer without waiting for the batch's longest row."""
        loop = asyncio.get_running_loop()
        # the generation thread hands text and early results over to the event loop
        rows = [dataclasses.replace(row, sink=on_loop(loop, row.sink)) for row in rows]
        ended = None
        if done is not None:

            def ended(row: int, generation: Generation) -> None:
                loop.call_soon_threadsafe(done, row, generation)

        return await loop.run_in_executor(self._executor, self._generate_on_device, rows, args, ended)

    async def count_tokens(self, messages: Sequence[Message]) -> TokenCount:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._count_blocking, messages)

    def _count_blocking(self, messages: Sequence[Message]) -> TokenCount:
        prompt = self.chat.render([messages])[0]
        return TokenCount(len(self.chat.token_ids(prompt)), self.context_size, prompt)

    def _generate_on_device(
        self, rows: Sequence[Row], args: GenArgs, ended: Callable[[int, Generation], None] | None
    ) -> list[Outcome]:
        """``_generate_blocking``, with a failure of the device made what it means for the model: a CUDA error
        kills the backend (the server unloads it; the next request loads it again), out of memory fails this
        call with RESOURCE_EXHAUSTED and hands torch's cached blocks back."""
        generate = functools.partial(self._generate_blocking, rows, args, ended)
        return placement.on_device(self.model_name, "generating", generate, free_memory)

    def _generate_blocking(
        self, rows: Sequence[Row], args: GenArgs, ended: Callable[[int, Generation], None] | None
    ) -> list[Outcome]:
        """One ``model.generate`` call for the rows that pass their checks; the others get their errors.
        ``ended`` is told a row's result (by its index in ``rows``) as soon as that row has ended. The batch is
        admitted against the model's KV-cache room (``kv``) first: rows that do not fit together run as
        smaller batches, one after the other; a row that does not fit alone gets RESOURCE_EXHAUSTED. With a
        prefix cache, the prompts' cached prefixes are reused and only the rest is computed."""
        prompts, lengths, errors = self._check(rows, args)
        outcomes: dict[int, Outcome] = dict(errors)
        new_tokens = self.context_size if self.model_config.get("cot_output") else args.max_tokens
        runs, refused = self.kv.groups(lengths, new_tokens) if self.kv else ([list(prompts)] if prompts else [], {})
        outcomes.update(refused)
        for live in runs:
            encoded = self._encode([prompts[i] for i in live])
            tokens = max(lengths[i] for i in live) + new_tokens
            if self.prefix is not None and self.kv is not None:  # the cache keeps to what the batch leaves
                self.prefix.fit(self.kv.allowance - self.kv.need(len(live), tokens))
            with self.kv.holding(len(live), tokens) if self.kv else contextlib.nullcontext():
                states, cached = self._prefill(encoded)
                watch = None
                if ended is not None:

                    def watch(
                        n: int,
                        sequence: Any,
                        live: list[int] = live,
                        encoded: Any = encoded,
                        cached: list[int] = cached,
                    ) -> None:
                        outcomes[live[n]] = generation = self._decode(encoded, n, sequence, args, cached[n])
                        ended(live[n], generation)  # n: among live

                sequences = self._run(encoded, args, [rows[i] for i in live], watch, states)
            for n, i in enumerate(live):
                if i not in outcomes:  # an early result stands
                    outcomes[i] = self._decode(encoded, n, sequences[n], args, cached[n])
        return [outcomes[i] for i in range(len(rows))]

    def _prefill(self, encoded: Any) -> tuple[Any, list[int]]:
        """The batch's prompt states from the prefix cache (None without one) and each row's tokens reused."""
        if self.prefix is None:
            return None, [0] * int(encoded["input_ids"].shape[0])
        states, reuse = prefix_cache.prefill(self.prefix, self.model, encoded)
        return states, reuse.reused

    def _check(
        self, rows: Sequence[Row], args: GenArgs
    ) -> tuple[dict[int, str], dict[int, int], dict[int, BaseException]]:
        """Each row's checks (text only; its prompt and max_tokens fit the context) -> the prompts of those that
        pass and their lengths in tokens (by row index), and the others' errors."""
        prompts: dict[int, str] = {}
        lengths: dict[int, int] = {}
        errors: dict[int, BaseException] = {}
        for i, row in enumerate(rows):
            try:
                refuse_images(row.messages, self.model_name)
                prompt = self.chat.render([row.messages])[0]
                length = len(self.chat.token_ids(prompt))
                self.chat.check_context(length, args.max_tokens, self.context_size)
                prompts[i], lengths[i] = prompt, length
            except (InvalidArgumentError, ContextExceededError) as exc:
                errors[i] = exc
        return prompts, lengths, errors

    def _encode(self, prompts: list[str]) -> Any:
        """The prompts as one padded batch on the model's device."""
        encoded = self.tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
        return encoded.to(self.device)

    def _run(
        self, encoded: Any, args: GenArgs, rows: Sequence[Row], ended: Callable[[int, Any], None] | None, states: Any
    ) -> Any:
        """``model.generate`` on the encoded rows -> each row's tokens (its padded prompt, then what was
        generated). A row stops once its caller has left; ``ended`` is told a row's tokens once it has ended.
        ``states``: the prompts' KV states but their last tokens (from the prefix cache), or None; the prefix
        cache keeps each row's prompt and reply afterwards."""
        model, length = self.model, int(encoded["input_ids"].shape[1])
        max_new_tokens = args.max_tokens
        if self.model_config.get("cot_output"):
            # clembench lets thinking models use the whole context; the room left is the real bound
            max_new_tokens = max(1, self.context_size - length)
        sampling: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None}
        if args.temperature > 0.0:
            sampling = {"do_sample": True, "temperature": args.temperature, "top_p": model.generation_config.top_p}
        sampling["stopping_criteria"] = _stop_on([row.cancel for row in rows], self.eos_ids, ended)
        if any(row.sink is not None for row in rows):
            sampling["streamer"] = BatchStreamer(self.tokenizer, rows, self.eos_ids)
        if states is not None:
            sampling[prefix_cache.cache_argument(model)] = states
        output = model.generate(
            encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            max_new_tokens=max_new_tokens,
            return_dict_in_generate=True,
            **sampling,
        )
        sequences = output.sequences
        if self.prefix is not None:
            kept = [
                None if row.cancel.is_set() else self._own_tokens(sequences[n, length:]) for n, row in enumerate(rows)
            ]
            prefix_cache.remember(self.prefix, encoded, output, kept)
        if gone := sum(row.cancel.is_set() for row in rows):
            steps = int(sequences.shape[1]) - length
            log.info("%s: stopped %d row(s) early: their callers went away (%d steps)", self.model_name, gone, steps)
        return sequences

    def _own_tokens(self, new_tokens: Any) -> int:
        """How many of a row's new tokens are its own: through its end-of-sequence token, else all."""
        stop = next((k for k, token in enumerate(new_tokens.tolist()) if token in self.eos_ids), None)
        return len(new_tokens) if stop is None else stop + 1

    def _decode(self, encoded: Any, n: int, sequence: Any, args: GenArgs, cached: int = 0) -> Generation:
        """Row ``n``'s Generation from its tokens: exactly its own prompt and reply, as if it had run alone
        (without the batch's padding, and without what follows its end-of-sequence token). ``cached``: its
        prompt tokens the prefix cache served."""
        length, attention = int(encoded["input_ids"].shape[1]), encoded["attention_mask"][n]
        new_tokens = sequence[length:].tolist()
        stop = next((k for k, token in enumerate(new_tokens) if token in self.eos_ids), None)
        start = int((attention == 0).sum())
        end = len(sequence) if stop is None else length + stop + 1
        raw = str(self.tokenizer.decode(sequence[start:end]))
        prompt_text = str(self.tokenizer.decode(encoded["input_ids"][n, start:]))
        text, cot = self.chat.clean(raw, prompt_text, args.max_tokens)
        response: dict[str, Any] = {"response": raw}
        if cot is not None:
            response["cot_content"] = cot
        return Generation(
            prompt={"inputs": prompt_text, "max_new_tokens": args.max_tokens, "temperature": args.temperature},
            response=response,
            text=text,
            prompt_tokens=int(attention.sum()),
            completion_tokens=len(new_tokens) if stop is None else stop + 1,
            finish_reason=FinishReason.LENGTH if stop is None else FinishReason.STOP,
            cached_prompt_tokens=cached,
        )


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


def estimate(spec: ModelSpec, sizing: Sizing) -> Estimate:
    """The safetensors headers of the weight files (dtype and shape of every tensor), else the parameter count
    from ``config.json``, times the bytes of the dtype the model loads in (``dtype="auto"``: the checkpoint's
    ``torch_dtype``, float32 when it names none); a GGUF file's tensors counted as float32, which is what its
    one-time conversion writes. ``load_in_4bit`` and ``load_in_8bit`` count the linear layers' weights at the
    quantised size (4 bits plus a float32 scale per 64 weights; 8 bits plus one per row); embeddings and norms
    stay as they are. Plus the KV-cache allowance of :func:`footprint.with_kv` (transformers allocates the
    cache as a batch grows, so each batch is checked again when it is admitted: memory.KvRoom); a
    vision-language model runs one row at a time."""
    config = model_config(spec)
    if is_multimodal(config):
        sizing = dataclasses.replace(sizing, max_batch=1)
    if "gguf" in config:
        path = gguf.locate(config["gguf"]["distribution"], config["gguf"]["file"])
        parameters, hf_config = footprint.gguf_weights(path, sizing.cache_dir)
        found = Estimate(parameters * footprint.DTYPE_BYTES["float32"], source="gguf header")
        return footprint.with_kv(found, hf_config, 4, spec, sizing)
    if (remote := hub.estimate(spec, sizing)) is not None:  # not here yet: what the hub lists
        return remote
    folder = footprint.local_folder(str(spec.get("huggingface_id", "")))
    try:
        hf_config = footprint.read_config(folder)
    except (OSError, ValueError):  # no readable config.json: the weight files alone
        hf_config = {}
    dtype_bytes = footprint.dtype_bytes(hf_config)
    bits = 4 if config.get("load_in_4bit") else 8 if config.get("load_in_8bit") else 0
    weights, source = _weights(folder, hf_config, dtype_bytes, bits)
    if bits and source != "weight files":
        source += f", linear layers at {bits} bits"
    return footprint.with_kv(Estimate(weights, source=source), hf_config, dtype_bytes, spec, sizing)


def _weights(folder: Path, hf_config: dict[str, Any], dtype_bytes: int, bits: int) -> tuple[int, str]:
    """The weights' bytes, rough rather than none: the safetensors headers, else the weight files' sizes, else
    the parameter count from ``config.json``."""
    try:
        tensors = footprint.safetensors_tensors(folder)
    except ValueError as exc:
        log.info("%s: %s; estimating from the files' sizes", folder, exc)
        tensors = []
    if tensors:
        return footprint.tensor_bytes(tensors, bits), "safetensors headers"
    if bits:  # the files hold the weights unquantised: the config's count at the quantised size is closer
        with contextlib.suppress(KeyError, TypeError, ZeroDivisionError):
            return footprint.config_bytes(hf_config, dtype_bytes, bits), "config.json"
    on_disk = footprint.weight_files_bytes(folder)
    if on_disk:
        return on_disk, "weight files"
    return footprint.config_bytes(hf_config, dtype_bytes, bits), "config.json"
