"""The client's side of the wire: merging before sending, images read locally, type errors named."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from clemserve.client.convert import gen_args_to_proto, messages_to_proto, selector_to_proto
from clemserve.registry import ModelSpec
from clemserve.registry.errors import InvalidArgumentError

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


def test_messages_are_merged_as_clembench_does() -> None:
    sent = messages_to_proto(
        [
            {"role": "system", "content": None},
            {"role": "user", "content": "A", "turn": 1},
            {"role": "user", "content": "B", "image": ["ignored.png"]},
            {"role": "assistant", "content": "C"},
        ]
    )
    assert [(m.role, m.content) for m in sent] == [("user", "A\n\nB"), ("assistant", "C")]
    assert json.loads(sent[0].extra_json) == {"turn": 1}
    assert not sent[0].images  # the merged message's image is dropped, as in clembench


def test_images_from_path_and_data_url(tmp_path: Path) -> None:
    path = tmp_path / "board.png"
    path.write_bytes(PNG)
    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    sent = messages_to_proto([{"role": "user", "content": "see", "image": [str(path), data_url]}])
    first, second = sent[0].images
    assert (first.data, first.mime_type, first.source) == (PNG, "image/png", str(path))
    assert (second.data, second.mime_type, second.source) == (PNG, "image/png", "data:")


def test_a_bare_string_image_is_one_image(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(PNG)
    assert len(messages_to_proto([{"role": "user", "content": "c", "image": str(path)}])[0].images) == 1


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([{"role": "user", "content": 3}], "messages[0].content"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None}], "messages[1].content"),
        ([{"content": "a"}], "messages[0].role"),
        (["hello"], "messages[0]"),
        ("hello", "messages"),
        ([{"role": "user", "content": "a", "image": ["/no/such/file.png"]}], "messages[0].image[0]"),
        ([{"role": "user", "content": "a", "when": object()}], "messages[0]"),
    ],
)
def test_what_the_wire_cannot_carry_is_refused_here(messages: object, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        messages_to_proto(messages)  # type: ignore[arg-type]
    assert caught.value.field == field


def test_gen_args() -> None:
    args = gen_args_to_proto({"temperature": 0, "max_tokens": 12.0, "top_p": 0.5})
    assert (args.temperature, args.max_tokens, json.loads(args.extra_json)) == (0.0, 12, {"top_p": 0.5})
    assert args.HasField("temperature")
    assert not gen_args_to_proto({}).HasField("max_tokens")
    for bad, field in (
        ({"max_tokens": 1.5}, "args.max_tokens"),
        ({"temperature": "hot"}, "args.temperature"),
    ):
        with pytest.raises(InvalidArgumentError) as caught:
            gen_args_to_proto(bad)
        assert caught.value.field == field


def test_selectors() -> None:
    assert selector_to_proto("m").name == "m"
    spec = ModelSpec(model_name="m", model_config={"a": [1, 2.5]})
    assert json.loads(selector_to_proto(spec).spec.json) == {
        "model_name": "m",
        "model_config": {"a": [1, 2.5]},
    }
    assert selector_to_proto({"model_name": "m"}).WhichOneof("selector") == "spec"


def test_lone_surrogates_are_refused_here_with_the_field() -> None:
    for messages, field in (
        ([{"role": "user", "content": "a\ud800b"}], "messages[0].content"),
        ([{"role": "user", "content": "ok", "note": "\udfff"}], "messages[0]"),
    ):
        with pytest.raises(InvalidArgumentError) as caught:
            messages_to_proto(messages)
        assert caught.value.field == field
