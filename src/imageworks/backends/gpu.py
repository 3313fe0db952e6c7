"""GpuSlot: the only code that decides which model holds the GPU.

One managed model process at a time. Requests for the current holder run concurrently (a
reference count). A request for another model queues; once the holder's requests have finished
the slot stops it, starts the model at the head of the queue, and admits every request waiting
for that model together. Later arrivals for the new holder wait behind requests for other models
that queued earlier, so no model starves and two models cannot ping-pong request by request.

The decisions are the pure function `decide`; the effects (start, stop) sit behind `SlotEffects`,
so scheduling is testable without processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from imageworks.backends.base import BackendNotReady

log = logging.getLogger("imageworks.backends.gpu")


class Holder(Protocol):
    @property
    def pid(self) -> int | None: ...

    def is_alive(self) -> bool: ...


H = TypeVar("H", bound=Holder)


class SlotEffects(Protocol[H]):
    async def start(self, model: str) -> H:
        """Start `model`; raise BackendNotReady with the reason if it cannot be started."""
        ...

    async def stop(self, holder: H) -> None: ...


class Decision(enum.Enum):
    ADMIT = "admit"  # run now on the current holder
    SWAP = "swap"  # this request's task makes its model the holder
    WAIT = "wait"


@dataclass(eq=False)
class Ticket:
    model: str
    seq: int
    queued_at: float = 0.0  # monotonic
    admitted: bool = False
    error: BaseException | None = None


@dataclass(frozen=True)
class SlotView:
    """What `decide` looks at."""

    holder: str | None
    holder_alive: bool
    swapping: bool
    active: int
    queue: Sequence[Ticket]  # waiting tickets in arrival order
    drain_expired: bool = False  # the head of the queue has waited out the drain timeout


def decide(view: SlotView, ticket: Ticket) -> Decision:
    if ticket.admitted:
        return Decision.ADMIT
    if view.swapping:
        return Decision.WAIT
    others_waiting = any(t.model != ticket.model for t in view.queue if t.seq < ticket.seq)
    if view.holder == ticket.model and view.holder_alive and not others_waiting:
        return Decision.ADMIT
    at_head = bool(view.queue) and view.queue[0] is ticket
    if at_head and (view.active == 0 or view.drain_expired):
        return Decision.SWAP
    return Decision.WAIT


@dataclass(frozen=True)
class Lease(Generic[H]):
    """A request's hold on the slot: the holder, and whether it was taken away mid-request."""

    holder: H
    generation: int
    _preempted: dict[int, str]

    @property
    def preempted(self) -> str | None:
        """Why the holder was stopped under this request (drain timeout), if it was."""
        return self._preempted.get(self.generation)


@dataclass
class SlotState(Generic[H]):
    holder_model: str | None = None
    holder: H | None = None
    active: int = 0
    swapping: bool = False
    queue: list[Ticket] = field(default_factory=list)
    last_error: str | None = None
    swaps: int = 0
    generation: int = 0  # bumped whenever the holder changes
    history: deque[tuple[float, str, str]] = field(default_factory=lambda: deque(maxlen=200))
    preempted: dict[int, str] = field(default_factory=dict)  # generation -> why it was cut short


