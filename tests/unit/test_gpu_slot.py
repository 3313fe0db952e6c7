"""The GPU slot's owner task, with fake effects: no processes, no sleeps beyond a few ticks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

import pytest

from imageworks.backends.base import BackendBusy, BackendNotReady
from imageworks.backends.gpu import GpuSlot, Lease
from imageworks.backends.slot import Rules

pytestmark = pytest.mark.timeout(10)


@dataclass
class FakeModel:
    name: str
    alive: bool = True
    pid: int | None = None
    killed: bool = False

    safe_mode: tuple[str, ...] = ()

    def is_alive(self) -> bool:
        return self.alive

    def kill_now(self) -> None:
        self.killed = True


@dataclass
class FakeEffects:
    """Starts complete when the test says so; every effect is written to `events`."""

    events: list[str] = field(default_factory=list)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    failing: set[str] = field(default_factory=set)
    running: set[str] = field(default_factory=set)
    unstoppable: set[str] = field(default_factory=set)

    def gate(self, model: str) -> asyncio.Event:
        return self.gates.setdefault(model, asyncio.Event())

    async def start(self, key: str, plan: str, *, progress: Callable[[str], None]) -> FakeModel:
        self.events.append(f"start {key}")
        progress(f"loading {key}")
        try:
            await self.gate(key).wait()
        except asyncio.CancelledError:
            self.events.append(f"cancelled {key}")
            raise
        if key in self.failing:
            self.events.append(f"failed {key}")
            raise BackendNotReady(f"{key}: weights missing")
        assert not self.running, f"two holders at once: {self.running} and {key}"
        self.running.add(key)
        return FakeModel(key)

    async def check_adopted(self, holder: FakeModel) -> None:
        self.events.append(f"check {holder.name}")
        self.running.add(holder.name)

    async def stop(self, holder: FakeModel) -> None:
        self.events.append(f"stop {holder.name}")
        if holder.name in self.unstoppable:
            raise RuntimeError(f"{holder.name} survived SIGKILL")
        self.running.discard(holder.name)


Slot = GpuSlot[str, str, FakeModel]


def new_slot(effects: FakeEffects, **rules: float) -> Slot:
    return GpuSlot(effects, Rules(**rules))


def hold(
    slot: Slot, model: str, idle_ttl_s: float | None = None
) -> AbstractAsyncContextManager[Lease[str, FakeModel]]:
    return slot.lease(model, f"plan {model}", idle_ttl_s=idle_ttl_s)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_slot_runs_requests_for_the_holder_concurrently() -> None:
    effects = FakeEffects()
    effects.gate("a").set()
    slot = new_slot(effects)
    async with hold(slot, "a"), hold(slot, "a"), hold(slot, "a"):
        assert slot.status()["active_requests"] == 3
    assert effects.events == ["start a"]
    await settle()  # lease ends are messages to the owner task
    assert slot.status()["active_requests"] == 0


async def test_slot_swap_waits_for_in_flight_requests_of_the_old_holder() -> None:
    effects = FakeEffects()
    effects.gate("a").set()
    effects.gate("b").set()
    slot = new_slot(effects)
    finish_a = asyncio.Event()

    async def use(model: str, until: asyncio.Event | None = None) -> None:
        async with hold(slot, model):
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
    slot = new_slot(effects)
    served: list[str] = []

    async def use(model: str, tag: str) -> None:
        async with hold(slot, model):
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
    slot = new_slot(effects)
    release_a = asyncio.Event()
    order: list[str] = []

    async def use(model: str, until: asyncio.Event | None = None) -> None:
        async with hold(slot, model):
            order.append(model)
            if until:
                await until.wait()

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
    slot = new_slot(effects)

    async def use(model: str) -> None:
        async with hold(slot, model):
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
    slot = new_slot(effects)

    async def use(model: str) -> str:
        async with hold(slot, model) as lease:
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
    slot = new_slot(effects)
    async with hold(slot, "a") as first:
        pass
    first.holder.alive = False  # e.g. killed with -9
    effects.running.clear()
    async with hold(slot, "a") as second:
        assert second.holder is not first.holder
    assert effects.events == ["start a", "stop a", "start a"]


async def test_slot_stop_stops_the_holder_after_its_requests() -> None:
    effects = FakeEffects()
    effects.gate("a").set()
    slot = new_slot(effects)
    async with hold(slot, "a"):
        release = asyncio.create_task(slot.stop())
        await settle()
        assert "stop a" not in effects.events
    await release
    assert effects.events == ["start a", "stop a"]
    assert slot.status()["state"] == "empty"


async def test_drain_timeout_swaps_anyway_and_marks_the_old_requests() -> None:
    effects = FakeEffects()
    effects.gate("a").set()
    effects.gate("b").set()
    slot = new_slot(effects, drain_timeout_s=0.05)
    stuck = asyncio.Event()  # the old model's request never finishes by itself

    async def hog() -> str | None:
        async with hold(slot, "a") as lease:
            await stuck.wait()
            return lease.preempted

    holding = asyncio.create_task(hog())
    await settle()
    async with hold(slot, "b") as lease:
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
    slot = new_slot(effects)
    done = asyncio.Event()

    async def hog() -> str | None:
        async with hold(slot, "a") as lease:
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


async def use_once(slot: Slot, model: str) -> None:
    async with hold(slot, model):
        pass


async def test_idle_ttl_releases_an_unused_holder() -> None:
    effects = FakeEffects()
    effects.gate("a").set()
    slot = new_slot(effects)
    async with hold(slot, "a", idle_ttl_s=0.05):
        pass
    assert slot.status()["holder"] == "a"
    for _ in range(200):
        if slot.status()["holder"] is None:
            break
        await asyncio.sleep(0.01)
    assert slot.status()["holder"] is None
    assert effects.events == ["start a", "stop a"]


async def test_no_idle_ttl_keeps_the_holder() -> None:
    effects = FakeEffects()
    effects.gate("a").set()
    slot = new_slot(effects)
    await use_once(slot, "a")
    await asyncio.sleep(0.1)
    assert slot.status()["holder"] == "a"


async def test_slot_stop_happens_while_clients_keep_chatting() -> None:
    effects = FakeEffects()
    effects.gate("a").set()
    slot = new_slot(effects)
    stopping: asyncio.Task[None] | None = None
    # Three clients take turns: there is always a request in flight when the stop arrives.
    for turn in range(6):
        async with hold(slot, "a"):
            if turn == 2:
                stopping = asyncio.create_task(slot.stop())
                await settle()
    assert stopping is not None
    await stopping
    assert effects.events.count("stop a") == 1
    assert effects.events.index("stop a") < len(effects.events) - 1  # requests after it restart a


async def test_slot_queue_timeout_answers_busy_and_the_start_goes_on() -> None:
    effects = FakeEffects()
    slot = new_slot(effects, queue_timeout_s=0.05)
    with pytest.raises(BackendBusy) as raised:
        async with hold(slot, "a"):
            pass
    assert raised.value.retry_after_s >= 1
    effects.gate("a").set()
    async with hold(slot, "a") as granted:  # the retry finds the model that kept starting
        assert granted.holder.name == "a"
    assert effects.events == ["start a"]


async def test_slot_start_nobody_waits_for_is_cancelled() -> None:
    effects = FakeEffects()
    slot = new_slot(effects)
    impatient = asyncio.create_task(use_once(slot, "a"))
    await settle()
    impatient.cancel()
    await settle()
    assert effects.events == ["start a", "cancelled a"]
    assert slot.status()["state"] == "empty"
    effects.gate("b").set()
    await use_once(slot, "b")  # the slot is usable at once for the next model
    assert effects.events[-1] == "start b"


async def test_slot_failed_stop_keeps_the_holder_and_tries_again() -> None:
    effects = FakeEffects(unstoppable={"a"})
    effects.gate("a").set()
    effects.gate("b").set()
    slot = new_slot(effects)
    await use_once(slot, "a")
    with pytest.raises(BackendNotReady, match="survived SIGKILL"):
        await use_once(slot, "b")
    status = slot.status()
    assert status["holder"] == "a"
    assert status["state"] == "stuck"
    effects.unstoppable.clear()
    await use_once(slot, "b")  # the next swap stops it
    assert effects.events == ["start a", "stop a", "stop a", "start b"]


async def test_slot_close_stops_the_holder_and_rejects_waiters() -> None:
    effects = FakeEffects()
    effects.gate("a").set()
    slot = new_slot(effects)
    async with hold(slot, "a"):
        waiting = asyncio.create_task(use_once(slot, "b"))
        await settle()
        closing = asyncio.create_task(slot.close(stop_holder=True, timeout_s=5))
        await settle()
    await closing
    with pytest.raises(BackendNotReady, match="shutting down"):
        await waiting
    assert effects.events == ["start a", "stop a"]
    with pytest.raises(BackendNotReady):
        await use_once(slot, "a")
    assert not effects.running


async def test_slot_close_cancels_a_start_half_way() -> None:
    effects = FakeEffects()
    slot = new_slot(effects)
    starting = asyncio.create_task(use_once(slot, "a"))
    await settle()
    await slot.close(stop_holder=False, timeout_s=5)
    with pytest.raises(BackendNotReady):
        await starting
    assert effects.events == ["start a", "cancelled a"]
    assert slot.status()["state"] == "empty"


async def test_slot_adopted_holder_serves_after_its_check() -> None:
    effects = FakeEffects()
    slot = new_slot(effects)
    found = FakeModel("a", pid=4242)
    slot.adopt("a", "plan a", found)
    async with hold(slot, "a") as granted:
        assert granted.holder is found
    assert effects.events == ["check a"]
    assert slot.status()["pid"] == 4242


async def test_slot_shutdown_answers_waiters_at_once_and_stops_the_holder_at_close() -> None:
    effects = FakeEffects()
    effects.gate("a").set()
    slot = new_slot(effects)
    async with hold(slot, "a"):  # a request still running when shutdown begins
        waiting = asyncio.create_task(use_once(slot, "b"))
        await settle()
        slot.begin_shutdown()
        with pytest.raises(BackendNotReady, match="shutting down"):
            await waiting
        assert effects.events == ["start a"]  # the running request keeps its model
    await slot.close(stop_holder=True, timeout_s=5)
    assert effects.events == ["start a", "stop a"]


async def test_slot_status_tells_what_it_is_doing_and_since_when() -> None:
    effects = FakeEffects()
    effects.gate("a").set()
    slot = new_slot(effects)
    assert slot.status()["activity"] == "idle"
    before = time.time()
    release = asyncio.Event()

    async def use(model: str) -> None:
        async with hold(slot, model):
            await release.wait()

    first = asyncio.create_task(use("a"))
    await settle()
    serving = slot.status()
    assert serving["activity"] == "serving"
    assert serving["holder"] == "a"
    assert isinstance(serving["holder_since"], float)
    assert serving["holder_since"] >= before
    swaps = serving["last_swaps"]
    assert isinstance(swaps, list)
    assert [swap["model"] for swap in swaps] == ["a"]
    assert swaps[0]["duration_s"] >= 0
    assert swaps[0]["at"] >= before

    second = asyncio.create_task(use("b"))  # b must wait for a's request: draining
    await settle()
    assert slot.status()["activity"] == "draining"
    assert slot.status()["waiting"] == {"b": 1}
    release.set()
    await settle()
    starting = slot.status()
    assert starting["state"] == "starting"
    assert starting["activity"] == "loading b"  # the step the start effect reported
    assert starting["holder_since"] is None
    effects.gate("b").set()
    await asyncio.gather(first, second)
    done = slot.status()
    assert done["holder"] == "b"
    swaps = done["last_swaps"]
    assert isinstance(swaps, list)
    assert [swap["model"] for swap in swaps] == ["a", "b"]
    assert done["phase_since"] >= starting["phase_since"]  # type: ignore[operator]


async def test_slot_status_dates_the_last_error_and_names_its_model() -> None:
    effects = FakeEffects(failing={"a"})
    effects.gate("a").set()
    slot = new_slot(effects)
    before = time.time()
    with pytest.raises(BackendNotReady):
        async with hold(slot, "a"):
            pass
    await settle()
    status = slot.status()
    assert "weights missing" in str(status["last_error"])
    assert status["last_error_model"] == "a"
    assert isinstance(status["last_error_at"], float)
    assert status["last_error_at"] >= before
