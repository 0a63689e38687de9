"""Prefix reuse in huggingface_local: prompt tokens computed with the prefix cache and without, on one model.

The shared games' own prompts (../shared/clembench-games: imagegame's describer, guesswhat's guesser), played as
clembench plays them, the whole conversation sent at every turn, the model's replies kept in it:
- ``multi-turn``: one episode replayed turn by turn, one call at a time;
- ``shared instructions``: many episodes' first turns, in batches of ``--batch`` (as ``clemserve run -j 8`` merges
  them), the episodes of an experiment sharing their instructions;
- ``batched episodes``: ``--batch`` episodes played together for ``--turns`` turns, each turn one batch whose
  rows have different cached lengths.
Each scenario runs on two copies of the backend, the cache off and on, in one process: prefill tokens computed
(the padding of a padded batch included), the share of them that is padding, wall time, and whether every greedy
output is the same. Prints a table, writes docs/bench/prefix_cache.md and plots docs/bench/prefix_cache.png.

    python -m bench.prefix_cache [--episodes 16] [--batch 8] [--turns 4] [--max-tokens 24] [--dtype float32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.plots import REPO, pyplot, save, write_table

GAMES = REPO.parent / "shared" / "clembench-games"
DEMO = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Episode:
    """A player's side of one episode: its first prompt and what the game says after each of its replies."""

    first: str
    then: tuple[str, ...]


def episodes(count: int, games: Path = GAMES) -> list[Episode]:
    """``count`` episodes, alternately imagegame's describer and guesswhat's guesser, in the order of their
    instances (so that episodes of one experiment, sharing its instructions, come together)."""
    image = json.loads((games / "imagegame" / "in" / "instances.json").read_text())
    describers = [
        Episode(
            f"{i['player_1_prompt_header']}\n{i['target_grid']}\n{i['player_1_question']}", (i["player_1_question"],)
        )
        for e in image["experiments"]
        for i in e["game_instances"]
    ]
    guess = json.loads((games / "guesswhat" / "in" / "instances.json").read_text())
    guessers = [
        Episode(
            e["guesser_initial_prompt"]
            .replace("$LIST$", str(i["candidate_list"]))
            .replace("$N$", str(e["max_turns"] - 1)),
            ("ANSWER: No.", "ANSWER: Yes."),
        )
        for e in guess["experiments"]
        for i in e["game_instances"]
    ]
    half = (count + 1) // 2
    return (describers[:half] + guessers[: count - half])[:count]


def conversation(episode: Episode, replies: list[str]) -> list[dict[str, str]]:
    """The messages of ``episode`` after ``replies`` (the player's earlier answers), as clembench sends them."""
    messages = [{"role": "user", "content": episode.first}]
    for k, reply in enumerate(replies):
        messages += [
            {"role": "assistant", "content": reply},
            {"role": "user", "content": episode.then[k % len(episode.then)]},
        ]
    return messages


@dataclass
class Tally:
    """One backend's run of a scenario."""

    texts: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    computed: int = 0
    padding: int = 0
    reused: int = 0
    seconds: float = 0.0


def play(backend: Any, batches: list[list[list[dict[str, str]]]], max_tokens: int, tally: Tally) -> list[str]:
    """One generate_rows call per batch of conversations (greedy); adds to ``tally``: prompt tokens, prefill
    tokens computed (with the cache: what it did not serve, else the padded batch) and their padding."""
    from clemserve.service.domain import GenArgs, Generation, Row

    texts = []
    for batch in batches:
        started = time.perf_counter()
        outcomes = asyncio.run(backend.generate_rows([Row(m) for m in batch], GenArgs(max_tokens=max_tokens)))
        tally.seconds += time.perf_counter() - started
        done = [o for o in outcomes if isinstance(o, Generation)]
        assert len(done) == len(outcomes), outcomes
        lengths = [g.prompt_tokens for g in done]
        tally.prompt_tokens += sum(lengths)
        tally.reused += sum(g.cached_prompt_tokens for g in done)
        if backend.prefix is None:  # a left-padded batch: every row as long as the longest
            tally.computed += len(lengths) * max(lengths)
            tally.padding += len(lengths) * max(lengths) - sum(lengths)
        else:
            tally.computed += sum(lengths) - sum(g.cached_prompt_tokens for g in done)
        texts += [g.text for g in done]
    tally.texts += texts
    return texts


