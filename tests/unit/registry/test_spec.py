"""ModelSpec and unification: spec sections 1.1-1.4 and conformance cases 1-13."""

from __future__ import annotations

import copy
import json
import pickle
from dataclasses import FrozenInstanceError
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clemserve.registry import ModelSpec, UnificationError, unify_values

# -- conformance cases 1-13 ------------------------------------------------------------------------------


def test_case01_item_access() -> None:
    assert ModelSpec(model_name="model_a")["model_name"] == "model_a"


def test_case02_contains() -> None:
    spec = ModelSpec(model_name="model_a")
    assert "model_name" in spec
    assert "nonexistent" not in spec


def test_case03_item_assignment_raises_type_error() -> None:
    spec = ModelSpec(model_name="model_a")
    with pytest.raises(TypeError):
        spec["model_name"] = "model_b"
    assert spec["model_name"] == "model_a"


def test_case04_from_name() -> None:
    assert ModelSpec.from_name("gpt-4").model_name == "gpt-4"
    with pytest.raises(ValueError, match=r"^Cannot create ModelSpec because model_name is None \(but required\)$"):
        ModelSpec.from_name(None)


def test_case05_from_dict() -> None:
    spec = ModelSpec.from_dict({"model_name": "gpt-4", "backend": "openai"})
    assert spec.model_name == "gpt-4"
    assert spec.backend == "openai"


def test_case06_from_string() -> None:
    parsed = ModelSpec.from_string('{"model_name": "gpt-4", "backend": "openai"}')
    assert parsed.to_dict() == {"model_name": "gpt-4", "backend": "openai"}
    assert ModelSpec.from_string("gpt-4").to_dict() == {"model_name": "gpt-4"}
    assert ModelSpec.from_string("{'model_name': 'gpt-4'}").to_dict() == {"model_name": "gpt-4"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gpt-4o", {"model_name": "gpt-4o"}),
        ("{'model_name':'x'}", {"model_name": "x"}),
        ('"gpt"', {"model_name": '"gpt"'}),  # JSON string, not an object: the name keeps its quotes
        ("[1,2]", {"model_name": "[1,2]"}),
        ("123", {"model_name": "123"}),
    ],
)
def test_case06_from_string_observed_results(text: str, expected: dict[str, Any]) -> None:
    assert ModelSpec.from_string(text).to_dict() == expected


def test_case06_from_string_keeps_apostrophes_in_plain_names() -> None:
    # clembench gives it"s [bug]; the original string is the name here
    assert ModelSpec.from_string("it's").model_name == "it's"


def test_case06_from_string_parses_json_with_apostrophes_inside_values() -> None:
    assert ModelSpec.from_string('{"model_name": "it\'s"}').model_name == "it's"


def test_case07_from_strings() -> None:
    specs = ModelSpec.from_strings(["gpt-4", '{"model_name": "claude"}'])
    assert [spec.model_name for spec in specs] == ["gpt-4", "claude"]


def test_case08_views() -> None:
    kwargs = {"model_name": "gpt-4", "backend": "openai"}
    spec = ModelSpec(**kwargs)
    assert spec.to_dict() == kwargs
    assert "gpt-4" in spec.to_string()
    assert "model_name" in spec.to_string()
    assert "ModelSpec" in repr(spec)
    assert "gpt-4" in repr(spec)
    assert "gpt-4" in str(spec)


def test_case08_exact_string_formats() -> None:
    spec = ModelSpec(model_name="m", backend="b", model_config={"x": [1, 2]})
    assert spec.to_string() == '{"model_name":"m","backend":"b","model_config":{"x":[1,2]}}'
    assert str(spec) == "{'model_name': 'm', 'backend': 'b', 'model_config': {'x': [1, 2]}}"
    assert repr(spec) == "ModelSpec({'model_name': 'm', 'backend': 'b', 'model_config': {'x': [1, 2]}})"


def test_case08_to_string_keeps_insertion_order() -> None:
    assert ModelSpec(z=1, a=2).to_string() == '{"z":1,"a":2}'


