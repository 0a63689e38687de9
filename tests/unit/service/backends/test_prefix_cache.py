"""The prefix cache of huggingface_local: the radix tree (longest prefix, splits, least-recently-used eviction by
bytes), which models and dtypes it serves, and identity: greedy outputs with reuse equal those without, on the
tiny model and the demo model, on the shared games' prompts played turn by turn and in batches."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bench.prefix_cache import GAMES, conversation, episodes
from clemserve.registry import KeyRegistry, ModelSpec
from clemserve.service.backends import BackendContext
from clemserve.service.backends.huggingface_local import HuggingfaceLocalBackend
from clemserve.service.backends.prefix_cache import PrefixCache, unsupported
from clemserve.service.config import parse_server_config
from clemserve.service.domain import GenArgs, Generation, PrefixReuse, Row

# -- the tree ----------------------------------------------------------------------------------------------------


def states(ids: list[int], layers: int = 2) -> list[tuple[Any, Any]]:
    """Per layer (keys, values) of [1 head, tokens, 2]: each token's states are its id (values: negated)."""
    import torch

    t = torch.tensor(ids, dtype=torch.float32)[None, :, None].expand(1, len(ids), 2).contiguous()
    return [(t + layer, -t - layer) for layer in range(layers)]


def ids_of(hit_kv: list[tuple[Any, Any]]) -> list[int]:
    return [int(x) for x in hit_kv[0][0][0, :, 0].tolist()]


PER_TOKEN = 2 * 2 * 2 * 4  # layers x (keys, values) x head dim x float32 bytes


def test_a_match_is_the_longest_cached_prefix_with_its_states() -> None:
    cache = PrefixCache(1 << 20)
    cache.insert([1, 2, 3, 4], states([1, 2, 3, 4]))
    cache.insert([1, 2, 7], states([1, 2, 7]))  # splits the first stretch after [1, 2]
    hit = cache.match([1, 2, 3, 9])
    assert hit.length == 3 and ids_of(hit.kv) == [1, 2, 3]
    assert ids_of(cache.match([1, 2, 7, 8]).kv) == [1, 2, 7]
    assert cache.match([1, 2, 3, 4], most=2).length == 2  # a caller keeps its last token to compute
    assert cache.match([5, 1]).length == 0 and cache.match([5, 1]).kv == []
    assert cache.bytes == 5 * PER_TOKEN  # the shared [1, 2] is held once


def test_eviction_is_least_recently_used_by_bytes_and_keeps_shared_prefixes() -> None:
    cache = PrefixCache(7 * PER_TOKEN)
    cache.insert([1, 2, 3, 4], states([1, 2, 3, 4]))
    cache.insert([1, 2, 5, 6], states([1, 2, 5, 6]))
    cache.match([1, 2, 3, 4])  # [5, 6] is now the least recently used
    cache.insert([1, 2, 3, 4, 8, 9], states([1, 2, 3, 4, 8, 9]))  # 8 tokens' worth: one stretch must go
    assert cache.bytes == 6 * PER_TOKEN
    assert cache.match([1, 2, 5, 6]).length == 2 and cache.match([1, 2, 3, 4, 8, 9]).length == 6


def test_shrink_and_fit_free_what_is_asked() -> None:
    cache = PrefixCache(1 << 20)
    for first in range(4):
        cache.insert([first, 1, 2, 3], states([first, 1, 2, 3]))
    assert cache.shrink(2 * 4 * PER_TOKEN) == 2 * 4 * PER_TOKEN and cache.bytes == 8 * PER_TOKEN
    assert cache.match([3, 1, 2, 3]).length == 4 and cache.match([0, 1, 2, 3]).length == 0  # oldest went first
    cache.fit(4 * PER_TOKEN)  # the room the KV allowance leaves: inserts keep to it too
    assert cache.bytes == 4 * PER_TOKEN
    cache.insert([9, 9, 9, 9, 9], states([9, 9, 9, 9, 9]))
    assert cache.bytes <= 4 * PER_TOKEN
    held = cache.bytes
    assert cache.shrink(0) == held and cache.bytes == 0


