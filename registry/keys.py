"""API keys for remote backends: clembench's ``key.json`` layout and lookup, plus environment variables.

Nothing in this module logs or formats a raw key: log lines and errors use ``Key.masked()``, and error
messages about a file name the file and the problem, never its content.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from .errors import FailedPreconditionError

__all__ = ["ENVIRONMENT_KEYS", "KEY_FILE_NAME", "EnvironmentKey", "Key", "KeyFileError", "KeyRegistry"]

logger = logging.getLogger(__name__)

KEY_FILE_NAME = "key.json"


class KeyFileError(ValueError):
    """A key file cannot be used. Names the file and the problem; never quotes the file's content."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class Key(Mapping[str, Any]):
    """One entry of ``key.json``: ``api_key`` (None when absent) plus any extra fields (base_url, ...).

    Read-only, unlike clembench's, so a Key handed to a backend cannot change the registry behind it.
    """

    __slots__ = ("_fields",)
    _fields: dict[str, Any]

    def __init__(self, /, **fields: Any) -> None:
        object.__setattr__(self, "_fields", {"api_key": None, **fields})

    def __getitem__(self, name: str) -> Any:
        return self._fields[name]

    def __getattr__(self, name: str) -> Any:
        if name == "_fields":
            raise AttributeError(name)
        try:
            return self._fields[name]
        except KeyError:
            raise AttributeError(f"'Key' object has no attribute {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise AttributeError(f"Key is read-only; use KeyRegistry.set_key_for() to change {name!r}")

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore_key, (self._fields,))

    def has_api_key(self) -> bool:
        api_key = self._fields["api_key"]
        return isinstance(api_key, str) and api_key.strip() != ""

    def _masked_for_json(self) -> str:
        """clembench's masking, used by to_json(): short keys keep their last 2 characters, long ones 4+4."""
        if not self.has_api_key():
            return "[MISSING]"
        api_key: str = self._fields["api_key"]
        if len(api_key) <= 8:
            return "****" + api_key[-2:]
        return f"{api_key[:4]}...{api_key[-4:]}"

    def masked(self) -> str:
        """The key as log lines and errors may show it: only its last 4 characters.

        Stricter than ``to_json()``, which also shows the first 4. Keys of 8 characters or fewer show none
        (``****``); a missing or blank key shows ``[MISSING]``.
        """
        if not self.has_api_key():
            return "[MISSING]"
        api_key: str = self._fields["api_key"]
        if len(api_key) <= 8:
            return "****"
        return "…" + api_key[-4:]

    def to_json(self, mask_secrets: bool = True) -> str:
        fields = dict(self._fields)
        if mask_secrets:
            fields["api_key"] = self._masked_for_json()
        return json.dumps(fields, sort_keys=True, indent=2)

    def __repr__(self) -> str:
        # other fields may be secrets too (tokens, passwords), so only their names are shown
        others = ", ".join(sorted(name for name in self._fields if name != "api_key"))
        return f"Key(api_key={self.masked()}, fields=[{others}])"


def _restore_key(fields: dict[str, Any]) -> Key:
    return Key(**fields)


@dataclass(frozen=True)
class EnvironmentKey:
    """Where one key entry comes from in the environment: the API key variables in order of preference,
    and extra fields, each from one variable."""

    api_key: tuple[str, ...]
    extras: tuple[tuple[str, str], ...] = ()


#: key entries that ``KeyRegistry.with_environment`` fills from environment variables
ENVIRONMENT_KEYS: dict[str, EnvironmentKey] = {
    "openai": EnvironmentKey(
        ("OPENAI_API_KEY",), (("organisation", "OPENAI_ORGANIZATION"), ("base_url", "OPENAI_BASE_URL"))
    ),
    "anthropic": EnvironmentKey(("ANTHROPIC_API_KEY",)),
    "mistral": EnvironmentKey(("MISTRAL_API_KEY",)),
    "cohere": EnvironmentKey(("COHERE_API_KEY", "CO_API_KEY")),
    "google": EnvironmentKey(("GOOGLE_API_KEY", "GEMINI_API_KEY")),
    "openrouter": EnvironmentKey(("OPENROUTER_API_KEY",)),
    "huggingface": EnvironmentKey(("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")),
    "openai_compatible": EnvironmentKey(("OPENAI_COMPATIBLE_API_KEY",), (("base_url", "OPENAI_COMPATIBLE_BASE_URL"),)),
    "azure_gpt": EnvironmentKey(("AZURE_GPT_API_KEY",), (("base_url", "AZURE_GPT_BASE_URL"),)),
    "azure_claude": EnvironmentKey(("AZURE_CLAUDE_API_KEY",), (("base_url", "AZURE_CLAUDE_BASE_URL"),)),
}


def _first_set(environ: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str] | None:
    for name in names:
        value = environ.get(name, "")
        if value.strip():
            return name, value
    return None


