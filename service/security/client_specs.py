"""Safe loading: a client's selector may narrow a registry entry, never point it at other code or files.

Selectors unify with the server's registry entries, so a selector can add keys an entry lacks. Most such
keys are harmless (generation settings, a key to pick among entries); some decide what the server loads,
runs or calls: a model id, a file path, a base URL, a backend, remote code, a chat template, engine
arguments. A selector may carry those only with the value its entry already has; adding one is
PERMISSION_DENIED naming the field, unless the operator started the server with ``--allow-client-specs``.

Pure functions, no grpc: the model manager calls :func:`check_selector` where it resolves selectors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from clemserve.registry import ModelSpec, UnificationError
from clemserve.registry.errors import PermissionDeniedError

#: keys (at any depth) that load code or weights, or choose where calls go
FORBIDDEN_KEYS = frozenset(
    {
        "backend",
        "huggingface_id",
        "model_id",
        "base_url",
        "trust_remote_code",
        "gguf",
        "peft_model",
        "custom_chat_template",
        "vllm_args",
    }
)
#: a key with one of these words (split at "_" and "-") names a file, folder or location
_PATH_WORDS = frozenset(
    {"path", "paths", "dir", "dirs", "directory", "file", "files", "filename", "folder", "url", "urls", "uri"}
)


def is_forbidden_key(key: str) -> bool:
    lowered = key.lower()
    return lowered in FORBIDDEN_KEYS or not _PATH_WORDS.isdisjoint(lowered.replace("-", "_").split("_"))


def introduced_paths(selector: Any, entry: Any, path: str = "") -> Iterator[str]:
    """Every path the selector has and the entry lacks (each leaf of an added subtree, and the subtree
    itself when it is empty). Values both sides have are equal: they unified."""
    if isinstance(selector, Mapping):
        if path and not isinstance(entry, Mapping):
            yield from _leaves(selector, path)
            return
        for key, value in selector.items():
            child = f"{path}.{key}" if path else str(key)
            if isinstance(entry, Mapping) and key in entry:
                yield from introduced_paths(value, entry[key], child)
            else:
                yield from _leaves(value, child)
    elif isinstance(selector, list) and isinstance(entry, list) and len(selector) == len(entry):
        for index, (value, other) in enumerate(zip(selector, entry, strict=True)):
            yield from introduced_paths(value, other, f"{path}.{index}")


def _leaves(value: Any, path: str) -> Iterator[str]:
    if isinstance(value, Mapping) and value:
        for key, child in value.items():
            yield from _leaves(child, f"{path}.{key}")
    elif isinstance(value, list) and value:
        for index, child in enumerate(value):
            yield from _leaves(child, f"{path}.{index}")
    else:
        yield path


def forbidden_field(selector: Mapping[str, Any], entry: Mapping[str, Any]) -> str | None:
    """The first field the selector adds to ``entry`` that clients may not choose, or None."""
    for path in introduced_paths(selector, entry):
        if any(is_forbidden_key(part) for part in path.split(".") if not part.isdigit()):
            return path
    return None


def matched_entry(entries: Iterable[ModelSpec], selector: Mapping[str, Any]) -> ModelSpec | None:
    """The entry the registry resolves ``selector`` with: the first one it unifies with."""
    spec = ModelSpec.from_dict(selector)
    for entry in entries:
        try:
            spec.unify(entry)
        except UnificationError:
            continue
        return entry
    return None


def check_selector(selector: str | Mapping[str, Any], entries: Iterable[ModelSpec]) -> None:
    """PERMISSION_DENIED if ``selector`` adds a forbidden field to the registry entry it matches.

    A name only picks an entry; a selector that matches none adds nothing (the registry answers NOT_FOUND,
    or it names a game's human or programmatic player, which nothing loads).
    """
    if isinstance(selector, str):
        return
    entry = matched_entry(entries, selector)
    if entry is None:
        return
    field = forbidden_field(selector, entry)
    if field is not None:
        raise PermissionDeniedError(
            f"model.spec.{field}: the registry entry {entry.get('model_name')!r} does not set this field, and "
            "clients may only narrow registry entries, not choose what the server loads or calls "
            "(the server allows it with --allow-client-specs)",
            metadata={"field": f"model.spec.{field}"},
        )