def scenarios(eps: list[Episode], batch: int, turns: int) -> dict[str, Any]:
    """Each scenario: a function of the backend that plays it, given how to play a list of batches."""

    def multi_turn(run: Any) -> None:
        replies: list[str] = []
        for _ in range(turns * 2):
            (text,) = run([[conversation(eps[0], replies)]])
            replies.append(text)

    def shared(run: Any) -> None:
        firsts = [conversation(e, []) for e in eps]
        run([firsts[k : k + batch] for k in range(0, len(firsts), batch)])

    def together(run: Any) -> None:
        # the episodes start a turn apart, as a run's workers drift: each batch mixes turns and cached lengths
        played = eps[:batch]
        replies: list[list[str]] = [[] for _ in played]
        for step in range(turns + (len(played) - 1) // 2):
            live = [k for k in range(len(played)) if 0 <= step - k // 2 < turns]
            texts = run([[conversation(played[k], replies[k]) for k in live]])
            for k, text in zip(live, texts, strict=True):
                replies[k].append(text)

    return {"multi-turn": multi_turn, "shared instructions": shared, "batched episodes": together}


def load(cache_bytes: int | None, dtype: str) -> Any:
    """The demo model in the huggingface_local backend (the prepared GGUF the tests use), cache on or off."""
    import torch

    from clemserve.registry import KeyRegistry, ModelRegistry
    from clemserve.service.backends import BackendContext
    from clemserve.service.backends.huggingface_local import HuggingfaceLocalBackend
    from clemserve.service.backends.prefix_cache import DEFAULT_BYTES, PrefixCache
    from tests.serving import DEMO_CACHE

    spec = ModelRegistry.from_files().resolve(DEMO)
    keys = KeyRegistry(Path(tempfile.mkdtemp()) / "key.json")
    backend = HuggingfaceLocalBackend(spec, BackendContext(keys, DEMO_CACHE, prefix_cache_bytes=cache_bytes))
    asyncio.run(backend.load(lambda line, fraction=None: None))
    if dtype != "float32":
        backend.model.to(getattr(torch, dtype))
        backend.prefix = PrefixCache(cache_bytes or DEFAULT_BYTES) if cache_bytes != 0 else None
    play(backend, [[[{"role": "user", "content": "Hello"}]] * 2], 4, Tally())  # torch's first calls are slow
    return backend


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (fp16 on a CPU is not usable)")
    parser.add_argument("--cache-bytes", type=int, default=None, help="the cache's size (default: the server's)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()

    eps = episodes(args.episodes)
    off, on = load(0, args.dtype), load(args.cache_bytes, args.dtype)
    rows = []
    for name, scenario in scenarios(eps, args.batch, args.turns).items():
        tallies = {}
        for backend in (off, on):
            if backend.prefix is not None:
                backend.prefix.shrink(0)  # each scenario starts with an empty cache
            tally = Tally()
            scenario(lambda batches, b=backend, t=tally: play(b, batches, args.max_tokens, t))
            tallies[backend.prefix is not None] = tally
        without, with_ = tallies[False], tallies[True]
        rows.append((name, without, with_))
    table = _table(rows, args, on)
    print(table)
    if not args.no_write:
        suffix = "" if args.dtype == "float32" else f"_{args.dtype}"
        write_table(f"prefix_cache{suffix}.md", table)
        _plot(rows, f"prefix_cache{suffix}.png")
    return 0


def _table(rows: list[tuple[str, Tally, Tally]], args: Any, on: Any) -> str:
    lines = [
        f"# Prefix reuse in huggingface_local ({DEMO}, {args.dtype}, CPU)",
        "",
        f"`python -m bench.prefix_cache --episodes {args.episodes} --batch {args.batch} --turns {args.turns} "
        f"--max-tokens {args.max_tokens} --dtype {args.dtype}`: the shared games' prompts, greedy; prefill tokens "
        "computed include a padded batch's padding.",
        "",
        "| scenario | prompt tokens | computed without | computed with | saved | padding without | padding with "
        "| time without (s) | time with (s) | speed-up | same outputs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, without, with_ in rows:
        same = sum(a == b for a, b in zip(without.texts, with_.texts, strict=True))
        lines.append(
            f"| {name} | {without.prompt_tokens} | {without.computed} | {with_.computed} "
            f"| {1 - with_.computed / max(1, without.computed):.0%} "
            f"| {without.padding / max(1, without.computed):.0%} | {with_.padding / max(1, with_.computed):.0%} "
            f"| {without.seconds:.1f} | {with_.seconds:.1f} | {without.seconds / max(with_.seconds, 1e-9):.2f}x "
            f"| {same}/{len(without.texts)} |"
        )
    lines += ["", f"- the cache held {on.prefix.bytes / 2**20:.0f} MiB after the last scenario"] if on.prefix else []
    return "\n".join(lines) + "\n"


def _plot(rows: list[tuple[str, Tally, Tally]], name: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [w.computed for _, w, _ in rows], width=0.4, label="cache off")
    ax.bar([i + 0.2 for i in x], [c.computed for _, _, c in rows], width=0.4, label="cache on")
    ax.set_xticks(list(x), [n for n, _, _ in rows])
    ax.set_ylabel("prefill tokens computed")
    ax.legend()
    save(fig, name)


if __name__ == "__main__":
    raise SystemExit(main())
