"""The model registry: ordered ModelSpec entries, loaded from layered JSON files, searched by unification."""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import InvalidArgumentError, ModelNotFoundError
from .spec import ModelSpec, UnificationError

__all__ = ["PACKAGED_SOURCE", "REGISTRY_FILE_NAME", "ModelRegistry", "RegistryFileError"]

logger = logging.getLogger(__name__)

REGISTRY_FILE_NAME = "model_registry.json"
#: the ``lookup_source`` of entries from the registry file shipped inside this package
PACKAGED_SOURCE = "packaged"

_HUMAN_BACKEND = "_player_human"
_PROGRAMMED_BACKEND = "_player_programmed"


class RegistryFileError(ValueError):
    """A registry file cannot be used. The message starts with the file, then says what is wrong."""

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem


def _missing_backend_message(entry: Mapping[str, Any]) -> str:
    # clembench's wording, missing space after "again." included, so log searches keep working
    return (
        f"Missing backend definition in model spec '{ModelSpec.from_dict(entry)}'. "
        "Check or update your model_registry.json and try again."
        "A minimal model spec is {'model_id':<id>,'backend':<backend>}."
    )


def _check_backends(entries: Sequence[ModelSpec]) -> None:
    for entry in entries:
        if "backend" not in entry:
            raise ValueError(_missing_backend_message(entry))


