"""The GPU slot's scheduling, with fake effects: no processes, no sleeps."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from imageworks.backends.base import BackendNotReady
from imageworks.backends.gpu import Decision, GpuSlot, SlotView, Ticket, decide


@dataclass
class FakeModel:
    name: str
    alive: bool = True
    pid: int | None = None

    def is_alive(self) -> bool:
        return self.alive


@dataclass
class FakeEffects:
    """Starts complete when the test says so; every effect is written to `events`."""

    events: list[str] = field(default_factory=list)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    failing: set[str] = field(default_factory=set)
    running: set[str] = field(default_factory=set)

    def gate(self, model: str) -> asyncio.Event:
        return self.gates.setdefault(model, asyncio.Event())

    async def start(self, model: str) -> FakeModel:
        self.events.append(f"start {model}")
        await self.gate(model).wait()
        if model in self.failing:
            self.events.append(f"failed {model}")
            raise BackendNotReady(f"{model}: weights missing")
        assert not self.running, f"two holders at once: {self.running} and {model}"
        self.running.add(model)
        return FakeModel(model)

    async def stop(self, holder: FakeModel) -> None:
        self.events.append(f"stop {holder.name}")
        self.running.discard(holder.name)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def ticket(model: str, seq: int) -> Ticket:
    return Ticket(model, seq)


def test_decide_admits_requests_for_a_live_holder() -> None:
    mine = ticket("a", 5)
    view = SlotView("a", True, False, 3, [mine])
    assert decide(view, mine) is Decision.ADMIT


def test_decide_holds_back_new_arrivals_when_another_model_queued_first() -> None:
    other, mine = ticket("b", 1), ticket("a", 2)
    view = SlotView("a", True, False, 1, [other, mine])
    assert decide(view, mine) is Decision.WAIT


def test_decide_head_of_queue_swaps_once_the_holder_is_idle() -> None:
    head, later = ticket("b", 1), ticket("c", 2)
    busy = SlotView("a", True, False, 1, [head, later])
    idle = SlotView("a", True, False, 0, [head, later])
    assert decide(busy, head) is Decision.WAIT
    assert decide(idle, head) is Decision.SWAP
    assert decide(idle, later) is Decision.WAIT


def test_decide_waits_during_a_swap_and_restarts_a_dead_holder() -> None:
    mine = ticket("a", 1)
    assert decide(SlotView("a", True, True, 0, [mine]), mine) is Decision.WAIT
    assert decide(SlotView("a", False, False, 0, [mine]), mine) is Decision.SWAP


async def test_slot_runs_requests_for_the_holder_concurrently() -> None:
    effects = FakeEffects()
    effects.gate("a").set()
    slot: GpuSlot[FakeModel] = GpuSlot(effects)
    async with slot.lease("a"), slot.lease("a"), slot.lease("a"):
        assert slot.status()["active_requests"] == 3
    assert effects.events == ["start a"]
    assert slot.status()["active_requests"] == 0


async def test_slot_swap_waits_for_in_flight_requests_of_the_old_holder() -> None:
    effects = FakeEffects()
    effects.gate("a").set()
    effects.gate("b").set()
    slot: GpuSlot[FakeModel] = GpuSlot(effects)
    finish_a = asyncio.Event()

    async def use(model: str, until: asyncio.Event | None = None) -> None:
        async with slot.lease(model):
            effects.events.append(f"serve {model}")
            if until:
                await until.wait()

    first = asyncio.create_task(use("a", finish_a))
    await settle()
    second = asyncio.create_task(use("b"))
    await settle()
    assert effects.events == ["start a", "serve a"]  # b waits: a is still busy
    finish_a.set()
    await asyncio.gather(first, second)
    assert effects.events == ["start a", "serve a", "stop a", "start b", "serve b"]


async def test_slot_admits_every_waiter_for_the_new_model_together() -> None:
    effects = FakeEffects()
    slot: GpuSlot[FakeModel] = GpuSlot(effects)
    served: list[str] = []

    async def use(model: str, tag: str) -> None:
        async with slot.lease(model):
            served.append(tag)

    tasks = [asyncio.create_task(use("b", f"b{i}")) for i in range(3)]
    await settle()
    assert effects.events == ["start b"]  # one start for three waiters
    effects.gate("b").set()
    await asyncio.gather(*tasks)
    assert sorted(served) == ["b0", "b1", "b2"]
    assert effects.events == ["start b"]
    assert slot.status()["swaps"] == 1


async def test_slot_serves_queued_models_in_arrival_order_without_ping_pong() -> None:
    effects = FakeEffects()
    for model in "abc":
        effects.gate(model).set()
    slot: GpuSlot[FakeModel] = GpuSlot(effects)
    release_a = asyncio.Event()
    order: list[str] = []

    async def use(model: str, hold: asyncio.Event | None = None) -> None:
        async with slot.lease(model):
            order.append(model)
            if hold:
                await hold.wait()

    holder = asyncio.create_task(use("a", release_a))
    await settle()
    queued = [asyncio.create_task(use(m)) for m in ("b", "c", "b", "a")]
    await settle()
    release_a.set()
    await asyncio.gather(holder, *queued)
    # b's two requests run in one batch, then c, then a: three swaps, no a/b/a/b.
    assert order == ["a", "b", "b", "c", "a"]
    assert [e for e in effects.events if e.startswith("start")] == [
        "start a",
        "start b",
        "start c",
        "start a",
    ]


async def test_slot_failed_start_fails_its_waiters_and_leaves_the_slot_empty() -> None:
    effects = FakeEffects(failing={"bad"})
    slot: GpuSlot[FakeModel] = GpuSlot(effects)

    async def use(model: str) -> None:
        async with slot.lease(model):
            pass

    waiters = [asyncio.create_task(use("bad")) for _ in range(2)]
    await settle()
    effects.gate("bad").set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, BackendNotReady) for r in results)
    assert "weights missing" in str(results[0])
    status = slot.status()
    assert status["holder"] is None
    assert status["state"] == "empty"
    assert "weights missing" in str(status["last_error"])

    effects.failing.clear()  # the next request may try again
    await use("bad")
    assert effects.events.count("start bad") == 2


async def test_slot_swap_survives_the_requesting_client_leaving() -> None:
    effects = FakeEffects()
    slot: GpuSlot[FakeModel] = GpuSlot(effects)

    async def use(model: str) -> str:
        async with slot.lease(model) as lease:
            return lease.holder.name

    impatient = asyncio.create_task(use("b"))
    await settle()
    patient = asyncio.create_task(use("b"))
    await settle()
    impatient.cancel()
    await settle()
    effects.gate("b").set()
    assert await patient == "b"
    with pytest.raises(asyncio.CancelledError):
        await impatient
    assert slot.status()["active_requests"] == 0


async def test_slot_restarts_a_holder_that_died() -> None:
    effects = FakeEffects()
    effects.gate("a").set()
    slot: GpuSlot[FakeModel] = GpuSlot(effects)
    async with slot.lease("a") as first:
        pass
    first.holder.alive = False  # e.g. killed with -9
    effects.running.clear()
    async with slot.lease("a") as second:
        assert second.holder is not first.holder
    assert effects.events == ["start a", "stop a", "start a"]


async def test_slot_release_stops_the_holder_after_its_requests() -> None:
    effects = FakeEffects()
    effects.gate("a").set()
    slot: GpuSlot[FakeModel] = GpuSlot(effects)
    async with slot.lease("a"):
        release = asyncio.create_task(slot.release())
        await settle()
        assert "stop a" not in effects.events
    await release
    assert effects.events == ["start a", "stop a"]
    assert slot.status()["state"] == "empty"


async def test_drain_timeout_swaps_anyway_and_marks_the_old_requests() -> None:
    effects = FakeEffects()
    effects.gate("a").set()
    effects.gate("b").set()
    slot: GpuSlot[FakeModel] = GpuSlot(effects, drain_timeout_s=0.05)
    stuck = asyncio.Event()  # the old model's request never finishes by itself

    async def hog() -> str | None:
        async with slot.lease("a") as lease:
            await stuck.wait()
            return lease.preempted

    holding = asyncio.create_task(hog())
    await settle()
    async with slot.lease("b") as lease:
        assert lease.holder.name == "b"
        assert effects.events == ["start a", "stop a", "start b"]
    stuck.set()
    reason = await holding
    assert reason is not None
    assert "drain timeout" in reason


async def test_no_drain_timeout_waits_for_the_old_requests() -> None:
    effects = FakeEffects()
    effects.gate("a").set()
    effects.gate("b").set()
    slot: GpuSlot[FakeModel] = GpuSlot(effects)
    done = asyncio.Event()

    async def hog() -> str | None:
        async with slot.lease("a") as lease:
            await done.wait()
            return lease.preempted

    holding = asyncio.create_task(hog())
    await settle()
    waiter = asyncio.create_task(use_once(slot, "b"))
    await asyncio.sleep(0.1)
    assert "stop a" not in effects.events
    done.set()
    assert await holding is None
    await waiter
    assert effects.events == ["start a", "stop a", "start b"]


async def use_once(slot: GpuSlot[FakeModel], model: str) -> None:
    async with slot.lease(model):
        pass


async def test_idle_ttl_releases_an_unused_holder() -> None:
    effects = FakeEffects()
    effects.gate("a").set()
    slot: GpuSlot[FakeModel] = GpuSlot(effects, idle_ttl_s=lambda model: 0.05)
    reaper = asyncio.create_task(slot.release_when_idle(check_every_s=0.01))
    try:
        await use_once(slot, "a")
        assert slot.status()["holder"] == "a"
        for _ in range(200):
            if slot.status()["holder"] is None:
                break
            await asyncio.sleep(0.01)
        assert slot.status()["holder"] is None
        assert effects.events == ["start a", "stop a"]
    finally:
        reaper.cancel()


async def test_no_idle_ttl_keeps_the_holder() -> None:
    effects = FakeEffects()
    effects.gate("a").set()
    slot: GpuSlot[FakeModel] = GpuSlot(effects)
    reaper = asyncio.create_task(slot.release_when_idle(check_every_s=0.01))
    try:
        await use_once(slot, "a")
        await asyncio.sleep(0.1)
        assert slot.status()["holder"] == "a"
    finally:
        reaper.cancel()
