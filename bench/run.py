"""One benchmark run: start everything, measure in interleaved rounds, report, stop everything.

Order of work:

1. The upstream and every selected target start (each in its own process, pinned), plus the
   two listing servers with 500 registry entries (this proxy's and LiteLLM's) and, unless the
   swap part is skipped, the demo models are prepared.
2. Memory: each server's RSS after start and ~100 warm-up requests, then after 100,000 more
   requests at c32 (5,000 with --quick). Done once, before the rounds, since its point is a
   long run; the rounds then measure servers that are warm.
3. Rounds: for each round, for each metric, for each target in turn (direct, floor, proxy,
   LiteLLM, nginx), so whatever else happens on the machine hits every target alike, and each
   "added" number compares two measurements taken moments apart.
4. The swap part, in every round: a proxy on the demo registry (plus 500 entries) is started,
   measures swap overhead (bench/swap.py's logic) and /v1/models during swaps, and is stopped.

A measurement that fails or sees errors is recorded as invalid (with why), never as a number,
and the run goes on; the exit code is 1 when anything was invalid.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from bench import machine, measure, report, targets
from bench.load import Generator, LoadSpec, wrk_version
from bench.loadgen import PythonLoadgen
from bench.measure import CHUNK_INTERVAL_MS, CHUNKS, WARMUP_REQUESTS, Record
from bench.processes import Processes, affinity
from bench.registry import echo_entry, filler_entries, write_registry
from bench.targets import CHAT_PATH, Running, Skipped, Target
from bench.wrk import Wrk

if TYPE_CHECKING:
    from bench.swap import Demo

LISTING_ENTRIES = 500


@dataclass(frozen=True)
class Settings:
    rounds: int
    quick: bool
    targets: tuple[str, ...]
    swap: bool
    json_path: Path
    loadgen: str  # auto | wrk | python
    c1_s: float
    c32_s: float
    streams: int
    models_s: float
    rss_requests: int
    rss_max_s: float  # a slow server gets fewer requests rather than an hour of them
    swaps_for_listing: int

    @classmethod
    def make(
        cls,
        *,
        rounds: int,
        quick: bool,
        only: tuple[str, ...],
        swap: bool,
        json_path: Path,
        loadgen: str,
    ) -> Settings:
        if quick:
            return cls(1, True, only, swap, json_path, loadgen, 1, 1, 3, 1, 5_000, 10, 2)
        return cls(rounds, False, only, swap, json_path, loadgen, 5, 5, 20, 5, 100_000, 150, 4)


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def choose_generator(kind: str, cpus: frozenset[int]) -> Generator:
    path = shutil.which("wrk") if kind in ("auto", "wrk") else None
    if path is not None:
        return Wrk(path, wrk_version() or "wrk", cpus)
    if kind == "wrk":
        raise SystemExit("bench: --loadgen wrk, but wrk is not on PATH")
    return PythonLoadgen(cpus)


class Bench:
    """Holds what a run started and what it measured."""

    def __init__(
        self, settings: Settings, procs: Processes, tmp: Path, placement: machine.Placement
    ) -> None:
        self.settings = settings
        self.procs = procs
        self.tmp = tmp
        self.placement = placement
        self.generator = choose_generator(settings.loadgen, self.placement.client)
        self.targets: dict[str, Target] = {}
        self.listing: dict[str, Running] = {}
        self.listing_notes: dict[str, str] = {}
        self.demo: Demo | None = None
        self.demo_note: str | None = None
        self.rss: dict[str, Record] = {}
        self.rounds: report.Rounds = []
        self.errors: list[str] = []
        self.upstream: Running | None = None

    # -- starting ---------------------------------------------------------------------------

    def start(self) -> None:
        cpus = self.placement
        self.upstream = targets.start_upstream(self.procs, cpus.upstream, CHUNKS, CHUNK_INTERVAL_MS)
        progress(f"upstream on :{self.upstream.port}")
        for name in targets.ORDER:
            if name not in self.settings.targets:
                continue
            try:
                found = self._start_target(name)
            except Exception as exc:  # noqa: BLE001 (its row says why, the others still run)
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                found = Skipped(name, name, f"failed to start: {reason}")
                self.errors.append(f"{name}: failed to start: {exc}")
            self.targets[name] = found
            progress(f"{name}: " + (f":{found.port}" if isinstance(found, Running) else found.note))
        if "proxy" in self.settings.targets:
            self._start_listing()
            if self.settings.swap:
                self._prepare_demo()

    def _start_target(self, name: str) -> Target:
        upstream, server = self.upstream, self.placement.server
        assert upstream is not None
        if name == "direct":
            return upstream
        if name == "floor":
            return targets.start_floor(self.procs, server, upstream)
        if name == "proxy":
            registry = write_registry(self.tmp / "proxy" / "configs", [echo_entry(upstream.url)])
            return targets.start_proxy(self.procs, server, registry, self.tmp / "proxy")
        if name == "litellm":
            return targets.start_litellm(self.procs, server, upstream, self.tmp / "litellm")
        if name == "nginx":
            return targets.start_nginx(self.procs, server, upstream, self.tmp / "nginx")
        raise ValueError(name)

    def _start_listing(self) -> None:
        """This proxy (and LiteLLM, when it runs) with 500 registry entries, for /v1/models."""
        upstream, server = self.upstream, self.placement.server
        assert upstream is not None
        fillers = filler_entries(LISTING_ENTRIES - 1, upstream.url)
        directory = self.tmp / "proxy-listing"
        registry = write_registry(directory / "configs", [echo_entry(upstream.url), *fillers])
        self.listing["proxy"] = targets.start_proxy(
            self.procs, server, registry, directory, name="proxy-listing"
        )
        if isinstance(self.targets.get("litellm"), Running):
            found = targets.start_litellm(
                self.procs,
                server,
                upstream,
                self.tmp / "litellm-listing",
                extra_models=LISTING_ENTRIES - 1,
                name="litellm-listing",
            )
            if isinstance(found, Running):
                self.listing["litellm"] = found
        for name, running in self.listing.items():
            answer = httpx.get(running.url + "/v1/models", timeout=10, trust_env=False)
            listed = len(answer.json()["data"])
            progress(f"{name} with {LISTING_ENTRIES} entries on :{running.port} lists {listed}")
            if listed != LISTING_ENTRIES:
                self.listing_notes[name] = f"lists {listed} models, not {LISTING_ENTRIES}"

    def _prepare_demo(self) -> None:
        """The demo models and a workspace for them (bench/swap.py's `prepare`); a note instead
        when they are not installed."""
        try:
            from bench import swap  # imports the tests' helpers and the demo's dependencies

            assert self.upstream is not None
            fillers = filler_entries(LISTING_ENTRIES, self.upstream.url)
            self.demo = swap.prepare(self.tmp / "demo", extra_entries=fillers)
        except Exception as exc:  # noqa: BLE001 (any reason means: no swap part on this machine)
            detail = getattr(exc, "stderr", None) or exc
            if isinstance(detail, bytes):
                detail = detail.decode(errors="replace")
            self.demo_note = (
                "skipped: the demo models are not installed (`uv sync` installs the demo group): "
                f"{str(detail).strip()[:200]}"
            )
            progress(self.demo_note)

    # -- measuring --------------------------------------------------------------------------

    def running(self) -> list[Running]:
        return [found for found in self.targets.values() if isinstance(found, Running)]

    def measure_rss(self) -> None:
        for target in self.running():
            if target.server is None:
                continue  # direct: nothing between client and upstream to weigh
            settings = self.settings
            record = measure.memory(
                self.generator, target, settings.rss_requests, settings.rss_max_s
            )
            self.rss[target.name] = record
            if record["valid"]:
                progress(
                    f"rss {target.name}: {record['idle_mb']:.1f} MB idle, "
                    f"{record['after_mb']:.1f} MB after {record['requests']} requests "
                    f"({record['growth_pct']:+.2f} %)"
                )
            else:
                self._invalid(f"rss {target.name}", record)

    def one_round(self, number: int) -> None:
        measured: dict[str, dict[str, Record]] = {}
        self.rounds.append(measured)
        settings = self.settings
        label = f"round {number}/{settings.rounds}"
        for metric, connections, seconds in (("c1", 1, settings.c1_s), ("c32", 32, settings.c32_s)):
            row = measured.setdefault(metric, {})
            for target in self.running():
                body = measure.chat_body(target.model, False)
                spec = LoadSpec(target.url + CHAT_PATH, "POST", body, connections, seconds)
                row[target.name] = self._load(f"{label} {metric} {target.name}", spec)
        row = measured.setdefault("stream", {})
        for target in self.running():
            record = measure.streams(target, settings.streams)
            row[target.name] = self._shown(f"{label} stream {target.name}", record, _streamed)
        row = measured.setdefault("models", {})
        for name, running in self.listing.items():
            if name in self.listing_notes:
                row[name] = {"valid": False, "error": self.listing_notes[name]}
                continue
            spec = LoadSpec(running.url + "/v1/models", "GET", b"", 1, settings.models_s)
            row[name] = self._load(f"{label} models {name}", spec)
        if self.demo is not None:
            from bench.swap_part import swap_round

            with affinity(self.placement.all):
                overhead, listing = swap_round(self.procs, self.demo, settings.swaps_for_listing)
            measured.setdefault("swap", {})["proxy"] = overhead
            measured.setdefault("models_swap", {})["proxy"] = listing
            self._shown(f"{label} swap overhead", overhead, _swapped)
            self._shown(f"{label} /v1/models during swaps", listing, _listed)

    def _load(self, what: str, spec: LoadSpec) -> Record:
        return self._shown(what, measure.load(self.generator, spec), _loaded)

    def _shown(self, what: str, record: Record, line: Callable[[Record], str]) -> Record:
        """Say what was measured, or that it is invalid and why; returns `record`."""
        if record.get("valid"):
            progress(f"{what}: {line(record)}")
        else:
            self._invalid(what, record)
        return record

    def _invalid(self, what: str, record: Record) -> None:
        reason = record.get("error")
        if reason is None:
            reason = f"{record.get('errors')} errors {record.get('error_detail') or ''}".strip()
        self.errors.append(f"{what}: INVALID: {reason}")
        progress(f"{what}: INVALID: {reason}")

    # -- reporting --------------------------------------------------------------------------

    def labels(self) -> dict[str, str]:
        return {name: found.label for name, found in self.targets.items()}

    def notes(self) -> dict[str, str]:
        found = {n: t.note for n, t in self.targets.items() if isinstance(t, Skipped)}
        return found

    def result(self, describe: machine.Machine, began: float) -> Record:
        names = [name for name, found in self.targets.items() if isinstance(found, Running)]
        summary = report.summarize(self.rounds, self.rss, names)
        notes = self.run_notes()
        return {
            "schema": 1,
            "machine": describe.as_json(),
            "settings": {**asdict(self.settings), "json_path": str(self.settings.json_path)},
            "targets": {
                name: (
                    {"label": found.label, "status": "measured"}
                    if isinstance(found, Running)
                    else {"label": found.label, "status": "skipped", "note": found.note}
                )
                for name, found in self.targets.items()
            },
            "swap_part": (
                {"status": "measured"}
                if self.demo is not None
                else {"status": "skipped", "note": self.demo_note or "--skip-swap"}
            ),
            "rss": self.rss,
            "rounds": self.rounds,
            "summary": summary,
            "targets_to_meet": {
                column.key: f"{column.target[0]} {column.target[1]:g}"
                for column in report.COLUMNS
                if column.target
            },
            "verdicts": report.verdicts(summary) if "proxy" in names else {},
            "errors": self.errors,
            "notes": notes,
            "duration_s": time.monotonic() - began,
        }

    def run_notes(self) -> list[str]:
        notes = [report.UNITS]
        if isinstance(self.generator, PythonLoadgen):
            notes.append(
                "load generator: Python (wrk not on PATH, or --loadgen python); it is slower "
                "than the upstream, so the direct row's req/s shows the generator's limit"
            )
        requests = self.settings.rss_requests
        quick = (
            " (--quick: far fewer than the 100,000 of a full run)" if self.settings.quick else ""
        )
        notes.append(
            f"RSS: after start and {WARMUP_REQUESTS} warm-up requests, and after {requests:,} "
            f"more at c32{quick}, within {self.settings.rss_max_s:g} s per server; warm grow% "
            f"is the growth over those requests but the first {requests // 10:,} (once the "
            "server's connections, buffers and heap have grown to the load: what a leak adds)"
        )
        for name, record in self.rss.items():
            if record.get("capped_at_s"):
                notes.append(
                    f"RSS {name} (grow% marked *): over {record['requests']:,} requests only: "
                    f"{requests:,} would take longer than {record['capped_at_s']:g} s"
                )
        notes.append(
            f"streams: {self.settings.streams} per target and round, {CHUNKS} chunks "
            f"{CHUNK_INTERVAL_MS:g} ms apart; transit p50/p99 over all chunks; transit far "
            "below the interval means each event was passed on before the next was written"
        )
        if self.demo is None:
            notes.append(f"swap part: {self.demo_note or 'skipped (--skip-swap)'}")
        notes.append(f"load average after the run: {machine.load_average()}")
        for name, note in self.listing_notes.items():
            notes.append(f"/v1/models {name}: {note}")
        return notes


def _loaded(record: Record) -> str:
    return (
        f"{record['rps']:.0f} req/s, p50 {record['p50_ms']:.3f} ms, p99 {record['p99_ms']:.3f} ms"
    )


def _streamed(record: Record) -> str:
    return (
        f"TTFT p50 {record['ttft_p50_ms']:.2f} ms, transit p50 {record['transit_p50_us']:.0f} us, "
        f"p99 {record['transit_p99_us']:.0f} us"
    )


def _swapped(record: Record) -> str:
    return ", ".join(f"{key} {ms:.0f} ms" for key, ms in record["overhead_ms"].items())


def _listed(record: Record) -> str:
    return f"p50 {record['p50_ms']:.3f} ms over {record['requests_during_swap']} requests"


def execute(settings: Settings) -> int:
    """The whole run; returns the exit code (1 when any measurement was invalid)."""
    began = time.monotonic()
    placement = machine.Placement.for_cpus(frozenset(os.sched_getaffinity(0)))
    os.sched_setaffinity(0, placement.client)  # the harness is a client too
    with (
        tempfile.TemporaryDirectory(prefix="bench-") as tmp,
        Processes(Path(tmp) / "logs") as procs,
    ):
        bench = Bench(settings, procs, Path(tmp), placement)
        describe = machine.describe(bench.generator.name, bench.placement)
        for line in describe.lines():
            progress(line)
        bench.start()
        bench.measure_rss()
        for number in range(1, settings.rounds + 1):
            bench.one_round(number)
        result = bench.result(describe, began)
        labels, notes = bench.labels(), bench.notes()
    write_json(settings.json_path, result)
    print("\n".join(describe.lines()))
    print()
    print(report.table(labels, result["summary"], notes))
    print()
    for note in result["notes"]:
        print(f"note: {note}")
    for error in result["errors"]:
        print(f"error: {error}")
    print(f"json: {settings.json_path}; {result['duration_s']:.0f} s")
    return 1 if result["errors"] else 0


def write_json(path: Path, result: Record) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    path.write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
