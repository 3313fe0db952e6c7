"""The model catalog: `/v1/models`, `/v1/models/{id}` and name resolution, answered from memory.

The registry is re-checked off the event loop at most once a second (a few `stat` calls when
nothing changed). Whether backend-served entries (Ollama tags, external URLs) are installed is
asked in the background every `installed_refresh_s`, so a dead backend never slows a listing.
For a remote entry that ask is its health check (at the entry's own `health_check_interval_s`
if it sets one): while it fails the entry is "unreachable", still listed, and `outage()` says
since when and why, so its requests are refused at once. An Ollama that does not answer gives
its entries an outage too (why, and the fix), for the dashboard; they stay "unknown" (not
listed), and their requests go to the GPU slot as before.

Every listed model carries its `status` (model_status.py: is it warm?). The listing is made of
bytes prepared per model, each with the status it has while the slot is idle; when the slot
changes, only the models it concerns (its holder, the models whose start failed) are written
again, and the listing is joined anew only if one of them now reads differently.

A model's `created` is the entry's `downloaded_at` (an ISO 8601 time or Unix seconds, at the top
of the entry as the original registry writes it, or in `metadata`), else the modification time
of the registry file that defines the entry (the newer one when both layers do).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imageworks.backends.base import Outage
from imageworks.backends.slot_report import SlotView
from imageworks.chat_proxy.config import ProxySettings
from imageworks.chat_proxy.model_status import IDLE, StatusRules, entry_status, holder_name
from imageworks.chat_proxy.protocol import InvalidRequest, ModelNotFound, json_bytes
from imageworks.registry.errors import AmbiguousName, EntryNotFound, RegistryError
from imageworks.registry.installed import (
    Installed,
    InstalledReport,
    ServedModelsSource,
    installed_report,
    installed_states,
)
from imageworks.registry.naming import NameIndex, display_name
from imageworks.registry.schema import RegistryEntry
from imageworks.registry.store import RegistrySnapshot, RegistryStore

log = logging.getLogger("imageworks.chat_proxy.catalog")

RECHECK_INTERVAL_S = 1.0
# The background check never wakes more often than this, however short an entry's interval.
_MIN_CHECK_INTERVAL_S = 0.1
# Listed even when CHAT_PROXY_INCLUDE_NON_INSTALLED is off. That setting hides what would need
# a download (NO) and what no backend vouches for (UNKNOWN). An unreachable remote is neither:
# it is a curated pointer at a server that is down for now, and hiding it would make clients
# drop the model they had selected; it is listed with its state, and its requests fail fast.
_ALWAYS_LISTED = frozenset({Installed.YES, Installed.UNREACHABLE})
_LISTING_HEAD = b'{"object":"list","data":['
_LISTING_TAIL = b"]}"


@dataclass(frozen=True)
class CatalogView:
    """One consistent picture: the registry, its name index, and the models list to serve."""

    snapshot: RegistrySnapshot
    index: NameIndex  # every entry that is not deprecated
    listing: bytes  # the /v1/models response body
    listed: int
    models: Mapping[str, bytes]  # listed id -> its model object, as the listing has it
    ids: Mapping[str, str]  # entry name -> its listed id
    installed: Mapping[str, Installed]  # entry name -> installed?, for every served entry
    file_times: Mapping[Path, int]  # the registry files' modification times, for `created`
    # The listed models in order: their entries, ids, bodies without `status` (a JSON object's
    # bytes), and their `status` bytes (with the slot idle in a view just built).
    listed_entries: tuple[RegistryEntry, ...] = ()
    listed_ids: tuple[str, ...] = ()
    bare: tuple[bytes, ...] = ()
    statuses: tuple[bytes, ...] = ()
    by_holder: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)


Overlay = tuple[tuple[int, bytes], ...]  # (listed model's index, its status bytes)


@dataclass(slots=True)
class _Shown:
    """The view last served with the slot's state, and what it was made from (updated in
    place when a slot change leaves every status as it was)."""

    base: CatalogView
    slot_version: int
    overlay: Overlay
    view: CatalogView


class Catalog:
    def __init__(
        self,
        store: RegistryStore,
        settings: ProxySettings,
        *,
        ollama_host: str,
        served_source: ServedModelsSource | None,
    ) -> None:
        self._store = store
        self._settings = settings
        self._ollama_host = ollama_host
        self._source = served_source
        self._served_states: dict[str, Installed] = {}
        self._outages: dict[str, Outage] = {}  # entry name -> its failing health check
        self._next_check: dict[str, float] = {}  # entry name -> monotonic time of its next ask
        self._view: CatalogView | None = None
        self._checked_at = float("-inf")
        self._refresh_lock = asyncio.Lock()
        self._rules = StatusRules(settings.vllm_single_port, ollama_host, settings.loopback_alias)
        self._slot: Callable[[], SlotView] = lambda: IDLE
        self._shown: _Shown | None = None

    def watch_slot(self, slot_view: Callable[[], SlotView]) -> None:
        """Show the models' status from this slot (`GpuSlot.view`); until then it is idle."""
        self._slot = slot_view
        self._shown = None

    @property
    def status_rules(self) -> StatusRules:
        return self._rules

    async def view(self) -> CatalogView:
        """The current view, its listing showing the slot as it is now; the registry is
        re-checked (in a thread) at most once a second."""
        if self._view is None or time.monotonic() - self._checked_at >= RECHECK_INTERVAL_S:
            async with self._refresh_lock:
                if self._view is None or time.monotonic() - self._checked_at >= RECHECK_INTERVAL_S:
                    self._view = await asyncio.to_thread(self._build_view, self._view)
                    self._checked_at = time.monotonic()
        return self._with_status(self._view)

    def _with_status(self, base: CatalogView) -> CatalogView:
        """`base` with each model's status as the slot has it now; a comparison when neither
        the registry nor the slot changed since the last call."""
        slot = self._slot()
        shown = self._shown
        if shown is not None and shown.base is base and shown.slot_version == slot.version:
            return shown.view
        overlay = _overlay(base, slot, self._rules)
        if shown is not None and shown.base is base and shown.overlay == overlay:
            shown.slot_version = slot.version
            return shown.view
        view = _compose(base, overlay)
        self._shown = _Shown(base, slot.version, overlay, view)
        return view

    async def reload(self) -> CatalogView:
        """Re-read the registry now (edits are also noticed within a second by themselves). An
        unreadable registry raises RegistryError; the last good view keeps serving meanwhile."""
        async with self._refresh_lock:
            self._view = await asyncio.to_thread(self._build_view, self._view, strict=True)
            self._checked_at = time.monotonic()
        return self._view

    def entry_count(self) -> int | None:
        """Entries in the last view, without touching the disk (None before the first load)."""
        return len(self._view.snapshot) if self._view else None

    def entry(self, name: str) -> RegistryEntry | None:
        """An entry by logical name from the latest view (for launching managed models)."""
        return self._view.snapshot.get(name) if self._view else None

    def model(self, view: CatalogView, model_id: str) -> bytes:
        """The `/v1/models/{id}` body: the listed model object with exactly this id."""
        found = view.models.get(model_id)
        if found is not None:
            return found
        try:  # another name of a listed model: point at its id
            entry = view.index.resolve(model_id)
        except EntryNotFound as exc:
            suggestions = [name for name in exc.suggestions if name in view.models]
        except AmbiguousName:
            suggestions = []
        else:
            suggestions = [view.ids[entry.name]] if entry.name in view.ids else []
        raise ModelNotFound(model_id, suggestions)

    def resolve(self, view: CatalogView, requested: str) -> RegistryEntry:
        try:
            return view.index.resolve(requested)
        except AmbiguousName as exc:
            raise InvalidRequest(str(exc), param="model", code="ambiguous_model") from exc
        except EntryNotFound as exc:
            raise ModelNotFound(requested, exc.suggestions) from exc

    def outage(self, name: str) -> Outage | None:
        """The entry's failing health check: a remote that does not answer, or an Ollama entry
        whose Ollama does not; None while it passes (or for an entry nobody is asked about)."""
        return self._outages.get(name)

    async def keep_installed_states_fresh(self) -> None:
        """Background task: ask backends which of their models exist, forever; each entry
        when it is due (its `health_check_interval_s`, else `installed_refresh_s`)."""
        while True:
            try:
                view = await self.view()
                entries = view.snapshot.entries
                due = [entry for entry in entries if self._is_due(entry.name)]
                if due:
                    report = await asyncio.to_thread(
                        installed_report,
                        due,
                        view.snapshot.directory,
                        self._source,
                        self._ollama_host,
                    )
                    if self._record(due, report, {entry.name for entry in entries}):
                        self._checked_at = float("-inf")  # rebuild the listing with the news
            except RegistryError as exc:
                log.warning("registry unavailable: %s", exc)
            await asyncio.sleep(self._until_next_check())

    def _is_due(self, name: str) -> bool:
        return self._next_check.get(name, float("-inf")) <= time.monotonic()

    def _record(self, asked: list[RegistryEntry], report: InstalledReport, names: set[str]) -> bool:
        """Keep the answers for `asked`, schedule their next ask, and forget entries that
        left the registry (`names`). True if a state changed: a remote checked every second
        must not make the listing be rebuilt every second for nothing."""
        now, wall = time.monotonic(), time.time()
        before = dict(self._served_states)
        news: dict[str, list[str]] = {}  # reason -> the entries whose outage starts now
        back: list[str] = []
        for entry in asked:
            interval = (
                entry.backend_config.health_check_interval_s or self._settings.installed_refresh_s
            )
            self._next_check[entry.name] = now + interval
            state = report.states[entry.name]
            self._served_states[entry.name] = state
            down = report.ollama_down.get(entry.name)
            if state is Installed.UNREACHABLE or down is not None:
                previous = self._outages.get(entry.name)
                since = previous.since if previous is not None else wall
                reason = down.reason if down is not None else report.reasons[entry.name]
                fix = down.fix if down is not None else None
                self._outages[entry.name] = Outage(since, reason, wall + interval, fix)
                if previous is None:
                    news.setdefault(reason, []).append(entry.name)
            elif self._outages.pop(entry.name, None) is not None:
                back.append(entry.name)
        for reason, starting in news.items():  # one Ollama's entries share one line
            log.warning("%s unreachable: %s", _entries_are(starting), reason)
        if back:
            log.info("%s reachable again", _entries_are(back))
        for name in (self._served_states.keys() | self._next_check.keys()) - names:
            self._served_states.pop(name, None)
            self._outages.pop(name, None)
            self._next_check.pop(name, None)
        return self._served_states != before

    def _until_next_check(self) -> float:
        """Seconds to sleep: until the first entry is due, at most `installed_refresh_s` (new
        entries are asked within it)."""
        soonest = min(self._next_check.values(), default=float("inf")) - time.monotonic()
        return max(_MIN_CHECK_INTERVAL_S, min(soonest, self._settings.installed_refresh_s))

    # -- runs in a worker thread ---------------------------------------------------------------

    def _build_view(self, previous: CatalogView | None, *, strict: bool = False) -> CatalogView:
        """A new view. A registry that cannot be read keeps the previous view serving, unless
        there is none or `strict` (an explicit reload): then the error is raised."""
        try:
            snapshot = self._store.load()
        except RegistryError as exc:
            if previous is None or strict:
                raise
            log.warning("keeping the last good registry: %s", exc)
            snapshot = previous.snapshot
        served = [entry for entry in snapshot.entries if not entry.deprecated]
        index = previous.index if previous and previous.snapshot is snapshot else NameIndex(served)
        local = installed_states(served, snapshot.directory, None, self._ollama_host)
        states = {
            name: self._served_states.get(name, state) if state is Installed.UNKNOWN else state
            for name, state in local.items()
        }
        file_times = _modification_times(snapshot)
        if (
            previous is not None
            and previous.snapshot is snapshot
            and previous.installed == states
            and previous.file_times == file_times
        ):
            # Nothing the listing says has changed: rebuilding it for 500 entries would cost
            # ~10 ms of CPU a second, the GIL held all the while the event loop waits for it.
            return previous
        listed = [
            entry
            for entry in index.entries
            if self._settings.include_non_installed or states[entry.name] in _ALWAYS_LISTED
        ]
        items = [
            self._model_item(
                entry, index, states[entry.name], _created(entry, snapshot, file_times)
            )
            for entry in listed
        ]
        bare = tuple(json_bytes(item) for item in items)
        statuses = tuple(
            json_bytes(entry_status(entry, states[entry.name], self._rules)) for entry in listed
        )
        by_holder: dict[str, list[int]] = {}
        for position, entry in enumerate(listed):
            holder = holder_name(entry, self._rules)
            if holder is not None:
                by_holder.setdefault(holder, []).append(position)
        finals = [
            _with_status_bytes(body, status) for body, status in zip(bare, statuses, strict=True)
        ]
        listed_ids = tuple(item["id"] for item in items)
        return CatalogView(
            snapshot,
            index,
            _LISTING_HEAD + b",".join(finals) + _LISTING_TAIL,
            len(items),
            dict(zip(listed_ids, finals, strict=True)),
            {item["extensions"]["logical_id"]: item["id"] for item in items},
            states,
            file_times,
            tuple(listed),
            listed_ids,
            bare,
            statuses,
            {holder: tuple(positions) for holder, positions in by_holder.items()},
        )

    def _model_item(
        self,
        entry: RegistryEntry,
        index: NameIndex,
        installed: Installed,
        created: int,
    ) -> dict[str, Any]:
        shown = display_name(entry)
        model_id = shown if _resolves_to(index, shown, entry) else entry.name
        decorated = not self._settings.suppress_decorations
        capabilities = entry.declared_capabilities
        modalities = ["text"] + (["vision"] if capabilities.get("vision") else [])
        return {
            "id": model_id,
            "object": "model",
            "created": created,
            "owned_by": "imageworks",
            "extensions": {
                "logical_id": entry.name,
                "display_name": shown,
                "capabilities": capabilities,
                "modalities": modalities,
                "installed": installed.value,
                "backend": entry.backend if decorated else None,
                "format": entry.download_format if decorated else None,
                "quantization": entry.quantization if decorated else None,
                "schema_version": self._settings.schema_version,
            },
        }


