"""Each batch of a transformers model admitted against its KV-cache room, on the tiny Llama in process:
rows that do not fit together run as smaller batches with the answers they get alone, a row that does not
fit alone is refused with the numbers, and borrowed budget is charged while a batch runs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from clemserve.registry import KeyRegistry, ModelSpec
from clemserve.registry.errors import ResourceExhaustedError
from clemserve.service.backends import BackendContext, estimate
from clemserve.service.backends.huggingface_local import HuggingfaceLocalBackend
from clemserve.service.domain import GenArgs, Generation, Row
from clemserve.service.memory import Estimate, KvRoom, Sizing

MAX_TOKENS = 8


def test_a_batch_larger_than_its_kv_room_runs_in_parts_that_fit(tmp_path: Path, tiny_model_dir: Path) -> None:
    from tests.serving import hf_entry

    spec = ModelSpec(**hf_entry("m", tiny_model_dir))
    found = estimate(spec, Sizing(tmp_path))
    b = HuggingfaceLocalBackend(spec, BackendContext(KeyRegistry(tmp_path / "key.json"), tmp_path))
    conversations = [[{"role": "user", "content": text}] for text in ("Hi", "Hello there", "What is a batch?")]
    too_long = [{"role": "user", "content": "word " * 60}]
    runs: list[int] = []
    split: list[int] = []
    charges: list[int] = []
    free = [0]

    async def run() -> tuple[list[Any], list[Any], list[Any]]:
        await b.load(lambda line, fraction=None: None)
        lengths = [len(b.chat.token_ids(b.chat.render([c])[0])) for c in conversations]
        # room for two of the three short rows at once, not three, and not the long one alone
        tokens = 2 * (max(lengths) + MAX_TOKENS)

        def room(tokens: int) -> KvRoom:
            allowance = Estimate(kv_cache=tokens * found.kv_per_token, **_per_token(found))
            return KvRoom("m", allowance, lambda: free[0], charges.append)

        b.kv = KvRoom(
            "m", Estimate(kv_cache=tokens * found.kv_per_token, **_per_token(found)), lambda: free[0], charges.append
        )
        real_run = b._run

        def counting(encoded: Any, *args: Any) -> Any:
            runs.append(int(encoded["input_ids"].shape[0]))
            return real_run(encoded, *args)

        b._run = counting  # type: ignore[method-assign]
        args = GenArgs(max_tokens=MAX_TOKENS)
        merged = await b.generate_rows([Row(c) for c in (*conversations, too_long)], args)
        split.extend(runs)
        b.kv = None
        alone = [(await b.generate_rows([Row(c)], args))[0] for c in conversations]
        # with free budget to borrow, all three run at once and the borrowed bytes are charged meanwhile
        b.kv = KvRoom(
            "m", Estimate(kv_cache=tokens * found.kv_per_token, **_per_token(found)), lambda: free[0], charges.append
        )
        free[0] = 10 * tokens * found.kv_per_token
        runs.clear()
        borrowed = await b.generate_rows([Row(c) for c in conversations], args)
        await b.unload()
        return merged, alone, borrowed

    merged, alone, borrowed = asyncio.run(run())
    assert split == [2, 1] and runs == [3]  # rows per model.generate call
    for got, want in zip([*merged[:3], *borrowed], [*alone, *alone], strict=True):
        assert isinstance(got, Generation) and (got.prompt, got.response, got.text) == (
            want.prompt,
            want.response,
            want.text,
        )
    refused = merged[3]
    assert isinstance(refused, ResourceExhaustedError)
    assert (
        f"prompt + {MAX_TOKENS} new tokens) needs about" in str(refused)
        and refused.required_bytes > refused.available_bytes
    )
    assert len(charges) == 2 and charges[0] > 0 and charges[1] == -charges[0]


def _per_token(found: Estimate) -> dict[str, int]:
    return {"kv_per_token": found.kv_per_token, "context": found.context}