class GpuSlot(Generic[H]):
    def __init__(
        self,
        effects: SlotEffects[H],
        *,
        drain_timeout_s: float | None = None,
        idle_ttl_s: Callable[[str], float | None] = lambda _model: None,
        on_swap: Callable[[str, float], None] | None = None,
    ) -> None:
        self._effects = effects
        self._drain_timeout_s = drain_timeout_s
        self._idle_ttl_s = idle_ttl_s
        self._on_swap = on_swap
        self._last_used = time.monotonic()
        self._state: SlotState[H] = SlotState()
        self._changed = asyncio.Condition()
        self._seq = itertools.count()
        self._swap_task: asyncio.Task[None] | None = None

    @property
    def holder_model(self) -> str | None:
        return self._state.holder_model

    @property
    def holder(self) -> H | None:
        return self._state.holder

    def status(self) -> dict[str, object]:
        state = self._state
        waiting: dict[str, int] = {}
        for ticket in state.queue:
            waiting[ticket.model] = waiting.get(ticket.model, 0) + 1
        return {
            "holder": state.holder_model,
            "pid": state.holder.pid if state.holder is not None else None,
            "state": "swapping" if state.swapping else ("ready" if state.holder else "empty"),
            "active_requests": state.active,
            "waiting": waiting,
            "swaps": state.swaps,
            "last_error": state.last_error,
            # (wall-clock time, event, model): every start and stop, oldest first
            "history": [
                {"at": at, "event": event, "model": model} for at, event, model in state.history
            ],
        }

    def _note(self, event: str, model: str | None) -> None:
        self._state.history.append((time.time(), event, model or "-"))

    @asynccontextmanager
    async def lease(self, model: str) -> AsyncIterator[Lease[H]]:
        """Hold `model` on the GPU for the duration of the block."""
        holder = await self._acquire(model)
        try:
            yield Lease(holder, self._state.generation, self._state.preempted)
        finally:
            async with self._changed:
                self._state.active -= 1
                self._last_used = time.monotonic()
                self._changed.notify_all()

    async def release_when_idle(self, check_every_s: float = 1.0) -> None:
        """Background task: stop a holder nobody has used for its idle TTL (per entry
        `ttl_s`, else the global default; no TTL means it stays loaded)."""
        while True:
            await asyncio.sleep(check_every_s)
            model = self._state.holder_model
            ttl = self._idle_ttl_s(model) if model is not None else None
            state = self._state
            idle = state.active == 0 and not state.swapping and not state.queue
            if ttl is not None and idle and time.monotonic() - self._last_used >= ttl:
                log.info("%s unused for %gs: releasing the GPU", model, ttl)
                await self.release()

    def _view(self) -> SlotView:
        state = self._state
        alive = state.holder is not None and state.holder.is_alive()
        expired = False
        if self._drain_timeout_s is not None and state.queue and state.active > 0:
            waited = time.monotonic() - state.queue[0].queued_at
            expired = waited >= self._drain_timeout_s
        return SlotView(
            state.holder_model, alive, state.swapping, state.active, state.queue, expired
        )

    async def _wait_for_change(self, ticket: Ticket) -> None:
        """Wait for the slot to change; the head of the queue also wakes at its drain deadline."""
        state = self._state
        head = bool(state.queue) and state.queue[0] is ticket
        if self._drain_timeout_s is None or state.swapping or not head:
            await self._changed.wait()
            return
        remaining = ticket.queued_at + self._drain_timeout_s - time.monotonic()
        # Never a zero timeout: wait_for would cancel Condition.wait before it released the
        # lock, and the task that must change the state could never take it.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), max(remaining, 0.001))

    async def _acquire(self, model: str) -> H:
        state = self._state
        ticket = Ticket(model, next(self._seq), time.monotonic())
        async with self._changed:
            state.queue.append(ticket)
            try:
                while True:
                    if ticket.error is not None:
                        raise ticket.error
                    decision = decide(self._view(), ticket)
                    if decision is Decision.ADMIT and state.holder is not None:
                        if not ticket.admitted:
                            state.active += 1
                        return state.holder
                    if decision is Decision.SWAP:
                        # A task of its own: if this request's client goes away, the others
                        # waiting for the same model still get it.
                        state.swapping = True
                        self._swap_task = asyncio.create_task(self._swap(model))
                    await self._wait_for_change(ticket)
            except BaseException:
                if ticket.admitted:  # admitted by a swap, but cancelled before it woke up
                    state.active -= 1
                    self._changed.notify_all()
                raise
            finally:
                state.queue.remove(ticket)

    async def _swap(self, model: str) -> None:
        state = self._state
        began = time.monotonic()
        try:
            if state.holder is not None:
                if state.active > 0:  # the drain timeout ran out: cut those requests short
                    state.preempted[state.generation] = (
                        f"{state.holder_model} was stopped to start {model}: its requests "
                        f"did not finish within the drain timeout ({self._drain_timeout_s:g}s)"
                    )
                log.info("stopping %s to start %s", state.holder_model, model)
                self._note("stopping", state.holder_model)
                await self._effects.stop(state.holder)
                self._note("stopped", state.holder_model)
                state.holder, state.holder_model = None, None
            self._note("starting", model)
            holder = await self._effects.start(model)
        except BackendNotReady as exc:
            self._note("failed", model)
            await self._settle(model, error=exc)
            return
        except Exception as exc:  # an effect bug must not leave waiters hanging forever
            log.exception("starting %s failed", model)
            await self._settle(model, error=BackendNotReady(f"{model}: start failed: {exc}"))
            return
        duration = time.monotonic() - began
        self._note("ready", model)
        await self._settle(model, holder=holder)
        log.info("%s is ready (swap took %.1fs)", model, duration)
        if self._on_swap is not None:
            self._on_swap(model, duration)

    async def _settle(
        self, model: str, *, holder: H | None = None, error: BackendNotReady | None = None
    ) -> None:
        """End a swap: admit every request waiting for `model`, or fail them all."""
        async with self._changed:
            state = self._state
            state.swapping = False
            state.holder, state.holder_model = holder, (model if holder is not None else None)
            state.generation += 1
            for stale in [g for g in state.preempted if g < state.generation - 64]:
                del state.preempted[stale]  # no request of that age can still be running
            if holder is not None:
                state.swaps += 1
                state.last_error = None
            elif error is not None:
                state.last_error = str(error)
            for waiting in state.queue:
                if waiting.model != model:
                    continue
                if holder is not None:
                    waiting.admitted = True
                    state.active += 1
                else:
                    waiting.error = error
            self._changed.notify_all()

    def adopt(self, model: str, holder: H) -> None:
        """Start out with a holder found already running (before any request is served)."""
        if self._state.holder is not None or self._state.swapping:
            raise RuntimeError("adopt() is only for an empty slot")
        self._state.holder, self._state.holder_model = holder, model

    def _idle(self) -> bool:
        return self._state.active == 0 and not self._state.swapping

    async def release(self) -> None:
        """Stop the holder once its requests have finished (admin stop, shutdown)."""
        async with self._changed:
            await self._changed.wait_for(self._idle)
            holder, holder_model = self._state.holder, self._state.holder_model
            self._state.holder, self._state.holder_model = None, None
            self._state.swapping = holder is not None
        if holder is None:
            return
        try:
            self._note("stopping", str(holder_model))
            await self._effects.stop(holder)
            self._note("stopped", str(holder_model))
        finally:
            async with self._changed:
                self._state.swapping = False
                self._changed.notify_all()
