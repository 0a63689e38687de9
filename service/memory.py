"""How much memory a model takes: estimated from its files before loading, measured after, and the budget.

The estimate reads only metadata, never weights:

- ``huggingface_local``: the safetensors headers of the weight files (dtype and shape of every tensor),
  else the parameter count from ``config.json``, times the bytes of the dtype the backend loads in
  (``dtype="auto"``: the checkpoint's ``torch_dtype``, float32 when it names none); plus a KV-cache
  allowance of 2 x layers x kv_heads x head_dim x dtype bytes x context tokens x max batch rows, the
  worst case of a full batch at full context.
- GGUF entries (``model_config.gguf``): the tensor shapes in the GGUF file's header, counted as float32,
  which is what the backend's one-time conversion writes; the converted folder is not needed.
- ``vllm``: the weights as above plus the engine's KV-cache space (``vllm_args.kv_cache_memory_bytes``,
  else ``VLLM_CPU_KVCACHE_SPACE`` GiB on CPU, else the GPU's ``gpu_memory_utilization`` share minus the
  weights: vLLM takes that share whole).
- remote, ``echo``, ``fault``: 0, unless ``model_config.memory_bytes`` says otherwise.

Measured memory is the change across a load: ``torch.cuda.memory_allocated`` on a GPU, the process's
resident set (``/proc/self/statm``) otherwise. RSS deltas are approximate: the allocator keeps freed
pages, memory-mapped weights count only once touched, the first load also imports torch, and loads
running at the same time share one process.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from clemserve.registry import ModelSpec
from clemserve.registry.errors import ClemserveError

log = logging.getLogger(__name__)

#: bytes per element by safetensors dtype name and torch_dtype name
DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int8": 1,
}  # fmt: skip
#: share of the whole memory that ``auto`` budgets: the rest is the server itself, CUDA's context, the OS
AUTO_GPU_SHARE, AUTO_RAM_SHARE = 0.9, 0.8
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30})


@dataclass(frozen=True)
class Estimate:
    """What a model is expected to take: its weights and the KV-cache allowance, and how that was found."""

    weights: int = 0
    kv_cache: int = 0
    source: str = "none"

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
    """The memory that loaded models may take, and what it counts ("gpu" or "ram")."""

    total: int
    kind: str


def budget_from_setting(setting: str) -> Budget:
    """``auto``: 90% of the first GPU's memory where there is one, else 80% of the machine's RAM.

    A GPU is looked for without importing torch (the NVIDIA driver's /proc entries); torch is asked for the
    size only when there is one, since a GPU server imports it for its first model anyway.
    """
    if setting.strip().lower() != "auto":
        total = parse_bytes(setting)
        return Budget(total, "gpu" if _has_gpu() else "ram")
    gpu_total = _gpu_total() if _has_gpu() else 0
    if gpu_total:
        return Budget(int(gpu_total * AUTO_GPU_SHARE), "gpu")
    return Budget(int(_meminfo("MemTotal") * AUTO_RAM_SHARE), "ram")


def _has_gpu() -> bool:
    if "torch" in sys.modules:
        return bool(sys.modules["torch"].cuda.is_available())
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def _gpu_total() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else 0


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


def memory_in_use(kind: str) -> int:
    """What this process holds now: CUDA memory allocated by torch (gpu), else the resident set (ram)."""
    if kind == "gpu":
        torch = sys.modules.get("torch")
        return int(torch.cuda.memory_allocated()) if torch is not None and torch.cuda.is_available() else 0
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def free_memory() -> None:
    """Hand back what an unloaded model left: Python's garbage, then torch's cached CUDA blocks."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- estimating ---------------------------------------------------------------------------------


def estimate(spec: ModelSpec, cache_dir: Path, *, max_batch: int = 1) -> Estimate:
    """The model's expected footprint, from metadata only; 0 where it cannot be told (logged, not fatal)."""
    config = spec.get("model_config", {})
    config = config if isinstance(config, dict) else {}
    declared = config.get("memory_bytes")
    if isinstance(declared, int) and not isinstance(declared, bool) and declared >= 0:
        return Estimate(weights=declared, source="model_config.memory_bytes")
    backend = spec.get("backend")
    try:
        if backend == "huggingface_local":
            return _local_estimate(spec, config, cache_dir, max_batch)
        if backend == "vllm":
            return _vllm_estimate(spec, config, cache_dir)
    except (OSError, ValueError, KeyError, TypeError, struct.error, ClemserveError) as exc:
        log.info("cannot estimate the memory of %s: %s", spec.get("model_name"), exc)
    return Estimate()


def _local_estimate(spec: ModelSpec, config: dict[str, Any], cache_dir: Path, max_batch: int) -> Estimate:
    if "gguf" in config:
        from .backends import gguf

        shapes, hf_config = gguf_header(gguf.locate(config["gguf"]["distribution"], config["gguf"]["file"]))
        weights = sum(_product(shape) for shape in shapes) * DTYPE_BYTES["float32"]
        return Estimate(weights, kv_cache_bytes(hf_config, 4, _context(hf_config, spec), max_batch), "gguf header")
    folder = _local_folder(str(spec.get("huggingface_id", "")), cache_dir)
    hf_config = json.loads((folder / "config.json").read_text())
    dtype_bytes = DTYPE_BYTES.get(str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"), 4)
    weights, source = safetensors_bytes(folder), "safetensors headers"
    if not weights:
        weights, source = parameter_count(hf_config) * dtype_bytes, "config.json"
    return Estimate(weights, kv_cache_bytes(hf_config, dtype_bytes, _context(hf_config, spec), max_batch), source)


def _vllm_estimate(spec: ModelSpec, config: dict[str, Any], cache_dir: Path) -> Estimate:
    folder = _local_folder(str(spec.get("huggingface_id", "")), cache_dir)
    weights = safetensors_bytes(folder)
    if not weights:
        hf_config = json.loads((folder / "config.json").read_text())
        weights = parameter_count(hf_config) * DTYPE_BYTES.get(str(hf_config.get("torch_dtype", "float32")), 4)
    args = config.get("vllm_args", {}) if isinstance(config.get("vllm_args"), dict) else {}
    if args.get("kv_cache_memory_bytes"):
        return Estimate(weights, int(args["kv_cache_memory_bytes"]), "vllm_args.kv_cache_memory_bytes")
    if _has_gpu():
        share = float(args.get("gpu_memory_utilization", 0.9))
        return Estimate(weights, max(0, int(_gpu_total() * share) - weights), "vllm gpu_memory_utilization")
    space = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"))  # vLLM's CPU default is 4 GiB
    return Estimate(weights, int(space * 2**30), "vllm VLLM_CPU_KVCACHE_SPACE")


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


def safetensors_bytes(folder: Path) -> int:
    """The bytes of every tensor in the folder's safetensors files, read from their headers."""
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, tensor in header.items():
            if name != "__metadata__":
                total += _product(tensor["shape"]) * DTYPE_BYTES[tensor["dtype"]]
    return total


def parameter_count(config: dict[str, Any]) -> int:
    """A decoder-only transformer's parameters from its config: embeddings, attention, a gated MLP, norms."""
    vocab, hidden, layers = config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    intermediate = config.get("intermediate_size") or 4 * hidden
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    per_layer = attention + 3 * hidden * intermediate + 2 * hidden
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", True) else 2)
    return int(embeddings + layers * per_layer + hidden)


def kv_cache_bytes(config: dict[str, Any], dtype_bytes: int, context: int, max_batch: int) -> int:
    """Keys and values of every layer for ``max_batch`` rows at full context."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return int(2 * config["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes * context * max_batch)


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
