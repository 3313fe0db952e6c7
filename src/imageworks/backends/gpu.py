"""GpuSlot: the one owner of the GPU.

At most one model process holds the GPU. Requests for the current holder run concurrently;
a request for another model queues, the slot drains the holder's requests (bounded by the drain
timeout), stops it, starts the next model and admits every request waiting for it together.

One task owns the slot's state. Leases, lease ends, stops, adoptions, withdrawals and the
reports of start and stop effects all reach it as messages on one queue, and it applies them in
arrival order through the pure `slot.decide` (whose module docstring holds the transition
table). Effects (start, stop, health check of an adopted process) run as tasks of their own and
report back as messages, so the owner never waits on a process and a client that leaves cannot
cancel a start that other requests wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast

from imageworks.backends.base import BackendBusy, BackendNotReady
from imageworks.backends.slot import (
    Adopt,
    CancelStart,
    CheckAdopted,
    Complete,
    Effect,
    Grant,
    HolderDied,
    LeaseEnded,
    Message,
    Note,
    Phase,
    Reject,
    Rules,
    Shutdown,
    SlotState,
    Start,
    Started,
    StartFailed,
    Stop,
    StopFailed,
    Stopped,
    Tick,
    Waiter,
    Wanted,
    Withdrawn,
    decide,
    next_deadline,
)
from imageworks.backends.slot_report import SlotReport, SlotView

log = logging.getLogger("imageworks.backends.gpu")

_CUT_SHORT_KEPT = 64  # generations whose "why were my requests cut short" is remembered


class Holder(Protocol):
    @property
    def pid(self) -> int | None: ...

    @property
    def safe_mode(self) -> tuple[str, ...]:
        """The safe-mode arguments it was started with (empty: none), for people to see."""
        ...

    def is_alive(self) -> bool: ...

    def kill_now(self) -> None:
        """Last resort when shutdown runs out of time; must not block."""
        ...


K = TypeVar("K", bound=Hashable)
P = TypeVar("P")
H = TypeVar("H", bound=Holder)
K_in = TypeVar("K_in", bound=Hashable, contravariant=True)
P_in = TypeVar("P_in", contravariant=True)


class StartLeftover(BackendNotReady):
    """A start failed and could not kill what it had spawned; the slot keeps it (STUCK) and
    tries to stop it again before anything else starts."""

    def __init__(self, message: str, holder: Any) -> None:
        super().__init__(message)
        self.holder = holder


class SlotEffects(Protocol[K_in, P_in, H]):
    async def start(self, key: K_in, plan: P_in, *, progress: Callable[[str], None]) -> H:
        """Start the holder for `key`; BackendNotReady with the reason if it cannot be. A start
        that fails (or is cancelled) after spawning kills what it spawned first. `progress`
        names each step as it begins ("waiting for health"), for people watching the slot."""
        ...

    async def check_adopted(self, holder: H) -> None:
        """Wait until an adopted holder answers its health check; if it does not, stop it and
        raise BackendNotReady."""
        ...

    async def stop(self, holder: H) -> None:
        """Stop the holder; raise if it is still running afterwards."""
        ...


class SlotChanges:
    """Latest-state change notification: the owner task calls `changed()` after every message
    it applies, and that never waits on anyone. A reader remembers the version it has seen and
    `wait`s for a newer one; a slow reader skips intermediate states, it never slows the slot.

    Each change sets the event readers wait on and swaps in a fresh one, so a reader waking up
    re-reads the version and goes back to sleep on the new event if it has nothing newer."""

    def __init__(self) -> None:
        self._version = 0
        self._event = asyncio.Event()
        self._closed = False

    @property
    def version(self) -> int:
        return self._version

    @property
    def closed(self) -> bool:
        """The slot's owner has ended (the proxy stopped): nothing will change any more."""
        return self._closed

    def changed(self) -> None:
        self._version += 1
        event, self._event = self._event, asyncio.Event()
        event.set()

    def close(self) -> None:
        self._closed = True
        self.changed()

    async def wait(self, seen: int) -> int:
        """The version once it differs from `seen` (at once if it already does), or once the
        slot is closed."""
        while self._version == seen and not self._closed:
            await self._event.wait()
        return self._version


