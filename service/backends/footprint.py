"""What a model's files say about its size, read from metadata only, never the weights: safetensors headers
(through ``safetensors``), GGUF headers (through ``gguf``), ``config.json``, and the arithmetic of a
decoder-only transformer (parameters, KV cache). The backends' ``estimate`` functions build on these.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from clemserve.registry import ModelSpec

from ..memory import Estimate, Sizing
from .context import parse_context_size

#: bytes per element by safetensors dtype name and torch_dtype name
DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int8": 1,
}  # fmt: skip
#: bitsandbytes: bytes per quantised weight, with its scales (4 bit: a float32 absmax per 64 weights)
QUANTISED_BYTES = {4: 0.5 + 4 / 64, 8: 1.0}
#: what a model's weight files end in
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def local_folder(source: str) -> Path:
    """A local folder as is; a hub id through the hub's cache (offline: nothing is downloaded)."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, local_files_only=True, allow_patterns=["*.json"]))


def weight_files_bytes(folder: Path) -> int:
    """The size on disk of the weight files in ``folder`` (safetensors, PyTorch bins): read from the file
    system alone, so it holds for files whose headers cannot be read."""
    return sum(p.stat().st_size for p in folder.glob("*") if p.suffix in WEIGHT_SUFFIXES)


# -- safetensors --------------------------------------------------------------------------------


def safetensors_tensors(folder: Path) -> list[tuple[str, list[int], int]]:
    """Every tensor in the folder's safetensors files, from their headers: (name, shape, bytes per element).
    ValueError for a file whose header cannot be read."""
    from safetensors import SafetensorError, safe_open

    found = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="np") as tensors:
                for name in tensors.keys():  # noqa: SIM118  (a safe_open handle is no dict)
                    sliced = tensors.get_slice(name)
                    found.append((name, list(sliced.get_shape()), DTYPE_BYTES[sliced.get_dtype()]))
        except SafetensorError as exc:
            raise ValueError(f"{path.name}: {exc}") from None
    return found


def safetensors_bytes(folder: Path) -> int:
    """The bytes of every tensor in the folder's safetensors files, read from their headers."""
    return tensor_bytes(safetensors_tensors(folder), 0)


def _quantised(name: str, shape: list[int]) -> bool:
    """What bitsandbytes quantises: the linear layers' weights, not embeddings, the output head or norms."""
    return len(shape) == 2 and name.endswith(".weight") and "embed" not in name and "lm_head" not in name


def tensor_bytes(tensors: list[tuple[str, list[int], int]], bits: int) -> int:
    """The tensors' bytes, linear layers' weights at ``bits`` (0: as stored)."""
    total = 0.0
    for name, shape, size in tensors:
        total += _product(shape) * (QUANTISED_BYTES[bits] if bits and _quantised(name, shape) else size)
    return int(total)


def _product(shape: list[int]) -> int:
    result = 1
    for dim in shape:
        result *= int(dim)
    return result


# -- GGUF ---------------------------------------------------------------------------------------


def gguf_header(path: Path, store: Path | None = None) -> tuple[list[list[int]], dict[str, Any]]:
    """The tensor shapes in a GGUF file and its architecture's settings in ``config.json`` names. Read once
    per file version and process; with ``store`` (the server's cache directory), once per file version at all:
    the reader parses every metadata array (the vocabulary) too, seconds for a small model, so what it found
    is kept in ``store/gguf-headers`` for the next server's start."""
    stat = path.stat()
    return _gguf_header(str(path.resolve()), stat.st_size, stat.st_mtime_ns, store)


@functools.lru_cache(maxsize=16)
def _gguf_header(path: str, size: int, mtime_ns: int, store: Path | None) -> tuple[list[list[int]], dict[str, Any]]:
    kept = None
    if store is not None:
        digest = hashlib.sha256(f"{path}\0{size}\0{mtime_ns}".encode()).hexdigest()[:24]
        kept = store / "gguf-headers" / f"{digest}.json"
        try:
            found = json.loads(kept.read_text())
            return [list(map(int, shape)) for shape in found["shapes"]], dict(found["config"])
        except (OSError, ValueError, KeyError, TypeError):  # not kept yet, or unreadable: read the file
            pass
    shapes, config = _read_gguf_header(path)
    if kept is not None:
        try:
            kept.parent.mkdir(parents=True, exist_ok=True)
            partial = kept.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(json.dumps({"path": path, "shapes": shapes, "config": config}))
            partial.replace(kept)
        except OSError:  # a read-only cache: read again next time
            pass
    return shapes, config


