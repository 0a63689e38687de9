"""Prefix reuse for the transformers backend: each prompt token is computed once.

clembench sends the whole conversation at every turn, and the episodes of an experiment start with the same
instructions, so most of a prompt is often a prefix that an earlier call already ran through the model. The
:class:`PrefixCache` keeps the KV states of what the model computed in a radix tree over token ids, evicted
least-recently-used by bytes; :func:`prefill` gives a batch the states of its prompts, running the model only
on each row's uncached suffix (one row at a time: no padding is computed, and a row reuses what the row before
it in the same batch stored); :func:`remember` stores each row's prompt and reply after the batch.

The KV states are transformers' own (``DynamicCache``: its layers' keys and values, cropped, padded and stacked
here, never attention code of our own). The cache serves models whose every layer is a plain full-attention
``DynamicLayer``: a sliding window or a recurrent state cannot be cut at a token boundary.
"""

from __future__ import annotations

import heapq
import inspect
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

#: the cache's bytes where the server was given none (--prefix-cache auto): measured in bench/prefix_cache.py
DEFAULT_BYTES = 1 << 30

#: per layer (keys, values), each [kv heads, tokens, head dim], on the device the layer ran on
Layers = list[tuple[Any, Any]]


@dataclass(eq=False)
class _Node:
    """A stretch of tokens and their states; its children continue it, keyed by their first token."""

    tokens: tuple[int, ...]
    kv: Layers
    parent: _Node | None
    children: dict[int, _Node] = field(default_factory=dict)
    used: int = 0
    nbytes: int = 0


@dataclass(frozen=True)
class Hit:
    """The longest cached prefix of a sequence: its length and states (empty when nothing matched)."""

    length: int
    kv: Layers


@dataclass
class Reuse:
    """What :func:`prefill` did for a batch: per row the prompt tokens served from the cache and those computed,
    and the batch's tokens computed as padding (always 0 here; the figure exists to be compared with a padded
    prefill's)."""

    reused: list[int]
    computed: list[int]
    padding: int = 0


class PrefixCache:
    """KV states by token prefix, at most ``limit`` bytes. Matches and inserts come from the model's generation
    thread, ``shrink`` may come from another: one lock guards the tree (the tensors themselves are never changed
    in place, so a match's states stay valid after the tree lets go of them)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: a tighter bound than ``limit`` until the next ``fit`` (what the model's KV room leaves the cache)
        self._ceiling = limit
        self._root = _Node((), [], None)
        self._bytes = 0
        self._clock = 0
        self._lock = threading.Lock()
        #: prompt tokens served from the cache, and computed, since the model loaded
        self.reused_tokens = 0
        self.computed_tokens = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def match(self, ids: Sequence[int], most: int | None = None) -> Hit:
        """The longest prefix of ``ids`` (at most ``most`` tokens) whose states are cached."""
        import torch

        wanted = len(ids) if most is None else min(most, len(ids))
        pieces: list[tuple[Layers, int]] = []
        with self._lock:
            self._clock += 1
            node, at = self._root, 0
            while at < wanted:
                child = node.children.get(ids[at])
                if child is None:
                    break
                same = _common(child.tokens, ids, at, wanted)
                child.used = self._clock
                pieces.append((child.kv, same))
                at += same
                if same < len(child.tokens):
                    break
                node = child
        if not pieces:
            return Hit(0, [])
        layers = [
            (
                torch.cat([kv[layer][0][:, :n] for kv, n in pieces], dim=1),
                torch.cat([kv[layer][1][:, :n] for kv, n in pieces], dim=1),
            )
            for layer in range(len(pieces[0][0]))
        ]
        return Hit(at, layers)

    def insert(self, ids: Sequence[int], kv: Layers) -> None:
        """Keep the states ``kv`` of ``ids`` (their token axis as long as ``ids``): only the part the tree does not
        hold yet is copied. Then evict down to the limit, least recently used first."""
        with self._lock:
            self._clock += 1
            node, at = self._root, 0
            while at < len(ids):
                child = node.children.get(ids[at])
                if child is None:
                    tail = _Node(tuple(ids[at:]), _cut(kv, at, len(ids)), node, used=self._clock)
                    tail.nbytes = _nbytes(tail.kv)
                    node.children[ids[at]] = tail
                    self._bytes += tail.nbytes
                    break
                same = _common(child.tokens, ids, at, len(ids))
                if same < len(child.tokens):
                    child = self._split(child, same)
                child.used = self._clock
                node, at = child, at + same
            self._evict(min(self.limit, self._ceiling))

    def fit(self, room: int) -> None:
        """Keep to ``room`` bytes (and the limit) from now on, evicting what is over it: the room that the
        model's KV allowance leaves beside the batch about to run."""
        with self._lock:
            self._ceiling = max(0, room)
            self._evict(min(self.limit, self._ceiling))

    def shrink(self, to_bytes: int) -> int:
        """Evict least recently used states until the cache holds at most ``to_bytes``; the bytes freed."""
        with self._lock:
            before = self._bytes
            self._evict(max(0, to_bytes))
            return before - self._bytes

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut ``node`` after ``at`` tokens: a new node holds the head, ``node`` keeps the tail below it."""
        parent = node.parent
        assert parent is not None
        head = _Node(node.tokens[:at], _cut(node.kv, 0, at), parent, used=node.used)
        head.nbytes = _nbytes(head.kv)
        node.tokens, node.kv, node.parent = node.tokens[at:], _cut(node.kv, at, len(node.tokens)), head
        node.nbytes = _nbytes(node.kv)
        head.children[node.tokens[0]] = node
        parent.children[head.tokens[0]] = head
        return head

    def _evict(self, to_bytes: int) -> None:
        if self._bytes <= to_bytes:
            return
        leaves = [(n.used, id(n), n) for n in self._nodes() if not n.children]
        heapq.heapify(leaves)
        while self._bytes > to_bytes and leaves:
            _, _, leaf = heapq.heappop(leaves)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.tokens[0]]
            self._bytes -= leaf.nbytes
            if parent is not self._root and not parent.children:
                heapq.heappush(leaves, (parent.used, id(parent), parent))

    def _nodes(self) -> list[_Node]:
        found, stack = [], list(self._root.children.values())
        while stack:
            node = stack.pop()
            found.append(node)
            stack.extend(node.children.values())
        return found


def _common(tokens: tuple[int, ...], ids: Sequence[int], at: int, end: int) -> int:
    """How many of ``tokens`` equal ``ids[at:end]`` from their start."""
    n = min(len(tokens), end - at)
    for k in range(n):
        if tokens[k] != ids[at + k]:
            return k
    return n


def _cut(kv: Layers, start: int, end: int) -> Layers:
    """Tokens ``start`` to ``end`` of each layer's states, copied (a view would keep the whole tensor alive)."""
    return [(k[:, start:end].clone(), v[:, start:end].clone()) for k, v in kv]


