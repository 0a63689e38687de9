"""huggingface_local's streamed text: each row decoded as its tokens arrive, an incomplete UTF-8 character
held back until it is whole, nothing after a row's end or its caller's leaving, and no row without a sink."""

from __future__ import annotations

import threading

import torch

from clemserve.service.backends.stream_decoding import BatchStreamer, IncrementalDecoder
from clemserve.service.domain import Row

EOS = 0
PAD = 1


class ByteTokenizer:
    """Token n > 1 is the byte n; 0 is the end of sequence, 1 padding (both decode as markers)."""

    def decode(self, tokens: list[int]) -> str:
        names = {EOS: b"</s>", PAD: b"<pad>"}
        return b"".join(names.get(t, bytes([t])) for t in tokens).decode("utf-8", errors="replace")


def test_a_character_split_across_tokens_is_sent_once_whole() -> None:
    decoder = IncrementalDecoder(ByteTokenizer().decode)
    snowman = "☃".encode()  # three bytes, three tokens
    pieces = [decoder.push(t) for t in [*b"hi ", *snowman, *b"!"]]
    assert pieces == ["h", "i", " ", "", "", "☃", "!"]
    assert "".join(pieces) == ByteTokenizer().decode([*b"hi ", *snowman, *b"!"])


def test_an_incomplete_character_at_the_end_is_flushed_as_the_decode_has_it() -> None:
    decoder = IncrementalDecoder(ByteTokenizer().decode)
    tokens = [*b"a", "é".encode()[0]]
    assert [decoder.push(t) for t in tokens] == ["a", ""]
    assert decoder.flush() == "\ufffd"
    assert decoder.flush() == ""


def test_the_batch_streamer_sends_each_row_its_own_text_until_it_ends_or_leaves() -> None:
    sent: dict[str, list[str]] = {"a": [], "b": [], "c": []}
    leaving = threading.Event()
    rows = [
        Row([], sink=sent["a"].append),  # ends with EOS, then padding
        Row([], leaving, sent["b"].append),  # its caller leaves after two tokens
        Row([]),  # a unary request batched with the streamed ones
        Row([], sink=sent["c"].append),  # cut at max_tokens with a half character
    ]
    streamer = BatchStreamer(ByteTokenizer(), rows, {EOS})
    streamer.put(torch.tensor([[5, 6], [5, 6], [5, 6], [5, 6]]))  # the prompts: not text
    steps = [
        [ord("o"), ord("x"), ord("n"), ord("y")],
        [ord("k"), ord("y"), ord("n"), "é".encode()[0]],
        [EOS, ord("z"), ord("n"), "é".encode()[1]],
        [PAD, ord("w"), ord("n"), "é".encode()[0]],
    ]
    for i, step in enumerate(steps):
        if i == 2:
            leaving.set()
        streamer.put(torch.tensor(step))
    streamer.end()
    assert sent["a"] == ["o", "k", "</s>"]
    assert sent["b"] == ["x", "y"]
    assert sent["c"] == ["y", "é", "\ufffd"]
