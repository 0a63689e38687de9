"""Prefix reuse in the llamacpp backend: prompt tokens llama.cpp evaluated and reused, on the demo GGUF.

llama.cpp keeps the KV states of what it evaluated last and, when the next prompt begins the same way, evaluates
only the rest (llama-cpp-python's ``Llama.generate``). A model serves one sequence at a time, so that reuse
depends on the order calls arrive in. The shared games' prompts (as ``bench.prefix_cache`` plays them: imagegame's
describer and guesswhat's guesser, the whole conversation at every turn, the model's replies kept) are played:
- ``episode by episode``: each episode's turns one after the other (``clemserve run -j 1``);
- ``interleaved``: the episodes' turns in turn, one call of each episode then the next (``-j 8`` on one model);
each with llama.cpp's reuse of the previous prompt (clemserve's default, as in clemcore), without any reuse
(the context reset before every call) and with llama-cpp-python's ``LlamaRAMCache`` (states of earlier prompts
kept in RAM, restored when one shares more of the prompt than the previous one). It counts the prompt tokens
llama.cpp evaluated (the first ``eval`` of each call), the reuse the backend reports (``cached_prompt_tokens``),
wall time, and whether each greedy output equals the one without reuse. Prints a table and writes
docs/bench/llamacpp_reuse.md.

    python -m bench.llamacpp_reuse [--episodes 4] [--turns 3] [--max-tokens 8]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.plots import write_table
from bench.prefix_cache import Episode, conversation, episodes

DEMO = "smollm2-135m-instruct-gguf"
MODES = ("no reuse", "previous prompt", "RAM cache")


@dataclass
class Tally:
    texts: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    evaluated: int = 0
    reported: int = 0
    seconds: float = 0.0


class Player:
    """The demo entry on clemserve's llamacpp backend, in one of :data:`MODES`, counting what it evaluates."""

    def __init__(self, mode: str) -> None:
        import llama_cpp

        from clemserve.registry import KeyRegistry, ModelRegistry
        from clemserve.service.backends import BackendContext
        from clemserve.service.backends.llamacpp import LlamaCppBackend

        spec = ModelRegistry.from_files().resolve(DEMO)
        keys = KeyRegistry(Path(tempfile.mkdtemp()) / "key.json")
        self.backend = LlamaCppBackend(spec, BackendContext(keys, Path(tempfile.mkdtemp())))
        asyncio.run(self.backend.load(lambda line, fraction=None: None))
        self.mode = mode
        model = self.backend.model
        self._ram_cache = llama_cpp.LlamaRAMCache
        self._first_eval: int | None = None
        evaluate = model.eval

        def counted(tokens: Any) -> None:  # Llama.generate's first eval of a call is the prompt's unreused part
            if self._first_eval is None:
                self._first_eval = len(tokens)
            evaluate(tokens)

        model.eval = counted

    def start(self) -> None:
        """Forget every earlier prompt: the context, and a RAM cache's states."""
        self.backend.model.reset()
        if self.mode == "RAM cache":
            self.backend.model.set_cache(self._ram_cache(capacity_bytes=2 << 30))

    def play(self, messages: list[dict[str, str]], max_tokens: int, tally: Tally) -> str:
        from clemserve.service.domain import GenArgs

        if self.mode == "no reuse":
            self.backend.model.reset()
        self._first_eval = None
        started = time.perf_counter()
        generation = asyncio.run(self.backend.generate(messages, GenArgs(temperature=0.0, max_tokens=max_tokens)))
        tally.seconds += time.perf_counter() - started
        tally.prompt_tokens += generation.prompt_tokens
        tally.evaluated += self._first_eval or 0
        tally.reported += generation.cached_prompt_tokens
        tally.texts.append(generation.text)
        return generation.text

    def close(self) -> None:
        asyncio.run(self.backend.unload())


def orders(eps: list[Episode], turns: int) -> dict[str, list[tuple[int, int]]]:
    """Each order: the (episode, turn) of every call, in the order they are sent."""
    return {
        "episode by episode": [(e, t) for e in range(len(eps)) for t in range(turns)],
        "interleaved": [(e, t) for t in range(turns) for e in range(len(eps))],
    }


def run(player: Player, eps: list[Episode], calls: list[tuple[int, int]], max_tokens: int) -> Tally:
    tally = Tally()
    replies: list[list[str]] = [[] for _ in eps]
    for e, _ in calls:
        replies[e].append(player.play(conversation(eps[e], replies[e]), max_tokens, tally))
    return tally


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()

    eps = episodes(args.episodes)
    rows: list[tuple[str, str, Tally]] = []
    for mode in MODES:
        player = Player(mode)  # a fresh model for each mode: no state carried over
        for order, calls in orders(eps, args.turns).items():
            player.start()
            rows.append((order, mode, run(player, eps, calls, args.max_tokens)))
        player.close()
    table = _table(rows, args)
    print(table)
    if not args.no_write:
        write_table("llamacpp_reuse.md", table)
    return 0


def _table(rows: list[tuple[str, str, Tally]], args: Any) -> str:
    baseline = {order: tally for order, mode, tally in rows if mode == "no reuse"}
    lines = [
        f"# Prefix reuse in llamacpp ({DEMO}, CPU)",
        "",
        f"`python -m bench.llamacpp_reuse --episodes {args.episodes} --turns {args.turns} --max-tokens "
        f"{args.max_tokens}`: the shared games' prompts, greedy, one model serving them in the order given.",
        "",
        "| order | reuse | prompt tokens | evaluated | reused | reported reused | time (s) | speed-up | same outputs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for order, mode, tally in rows:
        base = baseline[order]
        same = sum(a == b for a, b in zip(base.texts, tally.texts, strict=True))
        lines.append(
            f"| {order} | {mode} | {tally.prompt_tokens} | {tally.evaluated} "
            f"| {1 - tally.evaluated / max(1, tally.prompt_tokens):.0%} | {tally.reported} "
            f"| {tally.seconds:.1f} | {base.seconds / max(tally.seconds, 1e-9):.2f}x | {same}/{len(base.texts)} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