def _nbytes(kv: Layers) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


# -- the model side: which models can reuse, and a batch's prefill and what it leaves behind -----------------------


def unsupported(model: Any) -> str | None:
    """Why the prefix cache cannot serve ``model`` (None: it can). Its KV cache must be made of transformers'
    plain ``DynamicLayer``s only, one per layer: a sliding window, a recurrent or quantized state cannot be cut
    at a token boundary and reused."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    try:
        layers = DynamicCache(config=config).layers
    except (TypeError, ValueError, AttributeError) as exc:
        return f"its cache layout could not be read ({exc})"
    odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    return f"its KV cache has {', '.join(odd)} layers" if odd else None


def cache_argument(model: Any) -> str:
    """The name under which this transformers version's ``forward`` and ``generate`` take a cache."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def prefill(cache: PrefixCache, model: Any, encoded: Any) -> tuple[Any, Reuse]:
    """The states of a left-padded batch's prompts but their last token, as one ``DynamicCache`` for ``generate``
    (which then runs only the last token of each row, and the new ones). Each row takes its longest cached prefix
    and runs the model on the rest alone; what it computed is stored at once, so the next row can reuse it.
    Padding slots hold zeros; the attention mask hides them as it hides padding tokens."""
    import torch
    from transformers import DynamicCache

    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    width = int(ids.shape[1])
    name = cache_argument(model)
    # the logits of the prompt's tokens are not needed: only the last one's, where the model can tell
    last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    rows: list[Layers] = []
    reuse = Reuse([], [])
    for n in range(int(ids.shape[0])):
        start = width - int(mask[n].sum())
        tokens = ids[n, start:].tolist()
        hit = cache.match(tokens, len(tokens) - 1)
        states: Any = DynamicCache([(k[None], v[None]) for k, v in hit.kv]) if hit.length else DynamicCache()
        if hit.length < len(tokens) - 1:
            with torch.no_grad():
                model(
                    input_ids=ids[n : n + 1, start + hit.length : width - 1], use_cache=True, **{name: states}, **last
                )
        kv = [(layer.keys[0], layer.values[0]) for layer in states.layers]
        if len(tokens) > 1:
            cache.insert(tokens[:-1], kv)
        rows.append(kv)
        reuse.reused.append(hit.length)
        reuse.computed.append(len(tokens) - hit.length)  # the last token runs in generate
    cache.reused_tokens += sum(reuse.reused)
    cache.computed_tokens += sum(reuse.computed)
    shaped = next((row for row in rows if row), None)
    if shaped is None:  # prompts of one token each: generate runs them as they are
        return None, reuse
    return DynamicCache(_stacked([row or [(k[:, :0], v[:, :0]) for k, v in shaped] for row in rows], width - 1)), reuse


def _stacked(rows: list[Layers], length: int) -> Layers:
    """Each row's states left-padded with zeros to ``length`` tokens, stacked into a batch, layer by layer."""
    import torch

    def padded(t: Any) -> Any:
        return torch.nn.functional.pad(t, (0, 0, length - int(t.shape[1]), 0))

    return [
        (torch.stack([padded(row[layer][0]) for row in rows]), torch.stack([padded(row[layer][1]) for row in rows]))
        for layer in range(len(rows[0]))
    ]


def remember(cache: PrefixCache, encoded: Any, output: Any, ends: Sequence[int | None]) -> None:
    """Store each row's prompt and reply from a finished ``generate`` (``output``: its dict, with the cache it
    grew), so that the conversation's next turn reuses the reply too. ``ends``: per row, how many new tokens are
    its own (through its end-of-sequence token), None for a row whose states are not to be kept (stopped early)."""
    states = output.get("cache") if "cache" in output else output.get("past_key_values")
    if states is None:
        return
    mask, sequences = encoded["attention_mask"], output.sequences
    width, held = int(mask.shape[1]), states.get_seq_length()
    layers = [(layer.keys, layer.values) for layer in states.layers]
    for n, end in enumerate(ends):
        if end is None:
            continue
        start, stop = width - int(mask[n].sum()), min(width + end, held)
        if stop - start > 1:
            cache.insert(
                sequences[n, start:stop].tolist(), [(k[n, :, start:stop], v[n, :, start:stop]) for k, v in layers]
            )