def _load_key_file(path: Path) -> dict[str, Key]:
    """Parse a key file or raise KeyFileError; JSON error messages carry positions only, never content."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyFileError(path, "file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
        raise KeyFileError(path, f"cannot read the file: {reason}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        # `from None`: the exception's .doc holds the whole file, secrets included
        raise KeyFileError(path, f"invalid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    if not isinstance(data, dict):
        raise KeyFileError(path, f"expected a JSON object of key entries by name, got {type(data).__name__}")
    keys: dict[str, Key] = {}
    for name, fields in data.items():
        if not isinstance(fields, dict):
            raise KeyFileError(path, f"entry {name!r} is not a JSON object")
        keys[name] = Key(**fields)
    return keys


class KeyRegistry:
    """Key entries by name, as loaded from one ``key.json`` (files are never merged).

    ``searched`` holds the key files looked at, in order, for messages (default: ``key_file_path``).
    """

    def __init__(
        self,
        key_file_path: Path,
        keys: Mapping[str, Key | Mapping[str, Any]] | None = None,
        *,
        searched: Sequence[Path] = (),
    ) -> None:
        self.key_file_path = key_file_path
        self.searched: tuple[Path, ...] = tuple(searched) or (key_file_path,)
        self._keys: dict[str, Key] = {
            name: value if isinstance(value, Key) else Key(**value) for name, value in (keys or {}).items()
        }
        # entries filled from the environment: persist() must not write them into a file
        self._from_environment: set[str] = set()

    @classmethod
    def from_json(
        cls,
        path: Path | None = None,
        *,
        cwd: Path | None = None,
        home: Path | None = None,
        fallback: bool = True,
    ) -> KeyRegistry:
        """Load keys like clembench: an explicit ``path``, else ``cwd/key.json``, else (if ``fallback``)
        ``home/.clemcore/key.json``. The first readable file wins whole.

        An explicit path must work (KeyFileError otherwise). In the lookup, a missing file is skipped
        silently and a broken one with a warning; finding nothing gives an empty registry and a warning.
        ``cwd`` and ``home`` default to the process's, read at call time.
        """
        if path is not None:
            return cls(path, _load_key_file(path))
        candidates = [(cwd if cwd is not None else Path.cwd()) / KEY_FILE_NAME]
        if fallback:
            candidates.append((home if home is not None else Path.home()) / ".clemcore" / KEY_FILE_NAME)
        for i, candidate in enumerate(candidates):
            if not candidate.is_file():
                continue
            try:
                return cls(candidate, _load_key_file(candidate), searched=candidates[: i + 1])
            except KeyFileError as err:
                logger.warning("skipping key file: %s", err)
        tried = " or ".join(str(candidate) for candidate in candidates)
        logger.warning("no usable key file found (tried %s); remote backends will have no keys", tried)
        return cls(candidates[-1], searched=candidates)

    def with_environment(self, environ: Mapping[str, str]) -> KeyRegistry:
        """A copy in which key entries absent from the file are filled from environment variables.

        See ENVIRONMENT_KEYS. An entry is added only when its API key variable is set and not blank; file
        entries win, even ones without an ``api_key``.
        """
        registry = KeyRegistry(self.key_file_path, self._keys, searched=self.searched)
        registry._from_environment = set(self._from_environment)
        for name, source in ENVIRONMENT_KEYS.items():
            if name in registry._keys:
                continue
            found = _first_set(environ, source.api_key)
            if found is None:
                continue
            variable, api_key = found
            fields: dict[str, Any] = {"api_key": api_key}
            for field, extra_variable in source.extras:
                value = environ.get(extra_variable, "")
                if value.strip():
                    fields[field] = value
            key = Key(**fields)
            registry._keys[name] = key
            registry._from_environment.add(name)
            logger.debug("key entry %r from environment variable %s (%s)", name, variable, key.masked())
        return registry

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._keys))

    def __contains__(self, name: object) -> bool:
        return name in self._keys

    def __repr__(self) -> str:
        return f"KeyRegistry({str(self.key_file_path)!r}, names={sorted(self._keys)})"

    def get_key_for(self, name: str) -> Key:
        """The entry ``name``; FailedPreconditionError if there is none (clembench: AssertionError).

        The message says where the key belongs (on the server, which reads this registry, not on the game
        machine): the key files searched and the environment variables that would fill the entry.
        """
        try:
            return self._keys[name]
        except KeyError:
            raise FailedPreconditionError(self.missing_key_message(name), subject=f"{KEY_FILE_NAME}: {name}") from None

    def missing_key_message(self, name: str) -> str:
        """What to do when the server has no ``name`` entry. Names files and variables, never a value."""
        searched = ", ".join(str(path) for path in self.searched)
        article = "an" if name[:1].lower() in "aeiou" else "a"
        message = (
            f"the server has no key for {name}: add {article} `{name}` entry to the server's {KEY_FILE_NAME}"
            f" (searched: {searched})"
        )
        source = ENVIRONMENT_KEYS.get(name)
        if source is not None:
            message += f" or set {' or '.join(source.api_key)} on the server"
        return message

    def set_key_for(self, name: str, values: Mapping[str, Any], reset: bool = False) -> KeyRegistry:
        """Add an entry, or merge ``values`` into an existing one; ``reset`` replaces it instead."""
        if reset or name not in self._keys:
            self._keys[name] = Key(**values)
        else:
            self._keys[name] = Key(**{**self._keys[name], **values})
        # set on purpose, so it belongs to the file now
        self._from_environment.discard(name)
        return self

    def persist(self) -> None:
        """Write the entries to ``key_file_path`` (sorted keys, indent 2), leaving out environment ones.

        A new file is created readable by its owner only, since it holds secrets.
        """
        data = {name: dict(key) for name, key in self._keys.items() if name not in self._from_environment}
        text = json.dumps(data, sort_keys=True, indent=2)
        self.key_file_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.key_file_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
