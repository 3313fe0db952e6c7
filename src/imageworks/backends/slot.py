"""The GPU slot's decisions, as a pure function: `decide(state, message, now, rules)`.

The slot (``gpu.GpuSlot``) has one owner task; every change reaches it as a message, applied in
arrival order. ``decide`` returns the next state and the effects to run; it does no I/O, reads
no clock and logs nothing, so every interleaving is a table row (tests/unit/test_slot_table.py).

Requests for the GPU queue as *waiters*: a lease (a chat request, an activation) for a holder
key, or a stop (admin stop, shutdown). A stop is queued like a lease, so requests that arrive
after it wait behind it and a stop happens even under steady traffic.

Phases of the current holder (none at all: the slot is EMPTY):

    ========  =====================================================  ==========================
    phase     message or condition                                   next, and effects
    ========  =====================================================  ==========================
    EMPTY     a lease waiter is at the head of the queue             STARTING; Start
    EMPTY     a stop waiter is at the head                           EMPTY; the stop completes
    any       a stop of one key only (an unload) is at the head      the stop completes, nothing
              and another key (or none) holds the slot               is stopped
    EMPTY     Adopt (a process found running at start-up)            STARTING; CheckAdopted,
                                                                     or STOPPING; Stop if no
                                                                     entry can serve it
    STARTING  Started                                                READY; grant every waiter
                                                                     for the key queued before
                                                                     the first stop
    STARTING  Started, but the start had been cancelled              STOPPING; Stop
    STARTING  StartFailed (the effect cleaned up after itself)       EMPTY; reject those waiters
    STARTING  StartFailed with a process it could not kill           STUCK; reject those waiters
    STARTING  Withdrawn: no waiter wants the key any more            STARTING; CancelStart
    READY     a lease for the key with nobody queued before it       READY; grant it at once
    READY     the head wants another key (or is a stop), no leases   STOPPING; Stop
    READY     ... leases remain and the head waited out the drain    STOPPING; Stop, and the
              timeout                                                leases are cut short
    READY     idle (no leases, no waiters) for the key's TTL         STOPPING; Stop
    READY     HolderDied                                             STOPPING; Stop (cleanup)
    STOPPING  Stopped                                                EMPTY
    STOPPING  StopFailed                                             STUCK; reject every waiter
    STUCK     a waiter is at the head                                STOPPING; Stop (try again)
    any       Tick past a waiter's queue deadline                    reject it (busy, retry)
    any       Shutdown                                               reject every waiter; cancel
                                                                     a start; Stop a holder if
                                                                     asked to
    ========  =====================================================  ==========================

A start or stop is an effect that runs outside the owner and reports back (Started, StartFailed,
Stopped, StopFailed), so the slot never has two model processes on the GPU: a new start waits for
the previous stop's report, and a cancelled start reports too, once it has killed what it
spawned. Leases are counted per holder generation; a lease of a holder that has since been
stopped ends without touching the new holder's count.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Event = Literal[
    "starting", "ready", "failed", "cancelled", "stopping", "stopped", "stop failed", "adopted"
]


class Phase(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STUCK = "stuck"  # a stop (or a failed start's cleanup) left a process we could not kill


@dataclass(frozen=True, slots=True)
class Rules:
    drain_timeout_s: float | None = None  # None: wait for the old holder's leases forever
    queue_timeout_s: float | None = None  # None: a waiter waits as long as it takes


@dataclass(frozen=True, slots=True)
class Waiter:
    """A queued request for the slot: a lease of `key` (with the plan to start it), or a stop."""

    id: int
    arrived: float
    key: Hashable | None = None  # None: a stop
    plan: Any = None
    idle_ttl_s: float | None = None
    # A stop of this key only (an unload): decided when the stop reaches the head of the
    # queue, so a swap that happened meanwhile is not undone by stopping the new holder.
    only_key: Hashable | None = None

    @property
    def is_stop(self) -> bool:
        return self.key is None


@dataclass(frozen=True, slots=True)
class Current:
    """The holder of the slot (or the one being started or stopped)."""

    key: Hashable
    plan: Any
    generation: int
    phase: Phase
    holder: Any = None  # None while STARTING a fresh process
    leases: frozenset[int] = frozenset()
    idle_since: float = 0.0
    idle_ttl_s: float | None = None
    adopted: bool = False  # found running at start-up: no waiter's leaving cancels its check
    cancelled: bool = False  # the start was cancelled: stop whatever it reports


@dataclass(frozen=True, slots=True)
class SlotState:
    current: Current | None = None
    queue: tuple[Waiter, ...] = ()
    generation: int = 0
    swaps: int = 0
    last_error: str | None = None
    closing: bool = False  # new waiters are rejected
    finished: bool = False  # the owner may end once no effect is running


# -- messages --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Wanted:
    waiter: Waiter


@dataclass(frozen=True, slots=True)
class Withdrawn:
    waiter_id: int


@dataclass(frozen=True, slots=True)
class LeaseEnded:
    lease_id: int


@dataclass(frozen=True, slots=True)
class Started:
    generation: int
    holder: Any


@dataclass(frozen=True, slots=True)
class StartFailed:
    generation: int
    error: BaseException
    leftover: Any = None  # a process the failed start could not kill


@dataclass(frozen=True, slots=True)
class Stopped:
    generation: int


@dataclass(frozen=True, slots=True)
class StopFailed:
    generation: int
    error: BaseException


@dataclass(frozen=True, slots=True)
class HolderDied:
    generation: int


@dataclass(frozen=True, slots=True)
class Adopt:
    """A model process found running at start-up; it is checked (health) before it serves."""

    key: Hashable
    plan: Any
    holder: Any
    idle_ttl_s: float | None = None
    serve: bool = True  # False: nothing can serve it any more, so it is stopped at once


@dataclass(frozen=True, slots=True)
class Tick:
    """Time has passed: queue deadlines, the drain timeout and idle TTLs are due."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """The proxy is stopping. The first, early one (`final=False`, as soon as the server stops
    accepting) rejects waiters and cancels a start, so nothing waits on a model load; the last
    one also stops the holder, if asked, and lets the owner end."""

    stop_holder: bool
    final: bool = True


Message = (
    Wanted
    | Withdrawn
    | LeaseEnded
    | Started
    | StartFailed
    | Stopped
    | StopFailed
    | HolderDied
    | Adopt
    | Tick
    | Shutdown
)

# -- effects ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Grant:
    waiter_id: int
    lease_id: int
    generation: int
    holder: Any
    plan: Any


@dataclass(frozen=True, slots=True)
class Reject:
    waiter_id: int
    reason: str
    busy: bool = False  # the queue timeout: worth retrying
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class Complete:
    """A stop waiter is done: nothing holds the GPU any more."""

    waiter_id: int


@dataclass(frozen=True, slots=True)
class Start:
    generation: int
    key: Hashable
    plan: Any


@dataclass(frozen=True, slots=True)
class CheckAdopted:
    """Wait for an adopted process to answer its health check (then Started or StartFailed)."""

    generation: int
    holder: Any


@dataclass(frozen=True, slots=True)
class CancelStart:
    generation: int


@dataclass(frozen=True, slots=True)
class Stop:
    generation: int
    holder: Any
    cut_short: str | None = None  # why leases still running on it were cut short


@dataclass(frozen=True, slots=True)
class Note:
    """A line for the slot's history (and the operator log)."""

    event: Event
    key: Hashable
    detail: str = ""


