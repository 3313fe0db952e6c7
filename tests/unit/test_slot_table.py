"""The GPU slot's transition table (backends/slot.py), row by row: no processes, no clocks."""

from __future__ import annotations

from dataclasses import replace

import pytest

from imageworks.backends.slot import (
    Adopt,
    CancelStart,
    CheckAdopted,
    Complete,
    Current,
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

RULES = Rules(drain_timeout_s=30.0, queue_timeout_s=100.0)
HOLDER = "process"


def lease(waiter_id: int, key: str, arrived: float = 0.0) -> Waiter:
    return Waiter(waiter_id, arrived, key, plan=f"plan {key}")


def stop(waiter_id: int, arrived: float = 0.0, only: str | None = None) -> Waiter:
    return Waiter(waiter_id, arrived, only_key=only)


def slot(phase: Phase | None, key: str = "a", *queue: Waiter, **current: object) -> SlotState:
    if phase is None:
        return SlotState(queue=queue, generation=1)
    holder = None if phase is Phase.STARTING else HOLDER
    fields: dict[str, object] = {"holder": holder, **current}
    return SlotState(
        current=Current(key, f"plan {key}", 1, phase, **fields),  # type: ignore[arg-type]
        queue=queue,
        generation=1,
    )


def summary(effects: list[Effect]) -> list[str]:
    """Effects as short words (history notes left out): what the row promises."""
    words: list[str] = []
    for effect in effects:
        match effect:
            case Grant(waiter_id, _, generation, _, plan):
                words.append(f"grant {waiter_id} ({plan}, gen {generation})")
            case Reject(waiter_id, _, busy, _):
                words.append(f"{'busy' if busy else 'reject'} {waiter_id}")
            case Complete(waiter_id):
                words.append(f"complete {waiter_id}")
            case Start(generation, key, _):
                words.append(f"start {key} (gen {generation})")
            case CheckAdopted(generation, _):
                words.append(f"check adopted (gen {generation})")
            case CancelStart(generation):
                words.append(f"cancel start (gen {generation})")
            case Stop(generation, _, cut_short):
                words.append(
                    f"stop gen {generation}" + (" cutting leases short" if cut_short else "")
                )
            case Note():
                pass
    return words


def phase_of(state: SlotState) -> str:
    current = state.current
    return "empty" if current is None else f"{current.phase.value} {current.key}"


# One row: (name, before, message, now, effects, phase after). Kept as a table on purpose.
# fmt: off
ROWS: list[tuple[str, SlotState, Message, float, list[str], str]] = [
    # -- EMPTY --------------------------------------------------------------------------------
    ("empty: a lease starts its model", slot(None), Wanted(lease(1, "a")), 0,
     ["start a (gen 2)"], "starting a"),
    ("empty: a stop completes at once", slot(None), Wanted(stop(1)), 0,
     ["complete 1"], "empty"),
    # -- STARTING -----------------------------------------------------------------------------
    ("starting: another lease for it waits", slot(Phase.STARTING, "a", lease(1, "a")),
     Wanted(lease(2, "a")), 0, [], "starting a"),
    ("starting: ready grants every waiter for it queued before the first stop",
     slot(Phase.STARTING, "a", lease(1, "a"), lease(2, "b"), lease(3, "a"), stop(4),
          lease(5, "a")),
     Started(1, HOLDER), 0, ["grant 1 (plan a, gen 1)", "grant 3 (plan a, gen 1)"], "ready a"),
    ("starting: a cancelled start that comes up anyway is stopped",
     slot(Phase.STARTING, "a", cancelled=True), Started(1, HOLDER), 0, ["stop gen 1"],
     "stopping a"),
    ("starting: a failed start fails its waiters, then the next model starts",
     slot(Phase.STARTING, "a", lease(1, "a"), lease(2, "b")),
     StartFailed(1, RuntimeError("no weights")), 0, ["reject 1", "start b (gen 2)"],
     "starting b"),
    ("starting: a failed start that could not kill its process is stuck, and retried",
     slot(Phase.STARTING, "a", lease(1, "a"), lease(2, "b")),
     StartFailed(1, RuntimeError("survived"), leftover=HOLDER), 0,
     ["reject 1", "stop gen 1"], "stopping a"),
    ("starting: the last waiter leaving cancels the start",
     slot(Phase.STARTING, "a", lease(1, "a")), Withdrawn(1), 0, ["cancel start (gen 1)"],
     "starting a"),
    ("starting: a waiter leaving while another still waits changes nothing",
     slot(Phase.STARTING, "a", lease(1, "a"), lease(2, "a")), Withdrawn(1), 0, [],
     "starting a"),
    ("starting: a waiter for another model leaving does not cancel the start",
     slot(Phase.STARTING, "a", lease(2, "b")), Withdrawn(2), 0, [], "starting a"),
    ("starting: an adopted process being checked is not cancelled by a leaving waiter",
     slot(Phase.STARTING, "a", lease(1, "a"), adopted=True), Withdrawn(1), 0, [],
     "starting a"),
    ("starting: a report about an old generation is ignored",
     slot(Phase.STARTING, "a", lease(1, "a")), Started(0, HOLDER), 0, [], "starting a"),
    # -- READY --------------------------------------------------------------------------------
    ("ready: a lease for the holder is granted at once", slot(Phase.READY, "a"),
     Wanted(lease(1, "a")), 0, ["grant 1 (plan a, gen 1)"], "ready a"),
    ("ready: a lease for the holder waits behind a request for another model",
     slot(Phase.READY, "a", lease(1, "b"), leases=frozenset({7})), Wanted(lease(2, "a")), 0,
     [], "ready a"),
    ("ready: another model waits while the holder has leases",
     slot(Phase.READY, "a", leases=frozenset({7})), Wanted(lease(1, "b")), 0, [], "ready a"),
    ("ready: another model stops an idle holder", slot(Phase.READY, "a"),
     Wanted(lease(1, "b")), 0, ["stop gen 1"], "stopping a"),
    ("ready: the last lease ending lets the queued model in",
     slot(Phase.READY, "a", lease(1, "b"), leases=frozenset({7})), LeaseEnded(7), 5,
     ["stop gen 1"], "stopping a"),
    ("ready: a stop waits for the leases", slot(Phase.READY, "a", leases=frozenset({7})),
     Wanted(stop(1)), 0, [], "ready a"),
    ("ready: an unload of the holder waits for its leases, as a stop does",
     slot(Phase.READY, "a", leases=frozenset({7})), Wanted(stop(1, only="a")), 0, [],
     "ready a"),
    ("ready: an unload of the holder stops it once idle", slot(Phase.READY, "a"),
     Wanted(stop(1, only="a")), 0, ["stop gen 1"], "stopping a"),
    ("ready: an unload of a model swapped out meanwhile stops nothing", slot(Phase.READY, "b"),
     Wanted(stop(1, only="a")), 0, ["complete 1"], "ready b"),
    ("starting: an unload of another model completes, the start goes on",
     slot(Phase.STARTING, "b"), Wanted(stop(1, only="a")), 0, ["complete 1"], "starting b"),
    ("empty: an unload completes at once", slot(None), Wanted(stop(1, only="a")), 0,
     ["complete 1"], "empty"),
    ("ready: the drain timeout stops the holder under its leases",
     slot(Phase.READY, "a", lease(1, "b"), leases=frozenset({7})), Tick(), 30,
     ["stop gen 1 cutting leases short"], "stopping a"),
    ("ready: before the drain timeout nothing happens",
     slot(Phase.READY, "a", lease(1, "b"), leases=frozenset({7})), Tick(), 29.9, [],
     "ready a"),
    ("ready: the drain timeout applies to a stop too",
     slot(Phase.READY, "a", stop(1), leases=frozenset({7})), Tick(), 30,
     ["stop gen 1 cutting leases short"], "stopping a"),
    ("ready: an idle holder is stopped after its TTL",
     slot(Phase.READY, "a", idle_since=10.0, idle_ttl_s=60.0), Tick(), 70, ["stop gen 1"],
     "stopping a"),
    ("ready: not before its TTL",
     slot(Phase.READY, "a", idle_since=10.0, idle_ttl_s=60.0), Tick(), 69, [], "ready a"),
    ("ready: no TTL, no idle stop", slot(Phase.READY, "a"), Tick(), 10**6, [], "ready a"),
    ("ready: a dead holder is cleaned up, its leases cut short",
     slot(Phase.READY, "a", leases=frozenset({7})), HolderDied(1), 0,
     ["stop gen 1 cutting leases short"], "stopping a"),
    ("ready: a lease of an older holder ending changes nothing",
     slot(Phase.READY, "a", leases=frozenset({7})), LeaseEnded(3), 0, [], "ready a"),
    # -- STOPPING -----------------------------------------------------------------------------
    ("stopping: stopped starts the next model", slot(Phase.STOPPING, "a", lease(1, "b")),
     Stopped(1), 0, ["start b (gen 2)"], "starting b"),
    ("stopping: stopped completes a queued stop", slot(Phase.STOPPING, "a", stop(1)),
     Stopped(1), 0, ["complete 1"], "empty"),
    ("stopping: a failed stop keeps the holder and fails every waiter",
     slot(Phase.STOPPING, "a", lease(1, "b"), stop(2)), StopFailed(1, RuntimeError("D state")),
     0, ["reject 1", "reject 2"], "stuck a"),
    # -- STUCK --------------------------------------------------------------------------------
    ("stuck: the next request tries the stop again", slot(Phase.STUCK, "a"),
     Wanted(lease(1, "b")), 0, ["stop gen 1"], "stopping a"),
    # -- any phase ----------------------------------------------------------------------------
    ("any: a waiter past the queue timeout is told to retry; the start goes on",
     slot(Phase.STARTING, "a", lease(1, "a", arrived=0), lease(2, "a", arrived=50)), Tick(),
     100, ["busy 1"], "starting a"),
    ("shutdown: waiters are rejected and the holder stopped",
     slot(Phase.READY, "a", lease(1, "b"), leases=frozenset({7})), Shutdown(stop_holder=True),
     0, ["reject 1", "stop gen 1 cutting leases short"], "stopping a"),
    ("shutdown: leave the holder running when asked",
     slot(Phase.READY, "a", lease(1, "b")), Shutdown(stop_holder=False), 0, ["reject 1"],
     "ready a"),
    ("shutdown: a start is cancelled (its effect kills what it spawned)",
     slot(Phase.STARTING, "a", lease(1, "a")), Shutdown(stop_holder=False), 0,
     ["reject 1", "cancel start (gen 1)"], "starting a"),
    ("shutdown begins: waiters are rejected, a start cancelled, the owner goes on",
     slot(Phase.STARTING, "a", lease(1, "a")), Shutdown(stop_holder=False, final=False), 0,
     ["reject 1", "cancel start (gen 1)"], "starting a"),
    ("shutdown: a request after shutdown is rejected",
     replace(slot(Phase.READY, "a"), closing=True), Wanted(lease(1, "a")), 0, ["reject 1"],
     "ready a"),
    ("adopt: an empty slot checks the adopted process first", slot(None),
     Adopt("a", "plan a", HOLDER), 0, ["check adopted (gen 2)"], "starting a"),
    ("adopt: a process nothing can serve is stopped at once", slot(None),
     Adopt("a", None, HOLDER, serve=False), 0, ["stop gen 2"], "stopping a"),
    ("adopt: a slot that already holds something stops the stray",
     slot(Phase.READY, "b"), Adopt("a", "plan a", "stray"), 0, ["stop gen -1"], "ready b"),
]
# fmt: on


@pytest.mark.parametrize(
    ("before", "message", "now", "effects", "after"),
    [row[1:] for row in ROWS],
    ids=[row[0] for row in ROWS],
)
def test_slot_transition(
    before: SlotState, message: Message, now: float, effects: list[str], after: str
) -> None:
    state, done = decide(before, message, now, RULES)
    assert summary(done) == effects
    assert phase_of(state) == after


def run(state: SlotState, *steps: tuple[Message, float]) -> tuple[SlotState, list[str]]:
    seen: list[str] = []
    lease_ids = 100
    for message, now in steps:
        state, effects = decide(state, message, now, RULES, first_lease_id=lease_ids)
        lease_ids += sum(isinstance(e, Grant) for e in effects)
        seen.extend(summary(effects))
    return state, seen


def test_slot_stop_happens_under_steady_traffic_for_the_holder() -> None:
    # Three clients take turns on `a`; a stop arrives between them. Later arrivals queue
    # behind the stop instead of keeping the holder busy forever.
    state, seen = run(
        slot(Phase.READY, "a", leases=frozenset({7})),
        (Wanted(stop(1, arrived=1)), 1),
        (Wanted(lease(2, "a", arrived=2)), 2),
        (LeaseEnded(7), 3),
        (Stopped(1), 4),
    )
    assert seen == ["stop gen 1", "complete 1", "start a (gen 2)"]
    assert phase_of(state) == "starting a"


def test_slot_lease_counts_belong_to_their_holder_generation() -> None:
    # A lease cut short by the drain timeout ends after the new holder is up: the new
    # holder's count must not change, so it can still be swapped out once idle.
    state, seen = run(
        slot(Phase.READY, "a", lease(1, "b"), leases=frozenset({7})),
        (Tick(), 30),
        (Stopped(1), 31),
        (Started(2, "b process"), 32),
        (LeaseEnded(7), 33),
    )
    assert seen == ["stop gen 1 cutting leases short", "start b (gen 2)", "grant 1 (plan b, gen 2)"]
    assert state.current is not None
    assert state.current.leases == frozenset({100})


def test_slot_never_starts_while_another_process_may_be_alive() -> None:
    # A start cancelled by its leaving client must report before anything else starts.
    state, seen = run(
        slot(Phase.STARTING, "a", lease(1, "a")),
        (Withdrawn(1), 1),
        (Wanted(lease(2, "b")), 2),
    )
    assert seen == ["cancel start (gen 1)"]
    state, seen = run(state, (StartFailed(1, RuntimeError("cancelled")), 3))
    assert seen == ["start b (gen 2)"]
    assert state.last_error is None  # a cancelled start is not an error


def test_next_deadline_is_the_earliest_timer() -> None:
    queue_only = slot(Phase.STARTING, "a", lease(1, "a", arrived=5))
    assert next_deadline(queue_only, RULES) == 105
    draining = slot(Phase.READY, "a", lease(1, "b", arrived=5), leases=frozenset({7}))
    assert next_deadline(draining, RULES) == 35
    idle = slot(Phase.READY, "a", idle_since=2.0, idle_ttl_s=10.0)
    assert next_deadline(idle, RULES) == 12
    assert next_deadline(slot(Phase.READY, "a"), Rules()) is None