def test_case09_has_helpers() -> None:
    full = ModelSpec(model_name="m", temperature=0.5, backend="b")
    bare = ModelSpec(model_name="m")
    assert full.has_attr("model_name") and full.has_temperature() and full.has_backend()
    assert not bare.has_attr("backend")
    assert not bare.has_temperature()
    assert not bare.has_backend()


@pytest.mark.parametrize(
    ("name", "programmatic", "human"),
    [
        ("mock", True, False),
        ("programmatic", True, False),
        ("human", False, True),
        ("terminal", False, True),
        ("gpt-4", False, False),
        ("Human", False, False),  # case-sensitive
    ],
)
def test_case10_human_and_programmatic(name: str, programmatic: bool, human: bool) -> None:
    spec = ModelSpec.from_name(name)
    assert spec.is_programmatic() is programmatic
    assert spec.is_human() is human


def test_case10_without_model_name_raises_attribute_error() -> None:
    with pytest.raises(AttributeError):
        ModelSpec(backend="b").is_human()
    with pytest.raises(AttributeError):
        ModelSpec(backend="b").is_programmatic()


def test_case11_rename() -> None:
    spec = ModelSpec(model_name="a", backend="b", model_config={"k": 1})
    renamed = spec.rename("x")
    assert renamed.to_dict() == {"model_name": "x", "backend": "b", "model_config": {"k": 1}}
    assert spec.model_name == "a"
    assert renamed is not spec


def test_case12_unification() -> None:
    assert ModelSpec().unify(ModelSpec()) == ModelSpec()
    entry = ModelSpec(model_name="a", backend="b")
    assert ModelSpec().unify(entry) == entry
    with pytest.raises(ValueError):
        ModelSpec(model_name="a").unify(ModelSpec(model_name="b"))
    with pytest.raises(ValueError):
        ModelSpec(model_name="a", backend="x").unify(ModelSpec(model_name="a", backend="y"))
    assert ModelSpec(model_name="a").unify(entry) == entry
    union = ModelSpec(model_name="a", quantization="8bit").unify(entry)
    assert union.to_dict() == {"model_name": "a", "quantization": "8bit", "backend": "b"}


def test_case12_failure_message_is_clembenchs() -> None:
    left, right = ModelSpec(model_name="a"), ModelSpec(model_name="b")
    with pytest.raises(ValueError) as info:
        left.unify(right)
    assert str(info.value) == "{'model_name': 'a'} does not unify with {'model_name': 'b'}"
    assert isinstance(info.value, UnificationError)
    assert info.value.path == "model_name"


def test_case13_nested_dicts_merge() -> None:
    merged = ModelSpec(model_config={"x": 1}).unify(ModelSpec(model_config={"y": 2}))
    assert merged.model_config == {"x": 1, "y": 2}
    with pytest.raises(ValueError):
        ModelSpec(model_config={"x": 1}).unify(ModelSpec(model_config={"x": 2}))
    deep = ModelSpec(a={"b": {"c": 1}}).unify(ModelSpec(a={"b": {"d": 2}}))
    assert deep.a == {"b": {"c": 1, "d": 2}}


def test_case13_lists() -> None:
    with pytest.raises(ValueError):
        ModelSpec(languages=["en"]).unify(ModelSpec(languages=["en", "de"]))
    with pytest.raises(ValueError):
        ModelSpec(languages=["de", "en"]).unify(ModelSpec(languages=["en", "de"]))
    assert unify_values([{"a": 1}], [{"a": 1, "b": 2}]) == [{"a": 1, "b": 2}]


def test_case13_scalars() -> None:
    assert ModelSpec(x=1).unify(ModelSpec(x=1.0)).x == 1
    with pytest.raises(ValueError):
        ModelSpec(x=1).unify(ModelSpec(x="1"))
    with pytest.raises(ValueError):
        ModelSpec(x=None).unify(ModelSpec(x="value"))


