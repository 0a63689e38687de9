"""``vllm``: local models on vLLM's asynchronous engine inside the server.

One ``AsyncLLM`` per loaded model. Every Generate call becomes one engine request, so concurrent callers
(any number of game processes) are batched continuously by vLLM itself. Prompts are rendered with the
model's chat template exactly as ``huggingface_local`` renders them, and the engine receives the token ids
of that rendering: no second tokenization, so no doubled BOS (clembench's old vLLM backend had one).

On GPUs the engine runs on the GPUs admission placed it on (its process started with ``CUDA_VISIBLE_DEVICES``
naming them), and, unless the entry sets ``gpu_memory_utilization`` or ``kv_cache_memory_bytes`` itself, in
the room admission granted there: its KV cache is what the grant leaves after the weights and the engine's
overhead (``kv_cache_memory_bytes``), not vLLM's default 90% of each GPU.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging
import math
import os
from collections.abc import MutableMapping, Sequence
from typing import Any

from clemserve.registry.errors import (
    ClemserveError,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
)

from .. import gpus as gpu_reader
from ..devices import Grant
from ..domain import FinishReason, GenArgs, Generation, Message, PrefixReuse, TextSink, TokenCount
from ..memory import Estimate, Sizing
from . import footprint
from .base import Backend, BackendDeadError, Progress, missing_dependency
from .chat import (
    CHAT_CONFIG,
    ChatTokenizer,
    check_chat_config,
    context_size,
    engine_prompt,
    refuse_images,
    weights_missing,
)
from .weights import model_config

log = logging.getLogger(__name__)

KNOWN_CONFIG = CHAT_CONFIG | {"number_gpus", "vllm_args", "slow_tokenizer"}
#: SamplingParams fields that clemserve sets itself or that would change the reply's shape
_RESERVED_ARGS = frozenset({"n", "max_tokens", "temperature", "output_kind", "detokenize", "logprobs"})
_request_numbers = itertools.count()
#: what an engine takes on each GPU beyond its weights and KV cache: its CUDA context, the activations of its
#: profile run, CUDA graphs
ENGINE_OVERHEAD = 2 * 2**30
#: the least KV cache an engine is given on each GPU where its model's shape is unknown
KV_FLOOR = 512 * 2**20


class VLLMBackend(Backend):
    name = "vllm"

    async def load(self, progress: Progress) -> None:
        config = self.model_config
        check_chat_config(self.spec, config, self.name, KNOWN_CONFIG)
        if config.get("multimodal"):  # rather than a vision-language model that silently never sees an image
            raise FailedPreconditionError(
                f"{self.model_name}: the vllm backend serves text models only; serve this multimodal entry on "
                "huggingface_local",
                subject="model_config.multimodal",
            )
        spawn_workers(os.environ)
        try:
            from transformers import AutoConfig, AutoTokenizer
            from vllm import AsyncEngineArgs, SamplingParams
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise missing_dependency(self.name, "vllm", exc) from None
        self._sampling_params = SamplingParams
        self.sampling_fields = _sampling_fields(SamplingParams)
        source = str(self.spec["huggingface_id"])
        token = self.context.keys.get_key_for("huggingface")["api_key"] if config.get("requires_api_key") else None

        def read_tokenizer() -> tuple[Any, Any]:
            try:
                return AutoTokenizer.from_pretrained(source, token=token), AutoConfig.from_pretrained(
                    source, token=token
                )
            except (OSError, ValueError) as exc:
                raise weights_missing(self.model_name, source, exc) from None

        progress(f"reading tokenizer and config from {source}", 0.1)
        tokenizer, hf_config = await asyncio.to_thread(read_tokenizer)
        self.chat = ChatTokenizer(tokenizer, config, self.model_name)
        self.context_size = context_size(hf_config, tokenizer, self.spec)

        engine_args = self._engine_args(AsyncEngineArgs, source, token)
        progress(f"starting the vLLM engine ({', '.join(f'{k}={v}' for k, v in sorted(engine_args.items()))})", 0.3)
        grant = self.context.grant
        try:
            # building the engine profiles memory and warms up: seconds to minutes, so not on the event loop
            start = functools.partial(AsyncLLM.from_engine_args, AsyncEngineArgs(**engine_args))
            if grant.gpus:  # its process sees its GPUs only, as CUDA's 0 to n - 1
                start = functools.partial(gpu_reader.start_seeing, grant.cuda_visible_devices, start)
            self.engine = await asyncio.to_thread(start)
        except (OSError, ValueError, RuntimeError) as exc:
            raise engine_start_failure(self.model_name, source, exc) from None
        #: where it runs, for provenance
        self.device = ",".join(f"cuda:{gpu}" for gpu in grant.gpus)
        self.context_size = min(self.context_size, int(engine_args.get("max_model_len") or self.context_size))
        progress(f"ready: context size {self.context_size}", 1.0)

    def _engine_args(self, engine_args_class: Any, source: str, token: str | None) -> dict[str, Any]:
        """clembench's defaults (tensor_parallel_size from number_gpus, the model's context), then vllm_args."""
        config = self.model_config
        vllm_args = config.get("vllm_args", {})
        if not isinstance(vllm_args, dict):
            raise InvalidArgumentError("model_config.vllm_args", "must be an object of vLLM engine arguments")
        known = {f.name for f in dataclasses.fields(engine_args_class)}
        unknown = sorted(set(vllm_args) - known)
        if unknown:
            raise InvalidArgumentError(
                f"model_config.vllm_args.{unknown[0]}",
                f"vLLM has no engine argument(s) {', '.join(unknown)} (registry entry {self.model_name})",
            )
        args: dict[str, Any] = {
            "model": source,
            "tokenizer": source,
            "tensor_parallel_size": int(config.get("number_gpus") or 1),
            "max_model_len": self.context_size,
            "disable_log_stats": True,
            # vLLM turns automatic prefix caching on by default for a generative model; said here so that no
            # default of a later version turns it off unnoticed (an entry's vllm_args may still turn it off)
            **({"enable_prefix_caching": True} if "enable_prefix_caching" in known else {}),
            **({"hf_token": token} if token and "hf_token" in known else {}),
            **granted_memory(self.model_name, vllm_args, self.context.grant),
            **vllm_args,
        }
        if config.get("trust_remote_code"):
            args["trust_remote_code"] = True
        return args

    async def unload(self) -> None:
        engine = self.__dict__.pop("engine", None)
        if engine is not None:
            await asyncio.to_thread(engine.shutdown)

    def prefix_reuse(self) -> PrefixReuse:
        """vLLM's automatic prefix caching, as the running engine has it (its KV blocks are vLLM's own)."""
        cache = getattr(getattr(getattr(self, "engine", None), "vllm_config", None), "cache_config", None)
        if cache is None:
            return PrefixReuse()
        return PrefixReuse("vllm automatic prefix caching" if cache.enable_prefix_caching else "off (vllm_args)")

    def engine_requests(self) -> int:
        """Requests the engine holds now (running or waiting)."""
        engine = getattr(self, "engine", None)
        return int(engine.get_num_unfinished_requests()) if engine is not None else 0

    # -- generation ---------------------------------------------------------------------------

    def check_args(self, args: GenArgs) -> None:
        """vLLM's own check, against SamplingParams' fields, runs when the request's sampling is built."""

    def _sampling(self, args: GenArgs) -> Any:
        unknown = sorted(set(args.extra) - self.sampling_fields)
        if unknown:
            raise InvalidArgumentError(
                f"args.{unknown[0]}",
                f"vLLM's SamplingParams takes no {', '.join(unknown)}; it takes temperature, max_tokens and "
                f"{', '.join(sorted(self.sampling_fields)[:12])}, ...",
            )
        try:
            # temperature 0 is greedy in vLLM; special tokens are kept, as huggingface_local keeps them,
            # so eos_to_cull and the CoT tags work the same on both
            return self._sampling_params(
                temperature=args.temperature,
                max_tokens=args.max_tokens,
                skip_special_tokens=False,
                **args.extra,
            )
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError("args", f"vLLM refused the sampling parameters: {exc}") from None

    async def generate(self, messages: Sequence[Message], args: GenArgs, sink: TextSink | None = None) -> Generation:
        refuse_images(messages, self.model_name)
        sampling = self._sampling(args)
        prompt, ids = await asyncio.to_thread(self._prompt, messages)  # templating and tokenizing take CPU time
        self.chat.check_context(len(ids), args.max_tokens, self.context_size)
        from vllm.inputs import TokensPrompt

        request_id = f"clemserve-{os.getpid()}-{next(_request_numbers)}"
        final = None
        sent = 0
        try:
            async for output in self.engine.generate(TokensPrompt(prompt_token_ids=ids), sampling, request_id):
                final = output
                if sink is not None:  # outputs are cumulative (the default output kind): send what is new
                    sink(output.outputs[0].text[sent:])
                    sent = len(output.outputs[0].text)
        except asyncio.CancelledError:
            # the caller went away or its deadline passed: free the engine's slot at once
            await self.engine.abort(request_id)
            log.info("aborted vLLM request %s; the engine now holds %d request(s)", request_id, self.engine_requests())
            raise
        except Exception as exc:
            if self.engine.errored:
                raise BackendDeadError(f"the vLLM engine of {self.model_name} stopped: {exc}") from exc
            raise
        assert final is not None
        completion = final.outputs[0]
        text, cot = self.chat.clean(completion.text, "", args.max_tokens)
        response: dict[str, Any] = {"response": completion.text}
        if cot is not None:
            response["cot_content"] = cot
        return Generation(
            prompt=engine_prompt(prompt, args),
            response=response,
            text=text,
            prompt_tokens=len(ids),
            completion_tokens=len(completion.token_ids),
            finish_reason=FinishReason.LENGTH if completion.finish_reason == "length" else FinishReason.STOP,
            cached_prompt_tokens=int(getattr(final, "num_cached_tokens", None) or 0),
        )

    def _prompt(self, messages: Sequence[Message]) -> tuple[str, list[int]]:
        prompt = self.chat.render([messages])[0]
        return prompt, self.chat.token_ids(prompt)

    async def count_tokens(self, messages: Sequence[Message]) -> TokenCount:
        prompt, ids = await asyncio.to_thread(self._prompt, messages)
        return TokenCount(len(ids), self.context_size, prompt)