def _entries_are(names: list[str]) -> str:
    return f"entry {names[0]} is" if len(names) == 1 else f"entries {', '.join(names)} are"


def _with_status_bytes(body: bytes, status: bytes) -> bytes:
    """A model object's bytes (`{...}`) with `"status": <status>` as its last member."""
    return body[:-1] + b',"status":' + status + b"}"


def _overlay(view: CatalogView, slot: SlotView, rules: StatusRules) -> Overlay:
    """The status of every listed model the slot concerns: its holder's, and those of models
    whose last start failed (all the others have their idle status)."""
    concerned: set[int] = set()
    for name in (slot.holder, *slot.failures):
        if name is not None:
            concerned.update(view.by_holder.get(name, ()))
    return tuple(
        (
            position,
            json_bytes(
                entry_status(
                    view.listed_entries[position],
                    view.installed[view.listed_entries[position].name],
                    rules,
                    slot,
                )
            ),
        )
        for position in sorted(concerned)
    )


def _compose(base: CatalogView, overlay: Overlay) -> CatalogView:
    """`base` with the statuses of `overlay` in its listing and model objects."""
    if not overlay:
        return base
    statuses = list(base.statuses)
    models = dict(base.models)
    for position, status in overlay:
        statuses[position] = status
        models[base.listed_ids[position]] = _with_status_bytes(base.bare[position], status)
    finals = [models[model_id] for model_id in base.listed_ids]
    listing = _LISTING_HEAD + b",".join(finals) + _LISTING_TAIL
    return dataclasses.replace(base, listing=listing, models=models, statuses=tuple(statuses))