@pytest.mark.parametrize(
    ("a", "b", "unifies"),
    [
        (1, 1.0, True),
        (True, 1, True),
        (0.0, 0, True),
        (0.0, False, True),
        (1, "1", False),
        ("A", "a", False),
        (None, None, True),
        (None, 0, False),
        ("", None, False),
        ("?x", "y", False),  # strings are never variables
        ({}, {"k": 1}, True),
        ({"k": 1}, 1, False),
        ({"k": 1}, [1], False),
        ({}, [], False),  # nltk unifies these two (and crashes on equal-length non-empty ones); never here
        ([1], (1,), False),
        ((1, 2), (1, 2), True),
        ([], [], True),
    ],
)
def test_section_1_4_scalar_rules(a: Any, b: Any, unifies: bool) -> None:
    if unifies:
        unify_values(a, b)
    else:
        with pytest.raises(UnificationError):
            unify_values(a, b)


def test_equal_scalars_keep_the_left_value() -> None:
    assert type(unify_values(1, True)) is int
    assert type(unify_values(True, 1)) is bool
    assert type(unify_values(1.0, 1)) is float


# -- key order of unification results --------------------------------------------------------------------


def test_unify_key_order_caller_first_then_extras_alphabetically() -> None:
    selector = ModelSpec(model_name="m", temperature=0)
    entry = ModelSpec(zeta=1, model_name="m", backend="b", alpha=2)
    assert selector.unify(entry).to_string() == '{"model_name":"m","temperature":0,"alpha":2,"backend":"b","zeta":1}'


def test_unify_key_order_nested() -> None:
    left = {"model_config": {"y": 1, "x": 2}}
    right = {"model_config": {"b": 1, "x": 2, "a": {"z": 1, "c": 2}}}
    result = unify_values(left, right)
    assert list(result["model_config"]) == ["y", "x", "a", "b"]
    # a value only the right side has is copied as it is, its own keys unsorted (nltk 3.9.1 does the same)
    assert list(result["model_config"]["a"]) == ["z", "c"]
    listed = unify_values([{"q": 1}], [{"p": 2, "o": 3}])
    assert list(listed[0]) == ["q", "o", "p"]


# -- equality, hash, copies, immutability ----------------------------------------------------------------


def test_equality_compares_contents() -> None:
    # clembench's dataclass compares nothing, so these were all "equal" [bug]
    assert ModelSpec(model_name="a") != ModelSpec(model_name="b", backend="x")
    assert ModelSpec(model_name="a", backend="x") == ModelSpec(backend="x", model_name="a")
    assert ModelSpec(model_name="a") != {"model_name": "a"}


def test_hash_follows_content() -> None:
    assert hash(ModelSpec(a=1, b={"c": [1, 2]})) == hash(ModelSpec(b={"c": [1, 2]}, a=1))
    assert len({ModelSpec(model_name="a"), ModelSpec(model_name="a"), ModelSpec(model_name="b")}) == 2


def test_hash_agrees_with_numeric_equality() -> None:
    specs = [ModelSpec(x=1), ModelSpec(x=1.0), ModelSpec(x=True)]
    assert all(spec == specs[0] for spec in specs)
    assert len({hash(spec) for spec in specs}) == 1


def test_to_dict_returns_a_deep_copy() -> None:
    spec = ModelSpec(model_name="m", model_config={"x": [1]})
    data = spec.to_dict()
    data["model_name"] = "changed"
    data["model_config"]["x"].append(2)
    assert spec.to_dict() == {"model_name": "m", "model_config": {"x": [1]}}


def test_constructor_copies_its_input() -> None:
    config = {"x": [1]}
    spec = ModelSpec.from_dict({"model_name": "m", "model_config": config})
    config["x"].append(2)
    assert spec.model_config == {"x": [1]}


def test_unify_does_not_mutate_or_share_inputs() -> None:
    left = ModelSpec(model_config={"x": 1}, languages=["en"])
    right = ModelSpec(model_config={"y": 2}, extra={"k": [1]})
    before = (left.to_dict(), right.to_dict())
    result = left.unify(right)
    assert (left.to_dict(), right.to_dict()) == before
    result.extra["k"].append(2)
    assert right.extra == {"k": [1]}