Effect = Grant | Reject | Complete | Start | CheckAdopted | CancelStart | Stop | Note


@dataclass
class _Step:
    """The state being changed by one message, and the effects gathered on the way."""

    state: SlotState
    now: float
    rules: Rules
    effects: list[Effect] = field(default_factory=list)
    next_lease: int = 0

    def set(self, **changes: Any) -> None:
        self.state = replace(self.state, **changes)

    def set_current(self, current: Current | None) -> None:
        self.state = replace(self.state, current=current)

    def remove(self, waiter: Waiter) -> None:
        self.set(queue=tuple(w for w in self.state.queue if w.id != waiter.id))


def decide(
    state: SlotState, message: Message, now: float, rules: Rules, *, first_lease_id: int = 0
) -> tuple[SlotState, list[Effect]]:
    """Apply `message` at time `now`; the new state and the effects, in order. Lease ids for
    the grants are numbered from `first_lease_id` (the owner keeps the counter)."""
    step = _Step(state, now, rules, next_lease=first_lease_id)
    _apply(step, message)
    _advance(step)
    return step.state, step.effects


def _apply(step: _Step, message: Message) -> None:
    state, current = step.state, step.state.current
    match message:
        case Wanted(waiter):
            if state.closing:
                step.effects.append(Reject(waiter.id, "the proxy is shutting down"))
            else:
                step.set(queue=(*state.queue, waiter))
        case Withdrawn(waiter_id):
            gone = [w for w in state.queue if w.id == waiter_id]
            step.set(queue=tuple(w for w in state.queue if w.id != waiter_id))
            if gone and current is not None and gone[0].key == current.key:
                _cancel_unwanted_start(step)
        case LeaseEnded(lease_id):
            if current is not None and lease_id in current.leases:
                leases = current.leases - {lease_id}
                idle_since = step.now if not leases else current.idle_since
                step.set_current(replace(current, leases=leases, idle_since=idle_since))
        case Started(generation, holder) if _is(current, generation, Phase.STARTING):
            assert current is not None
            if current.cancelled:
                step.set_current(replace(current, phase=Phase.STOPPING, holder=holder))
                step.effects.append(Stop(generation, holder))
                step.effects.append(Note("stopping", current.key, "nobody wants it any more"))
                return
            step.set_current(
                replace(current, phase=Phase.READY, holder=holder, idle_since=step.now)
            )
            step.set(swaps=state.swaps + (0 if current.adopted else 1), last_error=None)
            step.effects.append(Note("ready", current.key))
            _grant_waiting(step, before_first_stop=True)
        case StartFailed(generation, error, leftover) if _is(current, generation, Phase.STARTING):
            assert current is not None
            reason = str(error) or type(error).__name__
            if leftover is not None:
                step.set_current(replace(current, phase=Phase.STUCK, holder=leftover))
            else:
                step.set_current(None)
            if current.cancelled:
                step.effects.append(Note("cancelled", current.key))
            else:
                step.set(last_error=reason)
                step.effects.append(Note("failed", current.key, reason))
                _reject_waiters_for(step, current.key, reason, error)
        case Stopped(generation) if _is(current, generation, Phase.STOPPING):
            assert current is not None
            step.set_current(None)
            step.effects.append(Note("stopped", current.key))
        case StopFailed(generation, error) if _is(current, generation, Phase.STOPPING):
            assert current is not None
            reason = f"could not stop {current.key}: {error}"
            step.set_current(replace(current, phase=Phase.STUCK))
            step.set(last_error=reason)
            step.effects.append(Note("stop failed", current.key, str(error)))
            for waiter in state.queue:
                step.effects.append(Reject(waiter.id, reason, error=error))
            step.set(queue=())
        case HolderDied(generation) if _is(current, generation, Phase.READY):
            assert current is not None
            _stop_current(step, cut_short=f"the model process for {current.key} exited")
        case Adopt(key, plan, holder, ttl, serve) if current is None and not state.closing:
            generation = state.generation + 1
            phase = Phase.STARTING if serve else Phase.STOPPING
            step.set(generation=generation)
            step.set_current(
                Current(key, plan, generation, phase, holder, idle_ttl_s=ttl, adopted=True)
            )
            step.effects.append(Note("adopted", key))
            if serve:
                step.effects.append(CheckAdopted(generation, holder))
            else:
                step.effects.append(Note("stopping", key))
                step.effects.append(Stop(generation, holder))
        case Adopt(holder=holder):  # only an empty slot adopts: stop the stray instead
            step.effects.append(Stop(-1, holder))
        case Tick():
            _expire_waiters(step)
            _release_idle(step)
        case Shutdown(stop_holder, final):
            step.set(closing=True, finished=state.finished or final)
            for waiter in state.queue:
                step.effects.append(Reject(waiter.id, "the proxy is shutting down"))
            step.set(queue=())
            if current is not None and current.phase is Phase.STARTING and not current.cancelled:
                step.set_current(replace(current, cancelled=True))
                step.effects.append(CancelStart(current.generation))
            elif stop_holder and current is not None and current.phase in _STOPPABLE:
                _stop_current(step, cut_short="the proxy is shutting down")
        case _:
            pass  # a report about a holder generation that is no longer current