#: what vLLM says when the engine's memory does not fit: its KV cache, or its share of a GPU
_OUT_OF_MEMORY = (
    "kv cache",
    "cache blocks",
    "gpu memory utilization",
    "gpu_memory_utilization",
    "out of memory",
    "free memory on device",
)


def engine_start_failure(model_name: str, source: str, exc: BaseException) -> ClemserveError:
    """What a failed engine start is: memory that does not fit (RESOURCE_EXHAUSTED, with vLLM's numbers),
    weights that cannot be read (an OSError: FAILED_PRECONDITION naming huggingface_id), engine arguments vLLM
    refused, or an engine core that died starting (its own error is in the server log, just before)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if any(marker in str(exc).lower() for marker in _OUT_OF_MEMORY):
        return ResourceExhaustedError(
            f"the vLLM engine of {model_name} does not fit: {first} (set model_config.vllm_args: a lower "
            "max_model_len, a higher gpu_memory_utilization, or more GPUs with tensor_parallel_size)",
            metadata={"field": "model_config.vllm_args"},
        )
    if isinstance(exc, OSError):
        return weights_missing(model_name, source, exc)
    if isinstance(exc, ValueError):
        return FailedPreconditionError(
            f"vLLM refused the engine of {model_name}: {first}", subject="model_config.vllm_args"
        )
    return FailedPreconditionError(
        f"the vLLM engine of {model_name} failed to start: {first}; the engine's own error is in the server log "
        "just before this line (often its KV cache or its GPU share does not fit: see model_config.vllm_args)",
        subject="model_config.vllm_args",
    )


def _sampling_fields(sampling_params: Any) -> frozenset[str]:
    """The generation arguments SamplingParams accepts (a msgspec struct here, a dataclass in older vLLM)."""
    if dataclasses.is_dataclass(sampling_params):
        fields: Sequence[str] = [f.name for f in dataclasses.fields(sampling_params)]
    else:
        fields = getattr(sampling_params, "__struct_fields__", ())
    return frozenset(f for f in fields if not f.startswith("_")) - _RESERVED_ARGS


def granted_memory(model_name: str, vllm_args: dict[str, Any], grant: Grant) -> dict[str, Any]:
    """The engine's memory sized from what admission granted on each of its GPUs, where the entry sets neither
    ``gpu_memory_utilization`` nor ``kv_cache_memory_bytes``: ``kv_cache_memory_bytes``, the grant less the
    weights and the engine's overhead (at least :data:`KV_FLOOR`), and a ``gpu_memory_utilization`` of the
    weights and that KV cache, which vLLM then only checks is free at start ({} on the CPU, or not placed)."""
    if not grant.gpus or not grant.gpu_bytes or {"gpu_memory_utilization", "kv_cache_memory_bytes"} & set(vllm_args):
        return {}
    gpus, found = len(grant.gpus), grant.estimate
    kv = max(KV_FLOOR, grant.per_gpu - (found.weights + found.overhead) // gpus)
    share = min(0.99, max(0.01, math.floor((found.weights // gpus + kv) / grant.gpu_bytes * 1e4) / 1e4))
    log.info(
        "%s: kv_cache_memory_bytes=%d (%.2f GiB) on each of %d GPU(s), from the %.2f GiB admitted there less "
        "%.2f GiB of weights and %.2f GiB of engine overhead; gpu_memory_utilization=%g",
        model_name,
        kv,
        kv / 2**30,
        gpus,
        grant.per_gpu / 2**30,
        found.weights / gpus / 2**30,
        found.overhead / gpus / 2**30,
        share,
    )
    return {"kv_cache_memory_bytes": kv, "gpu_memory_utilization": share}


def spawn_workers(environ: MutableMapping[str, str]) -> None:
    """vLLM starts its engine core and workers with ``fork`` unless told otherwise; a fork of this threaded server
    (gRPC's threads, the event loop, torch's pools) can inherit a lock held by a thread that the child does not
    have, and hang. ``spawn`` starts them clean. An operator's own VLLM_WORKER_MULTIPROC_METHOD is kept."""
    environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