def test_attribute_assignment_raises_frozen_instance_error() -> None:
    spec = ModelSpec(model_name="a")
    with pytest.raises(FrozenInstanceError):
        spec.model_name = "b"
    with pytest.raises(AttributeError):
        spec.other = 1
    with pytest.raises(AttributeError):
        del spec.model_name
    assert spec.model_name == "a"


def test_missing_keys_raise_attribute_error() -> None:
    spec = ModelSpec(model_name="a")
    with pytest.raises(AttributeError, match="backend"):
        _ = spec["backend"]
    with pytest.raises(AttributeError, match="backend"):
        _ = spec.backend
    # also a KeyError, so the Mapping protocol holds
    with pytest.raises(KeyError):
        _ = spec["backend"]


def test_get_is_an_addition() -> None:
    spec = ModelSpec(model_name="a")
    assert spec.get("model_name") == "a"
    assert spec.get("backend") is None
    assert spec.get("backend", "fallback") == "fallback"


def test_mapping_views() -> None:
    spec = ModelSpec(model_name="a", backend="b")
    assert list(spec.keys()) == ["model_name", "backend"]
    assert list(spec.items()) == [("model_name", "a"), ("backend", "b")]
    assert dict(spec) == {"model_name": "a", "backend": "b"}
    assert len(spec) == 2


def test_keys_named_like_methods_stay_readable_as_items() -> None:
    spec = ModelSpec(keys="value", self="me")
    assert spec["keys"] == "value"
    assert spec["self"] == "me"
    assert "to_dict" not in spec


def test_pickle_and_deepcopy_round_trip() -> None:
    spec = ModelSpec(model_name="m", model_config={"x": [1]})
    assert pickle.loads(pickle.dumps(spec)) == spec
    clone = copy.deepcopy(spec)
    assert clone == spec
    assert clone.model_config is not spec.model_config
    assert copy.copy(spec) is spec


def test_from_dict_rejects_non_mappings() -> None:
    with pytest.raises(TypeError):
        ModelSpec.from_dict(["model_name"])


# -- property tests: unify_values against an independent reference ---------------------------------------

_FAIL = object()


