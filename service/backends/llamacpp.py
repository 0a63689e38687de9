"""``llamacpp``: GGUF models on llama.cpp (the llama-cpp-python binding) in the server process.

Follows clembench's LlamaCPPLocalModel (spec section 5.9): the model loads with the file's own context
(``n_ctx=0``); the prompt is the entry's chat template (the file's, or ``custom_chat_template``) rendered by
llama-cpp-python's Jinja2 formatter with BOS/EOS strings found as clembench finds them; the context check
counts the prompt's tokens as clembench does; the completion is llama-cpp's ``Llama.__call__`` with
temperature and max_tokens, its dict recorded whole; the text is stripped, split on ``output_split_prefix``
and culled with ``eos_to_cull``. Where clembench is broken (spec section 9) this backend does what it meant:
``execute_on`` / ``gpu_layers_offloaded`` place the layers, ``additional_files`` come along with a hub
download, the Hugging Face key is read from the server's keys, and an absent ``output_split_prefix`` leaves
the text alone instead of raising IndexError.

The GGUF file comes from ``model_config.gguf`` (a file shipped inside an installed Python distribution,
as the demo model's is), from a local folder named by ``huggingface_id``, or from the Hugging Face cache
(downloaded there when the server is online), matched with the ``model_config.filename`` glob.

A llama.cpp context serves one sequence at a time: generation runs in one worker thread per model, so
concurrent callers are served one after the other (the scheduler queues them fairly), off the event loop.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from clemserve.registry import ModelSpec
from clemserve.registry.errors import ClemserveError, InvalidArgumentError

from ..domain import FinishReason, GenArgs, Generation, Message, PrefixReuse, TextSink, TokenCount
from ..memory import Estimate, Sizing
from . import footprint, gguf
from .base import Backend, Progress, lower_thread_priority, missing_dependency
from .chat import check_chat_config, check_context, engine_prompt, precondition, refuse_images, weights_missing
from .stream_decoding import on_loop
from .weights import SnapshotFinder, Weights, cached_snapshot, model_config, packaged, transformers_weights

log = logging.getLogger(__name__)

NAME = "llamacpp"
#: model_config keys this backend reads
KNOWN_CONFIG = frozenset(
    {
        "filename", "additional_files", "gguf", "premade_chat_template", "custom_chat_template", "bos_string",
        "eos_string", "eos_to_cull", "output_split_prefix", "requires_api_key", "execute_on",
        "gpu_layers_offloaded", "memory_bytes",
    }
)  # fmt: skip
#: chat formats llama-cpp-python recognises in a file's template, with its BOS/EOS strings (clembench's list)
_FORMAT_CONSTANTS = {
    "chatml": ("CHATML_BOS_TOKEN", "CHATML_EOS_TOKEN"),
    "mistral-instruct": ("MISTRAL_INSTRUCT_BOS_TOKEN", "MISTRAL_INSTRUCT_EOS_TOKEN"),
}
_SEED_MAX = 2**32 - 1


class _CallerGone(Exception):
    """A request whose caller left before its turn came."""


# -- the registry entry ---------------------------------------------------------------------------


def check_config(spec: ModelSpec, config: dict[str, Any]) -> None:
    """Refuse at load what cannot be honoured, naming the field, instead of failing at the first call."""
    check_chat_config(spec, config, NAME, KNOWN_CONFIG)
    name = spec["model_name"]
    if "gguf" in config:
        source = config["gguf"]
        if not (isinstance(source, dict) and all(isinstance(source.get(k), str) for k in ("distribution", "file"))):
            raise precondition("model_config.gguf needs string fields 'distribution' and 'file'", "model_config.gguf")
    elif not isinstance(config.get("filename"), str) or not config["filename"]:
        raise precondition(
            f"registry entry {name} needs model_config.filename, the GGUF file (a glob) in {spec['huggingface_id']}",
            "model_config.filename",
        )
    extra_files = config.get("additional_files", [])
    if not (isinstance(extra_files, list) and all(isinstance(f, str) and f for f in extra_files)):
        raise precondition(
            "model_config.additional_files must be a list of file names (globs)", "model_config.additional_files"
        )
    if not config["premade_chat_template"] and not config.get("custom_chat_template"):
        raise precondition(
            f"registry entry {name} has premade_chat_template false and no model_config.custom_chat_template",
            "model_config.custom_chat_template",
        )
    for key in ("custom_chat_template", "bos_string", "eos_string", "output_split_prefix"):
        if key in config and not isinstance(config[key], str):
            raise precondition(f"model_config.{key} must be a string", f"model_config.{key}")
    if config.get("execute_on", "gpu") not in ("cpu", "gpu"):
        raise precondition(
            f"model_config.execute_on must be 'cpu' or 'gpu', not {config['execute_on']!r}", "model_config.execute_on"
        )
    layers = config.get("gpu_layers_offloaded", -1)
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < -1:
        raise precondition(
            "model_config.gpu_layers_offloaded must be a number of layers, or -1 for all of them",
            "model_config.gpu_layers_offloaded",
        )


def gpu_layers(config: dict[str, Any]) -> int:
    """llama.cpp's ``n_gpu_layers`` as clembench meant it (its check never fires, so it always offloads all):
    ``execute_on`` first (cpu: none, gpu: all), else ``gpu_layers_offloaded``, else all (-1)."""
    if "execute_on" in config:
        return 0 if config["execute_on"] == "cpu" else -1
    return int(config.get("gpu_layers_offloaded", -1))


def model_file(spec: ModelSpec, config: dict[str, Any], *, token: str | None = None, download: bool = False) -> Path:
    """The GGUF file of the entry: ``model_config.gguf``, else the one file that ``model_config.filename``
    matches in the ``huggingface_id`` folder, or in the hub's cache (downloaded first when ``download`` is
    true and the server is online, with ``additional_files``, as llama-cpp's ``from_pretrained`` does)."""
    source = config.get("gguf")
    if isinstance(source, dict):
        return gguf.locate(str(source.get("distribution")), str(source.get("file")))
    repo, pattern = str(spec["huggingface_id"]), str(config["filename"])
    if Path(repo).is_dir():
        folder = Path(repo)
    else:
        folder = _hub_snapshot(
            str(spec["model_name"]), repo, [pattern, *config.get("additional_files", [])], token, download
        )
    return match_file(folder, pattern, repo)


