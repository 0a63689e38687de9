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

from clemserve.registry import KeyRegistry, ModelSpec
from clemserve.registry.errors import ClemserveError
from clemserve.registry.keys import ENVIRONMENT_KEYS

from .backends import Weights, key_entry, locate_weights, requirements
from .backends.weights import SnapshotFinder, cached_snapshot
from .domain import Availability

#: model_config flags that load the model through bitsandbytes, which needs a CUDA GPU
_GPU_FLAGS = ("load_in_8bit", "load_in_4bit")


def _has_package(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module without a spec
        return False


@dataclass(frozen=True)
class Machine:
    """What this server has, as the check sees it; the defaults look at the real machine."""

    keys: KeyRegistry
    has_gpu: bool
    #: the Hugging Face hub cannot be reached on purpose (HF_HUB_OFFLINE): weights not cached cannot come
    offline: bool
    has_package: Callable[[str], bool] = _has_package
    #: the folder of a hub id's cached snapshot with its config and weights, or None
    cached_snapshot: SnapshotFinder = cached_snapshot


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
    attention = str(config.get("attn_implementation") or "")
    if attention.startswith("flash_attention") and not machine.has_package("flash_attn"):
        return Availability.NEEDS_EXTRA, f"model_config.attn_implementation {attention} needs pip install flash-attn"
    key = key_entry(spec)
    if needs.weights and config.get("requires_api_key"):
        key = "huggingface"
    if key:
        found = _key_problem(machine.keys, key)
        if found:
            return Availability.NEEDS_KEY, found
    located = locate_weights(spec, machine.cached_snapshot) if needs.weights else None
    return _weights(located, machine) if located is not None else (Availability.CAN_LOAD, "")


def _key_problem(keys: KeyRegistry, name: str) -> str:
    if name not in keys:
        source = ENVIRONMENT_KEYS.get(name)
        unset = f" and {' or '.join(source.api_key)} is not set" if source else ""
        return f"the server's key.json has no `{name}` entry{unset}"
    if not keys.get_key_for(name).has_api_key():
        return f"the server's key.json entry '{name}' has no api_key"
    return ""


def _weights(found: Weights, machine: Machine) -> tuple[Availability, str]:
    if found.unservable:
        return Availability.NOT_SERVED, found.missing
    if found.found:
        return Availability.CAN_LOAD, ""
    if found.download and not machine.offline:
        return Availability.CAN_LOAD, f"the first load downloads {found.source} from the Hugging Face hub"
    return Availability.NEEDS_WEIGHTS, found.missing


def hub_offline() -> bool:
    """Whether the Hugging Face hub is off limits to this process, as huggingface_hub itself reads it."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return True
    return bool(constants.HF_HUB_OFFLINE)
