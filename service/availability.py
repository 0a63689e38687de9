"""Whether a registry entry can run on this server, found without loading it (ListModels' availability).

Reads the file system (installed packages, the Hugging Face cache, key entries) but imports no backend and
no SDK, so it is cheap enough for every ListModels; the model cache calls it off the event loop. The first
thing missing wins, in the order a load would meet it: a backend not served, a package, a GPU, a key, the
weights. Each backend's ``load`` checks the same things again and says so in its error.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clemserve.registry import KeyRegistry, ModelSpec
from clemserve.registry.errors import ClemserveError
from clemserve.registry.keys import ENVIRONMENT_KEYS

from .backends import key_entry, requirements
from .domain import Availability

#: model_config flags that load the model through bitsandbytes, which needs a CUDA GPU
_GPU_FLAGS = ("load_in_8bit", "load_in_4bit")


def _has_package(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module without a spec
        return False


def _cached_snapshot(repo: str) -> Path | None:
    """The cached snapshot folder of hub id ``repo`` when it holds a config and weights; no network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        config = try_to_load_from_cache(repo, "config.json")
    except ValueError:  # not a valid repo id
        return None
    if not isinstance(config, str):
        return None
    folder = Path(config).parent
    weights = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
    return folder if any(next(folder.glob(pattern), None) for pattern in weights) else None


@dataclass(frozen=True)
class Machine:
    """What this server has, as the check sees it; the defaults look at the real machine."""

    keys: KeyRegistry
    has_gpu: bool
    #: the Hugging Face hub cannot be reached on purpose (HF_HUB_OFFLINE): weights not cached cannot come
    offline: bool
    has_package: Callable[[str], bool] = _has_package
    #: the folder of a hub id's cached snapshot with its config and weights, or None
    cached_snapshot: Callable[[str], Path | None] = _cached_snapshot


def availability(spec: ModelSpec, machine: Machine) -> tuple[Availability, str]:
    """Whether ``spec`` can load here and, when not, what is missing in words (or what its load does first)."""
    backend = str(spec.get("backend", ""))
    try:
        needs = requirements(backend)
    except ClemserveError as exc:
        return Availability.NOT_SERVED, exc.message
    config = spec.get("model_config") or {}
    if not isinstance(config, dict):
        config = {}
    missing = [name for name in needs.packages if not machine.has_package(name)]
    if missing:
        return Availability.NEEDS_EXTRA, f"pip install 'clemserve[{needs.extra}]' (missing: {', '.join(missing)})"
    for flag in _GPU_FLAGS:
        if config.get(flag):
            if not machine.has_gpu:
                return Availability.NEEDS_GPU, f"model_config.{flag} needs a CUDA GPU (bitsandbytes)"
            if not machine.has_package("bitsandbytes"):
                return Availability.NEEDS_EXTRA, f"model_config.{flag} needs pip install bitsandbytes"
    if config.get("peft_model") and not machine.has_package("peft"):
        return Availability.NEEDS_EXTRA, "model_config.peft_model needs pip install peft"
    key = key_entry(backend, str(spec.get("model_id", ""))) if needs.key else ""
    if needs.weights and config.get("requires_api_key"):
        key = "huggingface"
    if key:
        found = _key_problem(machine.keys, key)
        if found:
            return Availability.NEEDS_KEY, found
    if needs.weights:
        return _weights(spec, config, machine)
    return Availability.CAN_LOAD, ""


def _key_problem(keys: KeyRegistry, name: str) -> str:
    if name not in keys:
        source = ENVIRONMENT_KEYS.get(name)
        unset = f" and {' or '.join(source.api_key)} is not set" if source else ""
        return f"the server's key.json has no `{name}` entry{unset}"
    if not keys.get_key_for(name).has_api_key():
        return f"the server's key.json entry '{name}' has no api_key"
    return ""


def _weights(spec: ModelSpec, config: dict[str, Any], machine: Machine) -> tuple[Availability, str]:
    gguf = config.get("gguf")
    if isinstance(gguf, dict):
        # shipped inside a Python distribution (the demo model): installed or not, nothing to download
        from .backends.gguf import locate

        try:
            locate(str(gguf.get("distribution")), str(gguf.get("file")))
        except ClemserveError as exc:
            return Availability.NEEDS_WEIGHTS, exc.message
        return Availability.CAN_LOAD, ""
    source = str(spec.get("huggingface_id", ""))
    if not source:
        return Availability.NOT_SERVED, "the registry entry has no huggingface_id"
    if spec.get("backend") == "llamacpp" and isinstance(config.get("filename"), str):
        # a GGUF repository has no config.json: look for the one file the entry's glob names
        from .backends.llamacpp import model_file

        try:
            model_file(spec, config)
        except ClemserveError as exc:
            if machine.offline:
                return Availability.NEEDS_WEIGHTS, exc.message
            return Availability.CAN_LOAD, f"the first load downloads {source} from the Hugging Face hub"
        return Availability.CAN_LOAD, ""
    if Path(source).is_dir() or machine.cached_snapshot(source) is not None:
        return Availability.CAN_LOAD, ""
    if machine.offline:
        return (
            Availability.NEEDS_WEIGHTS,
            f"the server is offline (HF_HUB_OFFLINE) and {source} is not in its Hugging Face cache",
        )
    return Availability.CAN_LOAD, f"the first load downloads {source} from the Hugging Face hub"


def hub_offline() -> bool:
    """Whether the Hugging Face hub is off limits to this process, as huggingface_hub itself reads it."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return True
    return bool(constants.HF_HUB_OFFLINE)