def _modification_times(snapshot: RegistrySnapshot) -> dict[Path, int]:
    """Unix seconds of each registry file that defines an entry (a file gone meanwhile: 0)."""
    times: dict[Path, int] = {}
    for path in {path for paths in snapshot.sources.values() for path in paths}:
        try:
            times[path] = int(path.stat().st_mtime)
        except OSError:
            times[path] = 0
    return times


def _created(
    entry: RegistryEntry, snapshot: RegistrySnapshot, file_times: Mapping[Path, int]
) -> int:
    defined_in = [file_times.get(path, 0) for path in snapshot.sources.get(entry.name, ())]
    return _downloaded_at(entry) or max(defined_in, default=0)


def _downloaded_at(entry: RegistryEntry) -> int | None:
    """The entry's `downloaded_at` as Unix seconds, when it has a readable one."""
    extra = entry.model_extra or {}
    for value in (extra.get("downloaded_at"), entry.metadata.get("downloaded_at")):
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return int(value)
        if isinstance(value, str):
            try:
                moment = datetime.fromisoformat(value.strip())
            except ValueError:
                continue
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            return int(moment.timestamp())
    return None


def _resolves_to(index: NameIndex, name: str, entry: RegistryEntry) -> bool:
    """True if a client asking for `name` gets `entry`: only such names may be listed as ids."""
    try:
        return index.resolve(name) is entry
    except (AmbiguousName, EntryNotFound):
        return False
