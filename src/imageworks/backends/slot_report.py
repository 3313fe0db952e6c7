"""What people see of the GPU slot (`GpuSlot.status()`): its state in words, and the wall-clock
story the pure state does not keep: since when the phase and the holder are what they are, the
step a start has reached, the last swaps, when the last error arose, and every start and stop;
and, for the models' status (`SlotView`), why each model's last start failed.

Written only by the slot's owner task, after each message it applies; read by anyone.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from imageworks.backends.slot import Phase, SlotState

_HISTORY = 200
_SWAPS_KEPT = 10


@dataclass(frozen=True, slots=True)
class SlotView:
    """The slot as the models' status needs it: small, made once per change of the slot."""

    version: int = 0  # the slot's `changes.version` this was made at
    holder: str | None = None  # the model being started, serving, stopped, or stuck
    phase: Phase | None = None
    step: str | None = None  # how far a start has got ("spawning", "waiting for health")
    # model -> why its last start (or stop) failed; forgotten once it is ready (or stopped)
    failures: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    safe_mode: tuple[str, ...] = ()  # the holder runs with these safe-mode arguments


class SlotReport:
    def __init__(self) -> None:
        self._history: deque[tuple[float, str, str]] = deque(maxlen=_HISTORY)
        self._phase: tuple[int, Phase] | None = None
        self._phase_since = time.time()
        self._holder_since: float | None = None
        self._start_step: str | None = None
        self._swaps: deque[tuple[float, str, float]] = deque(maxlen=_SWAPS_KEPT)
        self._error: tuple[float, str] | None = None  # (when, model) of state.last_error
        # model -> (why, which effect failed: "start" or "stop"), for the models' status
        self._failures: dict[str, tuple[str, str]] = {}

    # -- written by the owner task ----------------------------------------------------------------

    def noted(self, event: str, model: str, detail: str = "") -> None:
        """A start or stop happened (the slot's Note effect)."""
        self._history.append((time.time(), event, model))
        if event == "failed":
            self._failures[model] = (detail or "the start failed", "start")
        elif event == "stop failed":
            self._failures[model] = (f"could not stop it: {detail}", "stop")
        elif event == "ready":
            self._failures.pop(model, None)
        elif event == "stopped" and self._failures.get(model, ("", ""))[1] == "stop":
            self._failures.pop(model, None)  # a later stop did what the failed one could not

    def start_step(self, state: SlotState, generation: int, step: str) -> None:
        """The start of `generation` has reached `step` (ignored once it is not current)."""
        if state.current is not None and state.current.generation == generation:
            self._start_step = step

    def swapped(self, model: str, seconds: float) -> None:
        self._swaps.append((time.time(), model, seconds))

    def applied(self, state: SlotState, error_before: str | None) -> None:
        """Stamp phase changes (and a new error) with the wall-clock time."""
        current = state.current
        phase = (current.generation, current.phase) if current is not None else None
        if phase != self._phase:
            self._phase, self._phase_since = phase, time.time()
            if current is None or current.phase is not Phase.STARTING:
                self._start_step = None
            if current is not None and current.phase is Phase.READY:
                self._holder_since = self._phase_since
            elif current is None:
                self._holder_since = None
        if state.last_error is not None and state.last_error != error_before:
            if current is not None:
                model = str(current.key)
            else:
                model = self._history[-1][2] if self._history else ""
            self._error = (time.time(), model)

    # -- read ------------------------------------------------------------------------------------

    def view(self, state: SlotState, version: int) -> SlotView:
        current = state.current
        failures = MappingProxyType({model: why for model, (why, _) in self._failures.items()})
        if current is None:
            return SlotView(version, failures=failures)
        step = self._start_step if current.phase is Phase.STARTING else None
        safe_mode = current.holder.safe_mode if current.holder is not None else ()
        return SlotView(version, str(current.key), current.phase, step, failures, safe_mode)

    def status(self, state: SlotState) -> dict[str, object]:
        current = state.current
        waiting: dict[str, int] = {}
        for waiter in state.queue:
            name = "(stop)" if waiter.key is None else str(waiter.key)
            waiting[name] = waiting.get(name, 0) + 1
        has_process = current is not None and current.phase is not Phase.STARTING
        error = self._error if state.last_error else None
        return {
            "holder": str(current.key) if current is not None and has_process else None,
            "starting": str(current.key) if current and not has_process else None,
            "pid": current.holder.pid if current and current.holder is not None else None,
            # Its start crashed without these (or its binary is known to): see safe_mode.py.
            "safe_mode": list(current.holder.safe_mode)
            if current and current.holder is not None
            else [],
            "state": current.phase.value if current is not None else "empty",
            "activity": self._activity(state),
            "phase_since": self._phase_since,
            "holder_since": self._holder_since if has_process else None,
            "active_requests": len(current.leases) if current is not None else 0,
            "waiting": waiting,
            "swaps": state.swaps,
            "last_swaps": [
                {"at": at, "model": model, "duration_s": round(seconds, 3)}
                for at, model, seconds in self._swaps
            ],
            "last_error": state.last_error,
            "last_error_at": error[0] if error else None,
            "last_error_model": error[1] if error else None,
            # (wall-clock time, event, model): every start and stop, oldest first
            "history": [
                {"at": at, "event": event, "model": model} for at, event, model in self._history
            ],
        }

    def _activity(self, state: SlotState) -> str:
        """What the slot is doing, in words: idle, serving, draining (a swap or stop waits for
        the holder's requests), stopping, stuck, or the step a start has reached."""
        current = state.current
        if current is None:
            return "idle"
        if current.phase is Phase.STARTING:
            return self._start_step or "starting"
        if current.phase is Phase.READY:
            if any(waiter.key != current.key for waiter in state.queue):
                return "draining"
            return "serving" if current.leases else "idle"
        return str(current.phase.value)  # stopping, stuck