def test_the_setting_is_a_size_auto_or_off() -> None:
    assert parse_server_config([], {}).prefix_cache_bytes is None
    assert parse_server_config(["--prefix-cache", "2GiB"], {}).prefix_cache_bytes == 2 << 30
    assert parse_server_config([], {"CLEMSERVE_PREFIX_CACHE": "0"}).prefix_cache_bytes == 0
    with pytest.raises(SystemExit, match="--prefix-cache"):
        parse_server_config(["--prefix-cache", "lots"], {})


# -- the model side ----------------------------------------------------------------------------------------------


def test_sliding_window_models_are_not_served() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    small = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    small |= {"num_attention_heads": 2, "num_key_value_heads": 2}
    assert unsupported(LlamaForCausalLM(LlamaConfig(**small))) is None
    why = unsupported(MistralForCausalLM(MistralConfig(sliding_window=8, **small)))
    assert why is not None and "SlidingWindow" in why


@pytest.fixture(scope="module")
def long_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a context long enough for the games' prompts in its small vocabulary."""
    from tests.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("long-tiny"), max_positions=4096)


def load(folder: Path, tmp_path: Path, cache_bytes: int | None, **config: Any) -> HuggingfaceLocalBackend:
    from tests.serving import hf_entry

    context = BackendContext(KeyRegistry(tmp_path / "key.json"), tmp_path, prefix_cache_bytes=cache_bytes)
    backend = HuggingfaceLocalBackend(ModelSpec(**hf_entry("m", folder, **config)), context)
    asyncio.run(backend.load(lambda line, fraction=None: None))
    return backend


