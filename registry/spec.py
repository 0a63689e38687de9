"""ModelSpec: clembench's open-ended model description, and the unification that selects registry entries.

clembench declares ``@dataclass(frozen=True) class ModelSpec(SimpleNamespace)``; this is a plain class with
the same observable behaviour, minus the bugs the spec lists: equality compares contents, and
``from_string`` no longer turns apostrophes in plain names into double quotes.

Unification follows ``nltk.featstruct.unify`` as clembench calls it (spec section 1.4), written out here so
that the registry needs no nltk.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import FrozenInstanceError
from typing import Any, NoReturn

__all__ = [
    "HUMAN_SPECS",
    "PROGRAMMATIC_SPECS",
    "ModelSpec",
    "ModelSpecKeyError",
    "UnificationError",
    "unify_values",
]

#: model names that a scripted player answers (clemcore HEAD; 2024 also had dry_run, custom, _slurk_response)
PROGRAMMATIC_SPECS: list[str] = ["mock", "programmatic"]
#: model names that a person at a terminal answers
HUMAN_SPECS: list[str] = ["human", "terminal"]


class UnificationError(ValueError):
    """Two values do not unify. ``path`` locates the first conflict, e.g. ``model_config.eos_to_cull``."""

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class ModelSpecKeyError(AttributeError, KeyError):
    """A key the spec lacks.

    clembench raises AttributeError for ``spec["missing"]``; being a KeyError too lets ModelSpec honour the
    Mapping protocol (``dict(spec)``, ``Mapping.get``) without breaking callers that catch AttributeError.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _clash(path: str, left: Any, right: Any) -> UnificationError:
    return UnificationError(f"{path or '<top>'}: {left!r} does not unify with {right!r}", path=path)


def _unify(left: Any, right: Any, path: str) -> Any:
    if isinstance(left, dict) and isinstance(right, dict):
        result: dict[Any, Any] = {}
        for key, value in left.items():
            if key in right:
                result[key] = _unify(value, right[key], _join(path, key))
            else:
                result[key] = copy.deepcopy(value)
        # nltk emits the other side's extra keys sorted; to_string() shows the order, so keep it
        for key in sorted((k for k in right if k not in left), key=str):
            result[key] = copy.deepcopy(right[key])
        return result
    if isinstance(left, dict) or isinstance(right, dict):
        raise _clash(path, left, right)
    if isinstance(left, list) and isinstance(right, list):
        if len(left) != len(right):
            raise _clash(path, left, right)
        return [_unify(a, b, _join(path, i)) for i, (a, b) in enumerate(zip(left, right, strict=True))]
    if isinstance(left, list) or isinstance(right, list):
        # a tuple is a plain value to nltk, and (1,) != [1], so tuples never unify with lists
        raise _clash(path, left, right)
    if left == right:
        return left
    raise _clash(path, left, right)


def unify_values(a: Any, b: Any) -> Any:
    """Unify two JSON-like values the way clembench's nltk call does; raise UnificationError if they clash.

    Dicts merge key-wise and recursively, lists unify element-wise when equally long, anything else must be
    ``==`` (so ``1`` unifies with ``1.0`` and ``True``, never with ``"1"``; ``None`` only with ``None``).
    Where both sides agree the left value is kept. Result key order: the left keys in their order, then the
    right side's extra keys alphabetically (a value only one side has is copied as it is). The inputs are
    never mutated and never shared with the result.

    Two deliberate differences from nltk: a dict never unifies with a list (nltk unifies ``{}`` with ``[]``
    and raises KeyError for an equally long non-empty pair), and values are trees (nltk treats an object
    shared by two keys as one re-entrant node; JSON input never has such sharing).
    """
    return _unify(a, b, "")