def tensor_parallel_size(config: dict[str, Any]) -> int:
    """The GPUs an entry runs on: ``vllm_args.tensor_parallel_size``, else ``number_gpus``, else 1."""
    args = config.get("vllm_args", {}) if isinstance(config.get("vllm_args"), dict) else {}
    value = args.get("tensor_parallel_size") or config.get("number_gpus") or 1
    return max(1, int(value)) if isinstance(value, int | str) and str(value).isdigit() else 1


def estimate(spec: Any, sizing: Sizing) -> Estimate:
    """The weights (safetensors headers, else ``config.json``'s parameters at its dtype) plus the engine's
    KV-cache space: ``vllm_args.kv_cache_memory_bytes`` per GPU; else, where the entry sets
    ``gpu_memory_utilization``, that share of each of its ``tensor_parallel_size`` GPUs minus the weights (vLLM
    takes that share whole, on every GPU it uses, and refuses to start where a GPU has less free); else on a
    GPU the KV cache of ``--kv-cache-tokens`` tokens, or of one request at the model's whole context where that
    is more (vLLM refuses to start without room for one), which the engine is then given
    (:func:`granted_memory`); on a CPU ``VLLM_CPU_KVCACHE_SPACE`` GiB. On GPUs, plus the engine's overhead on
    each (:data:`ENGINE_OVERHEAD`) where no share covers it."""
    config = model_config(spec)
    folder = footprint.local_folder(str(spec.get("huggingface_id", "")))
    weights = footprint.safetensors_bytes(folder)
    try:
        hf_config = footprint.read_config(folder)
    except (OSError, ValueError):
        hf_config = {}
    if not weights:
        weights = footprint.parameter_count(hf_config) * footprint.dtype_bytes(hf_config)
    args = config.get("vllm_args", {}) if isinstance(config.get("vllm_args"), dict) else {}
    gpus = tensor_parallel_size(config)
    overhead = ENGINE_OVERHEAD * gpus if sizing.gpu_bytes else 0
    if args.get("kv_cache_memory_bytes"):  # a KV cache of a given size: no share is taken
        kv = int(args["kv_cache_memory_bytes"]) * gpus
        return Estimate(weights, kv, "vllm_args.kv_cache_memory_bytes", gpus=gpus, overhead=overhead)
    if not sizing.gpu_bytes:
        space = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"))  # vLLM's CPU default is 4 GiB
        return Estimate(weights, int(space * 2**30), "vllm VLLM_CPU_KVCACHE_SPACE", gpus=gpus)
    if "gpu_memory_utilization" in args:
        share = float(args["gpu_memory_utilization"])
        kv = max(0, int(sizing.gpu_bytes * share) * gpus - weights)
        field = "model_config.vllm_args.gpu_memory_utilization"
        source = f"vllm gpu_memory_utilization on {gpus} GPU(s)"
        return Estimate(weights, kv, source, gpu_share=share, gpus=gpus, share_field=field)
    tokens = max(sizing.kv_tokens, int(args.get("max_model_len") or footprint.context(hf_config, spec)))
    kv = max(_kv_per_token(hf_config, args) * tokens, KV_FLOOR * gpus)
    return Estimate(weights, kv, f"vllm KV cache for {tokens} tokens", gpus=gpus, overhead=overhead)


def _kv_per_token(hf_config: dict[str, Any], args: dict[str, Any]) -> int:
    """One token's keys and values over every layer, at the KV cache's dtype (0: the config does not say)."""
    dtype = 1 if str(args.get("kv_cache_dtype", "auto")).startswith("fp8") else footprint.dtype_bytes(hf_config)
    try:
        return footprint.kv_cache_bytes(hf_config, dtype, 1, 1)
    except (KeyError, TypeError, ZeroDivisionError):
        return 0
