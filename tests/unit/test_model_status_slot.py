"""The slot's change notification and its view for the models' status: the owner task never
waits on a reader, a reader sees the latest state, and failed starts are remembered per model."""

from __future__ import annotations

import asyncio

import pytest
from test_gpu_slot import FakeEffects, Slot, hold, new_slot, settle

from imageworks.backends.base import BackendNotReady
from imageworks.backends.gpu import SlotChanges
from imageworks.backends.slot import Phase

pytestmark = pytest.mark.timeout(10)


async def test_changes_wait_returns_at_once_when_the_version_moved_on() -> None:
    changes = SlotChanges()
    changes.changed()
    assert await changes.wait(0) == 1


async def test_changes_wait_wakes_on_the_next_change() -> None:
    changes = SlotChanges()
    waiter = asyncio.create_task(changes.wait(changes.version))
    await settle()
    assert not waiter.done()
    changes.changed()
    assert await waiter == 1


async def test_changes_a_slow_reader_skips_to_the_latest_version() -> None:
    changes = SlotChanges()
    seen = changes.version
    for _ in range(5):
        changes.changed()  # nobody reads meanwhile, and nothing blocks
    assert await changes.wait(seen) == 5


async def test_changes_close_wakes_every_reader() -> None:
    changes = SlotChanges()
    readers = [asyncio.create_task(changes.wait(0)) for _ in range(3)]
    await settle()
    changes.close()
    assert await asyncio.gather(*readers) == [1, 1, 1]
    assert changes.closed
    assert await changes.wait(changes.version) == changes.version  # closed: never waits


async def test_slot_view_shows_the_start_step_then_the_ready_holder() -> None:
    effects = FakeEffects()
    slot = new_slot(effects)
    lease = asyncio.create_task(_use(slot, "a"))
    await settle()
    starting = slot.view()
    assert (starting.holder, starting.phase, starting.step) == ("a", Phase.STARTING, "loading a")
    effects.gate("a").set()
    await lease
    await settle()
    ready = slot.view()
    assert (ready.holder, ready.phase, ready.step) == ("a", Phase.READY, None)
    assert ready.version > starting.version


async def test_slot_view_is_made_once_per_change() -> None:
    effects = FakeEffects()
    effects.gate("a").set()
    slot = new_slot(effects)
    await _use(slot, "a")
    await settle()
    assert slot.view() is slot.view()


async def test_slot_notifies_every_applied_message() -> None:
    effects = FakeEffects()
    effects.gate("a").set()
    slot = new_slot(effects)
    slot.open()
    seen = slot.changes.version
    waiter = asyncio.create_task(slot.changes.wait(seen))
    await _use(slot, "a")
    assert await waiter > seen


async def test_slot_view_remembers_a_failed_start_until_the_model_is_ready() -> None:
    effects = FakeEffects(failing={"a"})
    effects.gate("a").set()
    slot = new_slot(effects)
    with pytest.raises(BackendNotReady):
        await _use(slot, "a")
    await settle()
    failed = slot.view()
    assert failed.holder is None
    assert failed.failures == {"a": "a: weights missing"}
    effects.failing.clear()
    await _use(slot, "a")
    await settle()
    assert slot.view().failures == {}


async def test_slot_changes_close_when_the_slot_closes() -> None:
    slot = new_slot(FakeEffects())
    slot.open()
    await slot.close(stop_holder=True, timeout_s=5)
    assert slot.changes.closed


async def _use(slot: Slot, model: str) -> None:
    async with hold(slot, model):
        pass