_STOPPABLE = frozenset({Phase.READY, Phase.STUCK})


def _is(current: Current | None, generation: int, phase: Phase) -> bool:
    return current is not None and current.generation == generation and current.phase is phase


def _advance(step: _Step) -> None:
    """Move the queue along as far as the current phase allows."""
    while not step.state.closing:
        state, current = step.state, step.state.current
        if current is not None and current.phase is Phase.READY:
            _grant_waiting(step, before_first_stop=False)
            state = step.state
        if not state.queue:
            return
        head = state.queue[0]
        if _stops_nothing(head, current):  # that key holds nothing (any more)
            step.remove(head)
            step.effects.append(Complete(head.id))
            continue
        if current is None:
            if head.is_stop:
                step.remove(head)
                step.effects.append(Complete(head.id))
                continue
            _start(step, head)
            return
        if current.phase is Phase.STUCK:
            _stop_current(step, cut_short=None)
            return
        if current.phase is not Phase.READY:
            return  # STARTING or STOPPING: its report moves things on
        # READY for another key (a lease for this one would have been granted), or a stop.
        if not current.leases:
            _stop_current(step, cut_short=None)
        elif _drain_expired(step, head):
            drain = step.rules.drain_timeout_s
            wanted = "a stop" if head.is_stop else str(head.key)
            _stop_current(
                step,
                cut_short=f"{current.key} was stopped for {wanted}: its requests did not finish "
                f"within the drain timeout ({drain:g}s)",
            )
        return