@dataclass(frozen=True, slots=True)
class StartProgress:
    """A start effect's report of the step it has reached: shown in the status, never decided
    on (the pure table does not see it)."""

    generation: int
    step: str


@dataclass(frozen=True, slots=True)
class Lease(Generic[P, H]):
    """What a request was granted: the holder, and the plan it was started from."""

    holder: H
    plan: P
    lease_id: int
    generation: int
    _cut_short: dict[int, str]

    @property
    def preempted(self) -> str | None:
        """Why the holder was stopped under this request (drain timeout, crash), if it was."""
        return self._cut_short.get(self.generation)


class GpuSlot(Generic[K, P, H]):
    def __init__(
        self,
        effects: SlotEffects[K, P, H],
        rules: Rules | None = None,
        *,
        on_swap: Callable[[str, float], None] | None = None,
    ) -> None:
        self._effects = effects
        self._rules = rules or Rules()
        self._on_swap = on_swap
        self._state = SlotState()
        self._inbox: asyncio.Queue[tuple[Message | StartProgress, asyncio.Future[Any] | None]] = (
            asyncio.Queue()
        )
        self._ids = itertools.count()
        # Everything below is written by the owner task only.
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._effect_tasks: dict[int, asyncio.Task[None]] = {}
        self._started_at: dict[int, float] = {}
        self._next_lease = 0
        self._cut_short: dict[int, str] = {}
        self._last_swap_s: float | None = None
        self._owner: asyncio.Task[None] | None = None
        self._report = SlotReport()
        self.changes = SlotChanges()
        self._view: SlotView | None = None

    # -- the front door -----------------------------------------------------------------------

    def open(self) -> None:
        """Start the owner task (inside the running event loop)."""
        if self._owner is None:
            self._owner = asyncio.create_task(self._run(), name="gpu-slot")

    def begin_shutdown(self) -> None:
        """The server is stopping: reject whoever waits and cancel a start now, rather than
        after the requests waiting on it time out; running requests go on."""
        if self._owner is not None and not self._owner.done():
            self._post(Shutdown(stop_holder=False, final=False))

    async def close(self, *, stop_holder: bool, timeout_s: float) -> None:
        """Reject whoever still waits, cancel a start, stop the holder if asked; bounded: past
        `timeout_s` the processes are killed outright."""
        owner = self._owner
        if owner is None:
            return
        self._post(Shutdown(stop_holder))
        try:
            await asyncio.wait_for(asyncio.shield(owner), timeout_s)
        except TimeoutError:
            log.warning("the GPU slot did not settle within %gs; killing its processes", timeout_s)
            for task in self._effect_tasks.values():
                task.cancel()
            current = self._state.current
            if stop_holder and current is not None and current.holder is not None:
                current.holder.kill_now()
            owner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await owner

    @asynccontextmanager
    async def lease(
        self, key: K, plan: P, *, idle_ttl_s: float | None = None
    ) -> AsyncIterator[Lease[P, H]]:
        """Hold `key` on the GPU for the block (starting it from `plan` if needed). Raises
        BackendNotReady (BackendBusy past the queue timeout) if it cannot be had."""
        loop = self._opened()
        waiter_id = next(self._ids)
        granted: asyncio.Future[Lease[P, H]] = loop.create_future()
        self._post(Wanted(Waiter(waiter_id, loop.time(), key, plan, idle_ttl_s)), granted)
        try:
            lease = await granted
        except asyncio.CancelledError:
            if not granted.done() or granted.cancelled():
                self._post(Withdrawn(waiter_id))
            elif granted.exception() is None:  # granted just as this request was cancelled
                self._post(LeaseEnded(granted.result().lease_id))
            raise
        try:
            yield lease
        finally:
            self._post(LeaseEnded(lease.lease_id))

    async def stop(self, only: K | None = None) -> None:
        """Stop the holder once the requests admitted before this call have finished (or the
        drain timeout cuts them short); requests arriving meanwhile wait behind the stop.
        With `only`, the holder is stopped only if it is that key when the stop's turn comes."""
        loop = self._opened()
        waiter_id = next(self._ids)
        done: asyncio.Future[None] = loop.create_future()
        self._post(Wanted(Waiter(waiter_id, loop.time(), only_key=only)), done)
        try:
            await done
        except asyncio.CancelledError:
            if not done.done() or done.cancelled():
                self._post(Withdrawn(waiter_id))
            raise

    def adopt(
        self, key: K, plan: P, holder: H, *, idle_ttl_s: float | None = None, serve: bool = True
    ) -> None:
        """Take over a model process found running: it serves once its health check passes, or
        (`serve=False`) it is stopped at once."""
        self._post(Adopt(key, plan, holder, idle_ttl_s, serve))

    def _opened(self) -> asyncio.AbstractEventLoop:
        self.open()
        assert self._owner is not None
        if self._owner.done():
            raise BackendNotReady("the proxy is shutting down")
        return asyncio.get_running_loop()

    # -- what it looks like ---------------------------------------------------------------------

    @property
    def holder_model(self) -> str | None:
        current = self._state.current
        return str(current.key) if current is not None and current.phase is Phase.READY else None

    @property
    def current_key(self) -> K | None:
        """The key of the holder, or of the one starting or stopping (None: empty)."""
        current = self._state.current
        return cast(K, current.key) if current is not None else None

    @property
    def holder(self) -> H | None:
        current = self._state.current
        return current.holder if current is not None else None

    def status(self) -> dict[str, object]:
        return self._report.status(self._state)

    def view(self) -> SlotView:
        """Who holds the slot and in what phase, and which models last failed: made once per
        change (`changes.version`), so reading it on every listing costs a comparison."""
        version = self.changes.version
        if self._view is None or self._view.version != version:
            self._view = self._report.view(self._state, version)
        return self._view

    # -- the owner ------------------------------------------------------------------------------

    def _post(
        self, message: Message | StartProgress, reply: asyncio.Future[Any] | None = None
    ) -> None:
        self._inbox.put_nowait((message, reply))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not (self._state.finished and not self._effect_tasks):
            deadline = next_deadline(self._state, self._rules)
            try:
                async with asyncio.timeout_at(deadline):
                    message, reply = await self._inbox.get()
            except TimeoutError:
                message, reply = Tick(), None
            try:
                self._receive(message, reply, loop.time())
            except Exception:  # a bug here must not strand every later request
                log.exception("GPU slot: applying %r failed", message)
            self.changes.changed()
        self.changes.close()
        for reply in self._waiting.values():
            if not reply.done():
                reply.set_exception(BackendNotReady("the proxy is shutting down"))

    def _receive(
        self, message: Message | StartProgress, reply: asyncio.Future[Any] | None, now: float
    ) -> None:
        if isinstance(message, StartProgress):
            self._report.start_step(self._state, message.generation, message.step)
            return
        if isinstance(message, Wanted) and reply is not None:
            self._waiting[message.waiter.id] = reply
            self._notice_death(message.waiter.key)
        if isinstance(message, Started | StartFailed | Stopped | StopFailed):
            self._effect_tasks.pop(message.generation, None)
        if isinstance(message, Started) and message.generation in self._started_at:
            self._last_swap_s = now - self._started_at.pop(message.generation)
            if self._state.current is not None:
                model = str(self._state.current.key)
                self._report.swapped(model, self._last_swap_s)
                if self._on_swap is not None:
                    self._on_swap(model, self._last_swap_s)
        error_before = self._state.last_error
        self._apply(message, now)
        self._report.applied(self._state, error_before)

    def _notice_death(self, key: Hashable | None) -> None:
        """A request for the holder finds out whether its process still lives (pid and start
        time): a killed model server is restarted instead of being handed out."""
        current = self._state.current
        if (
            current is not None
            and current.phase is Phase.READY
            and current.key == key
            and current.holder is not None
            and not current.holder.is_alive()
        ):
            log.warning("%s (pid %s) has exited; restarting it", current.key, current.holder.pid)
            self._apply(HolderDied(current.generation), asyncio.get_running_loop().time())

    def _apply(self, message: Message, now: float) -> None:
        state, effects = decide(
            self._state, message, now, self._rules, first_lease_id=self._next_lease
        )
        self._state = state
        for effect in effects:
            self._run_effect(effect)

    def _run_effect(self, effect: Effect) -> None:
        match effect:
            case Grant(waiter_id, lease_id, generation, holder, plan):
                self._next_lease = max(self._next_lease, lease_id + 1)
                reply = self._waiting.pop(waiter_id, None)
                if reply is None or reply.done():  # its client left as it was granted
                    self._post(LeaseEnded(lease_id))
                else:
                    reply.set_result(Lease(holder, plan, lease_id, generation, self._cut_short))
            case Reject(waiter_id, reason, busy, _):
                reply = self._waiting.pop(waiter_id, None)
                if reply is not None and not reply.done():
                    retry = max(1.0, self._last_swap_s or 5.0)
                    error = BackendBusy(reason, retry) if busy else BackendNotReady(reason)
                    reply.set_exception(error)
            case Complete(waiter_id):
                reply = self._waiting.pop(waiter_id, None)
                if reply is not None and not reply.done():
                    reply.set_result(None)
            case Start(generation, key, plan):
                self._started_at[generation] = asyncio.get_running_loop().time()
                self._spawn(generation, self._start(generation, cast(K, key), plan))
            case CheckAdopted(generation, holder):
                self._spawn(generation, self._check_adopted(generation, holder))
            case CancelStart(generation):
                task = self._effect_tasks.get(generation)
                if task is not None:
                    task.cancel()
            case Stop(generation, holder, cut_short):
                if cut_short is not None:
                    self._cut_short[generation] = cut_short
                    for old in [g for g in self._cut_short if g < generation - _CUT_SHORT_KEPT]:
                        del self._cut_short[old]
                self._spawn(generation, self._stop(generation, holder))
            case Note(event, key, detail):
                self._report.noted(event, str(key), detail)
                log.info("GPU slot: %s %s%s", event, key, f": {detail}" if detail else "")

    def _spawn(self, generation: int, work: Any) -> None:
        self._effect_tasks[generation] = asyncio.create_task(work)

    # -- effects, each reporting back exactly once ------------------------------------------------

    async def _start(self, generation: int, key: K, plan: P) -> None:
        def progress(step: str) -> None:
            self._post(StartProgress(generation, step))

        started = self._effects.start(key, plan, progress=progress)
        await self._report_start(generation, f"starting {key}", started)

    async def _check_adopted(self, generation: int, holder: H) -> None:
        async def checked() -> H:
            await self._effects.check_adopted(holder)
            return holder

        await self._report_start(generation, "checking the adopted process", checked())

    async def _report_start(self, generation: int, what: str, work: Awaitable[H]) -> None:
        """Run a start (or an adoption check) and report how it ended, exactly once."""
        try:
            holder = await work
        except asyncio.CancelledError:
            self._post(StartFailed(generation, BackendNotReady(f"{what}: cancelled")))
        except StartLeftover as exc:
            self._post(StartFailed(generation, exc, exc.holder))
        except BackendNotReady as exc:
            self._post(StartFailed(generation, exc))
        except Exception as exc:  # an effect bug must not leave the waiters hanging
            log.exception("%s failed", what)
            failure = BackendNotReady(f"{what} failed: {type(exc).__name__}: {exc}")
            self._post(StartFailed(generation, failure))
        else:
            self._post(Started(generation, holder))

    async def _stop(self, generation: int, holder: H) -> None:
        try:
            await self._effects.stop(holder)
        except asyncio.CancelledError:
            self._post(StopFailed(generation, BackendNotReady("stop cancelled")))
        except Exception as exc:  # noqa: BLE001 - whatever it was, the holder may still run
            log.warning("stopping the model process failed: %s", exc)
            self._post(StopFailed(generation, exc))
        else:
            self._post(Stopped(generation))
