"""How much memory a model takes: estimated from its files before loading, measured after, and the budget.

The estimate reads only metadata, never weights:

- ``huggingface_local``: the safetensors headers of the weight files (dtype and shape of every tensor),
  else the parameter count from ``config.json``, times the bytes of the dtype the backend loads in
  (``dtype="auto"``: the checkpoint's ``torch_dtype``, float32 when it names none). ``load_in_4bit`` and
  ``load_in_8bit`` entries count their linear layers' weights at the quantised size (4 bits plus a float32
  scale per 64 weights; 8 bits plus one per row); embeddings and norms stay as they are. Plus a KV-cache
  allowance: what a batch really holds is rows x (prompt + max_tokens) tokens, each taking
  2 x layers x kv_heads x head_dim x dtype bytes; the allowance is ``--kv-cache-tokens`` of them, or
  ``--max-batch`` rows at the model's whole context where that is less. Transformers allocates the cache as
  a batch grows, so each batch is checked again when it is admitted (:class:`KvRoom`).
- GGUF entries (``model_config.gguf``): the tensor shapes in the GGUF file's header, counted as float32,
  which is what the backend's one-time conversion writes; the converted folder is not needed.
- ``vllm``: the weights as above plus the engine's KV-cache space (``vllm_args.kv_cache_memory_bytes`` per
  GPU, else ``VLLM_CPU_KVCACHE_SPACE`` GiB on CPU, else the ``gpu_memory_utilization`` share of each of its
  ``tensor_parallel_size`` GPUs minus the weights: vLLM takes that share whole, on every GPU it uses).
- ``llamacpp``: the GGUF file's size (llama.cpp maps the quantized tensors as stored) plus a float16 KV
  cache for the context in the file's header, which llama.cpp allocates whole.
- remote, ``echo``, ``fault``: 0, unless ``model_config.memory_bytes`` says otherwise.

Measured memory is what the loaded model holds, not what the process grew by: on a GPU, the CUDA memory
the load allocated, summed over every device it went to; on a CPU, the bytes of the model's parameters and
buffers (a tied weight once). The process's resident-set growth across the load is kept as a separate,
labelled figure for the operator (it counts the first load's import of torch, about 300 MiB, and loads
running at the same time). A backend whose model lives in another process (vLLM's engine core) is not
measured here: it is charged its estimate.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from clemserve.registry import ModelSpec
from clemserve.registry.errors import ClemserveError, ResourceExhaustedError

from . import gpus as gpu_reader
from .domain import GpuMemory, MemoryFigures

log = logging.getLogger(__name__)

#: bytes per element by safetensors dtype name and torch_dtype name
DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int8": 1,
}  # fmt: skip
#: share of the whole memory that ``auto`` budgets: the rest is the server itself, CUDA's context, the OS
AUTO_GPU_SHARE, AUTO_RAM_SHARE = 0.9, 0.8
#: the KV-cache tokens a model's estimate allows its batches (``--kv-cache-tokens``): a full default batch
#: (8 rows) of 4096-token conversations (clembench's imagegame opens with at most 354 prompt tokens)
DEFAULT_KV_CACHE_TOKENS = 32768
#: the backends that put a model on the GPUs when there are GPUs
GPU_BACKENDS = frozenset({"huggingface_local", "vllm"})
#: bitsandbytes: bytes per quantised weight, with its scales (4 bit: a float32 absmax per 64 weights)
QUANTISED_BYTES = {4: 0.5 + 4 / 64, 8: 1.0}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30})


@dataclass(frozen=True)
class Estimate:
    """What a model is expected to take: its weights and the KV-cache allowance, and how that was found.
    ``kv_per_token``: the KV-cache bytes of one token (0: no KV cache this process allocates as it goes);
    ``context``: the model's context, which caps each row."""

    weights: int = 0
    kv_cache: int = 0
    source: str = "none"
    kv_per_token: int = 0
    context: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


# -- the budget ---------------------------------------------------------------------------------