def _hub_snapshot(name: str, repo: str, patterns: list[str], token: str | None, download: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise missing_dependency(NAME, NAME, exc) from None
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, token=token, local_files_only=not download))
    except (OSError, ValueError) as exc:  # not cached (offline), no such repo, or not a repo id
        raise weights_missing(name, repo, exc) from None


def match_file(folder: Path, pattern: str, repo: str) -> Path:
    """The one file under ``folder`` whose relative path matches the glob (llama-cpp's rule: none or several
    is an error)."""
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    matches = [f for f in files if fnmatch.fnmatch(f, pattern)]
    if len(matches) != 1:
        found = "no file" if not matches else f"{len(matches)} files ({', '.join(matches[:4])})"
        raise precondition(
            f"{found} in {repo} match model_config.filename {pattern!r}; it must match exactly one GGUF file",
            "model_config.filename",
        )
    return folder / matches[0]


# -- prompts and text -----------------------------------------------------------------------------


def chat_template(metadata: dict[str, str], config: dict[str, Any], name: str) -> str:
    """The file's template with ``premade_chat_template``, else ``custom_chat_template``."""
    if not config["premade_chat_template"]:
        return str(config["custom_chat_template"])  # check_config saw that there is one
    template = metadata.get("tokenizer.chat_template")
    if not template:
        raise precondition(
            f"{name}: the GGUF file holds no chat template; set premade_chat_template false and "
            "model_config.custom_chat_template",
            "model_config.custom_chat_template",
        )
    return template


