"""A small game loop against clemserve, fully typed: ``mypy --strict`` checks it in ``make lint``.

    python examples/typed_game.py [HOST:PORT]

Two players guess a number; one plays through the blocking client, the other through the asyncio one.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import clemserve.client as backends

Message = dict[str, Any]


def ask(model: backends.Model, history: list[Message], text: str) -> str:
    history.append({"role": "user", "content": text})
    prompt, response, answer = model.generate_response(history)
    # a game would log these two as clembench does; here the types are the point
    assert prompt is not None and "clem_player" in response
    history.append({"role": "assistant", "content": answer})
    return answer


async def ask_async(model: backends.AsyncModel, history: list[Message], text: str) -> str:
    history.append({"role": "user", "content": text})
    _, _, answer = await model.generate_response(history)
    history.append({"role": "assistant", "content": answer})
    return answer


async def play(address: str, model_name: str, turns: int = 3) -> list[tuple[str, str]]:
    backends.connect(address)
    sync_player = backends.get_model_for(model_name)
    sync_player.set_gen_args(temperature=0.0, max_tokens=20)
    async_player: backends.AsyncModel = await backends.get_async_model_for(model_name)
    histories: tuple[list[Message], list[Message]] = ([], [])
    transcript: list[tuple[str, str]] = []
    for turn in range(turns):
        try:
            first = ask(sync_player, histories[0], f"Turn {turn}: guess a number between 1 and 10.")
        except backends.ContextExceededError as err:
            print(f"history too long ({err.tokens_used}/{err.context_size}); ending the episode")
            break
        second = await ask_async(async_player, histories[1], f"Turn {turn}: the other player said {first!r}.")
        transcript.append((first, second))
    return transcript


def main() -> int:
    address = sys.argv[1] if len(sys.argv) > 1 else backends.default_address()
    for first, second in asyncio.run(play(address, "echo")):
        print(f"{first} | {second}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