def _reference_unify(a: Any, b: Any) -> Any:
    """Section 1.4, recursively, without caring about key order."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: dict[str, Any] = {}
        for key in set(a) | set(b):
            if key in a and key in b:
                value = _reference_unify(a[key], b[key])
                if value is _FAIL:
                    return _FAIL
                out[key] = value
            else:
                out[key] = a[key] if key in a else b[key]
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return _FAIL
        items = [_reference_unify(x, y) for x, y in zip(a, b, strict=True)]
        return _FAIL if any(item is _FAIL for item in items) else items
    if isinstance(a, dict | list) or isinstance(b, dict | list):
        return _FAIL
    return a if a == b else _FAIL


def _tagged(value: Any) -> Any:
    """A comparable form that tells 1, 1.0 and True apart (== does not) but ignores key order."""
    if isinstance(value, dict):
        return {key: _tagged(item) for key, item in value.items()}
    if isinstance(value, list):
        return ["list", [_tagged(item) for item in value]]
    return (type(value).__name__, value)


def _try_unify(a: Any, b: Any) -> Any:
    try:
        return unify_values(a, b)
    except UnificationError:
        return _FAIL


_keys = st.sampled_from(["a", "b", "c", "model_name"])
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-2, max_value=2)
    | st.sampled_from([0.0, 1.0, -1.0, 0.5])
    | st.sampled_from(["", "a", "b", "1"])
)
_json = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_keys, children, max_size=3),
    max_leaves=12,
)


def _compatible(draw: st.DrawFn, value: Any) -> Any:
    """A value that unifies with ``value`` (a subset, a superset, equal-valued scalars)."""
    if isinstance(value, dict):
        kept = {k: _compatible(draw, v) for k, v in value.items() if draw(st.booleans())}
        extra = draw(st.dictionaries(_keys.filter(lambda k: k not in value), _json, max_size=2))
        return {**kept, **extra}
    if isinstance(value, list):
        return [_compatible(draw, item) for item in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    return draw(st.sampled_from([value, float(value)]))


@st.composite
def _compatible_pair(draw: st.DrawFn) -> tuple[Any, Any]:
    """A value and a second one that unifies with it."""
    first = draw(_json)
    return first, _compatible(draw, first)


@settings(max_examples=300)
@given(_json, _json)
def test_unify_values_matches_the_reference(a: Any, b: Any) -> None:
    before = (copy.deepcopy(a), copy.deepcopy(b))
    expected = _reference_unify(a, b)
    actual = _try_unify(a, b)
    if expected is _FAIL:
        assert actual is _FAIL
    else:
        assert actual is not _FAIL
        assert _tagged(actual) == _tagged(expected)
    assert _tagged((a, b)) == _tagged(before)


@settings(max_examples=300)
@given(_compatible_pair())
def test_unify_values_matches_the_reference_on_compatible_values(pair: tuple[Any, Any]) -> None:
    a, b = pair
    expected = _reference_unify(a, b)
    assert expected is not _FAIL
    assert _tagged(unify_values(a, b)) == _tagged(expected)


@settings(max_examples=300)
@given(_json, _json)
def test_unify_values_is_commutative_up_to_key_order(a: Any, b: Any) -> None:
    forward, backward = _try_unify(a, b), _try_unify(b, a)
    assert (forward is _FAIL) == (backward is _FAIL)
    if forward is not _FAIL:
        assert forward == backward


@settings(max_examples=300)
@given(_compatible_pair())
def test_unify_values_is_commutative_on_compatible_values(pair: tuple[Any, Any]) -> None:
    a, b = pair
    assert unify_values(a, b) == unify_values(b, a)


@given(_json)
def test_unify_values_is_idempotent(a: Any) -> None:
    result = unify_values(a, a)
    assert _tagged(result) == _tagged(a)
    assert json.dumps(result) == json.dumps(a)  # key order kept too


@given(st.dictionaries(_keys, _json, max_size=4))
def test_equal_specs_hash_alike(data: dict[str, Any]) -> None:
    spec = ModelSpec(**data)
    same = ModelSpec(**dict(reversed(list(data.items()))))
    assert spec == same
    assert hash(spec) == hash(same)
    assert spec.unify(spec) == spec


# -- property tests: ModelSpec.unify on generated nested specs (section 1.4) ------------------------------------


def _reference_order(a: Any, b: Any) -> Any:
    """The key order section 1.4 observes: the caller's keys in their order, then the other's extras sorted."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [*a, *sorted(k for k in b if k not in a)]
        return [(k, _reference_order(a.get(k), b.get(k)) if k in a and k in b else None) for k in keys]
    if isinstance(a, list) and isinstance(b, list):
        return [_reference_order(x, y) for x, y in zip(a, b, strict=True)]
    return None


def _order_of(value: Any, reference: Any) -> Any:
    if isinstance(value, dict):
        pairs = zip(value.items(), reference, strict=True)
        return [(k, None if r[1] is None else _order_of(v, r[1])) for (k, v), r in pairs]
    if isinstance(value, list):
        return [_order_of(v, r) for v, r in zip(value, reference, strict=True)]
    return None


_specs = st.dictionaries(_keys, _json, max_size=4)


@st.composite
def _spec_pair(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two specs: independent ones (which seldom unify), or one and a compatible variant of it."""
    first = draw(_specs)
    return first, draw(_specs) if draw(st.booleans()) else _compatible(draw, first)


@settings(max_examples=400)
@given(_spec_pair())
def test_spec_unify_agrees_with_section_1_4(pair: tuple[dict[str, Any], dict[str, Any]]) -> None:
    a, b = pair
    left, right = ModelSpec.from_dict(a), ModelSpec.from_dict(b)
    expected = _reference_unify(a, b)
    if expected is _FAIL:
        with pytest.raises(ValueError, match="does not unify with"):
            left.unify(right)
        return
    result = left.unify(right).to_dict()
    assert _tagged(result) == _tagged(expected)
    # keys: the caller's first, in order, then the other side's extras alphabetically, at every depth
    assert _order_of(result, _reference_order(a, b)) == _reference_order(a, b)
    assert _tagged((left.to_dict(), right.to_dict())) == _tagged((a, b))  # inputs unchanged