def special_strings(
    config: dict[str, Any],
    chat_format: str | None,
    metadata: dict[str, str],
    token_text: Callable[[int], str],
    format_constants: dict[str, tuple[str, str]],
    name: str,
) -> tuple[str, str]:
    """The BOS and EOS strings the template gets, in clembench's order: the chat format's constants, then the
    file's token ids, then the entry's ``bos_string`` / ``eos_string``."""
    bos, eos = format_constants.get(chat_format or "", (None, None))
    if "tokenizer.ggml.bos_token_id" in metadata:
        bos = token_text(int(metadata["tokenizer.ggml.bos_token_id"]))
    if "tokenizer.ggml.eos_token_id" in metadata:
        eos = token_text(int(metadata["tokenizer.ggml.eos_token_id"]))
    bos, eos = bos or config.get("bos_string"), eos or config.get("eos_string")
    for key, value in (("bos_string", bos), ("eos_string", eos)):
        if not value:
            raise precondition(
                f"{name}: the GGUF file names no {key[:3].upper()} token; set model_config.{key}", f"model_config.{key}"
            )
    return str(bos), str(eos)


def clean(completion: str, config: dict[str, Any]) -> str:
    """clembench's order: strip, the last part after ``output_split_prefix`` (when it occurs), every
    ``eos_to_cull`` match removed (no strip afterwards)."""
    text = completion.strip()
    prefix = config.get("output_split_prefix")
    if prefix and prefix in text:
        text = text.rsplit(prefix, 1)[1]
    return re.sub(config["eos_to_cull"], "", text)


class TokenWatch:
    """llama-cpp-python's stopping criterion, called as each token is sampled with the tokens evaluated so far:
    first the prompt, then each generated token once the token after it is being sampled. It stops the
    generation once the caller has gone, and sends a streamed request's text token by token (one token
    behind the sampler; ``finish`` sends the rest, so the pieces add up to the completion's text)."""

    def __init__(
        self, cancel: threading.Event, sink: TextSink | None, detokenize: Callable[[list[int], list[int]], bytes]
    ) -> None:
        self.cancel = cancel
        self.sink = sink
        self._detokenize = detokenize
        self._prompt: list[int] | None = None
        self.sent = ""
        self.calls = 0

    @property
    def prompt(self) -> list[int]:
        """The prompt's token ids as llama.cpp evaluated them (empty before the first token is sampled)."""
        return self._prompt or []

    def __call__(self, input_ids: Any, logits: Any) -> bool:
        self.calls += 1
        if self.cancel.is_set():
            return True
        if self._prompt is None:  # the first call: the prompt, evaluated
            self._prompt = [int(i) for i in input_ids]
            return False
        if self.sink is None:
            return False
        ids = [int(i) for i in input_ids]
        text = self._detokenize(ids[len(self._prompt) :], self._prompt).decode("utf-8", errors="replace")
        if not text.endswith("\ufffd") and text.startswith(self.sent) and len(text) > len(self.sent):
            piece, self.sent = text[len(self.sent) :], text  # a character cut in two waits for its rest
            self.sink(piece)
        return False

    def finish(self, completion: str) -> None:
        if self.sink is None or self.cancel.is_set():
            return
        if completion.startswith(self.sent) and len(completion) > len(self.sent):
            self.sink(completion[len(self.sent) :])
            self.sent = completion


# -- the backend ----------------------------------------------------------------------------------