def _parse_entries(text: str, source: str) -> list[ModelSpec]:
    """Entries of one registry file, each tagged with ``source`` unless it names its own lookup_source."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise RegistryFileError(source, f"invalid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise RegistryFileError(
            source, f"expected a JSON list of objects or a single object, got {type(data).__name__}"
        )
    specs: list[ModelSpec] = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise RegistryFileError(source, f"entry {index} is not a JSON object")
        if "backend" not in entry:
            raise RegistryFileError(source, f"entry {index} has no 'backend'. {_missing_backend_message(entry)}")
        # a new dict, so the parsed input stays as it was (clembench mutates it)
        specs.append(ModelSpec.from_dict({**entry, "lookup_source": entry.get("lookup_source", source)}))
    return specs


def _read_file(path: Path) -> list[ModelSpec]:
    source = str(path.absolute())
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RegistryFileError(source, "file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise RegistryFileError(source, f"cannot read the file: {reason}") from None
    return _parse_entries(text, source)


def _read_packaged() -> list[ModelSpec]:
    text = resources.files("clemserve.registry").joinpath(REGISTRY_FILE_NAME).read_text(encoding="utf-8")
    return _parse_entries(text, PACKAGED_SOURCE)


class ModelRegistry:
    """Ordered registry entries; the first entry that unifies with a selector wins.

    Every entry carries ``lookup_source`` (the absolute path of its file, or ``"packaged"``), which becomes
    part of each resolved spec, as in clembench.
    """

    def __init__(self, entries: Sequence[ModelSpec] = ()) -> None:
        _check_backends(entries)
        self._entries: list[ModelSpec] = list(entries)

    @classmethod
    def from_files(
        cls,
        paths: Sequence[Path | str] = (),
        *,
        cwd: Path | None = None,
        packaged: bool = True,
    ) -> ModelRegistry:
        """Layer registry files, earlier files first so that their entries win.

        Order: every file in ``paths`` (a problem there raises RegistryFileError, since the operator named
        the file), then ``cwd/model_registry.json`` when ``cwd`` is given and the file exists (a problem
        there skips that whole file with a warning, where clembench skips it with a debug line), then the
        packaged registry when ``packaged`` is set (a problem there raises: it is a packaging bug, where
        clembench logs a warning and keeps the entries before the bad one).
        """
        entries: list[ModelSpec] = []
        for path in paths:
            entries.extend(_read_file(Path(path)))
        if cwd is not None:
            cwd_file = cwd / REGISTRY_FILE_NAME
            if cwd_file.is_file():
                try:
                    entries.extend(_read_file(cwd_file))
                except RegistryFileError as err:
                    logger.warning("ignoring the model registry in the working directory: %s", err)
        if packaged:
            entries.extend(_read_packaged())
        return cls(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(list(self._entries))

    @property
    def model_specs(self) -> list[ModelSpec]:
        return list(self._entries)

    def resolve(self, selector: str | Mapping[str, Any] | ModelSpec) -> ModelSpec:
        """The selector unified with the first registry entry it unifies with (clembench's
        ``get_first_model_spec_that_unify_with``).

        Human and programmatic names short-circuit to their player backends before any lookup. Extra
        selector keys narrow the match and are carried into the result. Unlike clembench 2024, a selector
        with its own ``backend`` that matches no entry is rejected too (clemcore HEAD behaviour).
        """
        spec = _to_spec(selector)
        if "model_name" not in spec:
            # clembench fails here with an AttributeError from is_human(); callers need to know which field
            raise InvalidArgumentError("model", "the model selector has no 'model_name'")
        if spec.is_human():
            return ModelSpec(model_name=spec.model_name, backend=_HUMAN_BACKEND)
        if spec.is_programmatic():
            return ModelSpec(model_name=spec.model_name, backend=_PROGRAMMED_BACKEND)
        if not self._entries:
            raise AttributeError("Model registry is empty. Load a model registry and try again.")
        for entry in self._entries:
            try:
                return spec.unify(entry)
            except UnificationError:
                continue
        selector_string = spec.to_string()
        hint = _not_found_hint(str(spec.model_name), [str(entry.model_name) for entry in self._entries])
        raise ModelNotFoundError(
            f"No model spec unifies with model selector={selector_string}{hint}", selector=selector_string
        )


def _not_found_hint(name: str, names: Sequence[str]) -> str:
    """What to try instead: close registry names (difflib), and where the whole list is."""
    known = list(dict.fromkeys(names))
    if name in known:
        hint = f"; entries named {name} exist, but none matches the selector's other fields"
    else:
        by_folded = {known_name.lower(): known_name for known_name in known}
        folded = name.lower()
        # a name the selector begins (gpt-4o for gpt-4o-2024-08-06) first, then difflib's close ones, then the
        # names whose stem is close to the selector's, where neither found one (smolm2 for smollm2-135m-instruct:
        # whole names differ in their size and variant too much for difflib's cutoff)
        starting = [known_name for known_name in by_folded if known_name.startswith(folded)]
        close = difflib.get_close_matches(folded, list(by_folded), n=3, cutoff=0.6)
        picked = list(dict.fromkeys(starting + close))[:3] or _close_stems(folded, list(by_folded))[:3]
        hint = f"; did you mean {' or '.join(by_folded[c] for c in picked)}?" if picked else ""
    return f"{hint} (see `clemserve models`)"


def name_stem(name: str) -> str:
    """The part of a model name before its size, version, date and variant: smollm2 of smollm2-135m-instruct,
    gpt of gpt-4o-2024-08-06, claude-sonnet of claude-sonnet-4-5-20250929 (the parts from the first one that
    begins with a digit on); a name without such a part is its own stem."""
    parts = name.lower().split("-")
    for index, part in enumerate(parts):
        if index and part[:1].isdigit():
            return "-".join(parts[:index])
    return name.lower()


def _close_stems(folded: str, names: Sequence[str]) -> list[str]:
    """The names whose stem is close to the selector's stem, the names closest as a whole first."""
    stems: dict[str, list[str]] = {}
    for known_name in names:
        stems.setdefault(name_stem(known_name), []).append(known_name)
    close = difflib.get_close_matches(name_stem(folded), list(stems), n=3, cutoff=0.75)
    found = [known_name for stem in close for known_name in stems[stem]]
    return sorted(found, key=lambda known_name: -difflib.SequenceMatcher(None, folded, known_name).ratio())


def _to_spec(selector: str | Mapping[str, Any] | ModelSpec) -> ModelSpec:
    if isinstance(selector, ModelSpec):
        return selector
    if isinstance(selector, str):
        # from_name, not from_string: clembench parses JSON selectors only on the command line
        return ModelSpec.from_name(selector)
    if isinstance(selector, Mapping):
        return ModelSpec.from_dict(selector)
    raise TypeError(f"a model selector is a str, a mapping or a ModelSpec, not {type(selector).__name__}")
