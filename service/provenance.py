"""Where a model's answers come from, as far as this server can tell without loading it: its version, the
backend's library versions, the weights' revision, dtype and device. ``ResolveModel`` answers with it, and
``clemserve run`` records it beside a benchmark's results.

Hashing weight files reads them whole, so a folder's hash is computed once per set of (path, size, mtime)
and kept for the server's life; callers run ``describe`` off the event loop.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from clemserve.registry import ModelSpec

from .backends import locate_weights, requirements
from .backends.base import Backend
from .domain import Generation
from .pricing import Pricing

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_hashes: dict[tuple[tuple[str, int, int], ...], str] = {}
_hashes_lock = threading.Lock()


@dataclass(frozen=True)
class Provenance:
    server_version: str
    library_versions: dict[str, str] = field(default_factory=dict)
    revision: str = ""
    dtype: str = ""
    device: str = ""
    #: why the server cannot price the model's calls ("": it can, or the server runs the model)
    unpriced: str = ""
    #: how the loaded model reuses prompt prefixes it computed before ("": not loaded, or nothing to say)
    prefix_caching: str = ""


def described(spec: ModelSpec, engine: object | None, pricing: Pricing) -> Provenance:
    """``describe``, with whether ``pricing`` can price the model's calls (clemserve run --max-cost asks)."""
    return replace(describe(spec, engine), unpriced=pricing.cost(spec, Generation(None, {}, "")).unpriced)


def describe(spec: ModelSpec, engine: object | None = None) -> Provenance:
    """``engine``: the model's loaded backend, when it is loaded; its dtype and device are then what the engine
    really runs in, not what the registry entry and the model's config ask for."""
    try:
        needs = requirements(str(spec.get("backend") or ""))
    except Exception:  # a backend not served here: resolving it still answers, as before
        return Provenance(_version("clemserve"))
    versions = library_versions(needs.packages)
    if not needs.weights:
        return Provenance(_version("clemserve"), versions)
    config = spec.get("model_config") or {}
    folder, revision = _weights(spec)
    dtype, device = engine_facts(engine) if engine is not None else ("", "")
    reuse = engine.prefix_reuse().in_force if isinstance(engine, Backend) else ""
    return Provenance(
        _version("clemserve"),
        versions,
        revision,
        dtype or _dtype(config, folder),
        device or _device(),
        prefix_caching=reuse,
    )


def engine_facts(engine: object) -> tuple[str, str]:
    """The dtype and device a loaded backend's engine runs in, where it can tell ("" where it cannot): a
    transformers model's own dtype and the devices its weights were placed on, a vLLM engine's model config."""
    model = getattr(engine, "model", None)
    dtype = getattr(model, "dtype", None)
    if dtype is None:  # vLLM: AsyncLLM's model config
        dtype = getattr(getattr(getattr(engine, "engine", None), "model_config", None), "dtype", None)
    placed = getattr(model, "hf_device_map", None)
    if isinstance(placed, dict) and placed:
        devices = sorted({_device_name(where) for where in placed.values()})
    else:
        where = getattr(engine, "device", None) or getattr(model, "device", None)
        devices = [_device_name(where)] if where is not None else []
    return (str(dtype).removeprefix("torch.") if dtype is not None else ""), "+".join(devices)


def _device_name(where: object) -> str:
    """A device's kind: cuda for cuda:0 or the integer 0 (a device map's GPU index), cpu, disk, meta."""
    if isinstance(where, int):
        return "cuda"
    return str(getattr(where, "type", where)).split(":")[0]


def library_versions(modules: Iterable[str]) -> dict[str, str]:
    """The installed distributions that provide ``modules`` (import names), by distribution name."""
    providers = _distributions()
    versions = {}
    for module in modules:
        for distribution in providers.get(module.split(".")[0], []):
            versions[distribution] = _version(distribution)
    return versions


@functools.cache
def _distributions() -> dict[str, list[str]]:
    """Import names -> the distributions that provide them (a scan of every installed package: once)."""
    return dict(importlib.metadata.packages_distributions())


def _weights(spec: ModelSpec) -> tuple[Path | None, str]:
    """The folder holding the model's config (where known) and the weights' revision: a hash of its files
    where they are on this machine (a local folder, a GGUF file), else the hub snapshot's commit."""
    try:
        found = locate_weights(spec)
    except Exception:  # the weights cannot be found: ListModels says why; nothing to identify
        return None, ""
    if found is None or not found.found:
        return None, ""
    if found.files:
        return found.folder, "sha256:" + _files_hash(list(found.files))
    if found.local and found.folder is not None:
        files = sorted(p for p in found.folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
        return found.folder, ("sha256:" + _files_hash(files)) if files else ""
    return found.folder, f"hf:{found.folder.name}" if found.folder is not None else ""


def _files_hash(paths: list[Path]) -> str:
    key = tuple((str(p), (s := p.stat()).st_size, s.st_mtime_ns) for p in paths)
    with _hashes_lock:
        if key in _hashes:
            return _hashes[key]
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    with _hashes_lock:
        _hashes[key] = digest.hexdigest()
    return _hashes[key]


def _dtype(config: dict[str, Any], folder: Path | None) -> str:
    if config.get("load_in_8bit"):
        return "int8"
    if config.get("load_in_4bit"):
        return "int4"
    try:
        model_config = json.loads((folder / "config.json").read_text()) if folder else {}
    except (OSError, ValueError):
        model_config = {}
    named = model_config.get("torch_dtype") or model_config.get("dtype")
    return str(named) if named else "auto"


def _device() -> str:
    """Where this server's local models run: asked of torch only once a model has imported it (importing it
    here would cost seconds and hundreds of MiB for a question)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return "cuda" if Path("/proc/driver/nvidia/gpus").is_dir() else ""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