class LlamaCppBackend(Backend):
    name = NAME
    supported_args = ("top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "seed")
    # one llama.cpp context, one sequence at a time; the scheduler queues the others
    concurrency = 1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"llamacpp-{self.model_name}",
            initializer=lower_thread_priority,
            initargs=(self.context.compute_nice,),
        )

    async def load(self, progress: Progress) -> None:
        config = self.model_config
        check_config(self.spec, config)
        try:
            import llama_cpp  # noqa: F401
        except ImportError as exc:
            raise missing_dependency(self.name, "llamacpp", exc) from None
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load_blocking, config, progress)

    def _load_blocking(self, config: dict[str, Any], progress: Progress) -> None:
        import llama_cpp
        from llama_cpp import llama_chat_format

        token = self.context.keys.get_key_for("huggingface")["api_key"] if config.get("requires_api_key") else None
        progress("finding the GGUF file", 0.05)
        path = model_file(self.spec, config, token=token, download=True)
        layers = gpu_layers(config)
        where = f"n_gpu_layers={layers}"
        if layers != 0 and not llama_cpp.llama_supports_gpu_offload():
            where = "on the CPU (this llama.cpp build has no GPU offload)"
        progress(f"loading {path.name} {where}", 0.3)
        try:
            model = llama_cpp.Llama(model_path=str(path), n_gpu_layers=layers, n_ctx=0, verbose=False)
        except ValueError as exc:
            field = "model_config.gguf" if "gguf" in config else "model_config.filename"
            raise precondition(f"llama.cpp cannot load {path.name} for {self.model_name}: {exc}", field) from None
        constants = {
            fmt: (getattr(llama_chat_format, bos), getattr(llama_chat_format, eos))
            for fmt, (bos, eos) in _FORMAT_CONSTANTS.items()
        }
        metadata = dict(model.metadata)
        bos, eos = special_strings(
            config,
            getattr(model, "chat_format", None),
            metadata,
            model._model.token_get_text,
            constants,
            self.model_name,
        )
        template = chat_template(metadata, config, self.model_name)
        # Any: llama-cpp-python's annotations (its message TypedDicts, a StoppingCriteriaList, a completion that
        # may be a stream) are narrower than the calls it takes, which these are
        self.formatter: Any = llama_chat_format.Jinja2ChatFormatter(template=template, bos_token=bos, eos_token=eos)
        self.model: Any = model
        self.context_size = int(model.n_ctx())
        progress(f"ready: context size {self.context_size}, {where}", 1.0)

    async def unload(self) -> None:
        def close() -> None:
            model = self.__dict__.pop("model", None)
            if model is not None:
                model.close()

        await asyncio.get_running_loop().run_in_executor(self._executor, close)
        self._executor.shutdown(wait=False)

    # -- generation ---------------------------------------------------------------------------

    def _prompt(self, messages: Sequence[Message]) -> tuple[str, int]:
        """The rendered prompt and its length as clembench counts it (no BOS added, special tokens as text)."""
        conversation = [{k: v for k, v in m.items() if k != "image"} for m in messages]  # images are refused
        prompt = str(self.formatter(messages=conversation).prompt)
        return prompt, len(self.model.tokenize(prompt.encode(), add_bos=False))

    async def count_tokens(self, messages: Sequence[Message]) -> TokenCount:
        prompt, length = await asyncio.get_running_loop().run_in_executor(self._executor, self._prompt, messages)
        return TokenCount(length, self.context_size, prompt)

    async def generate(self, messages: Sequence[Message], args: GenArgs, sink: TextSink | None = None) -> Generation:
        refuse_images(messages, self.model_name)
        seed = args.extra.get("seed")
        if seed is not None and not 0 <= seed <= _SEED_MAX:
            raise InvalidArgumentError("args.seed", f"llama.cpp takes a seed from 0 to {_SEED_MAX}, not {seed}")
        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        work = loop.run_in_executor(
            self._executor, self._generate_blocking, messages, args, on_loop(loop, sink), cancel
        )
        try:
            return await work
        except asyncio.CancelledError:
            cancel.set()  # the worker stops at its next token; the next caller's turn waits for that
            raise

    def _generate_blocking(
        self, messages: Sequence[Message], args: GenArgs, sink: TextSink | None, cancel: threading.Event
    ) -> Generation:
        if cancel.is_set():
            raise _CallerGone  # it left while this waited for the worker; nobody reads this
        prompt, length = self._prompt(messages)
        check_context(self.model_name, length, args.max_tokens, self.context_size)
        watch = TokenWatch(cancel, sink, lambda ids, before: bytes(self.model.detokenize(ids, prev_tokens=before)))
        # llama.cpp keeps the KV states of what it evaluated last and reuses the prefix they share with this prompt;
        # what it evaluated is a private attribute: a version without it reports no reuse
        previous = [int(i) for i in getattr(self.model, "_input_ids", ())]
        replays = bool(getattr(self.model, "_requires_eval", True))
        output = self.model(
            prompt, temperature=args.temperature, max_tokens=args.max_tokens, stopping_criteria=watch, **args.extra
        )
        choice = output["choices"][0]
        usage = output.get("usage", {})
        if cancel.is_set():
            log.info(
                "%s: stopped generating after %d token(s): the caller went away",
                self.model_name,
                usage.get("completion_tokens", 0),
            )
        watch.finish(choice["text"])
        return Generation(
            prompt=engine_prompt(prompt, args),
            response={"response": output},
            text=clean(choice["text"], self.model_config),
            prompt_tokens=int(usage.get("prompt_tokens", length)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            finish_reason=FinishReason.LENGTH if choice.get("finish_reason") == "length" else FinishReason.STOP,
            cached_prompt_tokens=reused_prefix(previous, watch.prompt, replays),
        )

    def prefix_reuse(self) -> PrefixReuse:
        return PrefixReuse("llama.cpp previous prompt" if getattr(self, "model", None) is not None else "")


def reused_prefix(previous: Sequence[int], prompt: Sequence[int], replays: bool = True) -> int:
    """The prompt tokens llama.cpp did not evaluate again (llama-cpp-python's ``Llama.generate``): the longest
    prefix ``prompt`` shares with what it evaluated before (``previous``), less the last prompt token where it
    shares the whole prompt (that one runs again for its logits), unless the prompt is exactly what was evaluated
    and its logits are still live (not ``replays``). 0 without a prompt (nothing was sampled)."""
    shared = 0
    for a, b in zip(previous, prompt, strict=False):
        if a != b:
            break
        shared += 1
    if shared < len(prompt) or not prompt:
        return shared
    return shared if len(previous) == len(prompt) and not replays else shared - 1


def estimate(spec: ModelSpec, sizing: Sizing) -> Estimate:
    """llama.cpp maps the GGUF tensors as stored (quantized): the file's size; plus its float16 KV cache for
    the context the header declares, which it allocates whole (the backend loads with that context)."""
    path = model_file(spec, model_config(spec))
    _, hf_config = footprint.gguf_weights(path, sizing.cache_dir)
    kv_cache = footprint.kv_cache_bytes(
        hf_config, footprint.DTYPE_BYTES["float16"], footprint.context(hf_config, spec), 1
    )
    return Estimate(path.stat().st_size, kv_cache, "gguf header")


def weights(spec: ModelSpec, find: SnapshotFinder = cached_snapshot) -> Weights:
    """The entry's GGUF file: shipped in a distribution, else the one file ``model_config.filename`` matches
    in the ``huggingface_id`` folder or the hub's cache (a GGUF repository has no config.json); entries
    without a ``filename`` as a transformers checkpoint."""
    config = model_config(spec)
    shipped = packaged(config)
    source = str(spec.get("huggingface_id", ""))
    if shipped is not None or not source or not isinstance(config.get("filename"), str):
        return shipped or transformers_weights(spec, find)
    try:
        path = model_file(spec, config)
    except ClemserveError as exc:  # a local folder without the file has nothing to download
        return Weights(source, missing=exc.message, download=not Path(source).is_dir())
    return Weights(source, files=(path,), local=Path(source).is_dir())