def _canonical(value: Any) -> Any:
    """Reduce a value to a JSON form in which values that compare equal look the same (for hashing)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else value
    if value is None or isinstance(value, int | str):
        return value
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    # not JSON: equal objects must hash alike, so they all share one bucket
    return "<opaque>"


class ModelSpec(Mapping[str, Any]):
    """An immutable, open-ended description of a model: any keys, read as items or attributes.

    Differences from clembench, on purpose:
    - equality and hash compare contents (clembench's compare nothing: any two specs are equal);
    - ``in``, ``[]`` and ``has_attr`` see the spec's keys only, not methods such as ``to_dict``;
    - the constructor deep-copies its values, so later changes to the source dict do not leak in;
    - ``to_dict()`` returns a deep copy, so callers cannot change a spec through it;
    - ``get()``, ``keys()``, ``items()``, ``values()``, ``len()`` and iteration exist (clembench has none).
    Attribute access reaches a key only when no method has its name; use ``spec["keys"]`` for such keys.
    """

    __slots__ = ("_data", "_text")
    _data: dict[str, Any]
    _text: str | None

    def __init__(self, /, **kwargs: Any) -> None:
        object.__setattr__(self, "_data", copy.deepcopy(kwargs))

    @classmethod
    def _wrap(cls, data: dict[str, Any]) -> ModelSpec:
        """Adopt a dict this module built itself, without copying it again."""
        spec = cls.__new__(cls)
        object.__setattr__(spec, "_data", data)
        return spec

    # -- construction ------------------------------------------------------------------------------------

    @classmethod
    def from_name(cls, model_name: str | None) -> ModelSpec:
        if model_name is None:
            raise ValueError("Cannot create ModelSpec because model_name is None (but required)")
        return cls(model_name=model_name)

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> ModelSpec:
        if not isinstance(spec, Mapping):
            # clembench's ModelSpec(**spec) fails the same way; from_string relies on it
            raise TypeError(f"ModelSpec.from_dict() needs a mapping, got {type(spec).__name__}")
        return cls(**spec)

    @classmethod
    def from_string(cls, text: str) -> ModelSpec:
        """Parse a CLI selector: a JSON object (single quotes allowed) or else a plain model name.

        clembench replaces every ``'`` by ``"`` and, when parsing fails, keeps the *replaced* string as the
        name (``it's`` became ``it"s``) [bug]. Here the string is parsed as written first, then with the
        quotes replaced, and a plain name is always the original string.
        """
        candidates = [text]
        if "'" in text:
            candidates.append(text.replace("'", '"'))
        for candidate in candidates:
            try:
                parsed = json.loads(candidate)
            except ValueError:
                continue
            if isinstance(parsed, dict):
                return cls.from_dict(parsed)
        return cls.from_name(text)

    @classmethod
    def from_strings(cls, texts: Iterable[str]) -> list[ModelSpec]:
        return [cls.from_string(text) for text in texts]

    # -- read-only dict-like access ----------------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        try:
            return self._data[key]
        except KeyError:
            raise ModelSpecKeyError(f"'ModelSpec' object has no attribute {key!r}") from None

    def __getattr__(self, name: str) -> Any:
        # only reached when normal lookup fails; guard _data so copy/pickle of a bare instance cannot recurse
        if name == "_data":
            raise AttributeError(name)
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(f"'ModelSpec' object has no attribute {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> NoReturn:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str, default: Any = None) -> Any:
        """The value for ``key`` or ``default``. An addition: clembench's ModelSpec has no ``get``."""
        return self._data.get(key, default)

    def has_attr(self, key: str) -> bool:
        return key in self._data

    def has_temperature(self) -> bool:
        return "temperature" in self._data

    def has_backend(self) -> bool:
        return "backend" in self._data

    def is_programmatic(self) -> bool:
        """Case-sensitive; raises AttributeError without ``model_name``, as clembench does."""
        return self.model_name in PROGRAMMATIC_SPECS

    def is_human(self) -> bool:
        """Case-sensitive; raises AttributeError without ``model_name``, as clembench does."""
        return self.model_name in HUMAN_SPECS

    # -- derived specs -----------------------------------------------------------------------------------

    def rename(self, model_name: str) -> ModelSpec:
        return ModelSpec._wrap({**copy.deepcopy(self._data), "model_name": model_name})

    def unify(self, other: Mapping[str, Any]) -> ModelSpec:
        """The union of both specs if no key clashes, else ValueError (clembench's message).

        This spec's keys come first, so ``selector.unify(entry)`` keeps the caller's order in ``to_string()``.
        """
        other_data = other._data if isinstance(other, ModelSpec) else dict(other)
        try:
            result = unify_values(self._data, other_data)
        except UnificationError as err:
            raise UnificationError(f"{self} does not unify with {other}", path=err.path) from err
        return ModelSpec._wrap(result)

    # -- views -------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A deep copy. clembench returns a shallow one, through which callers could change nested values."""
        return copy.deepcopy(self._data)

    def to_string(self) -> str:
        # computed once: a spec does not change (the server sends the same one with every answer)
        text = getattr(self, "_text", None)
        if text is None:
            text = json.dumps(self._data, separators=(",", ":"))
            object.__setattr__(self, "_text", text)
        return text

    def __str__(self) -> str:
        return str(self._data)

    def __repr__(self) -> str:
        return f"ModelSpec({self._data!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ModelSpec):
            return NotImplemented
        return self._data == other._data

    def __hash__(self) -> int:
        # computed each time: nested values could still be changed in place by a careless caller
        return hash(json.dumps(_canonical(self._data), sort_keys=True, separators=(",", ":")))

    def __copy__(self) -> ModelSpec:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> ModelSpec:
        return ModelSpec._wrap(copy.deepcopy(self._data, memo))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore, (self._data,))


def _restore(data: dict[str, Any]) -> ModelSpec:
    """Unpickle helper: ModelSpec refuses attribute assignment, so pickle cannot set state the usual way."""
    return ModelSpec._wrap(data)
