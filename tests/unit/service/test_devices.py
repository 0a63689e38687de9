"""Per-device admission without a GPU: which GPUs a model goes to, given each GPU's budget part, what this
server's models hold there and what is free on it."""

from __future__ import annotations

import pytest

from clemserve.service.devices import DeviceLedger, Grant, choose, gpu_count, room
from clemserve.service.domain import GpuMemory
from clemserve.service.memory import Estimate

GiB = 2**30


def gpu(index: int, others: int = 0, ours: int = 0) -> GpuMemory:
    """An 80 GiB GPU with 72 GiB of budget; ``others``/``ours``: GiB other processes and this server hold."""
    return GpuMemory(
        index,
        total_bytes=80 * GiB,
        budget_bytes=72 * GiB,
        used_by_others_bytes=others * GiB,
        process_bytes=ours * GiB,
    )


def indices(chosen: tuple[GpuMemory, ...]) -> tuple[int, ...]:
    return tuple(d.index for d in chosen)


def test_room_is_the_budget_part_less_what_is_placed_and_never_more_than_is_free() -> None:
    assert room(gpu(0), 0) == 72 * GiB
    assert room(gpu(0), 50 * GiB) == 22 * GiB
    assert room(gpu(0, others=30), 0) == 50 * GiB  # free memory bounds it
    assert room(gpu(0, ours=70), 10 * GiB) == 10 * GiB  # what this server really holds there counts too


def test_on_two_gpus_a_second_one_gpu_model_takes_the_other() -> None:
    two = [gpu(0), gpu(1)]
    assert indices(choose(two, {}, 60 * GiB, 1)) == (0,)
    assert indices(choose(two, {0: 60 * GiB}, 60 * GiB, 1)) == (1,)
    assert choose(two, {0: 60 * GiB, 1: 60 * GiB}, 60 * GiB, 1) == ()  # no GPU has room: evict or refuse


def test_on_four_gpus_a_two_gpu_model_goes_where_two_have_room() -> None:
    four = [gpu(0), gpu(1, others=50), gpu(2), gpu(3)]
    held = {0: 60 * GiB}
    assert indices(choose(four, held, 100 * GiB, 2)) == (2, 3)
    assert choose(four, {**held, 2: 60 * GiB, 3: 60 * GiB}, 100 * GiB, 2) == ()


def test_without_number_gpus_the_fewest_gpus_that_hold_it() -> None:
    four = [gpu(0), gpu(1), gpu(2), gpu(3)]
    assert indices(choose(four, {}, 60 * GiB, 0)) == (0,)
    assert indices(choose(four, {}, 100 * GiB, 0)) == (0, 1)
    assert indices(choose(four, {1: 50 * GiB}, 200 * GiB, 0)) == (0, 2, 3)
    # with every model of this server gone, would it fit? only what others hold counts then
    assert choose([gpu(0, ours=70), gpu(1, ours=70)], {0: 70 * GiB, 1: 70 * GiB}, 100 * GiB, 0) == ()
    assert indices(choose([gpu(0, ours=70), gpu(1, ours=70)], {}, 100 * GiB, 0, empty=True)) == (0, 1)


def test_an_engine_that_takes_a_share_needs_it_in_room_on_each_gpu() -> None:
    two = [gpu(0, ours=45), gpu(1, others=20)]
    assert indices(choose(two, {}, GiB, 1, share=0.5)) == (1,)  # 40 GiB: 35 free on GPU 0, 60 on GPU 1
    assert choose(two, {}, GiB, 2, share=0.5) == ()


def test_the_gpus_a_model_asks_for() -> None:
    assert gpu_count({}, Estimate()) == 0
    assert gpu_count({"number_gpus": 2}, Estimate()) == 2
    assert gpu_count({"number_gpus": 2}, Estimate(gpus=4)) == 4  # the engine's own (tensor_parallel_size)
    assert gpu_count({"number_gpus": True}, Estimate()) == 0
    assert gpu_count("not an object", Estimate()) == 0


def test_the_ledger_splits_each_charge_over_its_gpus_and_tells_engines_apart() -> None:
    ledger = DeviceLedger()
    ledger.place("a", "a", [gpu(0), gpu(1)], 10 * GiB, Estimate(), engine=True)
    ledger.place("b", "b", [gpu(1)], 4 * GiB, Estimate(), engine=False)
    charges = {"a": 10 * GiB, "b": 6 * GiB}  # b borrowed 2 GiB for a batch
    assert ledger.held(charges) == {0: 5 * GiB, 1: 11 * GiB}
    assert ledger.held(charges, engines_only=True) == {0: 5 * GiB, 1: 5 * GiB}
    assert ledger.grant("a").per_gpu == 5 * GiB and ledger.placed("b")
    ledger.forget("a")
    assert ledger.held(charges) == {1: 6 * GiB} and not ledger.placed("a")


def test_an_engine_process_is_told_its_gpus_by_uuid_else_as_the_server_names_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Grant((0, 2), ("GPU-a", "GPU-c")).cuda_visible_devices == "GPU-a,GPU-c"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert Grant((0, 2), ("", "")).cuda_visible_devices == "0,2"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5, 7")  # the server's GPU 1 is the machine's 7
    assert Grant((1,), ("",)).cuda_visible_devices == "7"