def parse_bytes(text: str) -> int:
    """``8GiB``, ``512MiB``, ``1.5G`` (binary) or ``4GB`` (decimal), or plain bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (say 8GiB, 512MiB or a number of bytes)")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class Budget:
    """The memory that loaded models may take, what it counts ("gpu" or "ram"), the GPUs it covers (each
    with its part in ``budget_bytes``), and where its size came from."""

    total: int
    kind: str
    devices: tuple[GpuMemory, ...] = ()
    source: str = ""


def budget_from_setting(setting: str, *, may_import_torch: bool = False) -> Budget:
    """``auto``: on a GPU machine, 90% of every visible GPU, or what other processes leave of it where that
    is less; else 80% of the machine's RAM. A size: that, over the GPUs where there are any.

    GPUs are read through NVML where it is installed, else through torch where the driver lists GPUs or
    ``may_import_torch`` (a GPU backend is loading, so torch is imported anyway). Blocks: call it off the
    event loop.
    """
    found, how = gpu_reader.read_gpus(may_import_torch=may_import_torch)
    auto = setting.strip().lower() == "auto"
    if found:
        devices = tuple(_with_budget(gpu) for gpu in found)
        if auto:
            return Budget(sum(d.budget_bytes for d in devices), "gpu", devices, how)
        return Budget(parse_bytes(setting), "gpu", devices, "--memory-budget")
    if auto:
        return Budget(int(_meminfo("MemTotal") * AUTO_RAM_SHARE), "ram", (), "/proc/meminfo")
    return Budget(parse_bytes(setting), "ram", (), "--memory-budget")


def _with_budget(gpu: GpuMemory) -> GpuMemory:
    """The device with its part of an ``auto`` budget: its share, or what others leave of it where that is
    less (the driver's few hundred MiB fit in the share's headroom; another process's model does not)."""
    share = min(int(gpu.total_bytes * AUTO_GPU_SHARE), gpu.total_bytes - gpu.used_by_others_bytes)
    return GpuMemory(**{**gpu.__dict__, "budget_bytes": max(0, share)})


def read_devices(budget: Budget) -> tuple[GpuMemory, ...]:
    """The budget's GPUs as they stand now (each keeping its part of the budget); blocks."""
    if budget.kind != "gpu":
        return ()
    parts = {d.index: d.budget_bytes for d in budget.devices}
    found, _ = gpu_reader.read_gpus(may_import_torch=False)
    return tuple(GpuMemory(**{**d.__dict__, "budget_bytes": parts.get(d.index, 0)}) for d in found)


def available_ram() -> int:
    """What the machine can give a new load now without swapping (0 where it cannot be told)."""
    return _meminfo("MemAvailable")


def _meminfo(field: str) -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# -- measuring ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """The process's memory at one moment: its resident set, and the tensor bytes on each GPU."""

    rss: int
    allocated: dict[int, int] = field(default_factory=dict)


def reading() -> Reading:
    return Reading(resident_set(), gpu_reader.allocated_by_device())


def resident_set() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def measure(before: Reading, backend: object, estimate: Estimate) -> tuple[int, MemoryFigures]:
    """What a finished load holds, and its labelled figures: the CUDA memory it allocated (summed over its
    devices), else the bytes of its model's parameters and buffers, else nothing this process can see."""
    after = reading()
    devices = tuple(
        (index, after.allocated[index] - before.allocated.get(index, 0))
        for index in sorted(after.allocated)
        if after.allocated[index] > before.allocated.get(index, 0)
    )
    measured, how = sum(n for _, n in devices), "cuda allocated"
    if not measured:
        measured, how = tensor_bytes(getattr(backend, "model", None)), "parameters and buffers"
    if not measured:
        how = "estimate" if estimate.total else ""
    return measured, MemoryFigures(
        estimated_weights_bytes=estimate.weights,
        estimated_kv_cache_bytes=estimate.kv_cache,
        estimate_source=estimate.source if estimate.total else "",
        measured_by=how,
        rss_delta_bytes=max(0, after.rss - before.rss),
        devices=devices,
    )


def tensor_bytes(model: Any) -> int:
    """The bytes of a torch module's parameters and buffers, each storage once (tied weights share one);
    0 for anything else. Tensors on the meta device (offloaded to disk) hold nothing here."""
    if model is None or not hasattr(model, "parameters") or not hasattr(model, "buffers"):
        return 0
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def free_memory(*, cuda: bool = True) -> None:
    """Hand back what an unloaded model left: Python's garbage, then torch's cached CUDA blocks (not after a
    CUDA error, ``cuda=False``: every CUDA call fails then)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if cuda and torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- the KV cache of running batches ------------------------------------------------------------


class KvRoom:
    """The KV cache one model's batches may hold: its allowance (charged in the budget since its load), and
    free budget it may borrow for a batch that needs more, given back when the batch ends.

    Used from the model's generation thread: ``groups`` splits a batch into runs that fit, ``holding``
    charges a run's borrowed bytes while it runs. ``free`` reads the budget's free bytes and ``charge`` adds
    to (or, negative, takes from) the model's charge; both are plain reads and writes of numbers.
    """

    def __init__(
        self,
        name: str,
        estimate: Estimate,
        free: Callable[[], int],
        charge: Callable[[int], None],
    ) -> None:
        self.name = name
        self.per_token = estimate.kv_per_token
        self.context = estimate.context
        self.allowance = estimate.kv_cache
        self._free = free
        self._charge = charge
        self._lock = threading.Lock()

    def need(self, rows: int, tokens: int) -> int:
        """The KV bytes of ``rows`` rows of ``tokens`` tokens each (prompt + new tokens), the context capping."""
        return self.per_token * rows * (min(tokens, self.context) if self.context else tokens)

    def room(self) -> int:
        return self.allowance + max(0, self._free())

    def groups(self, lengths: dict[int, int], new_tokens: int) -> tuple[list[list[int]], dict[int, BaseException]]:
        """The rows (index -> prompt tokens) in runs whose KV cache fits the room now, in order; a row that
        does not fit even alone gets RESOURCE_EXHAUSTED with the numbers. Rows are padded to the longest
        prompt of their run, so a run needs rows x (its longest prompt + ``new_tokens``)."""
        if not self.per_token:
            return ([list(lengths)] if lengths else []), {}
        room = self.room()
        runs: list[list[int]] = []
        refused: dict[int, BaseException] = {}
        run: list[int] = []
        longest = 0
        for index, length in lengths.items():
            alone = self.need(1, length + new_tokens)
            if alone > room:
                refused[index] = ResourceExhaustedError(
                    f"{self.name}: this conversation's KV cache ({length} prompt + {new_tokens} new tokens) needs "
                    f"about {alone / 2**20:.0f} MiB; {room / 2**20:.0f} MiB is free for it (the model's "
                    f"{self.allowance / 2**20:.0f} MiB allowance and the free budget)",
                    required_bytes=alone,
                    available_bytes=room,
                )
                continue
            if run and self.need(len(run) + 1, max(longest, length) + new_tokens) > room:
                runs.append(run)
                run, longest = [], 0
            run.append(index)
            longest = max(longest, length)
        if run:
            runs.append(run)
        if len(runs) > 1:
            log.info("%s: a batch's KV cache exceeds its room; run as %d smaller batches", self.name, len(runs))
        return runs, refused

    @contextmanager
    def holding(self, rows: int, tokens: int) -> Iterator[None]:
        """Charge what a run needs beyond the allowance while it runs."""
        with self._lock:
            borrowed = max(0, self.need(rows, tokens) - self.allowance)
            if borrowed:
                self._charge(borrowed)
        try:
            yield
        finally:
            if borrowed:
                self._charge(-borrowed)


# -- estimating ---------------------------------------------------------------------------------


def estimate(
    spec: ModelSpec,
    cache_dir: Path,
    *,
    max_batch: int = 1,
    kv_tokens: int = DEFAULT_KV_CACHE_TOKENS,
    gpu_bytes: int = 0,
) -> Estimate:
    """The model's expected footprint, from metadata only; 0 where it cannot be told (logged, not fatal).
    ``gpu_bytes``: the memory of one of the GPUs the model goes to (0: it runs on the CPU)."""
    config = spec.get("model_config", {})
    config = config if isinstance(config, dict) else {}
    declared = config.get("memory_bytes")
    if isinstance(declared, int) and not isinstance(declared, bool) and declared >= 0:
        return Estimate(weights=declared, source="model_config.memory_bytes")
    backend = spec.get("backend")
    try:
        if backend == "huggingface_local":
            rows = 1 if config.get("multimodal") else max_batch  # vision-language models run one row at a time
            return _local_estimate(spec, config, cache_dir, rows, kv_tokens)
        if backend == "vllm":
            return _vllm_estimate(spec, config, cache_dir, gpu_bytes)
        if backend == "llamacpp":
            from .backends.llamacpp import model_file

            return llamacpp_estimate(model_file(spec, config), spec)
    except (OSError, ValueError, KeyError, TypeError, struct.error, ClemserveError) as exc:
        log.info("cannot estimate the memory of %s: %s", spec.get("model_name"), exc)
    return Estimate()


def _local_estimate(
    spec: ModelSpec, config: dict[str, Any], cache_dir: Path, max_batch: int, kv_tokens: int
) -> Estimate:
    if "gguf" in config:
        from .backends import gguf

        shapes, hf_config = gguf_header(gguf.locate(config["gguf"]["distribution"], config["gguf"]["file"]))
        weights = sum(_product(shape) for shape in shapes) * DTYPE_BYTES["float32"]
        return _with_kv(Estimate(weights, source="gguf header"), hf_config, 4, spec, max_batch, kv_tokens)
    folder = _local_folder(str(spec.get("huggingface_id", "")), cache_dir)
    hf_config = language_config(json.loads((folder / "config.json").read_text()))
    dtype_bytes = DTYPE_BYTES.get(str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"), 4)
    bits = 4 if config.get("load_in_4bit") else 8 if config.get("load_in_8bit") else 0
    tensors = safetensors_tensors(folder)
    if tensors:
        weights = _tensor_bytes(tensors, bits)
        source = "safetensors headers"
    else:
        weights, source = _config_bytes(hf_config, dtype_bytes, bits), "config.json"
    if bits:
        source += f", linear layers at {bits} bits"
    return _with_kv(Estimate(weights, source=source), hf_config, dtype_bytes, spec, max_batch, kv_tokens)


def _with_kv(
    found: Estimate, hf_config: dict[str, Any], dtype_bytes: int, spec: ModelSpec, max_batch: int, kv_tokens: int
) -> Estimate:
    """``found`` with its KV-cache allowance: ``kv_tokens`` tokens, or a full batch at the whole context where
    that is less."""
    per_token = kv_cache_bytes(hf_config, dtype_bytes, 1, 1)
    context = _context(hf_config, spec)
    tokens = min(kv_tokens, context * max_batch)
    return Estimate(found.weights, per_token * tokens, found.source, per_token, context)


def _vllm_estimate(spec: ModelSpec, config: dict[str, Any], cache_dir: Path, gpu_bytes: int) -> Estimate:
    folder = _local_folder(str(spec.get("huggingface_id", "")), cache_dir)
    weights = safetensors_bytes(folder)
    if not weights:
        hf_config = json.loads((folder / "config.json").read_text())
        weights = parameter_count(hf_config) * DTYPE_BYTES.get(str(hf_config.get("torch_dtype", "float32")), 4)
    args = config.get("vllm_args", {}) if isinstance(config.get("vllm_args"), dict) else {}
    gpus = tensor_parallel_size(config)
    if args.get("kv_cache_memory_bytes"):
        kv = int(args["kv_cache_memory_bytes"]) * gpus
        return Estimate(weights, kv, "vllm_args.kv_cache_memory_bytes")
    if gpu_bytes:
        share = float(args.get("gpu_memory_utilization", 0.9))
        taken = int(gpu_bytes * share) * gpus  # vLLM takes its share of each GPU it runs on
        return Estimate(weights, max(0, taken - weights), f"vllm gpu_memory_utilization on {gpus} GPU(s)")
    space = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"))  # vLLM's CPU default is 4 GiB
    return Estimate(weights, int(space * 2**30), "vllm VLLM_CPU_KVCACHE_SPACE")


def tensor_parallel_size(config: dict[str, Any]) -> int:
    """The GPUs a vLLM entry runs on: ``vllm_args.tensor_parallel_size``, else ``number_gpus``, else 1."""
    args = config.get("vllm_args", {}) if isinstance(config.get("vllm_args"), dict) else {}
    value = args.get("tensor_parallel_size") or config.get("number_gpus") or 1
    return max(1, int(value)) if isinstance(value, int | str) and str(value).isdigit() else 1


def llamacpp_estimate(path: Path, spec: ModelSpec) -> Estimate:
    """llama.cpp maps the GGUF tensors as stored (quantized): the file's size; plus its float16 KV cache for
    the context the header declares, which it allocates whole (the llamacpp backend loads with that context)."""
    _, hf_config = gguf_header(path)
    kv_cache = kv_cache_bytes(hf_config, DTYPE_BYTES["float16"], _context(hf_config, spec), 1)
    return Estimate(path.stat().st_size, kv_cache, "gguf header")


def _local_folder(source: str, cache_dir: Path) -> Path:
    """A local folder as is; a hub id through the hub's cache (offline: nothing is downloaded)."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, local_files_only=True, allow_patterns=["*.json"]))


def _context(hf_config: dict[str, Any], spec: ModelSpec) -> int:
    from .backends.context import parse_context_size

    for value in (hf_config.get("max_position_embeddings"), hf_config.get("n_positions")):
        if isinstance(value, int) and value > 0:
            return value
    return parse_context_size(spec.get("context_size")) or 2048


def _product(shape: list[int]) -> int:
    result = 1
    for dim in shape:
        result *= dim
    return result


def weight_files_bytes(folder: Path) -> int:
    """The size on disk of the weight files in ``folder`` (safetensors, PyTorch bins): read from the file
    system alone, so it holds for files whose headers cannot be read."""
    return sum(p.stat().st_size for p in folder.glob("*") if p.suffix in (".safetensors", ".bin", ".pt"))


def safetensors_tensors(folder: Path) -> list[tuple[str, list[int], int]]:
    """Every tensor in the folder's safetensors files, from their headers: (name, shape, bytes per element)."""
    found = []
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, tensor in header.items():
            if name != "__metadata__":
                found.append((name, tensor["shape"], DTYPE_BYTES[tensor["dtype"]]))
    return found


def safetensors_bytes(folder: Path) -> int:
    """The bytes of every tensor in the folder's safetensors files, read from their headers."""
    return _tensor_bytes(safetensors_tensors(folder), 0)


def _quantised(name: str, shape: list[int]) -> bool:
    """What bitsandbytes quantises: the linear layers' weights, not embeddings, the output head or norms."""
    return len(shape) == 2 and name.endswith(".weight") and "embed" not in name and "lm_head" not in name


def _tensor_bytes(tensors: list[tuple[str, list[int], int]], bits: int) -> int:
    total = 0.0
    for name, shape, size in tensors:
        total += _product(shape) * (QUANTISED_BYTES[bits] if bits and _quantised(name, shape) else size)
    return int(total)


def _config_bytes(config: dict[str, Any], dtype_bytes: int, bits: int) -> int:
    """The weights' bytes from ``config.json``: the linear layers at ``bits`` (0: the dtype), the rest at the dtype."""
    params = parameter_count(config)
    if not bits:
        return params * dtype_bytes
    linear = linear_parameter_count(config)
    return int((params - linear) * dtype_bytes + linear * QUANTISED_BYTES[bits])


def _shape(config: dict[str, Any]) -> tuple[int, int, int, int, int, int]:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    intermediate = config.get("intermediate_size") or 4 * hidden
    return hidden, heads, kv_heads, head_dim, intermediate, config["num_hidden_layers"]


def linear_parameter_count(config: dict[str, Any]) -> int:
    """The parameters of the decoder layers' linear projections (attention and a gated MLP)."""
    hidden, heads, kv_heads, head_dim, intermediate, layers = _shape(config)
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    return int(layers * (attention + 3 * hidden * intermediate))


def language_config(config: dict[str, Any]) -> dict[str, Any]:
    """A vision-language model's config.json holds its language model's settings in ``text_config``: those
    size the KV cache and give the context (the safetensors headers count every tensor, the vision tower's
    included)."""
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def parameter_count(config: dict[str, Any]) -> int:
    """A decoder-only transformer's parameters from its config: embeddings, attention, a gated MLP, norms."""
    hidden, _, _, _, _, layers = _shape(config)
    embeddings = config["vocab_size"] * hidden * (1 if config.get("tie_word_embeddings", True) else 2)
    return int(embeddings + linear_parameter_count(config) + layers * 2 * hidden + hidden)


def kv_cache_bytes(config: dict[str, Any], dtype_bytes: int, context: int, max_batch: int) -> int:
    """Keys and values of every layer for ``max_batch`` rows of ``context`` tokens."""
    _, _, kv_heads, head_dim, _, layers = _shape({"hidden_size": 0, **config})
    return int(2 * layers * kv_heads * head_dim * dtype_bytes * context * max_batch)


# -- GGUF -----------------------------------------------------------------------------------------

_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_header(path: Path) -> tuple[list[list[int]], dict[str, Any]]:
    """The tensor shapes in a GGUF file and its architecture's settings in ``config.json`` names."""
    with open(path, "rb") as f:
        magic, _version, tensors, fields = struct.unpack("<4sIQQ", f.read(24))
        if magic != b"GGUF":
            raise ValueError(f"{path.name} is not a GGUF file")
        metadata = {_gguf_string(f): _gguf_value(f, _read(f, "I")) for _ in range(fields)}
        shapes = []
        for _ in range(tensors):
            _gguf_string(f)
            dims = _read(f, "I")
            shapes.append([_read(f, "Q") for _ in range(dims)])
            f.read(4 + 8)  # type, offset
    arch = metadata.get("general.architecture", "llama")
    heads = metadata.get(f"{arch}.attention.head_count", 1)
    config = {
        "num_hidden_layers": metadata.get(f"{arch}.block_count", 0),
        "hidden_size": metadata.get(f"{arch}.embedding_length", 0),
        "num_attention_heads": heads,
        "num_key_value_heads": metadata.get(f"{arch}.attention.head_count_kv", heads),
        "max_position_embeddings": metadata.get(f"{arch}.context_length", 0),
    }
    return shapes, config


def _read(f: BinaryIO, fmt: str) -> Any:
    return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]