def _read_gguf_header(path: str) -> tuple[list[list[int]], dict[str, Any]]:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path, "r")
    except (ValueError, IndexError) as exc:  # not GGUF, or cut short
        raise ValueError(f"{Path(path).name} is not a readable GGUF file: {exc}") from None

    def value(key: str, default: Any) -> Any:
        field = reader.get_field(key)
        return field.contents() if field is not None else default

    arch = value("general.architecture", "llama")
    heads = value(f"{arch}.attention.head_count", 1)
    config = {
        "num_hidden_layers": value(f"{arch}.block_count", 0),
        "hidden_size": value(f"{arch}.embedding_length", 0),
        "num_attention_heads": heads,
        "num_key_value_heads": value(f"{arch}.attention.head_count_kv", heads),
        "max_position_embeddings": value(f"{arch}.context_length", 0),
    }
    shapes = [[int(dim) for dim in tensor.shape] for tensor in reader.tensors]
    return shapes, config


def gguf_weights(path: Path, store: Path | None = None) -> tuple[int, dict[str, Any]]:
    """A GGUF file's parameter count (every tensor's elements) and its settings in ``config.json`` names
    (``store``: see :func:`gguf_header`)."""
    shapes, config = gguf_header(path, store)
    return sum(_product(shape) for shape in shapes), config


# -- a decoder-only transformer's arithmetic ----------------------------------------------------


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


def parameter_count(config: dict[str, Any]) -> int:
    """A decoder-only transformer's parameters from its config: embeddings, attention, a gated MLP, norms."""
    hidden, _, _, _, _, layers = _shape(config)
    embeddings = config["vocab_size"] * hidden * (1 if config.get("tie_word_embeddings", True) else 2)
    return int(embeddings + linear_parameter_count(config) + layers * 2 * hidden + hidden)


def config_bytes(config: dict[str, Any], dtype_bytes: int, bits: int) -> int:
    """The weights' bytes from ``config.json``: the linear layers at ``bits`` (0: the dtype), the rest at the dtype."""
    params = parameter_count(config)
    if not bits:
        return params * dtype_bytes
    linear = linear_parameter_count(config)
    return int((params - linear) * dtype_bytes + linear * QUANTISED_BYTES[bits])


def language_config(config: dict[str, Any]) -> dict[str, Any]:
    """A vision-language model's config.json holds its language model's settings in ``text_config`` (or
    ``llm_config``, InternVL's name): those size the KV cache and give the context (the safetensors headers
    count every tensor, the vision tower's included)."""
    for name in ("text_config", "llm_config"):
        text = config.get(name)
        if isinstance(text, dict):
            return {**config, **text}
    return config


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's ``config.json``, its language model's settings on top."""
    return language_config(json.loads((folder / "config.json").read_text()))


def dtype_bytes(config: dict[str, Any]) -> int:
    """The bytes per weight of the dtype a checkpoint names (``dtype="auto"`` loads in it), float32 else."""
    return DTYPE_BYTES.get(str(config.get("torch_dtype") or config.get("dtype") or "float32"), 4)


def kv_cache_bytes(config: dict[str, Any], dtype_bytes: int, context: int, max_batch: int) -> int:
    """Keys and values of every layer for ``max_batch`` rows of ``context`` tokens."""
    _, _, kv_heads, head_dim, _, layers = _shape({"hidden_size": 0, **config})
    return int(2 * layers * kv_heads * head_dim * dtype_bytes * context * max_batch)


def context(hf_config: dict[str, Any], spec: ModelSpec) -> int:
    """The model's context: its config's, else the registry entry's ``context_size``, else 2048."""
    for value in (hf_config.get("max_position_embeddings"), hf_config.get("n_positions")):
        if isinstance(value, int) and value > 0:
            return value
    return parse_context_size(spec.get("context_size")) or 2048


def with_kv(found: Estimate, hf_config: dict[str, Any], dtype_bytes: int, spec: ModelSpec, sizing: Sizing) -> Estimate:
    """``found`` with the KV-cache allowance of a model that allocates its cache as batches grow: ``kv_tokens``
    tokens, or ``rows`` rows at the whole context where that is less."""
    try:
        per_token = kv_cache_bytes(hf_config, dtype_bytes, 1, 1)
    except (KeyError, TypeError, ZeroDivisionError):  # a config without the usual shape: the weights alone
        per_token = 0
    size = context(hf_config, spec)
    tokens = min(sizing.kv_tokens, size * sizing.max_batch)
    return Estimate(found.weights, per_token * tokens, found.source, per_token, size)