def _stops_nothing(head: Waiter, current: Current | None) -> bool:
    """A stop of one key (an unload) when that key is not the slot's."""
    if not head.is_stop or head.only_key is None:
        return False
    return current is None or current.key != head.only_key


def _start(step: _Step, head: Waiter) -> None:
    assert head.key is not None
    generation = step.state.generation + 1
    current = Current(head.key, head.plan, generation, Phase.STARTING, idle_ttl_s=head.idle_ttl_s)
    step.set(generation=generation)
    step.set_current(current)
    step.effects.append(Note("starting", head.key))
    step.effects.append(Start(generation, head.key, head.plan))


def _stop_current(step: _Step, *, cut_short: str | None) -> None:
    current = step.state.current
    assert current is not None
    step.set_current(replace(current, phase=Phase.STOPPING))
    step.effects.append(Note("stopping", current.key))
    step.effects.append(
        Stop(current.generation, current.holder, cut_short if current.leases else None)
    )


def _grant_waiting(step: _Step, *, before_first_stop: bool) -> None:
    """Grant queued leases for the READY holder's key: right after its start, every one queued
    before the first stop (they all waited for it); otherwise only those at the head, so a
    model with steady traffic cannot starve the others queued behind it."""
    current = step.state.current
    assert current is not None
    granted: list[Waiter] = []
    for waiter in step.state.queue:
        if waiter.is_stop:
            break
        if waiter.key != current.key:
            if before_first_stop:
                continue
            break
        granted.append(waiter)
    if not granted:
        return
    leases = set(current.leases)
    for waiter in granted:
        lease_id = step.next_lease
        step.next_lease += 1
        leases.add(lease_id)
        step.effects.append(
            Grant(waiter.id, lease_id, current.generation, current.holder, current.plan)
        )
    ids = {w.id for w in granted}
    step.set(queue=tuple(w for w in step.state.queue if w.id not in ids))
    step.set_current(replace(current, leases=frozenset(leases)))


def _reject_waiters_for(step: _Step, key: Hashable, reason: str, error: BaseException) -> None:
    """Fail the waiters of a start that failed (those queued before the first stop)."""
    failed: list[Waiter] = []
    for waiter in step.state.queue:
        if waiter.is_stop:
            break
        if waiter.key == key:
            failed.append(waiter)
    for waiter in failed:
        step.effects.append(Reject(waiter.id, reason, error=error))
    ids = {w.id for w in failed}
    step.set(queue=tuple(w for w in step.state.queue if w.id not in ids))


def _cancel_unwanted_start(step: _Step) -> None:
    """A start that no waiter wants any more is stopped rather than finished."""
    current = step.state.current
    if current is None or current.phase is not Phase.STARTING or current.cancelled:
        return
    if current.adopted or any(w.key == current.key for w in step.state.queue):
        return
    step.set_current(replace(current, cancelled=True))
    step.effects.append(CancelStart(current.generation))


def _drain_expired(step: _Step, head: Waiter) -> bool:
    drain = step.rules.drain_timeout_s
    return drain is not None and step.now - head.arrived >= drain


def _expire_waiters(step: _Step) -> None:
    timeout = step.rules.queue_timeout_s
    if timeout is None:
        return
    expired = [w for w in step.state.queue if step.now - w.arrived >= timeout]
    for waiter in expired:
        step.remove(waiter)
        step.effects.append(
            Reject(waiter.id, f"waited {timeout:g}s for the GPU (queue timeout)", busy=True)
        )


def _release_idle(step: _Step) -> None:
    current = step.state.current
    if current is None or current.phase is not Phase.READY or step.state.queue:
        return
    ttl = current.idle_ttl_s
    if ttl is not None and not current.leases and step.now - current.idle_since >= ttl:
        _stop_current(step, cut_short=None)


def next_deadline(state: SlotState, rules: Rules) -> float | None:
    """When a Tick would change something (a queue timeout, the drain timeout, an idle TTL)."""
    deadlines: list[float] = []
    if rules.queue_timeout_s is not None:
        deadlines.extend(w.arrived + rules.queue_timeout_s for w in state.queue)
    current = state.current
    if current is not None and current.phase is Phase.READY:
        if state.queue and current.leases and rules.drain_timeout_s is not None:
            deadlines.append(state.queue[0].arrived + rules.drain_timeout_s)
        if not state.queue and not current.leases and current.idle_ttl_s is not None:
            deadlines.append(current.idle_since + current.idle_ttl_s)
    return min(deadlines) if deadlines else None