def _gguf_string(f: BinaryIO) -> str:
    return f.read(_read(f, "Q")).decode("utf-8", "replace")


def _gguf_value(f: BinaryIO, kind: int) -> Any:
    if kind == _GGUF_STRING:
        return _gguf_string(f)
    if kind == _GGUF_ARRAY:
        item_kind, count = _read(f, "I"), _read(f, "Q")
        if item_kind in _GGUF_SCALARS:  # skipped whole: long arrays (token scores) are not needed
            f.seek(count * struct.calcsize(_GGUF_SCALARS[item_kind]), 1)
            return None
        return [_gguf_value(f, item_kind) for _ in range(count)]
    return _read(f, _GGUF_SCALARS[kind])


@dataclass(frozen=True)
class ResidencyPolicy:
    """Which models stay loaded: the memory budget, idle unloading, leases, and how loads are bounded."""

    #: ``auto`` or a size (see ``budget_from_setting``)
    memory_budget: str = "auto"
    #: unload a model idle this long, in seconds; 0 or less: never
    keep_alive_s: float = 1800.0
    #: loads running at once; more wait their turn
    max_concurrent_loads: int = 1
    #: a load that takes longer fails (UNAVAILABLE, reason LOAD_TIMEOUT); 0 or less: no limit
    load_timeout_s: float = 1800.0
    #: the longest a lease lasts; a request's ttl_seconds may shorten it
    lease_timeout_s: float = 1800.0
    #: the KV-cache tokens a model's estimate allows its batches (rows x (prompt + max_tokens))
    kv_cache_tokens: int = DEFAULT_KV_CACHE_TOKENS
