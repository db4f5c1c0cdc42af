"""Counters summed across worker processes (mcc/ops/slots.py): each forked worker
counts in its own slot, the parent sums them, and a restarted worker goes on from
its slot's values."""

from __future__ import annotations

import multiprocessing
import os
import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcc.ops.slots import MAX_WORKERS, CounterSlots

NAMES = ("requests", "bytes")
ADDS = 5000


def _count(slots: CounterSlots, index: int, times: int, nbytes: int) -> None:
    slot = slots.slot(index)
    for _ in range(times):
        slot.add("requests")
        slot.add("bytes", nbytes)


def _count_then_hang(
    slots: CounterSlots, index: int, ready: multiprocessing.synchronize.Event
) -> None:
    _count(slots, index, 7, 1)
    ready.set()
    signal.pause()  # until killed


def test_counters_are_summed_across_worker_processes() -> None:
    ctx = multiprocessing.get_context("fork")
    slots = CounterSlots(NAMES, 2)
    kids = [ctx.Process(target=_count, args=(slots, i, ADDS, 100 * (i + 1))) for i in range(2)]
    for k in kids:
        k.start()
    for k in kids:
        k.join(timeout=60)
        assert k.exitcode == 0
    assert slots.totals() == {"requests": 2 * ADDS, "bytes": ADDS * 100 + ADDS * 200}
    assert (slots.slot(0).get("bytes"), slots.slot(1).get("bytes")) == (ADDS * 100, ADDS * 200)
    slots.close()


def test_a_restarted_worker_goes_on_from_its_slot() -> None:
    ctx = multiprocessing.get_context("fork")
    slots = CounterSlots(NAMES, 2)
    ready = ctx.Event()
    first = ctx.Process(target=_count_then_hang, args=(slots, 1, ready))
    first.start()
    assert ready.wait(timeout=60)
    assert first.pid is not None
    os.kill(first.pid, signal.SIGKILL)
    first.join(timeout=60)
    assert slots.totals() == {"requests": 7, "bytes": 7}  # kill -9 loses no count
    again = ctx.Process(target=_count, args=(slots, 1, 3, 10))
    again.start()
    again.join(timeout=60)
    assert again.exitcode == 0
    assert slots.totals() == {"requests": 10, "bytes": 37}
    slots.close()


@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from(NAMES), st.integers(0, 2**40))))
def test_totals_are_the_sum_of_the_adds(adds: list[tuple[int, str, int]]) -> None:
    slots = CounterSlots(NAMES, 4)
    for index, name, n in adds:
        slots.slot(index).add(name, n)
    assert slots.totals() == {name: sum(n for _, k, n in adds if k == name) for name in NAMES}
    slots.close()


def test_bad_shapes_are_refused() -> None:
    for names, workers in (((), 1), (("a", "a"), 1), (("a",), 0), (("a",), MAX_WORKERS + 1)):
        with pytest.raises(ValueError):
            CounterSlots(names, workers)
    slots = CounterSlots(("a",), 2)
    with pytest.raises(IndexError):
        slots.slot(2)
    with pytest.raises(KeyError):
        slots.slot(0).add("b")
    slots.close()