def test_by_default_float32_weights_reuse_and_others_only_when_sized(long_tiny: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    half = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(long_tiny).to(torch.bfloat16).save_pretrained(half)
    for file in long_tiny.iterdir():
        if not file.name.startswith(("model", "config")):
            (half / file.name).write_bytes(file.read_bytes())
    assert load(long_tiny, tmp_path, None).prefix is not None
    assert load(long_tiny, tmp_path, 0).prefix is None
    assert load(half, tmp_path, None).prefix is None
    sized = load(half, tmp_path, 1 << 20).prefix
    assert sized is not None and sized.limit == 1 << 20
    # what provenance and ListModels say is in force
    assert load(long_tiny, tmp_path, None).prefix_reuse() == PrefixReuse("prefix cache up to 1024 MiB", 0)
    assert load(long_tiny, tmp_path, 0).prefix_reuse().in_force == "off: --prefix-cache 0"
    assert load(half, tmp_path, None).prefix_reuse().in_force.startswith("off: bfloat16 weights")


def play(backend: HuggingfaceLocalBackend, batches: list[list[Any]], max_tokens: int) -> list[Generation]:
    found = []
    for batch in batches:
        outcomes = asyncio.run(backend.generate_rows([Row(m) for m in batch], GenArgs(max_tokens=max_tokens)))
        assert all(isinstance(o, Generation) for o in outcomes), outcomes
        found += [o for o in outcomes if isinstance(o, Generation)]
    return found


def replay(backend: HuggingfaceLocalBackend, count: int, turns: int, max_tokens: int) -> int:
    """``count`` of the games' episodes played together for ``turns`` turns, each turn one batch, with the model's
    prefix cache and without it; every output must be the same. Returns the prompt tokens the cache served."""
    eps = episodes(count)
    replies: list[list[str]] = [[] for _ in eps]
    served, prefix = 0, backend.prefix
    for _ in range(turns):
        batch = [conversation(e, r) for e, r in zip(eps, replies, strict=True)]
        backend.prefix = None
        without = play(backend, [batch], max_tokens)
        backend.prefix = prefix
        with_ = play(backend, [batch], max_tokens)
        for a, b in zip(without, with_, strict=True):
            assert (a.prompt, a.response, a.text, a.completion_tokens) == (
                b.prompt,
                b.response,
                b.text,
                b.completion_tokens,
            )
            assert a.cached_prompt_tokens == 0
        served += sum(g.cached_prompt_tokens for g in with_)
        for reply, generation in zip(replies, without, strict=True):
            reply.append(generation.text)
    return served


needs_games = pytest.mark.skipif(not GAMES.is_dir(), reason="the shared clembench games are not there")


@needs_games
def test_the_games_prompts_give_the_same_greedy_outputs_with_reuse(long_tiny: Path, tmp_path: Path) -> None:
    backend = load(long_tiny, tmp_path, None)
    served = replay(backend, count=4, turns=2, max_tokens=12)
    assert served > 0 and backend.prefix is not None and backend.prefix.reused_tokens == served


def test_each_row_computes_only_its_uncached_suffix_without_padding(long_tiny: Path, tmp_path: Path) -> None:
    """Rows of different cached lengths in one batch: the model sees each row's suffix alone (no padding), then
    one token per row; without the cache it sees the padded batch."""
    first = [{"role": "user", "content": "You are playing a game. Guess the word. " * 8}]
    longer = [
        *first,
        {"role": "assistant", "content": "apple"},
        {"role": "user", "content": "Your answer was correct."},
    ]
    other = [{"role": "user", "content": "What is the capital of France?"}]
    counted: dict[bool, list[tuple[int, int]]] = {}
    for cache_bytes in (0, None):
        backend = load(long_tiny, tmp_path, cache_bytes)
        play(backend, [[first]], 1)
        seen: list[tuple[int, int]] = []
        embed = backend.model.get_input_embeddings()
        hook = embed.register_forward_hook(lambda module, args, out, seen=seen: seen.append(tuple(args[0].shape)))
        (*_, a, b, c) = play(backend, [[longer, other, first]], 1)
        hook.remove()
        counted[cache_bytes is None] = seen
        lengths = [a.prompt_tokens, b.prompt_tokens, c.prompt_tokens]
        if cache_bytes is None:
            assert a.cached_prompt_tokens >= lengths[2] - 1 and c.cached_prompt_tokens == lengths[2] - 1
            assert sum(rows * tokens for rows, tokens in seen) == sum(lengths) - sum(
                g.cached_prompt_tokens for g in (a, b, c)
            )
            assert all(rows == 1 for rows, tokens in seen if tokens > 1)  # no padded prefill
        else:
            assert seen == [(3, max(lengths))]


# -- the demo model ----------------------------------------------------------------------------------------------


@pytest.mark.demo
@needs_games
def test_the_demo_model_gives_the_same_greedy_outputs_with_reuse(tmp_path: Path) -> None:
    from clemserve.registry import ModelRegistry
    from tests.serving import DEMO_CACHE

    spec = ModelRegistry.from_files().resolve("smollm2-135m-instruct")
    if not any((DEMO_CACHE / "gguf").glob("SmolLM2-135M-Instruct*/.clemserve-prepared")):
        pytest.skip("the demo model is not prepared (the demo integration tests prepare it)")
    backend = HuggingfaceLocalBackend(spec, BackendContext(KeyRegistry(tmp_path / "key.json"), DEMO_CACHE))
    asyncio.run(backend.load(lambda line, fraction=None: None))
    assert backend.prefix is not None, "the demo model's weights are float32: reuse is on by default"
    assert replay(backend, count=2, turns=2, max_tokens=8) > 0


def test_the_cache_keeps_to_what_the_kv_allowance_leaves_beside_a_batch(long_tiny: Path, tmp_path: Path) -> None:
    """The cache is part of the model's KV allowance (residency charges that): before a batch runs it shrinks to
    the allowance less the batch's need, and grows no further while it runs."""
    from clemserve.service.memory import Estimate, KvRoom

    backend = load(long_tiny, tmp_path, None)
    assert backend.prefix is not None
    prompt = [{"role": "user", "content": "You are playing a game. Guess the word. " * 4}]
    (first,) = play(backend, [[prompt]], 4)
    held = backend.prefix.bytes
    config = backend.model.config
    per_token = 2 * config.num_hidden_layers * config.hidden_size * 4  # keys and values, float32
    allowance = per_token * (first.prompt_tokens + 4) + held // 2  # the batch's need, and half the cache
    backend.kv = KvRoom("m", Estimate(kv_cache=allowance, kv_per_token=per_token, context=4096), lambda: 0, print)
    (again,) = play(backend, [[prompt]], 4)
    assert backend.prefix.bytes <= held // 2 < held
    assert again.text == first.text
