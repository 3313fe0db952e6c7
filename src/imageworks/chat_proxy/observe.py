"""What the proxy remembers about requests: a JSONL request log and rolling in-memory metrics.

`RequestLog` appends one JSON line per finished request, in batches from a single background
thread, so the event loop never waits on the disk, and rotates the file by size. A broken log
path costs a warning and dropped log lines, never a failed request.

`Metrics` keeps a rolling window of finished requests per model for the `/metrics`-style snapshot.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BufferedWriter
from pathlib import Path
from typing import Any, Literal, NamedTuple

import orjson

__all__ = ["Metrics", "Outcome", "RequestLog", "RequestRecord", "iso_utc"]

Outcome = Literal["ok", "error", "cancelled"]

# A broken log path is re-tried this often, so a disk that was full or a directory that was fixed
# starts logging again without a restart, but a permanently broken path costs one open() per 30 s.
RETRY_INTERVAL_S = 30.0

# While records keep coming, the log's writer thread wakes (and takes the GIL) at most this often,
# so about 20 times a second however many requests finish; see RequestLog.
BATCH_INTERVAL_S = 0.05

_log = logging.getLogger("imageworks.chat_proxy.observe")


def iso_utc(epoch_s: float) -> str:
    moment = datetime.fromtimestamp(epoch_s, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One finished request, as logged and as counted by `Metrics`.

    There is deliberately no field for request headers: API keys travel in `Authorization` and
    must never reach the log, so the record cannot carry them. `prompt` and `response` are only
    written when the log was created with `log_prompts=True`. The log serialises the record on
    its writer thread, so callers must not mutate `prompt`/`response` after handing it over.
    """

    request_id: str
    started_at: float  # epoch seconds
    model_requested: str | None
    model_resolved: str | None  # the registry entry's logical name
    backend: str | None
    stream: bool
    status: int  # for a stream that failed after headers: the status its error event carried
    outcome: Outcome
    latency_ms: float
    ttft_ms: float | None  # None for non-stream requests
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    error: str | None  # one line
    prompt: Any = None
    response: Any = None
    # Where the time went (see timing.py): waiting for the GPU slot, on the backend, and in the
    # proxy itself until the answer began. None: that phase never happened (or no answer went out).
    queue_ms: float | None = None
    upstream_ms: float | None = None
    proxy_ms: float | None = None
    # The path the client posted to. Lines written before the field existed have none: they
    # are all chat completions.
    endpoint: str = "/v1/chat/completions"
    # The safe-mode arguments its model server ran with (it crashed at load without them);
    # written only when there are some.
    safe_mode: tuple[str, ...] = ()

    def to_json_line(self, log_prompts: bool) -> bytes:
        """The record as one compact JSON line in UTF-8, newline included."""
        return _encode_line(self._line(log_prompts))

    def _line(self, log_prompts: bool) -> dict[str, Any]:
        usage = None
        if (self.prompt_tokens, self.completion_tokens, self.total_tokens) != (None, None, None):
            usage = {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens,
            }
        line: dict[str, Any] = {
            "ts": iso_utc(self.started_at),
            "request_id": self.request_id,
            "endpoint": self.endpoint,
            "model_requested": self.model_requested,
            "model_resolved": self.model_resolved,
            "backend": self.backend,
            "stream": self.stream,
            "status": self.status,
            "outcome": self.outcome,
            "latency_ms": round(self.latency_ms, 1),
            "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 1),
            "usage": usage,
            # Collapse whitespace so a multi-line backend traceback stays readable with grep.
            "error": None if self.error is None else " ".join(self.error.split()),
            "queue_ms": None if self.queue_ms is None else round(self.queue_ms, 1),
            "upstream_ms": None if self.upstream_ms is None else round(self.upstream_ms, 1),
            "proxy_ms": None if self.proxy_ms is None else round(self.proxy_ms, 1),
        }
        if self.safe_mode:
            line["safe_mode"] = list(self.safe_mode)
        if log_prompts:
            line["prompt"] = self.prompt
            line["response"] = self.response
        return line


# orjson writes the UTF-8 line itself and is several times faster than json.dumps. The two
# passthrough options hand dataclasses and datetimes to default=str, as json.dumps does, instead
# of encoding them orjson's own way.
_ORJSON_OPTIONS = (
    orjson.OPT_APPEND_NEWLINE | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME
)


def _encode_line(line: dict[str, Any]) -> bytes:
    # default=str: a prompt holding something JSON cannot encode still yields a line.
    try:
        return orjson.dumps(line, default=str, option=_ORJSON_OPTIONS)
    except orjson.JSONEncodeError:
        # What orjson refuses but json takes: lone surrogates, non-str keys, integers beyond 64
        # bits, nesting deeper than 254. Rare enough that the slow path costs nothing overall.
        return _encode_line_with_json(line)


def _encode_line_with_json(line: dict[str, Any]) -> bytes:
    text = json.dumps(line, ensure_ascii=False, separators=(",", ":"), default=str)
    # errors="replace": a lone surrogate in a prompt becomes "?" instead of costing the line.
    return (text + "\n").encode("utf-8", errors="replace")


class RequestLog:
    """Appends records as JSON lines to `path`, rotating to `path.1` ... `path.<keep_files>`.

    `write` may be called from any thread and never blocks or raises. Only the writer thread
    touches the files: it takes everything queued at once and appends it with one `write()` per
    file, cut at whole lines, so lines are never split or interleaved. Records that cannot be
    written (not started, closed, path broken, not encodable) are counted in `dropped`.

    Why batches: each time the writer thread wakes it must take the GIL from the event loop
    thread, which then waits for it (up to the 5 ms switch interval) before serving anyone.
    Woken per record, that was one hand-over and one syscall per request, and it showed in p99
    latency under load. Now it wakes at once for the first record after a quiet spell (operators
    and tests read the log right after a response) and otherwise at most every
    `BATCH_INTERVAL_S`, however many requests finish meanwhile.

    Without prompts a record is encoded by `write()` itself, a few µs on the caller's thread,
    spread evenly over the requests: encoded in the thread, a batch of a hundred held the GIL
    for ~0.5 ms every 50 ms, and that pause showed in the p99 of one connection's latency. With
    prompts (megabytes, with images) the writer thread encodes them; a long batch is still cut
    by the switch interval, so the loop never waits more than 5 ms at a time.
    """

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        *,
        keep_files: int = 5,
        log_prompts: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes <= 0 or keep_files < 1:
            raise ValueError("max_bytes must be > 0 and keep_files >= 1")
        self.path = path
        self.max_bytes = max_bytes
        self.keep_files = keep_files
        self.log_prompts = log_prompts
        self._clock = clock  # only the writer thread reads it (for the retry interval)
        # Unbounded, so write() never blocks; only the writer thread takes from it.
        self._pending: deque[RequestRecord | bytes] = deque()  # records, or their lines
        self._accepting = False  # written under _gate, read by write() without it
        self._idle = False  # the writer waits for _wake: the next write() must set it
        self._wake = threading.Event()
        self._stop = threading.Event()  # close() was called: write what is left and finish
        # Serialises start() and close(), and the rare rejected count of write().
        self._gate = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._rejected = 0  # written while not accepting; changed under _gate
        self._lost = 0  # failed on the writer thread; changed only there
        # Writer-thread state below.
        self._file: BufferedWriter | None = None
        self._size = 0
        self._retry_at: float | None = None
        self._warned = False

    @property
    def dropped(self) -> int:
        thread = self._thread
        # A write() that raced close() may append after the writer's last look at the queue
        # (see write); once the writer has finished, whatever is still queued is dropped.
        stranded = len(self._pending) if thread is not None and not thread.is_alive() else 0
        return self._rejected + self._lost + stranded

    def start(self) -> None:
        with self._gate:
            if self._thread is not None or self._closed:
                raise RuntimeError("RequestLog can be started once, before close()")
            self._thread = threading.Thread(
                target=self._run, name="imageworks-request-log", daemon=True
            )
            self._thread.start()
            self._accepting = True

    def write(self, record: RequestRecord) -> None:
        # The event loop calls this once per request, so it takes no lock (about 60 ns instead
        # of 300+): under the GIL a deque append is atomic, and every thread sees a flag as it
        # was last stored. (This relies on the GIL, as CPython 3.11 has it.)
        # Against close(): a write() that returned before close() was called appended before
        # close() woke the writer for its last drain, which therefore takes the record. A write()
        # racing close() may read _accepting just before close() clears it and append just after
        # that drain: such a record is not written, but `dropped` counts it, so none vanishes.
        if self._accepting:
            entry: RequestRecord | bytes = record
            if not self.log_prompts:
                # What cannot be encoded goes as it is: the writer thread tries and says why.
                with contextlib.suppress(Exception):
                    entry = record.to_json_line(False)
            self._pending.append(entry)
            # We append before we look at _idle, the writer sets _idle before its last look at
            # the queue (_wait_for_records): one of us sees the other, no wake-up is lost.
            if self._idle:
                self._idle = False  # spare the next writes the Event's lock
                self._wake.set()
        else:
            with self._gate:  # rare (before start, after close); += is not atomic across threads
                self._rejected += 1

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, then wait up to `timeout_s` for every accepted record to be written."""
        with self._gate:
            if self._closed:
                return
            self._closed = True
            self._accepting = False
            thread = self._thread
        if thread is not None:
            self._stop.set()  # before _wake: a woken writer must see that it is to finish
            self._wake.set()
            thread.join(timeout_s)
            if thread.is_alive():
                _log.warning("request log writer did not finish within %.1f s", timeout_s)

    # -- writer thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        self._ensure_open()  # so a broken path is reported at start-up, not at the first request
        while not self._stop.is_set():
            self._wait_for_records()
            self._store(self._take_pending())
            # Let the next batch gather; close() cuts the pause short.
            self._stop.wait(BATCH_INTERVAL_S)
        self._store(self._take_pending())
        self._close_file()

    def _wait_for_records(self) -> None:
        """Return once records are queued or close() was called; at once if they are already."""
        self._wake.clear()
        self._idle = True
        if not self._pending and not self._stop.is_set():
            self._wake.wait()
        self._idle = False

    def _take_pending(self) -> list[RequestRecord | bytes]:
        # popleft, not swapping in a new deque: a write() racing us then still appends to the
        # deque we drain (or it waits there for the next batch).
        pending = self._pending
        return [pending.popleft() for _ in range(len(pending))]

    def _store(self, records: list[RequestRecord | bytes]) -> None:
        """Append `records` with one write per file they go to, each file cut at a whole line."""
        run, count = bytearray(), 0  # lines for the open file, not yet written
        for record in records:
            line = self._encode(record)
            if line is None:
                continue
            if not self._ensure_open():
                # One record at a time while the path is broken: each may find the retry due.
                self._lost += 1
                continue
            size = self._size + len(run)
            if size > 0 and size + len(line) > self.max_bytes:
                # What fits goes to this file, the line starts the next (a line longer than
                # max_bytes so gets a file of its own).
                rotated = self._write_run(run, count) and self._rotate_or_fail()
                run, count = bytearray(), 0  # a new one: _append may not keep a reference
                if not rotated:
                    self._lost += 1
                    continue
            run += line  # joined as they come: the encoded lines' memory is reused at once
            count += 1
        self._write_run(run, count)

    def _encode(self, record: RequestRecord | bytes) -> bytes | None:
        if isinstance(record, bytes):
            return record  # encoded by write()
        try:
            return record.to_json_line(self.log_prompts)
        except Exception as exc:  # noqa: BLE001 - costs this record, never the writer thread
            # E.g. a circular structure or a tuple key in the prompt, or a __str__ that raises.
            self._lost += 1
            _log.warning("request %s could not be logged: %s", record.request_id, exc)
            return None

    def _write_run(self, run: bytearray, count: int) -> bool:
        if not run:
            return True
        try:
            self._append(run)
        except OSError as exc:
            self._lost += count
            self._fail(exc)
            return False
        self._size += len(run)
        return True

    def _rotate_or_fail(self) -> bool:
        try:
            self._rotate()
        except OSError as exc:
            self._fail(exc)
            return False
        return True

    def _append(self, data: bytes | bytearray) -> None:
        assert self._file is not None
        self._file.write(data)
        self._file.flush()  # the batch is in the OS before the next: readers and crashes see it

    def _ensure_open(self) -> bool:
        if self._file is not None:
            return True
        if self._retry_at is not None and self._clock() < self._retry_at:
            return False
        try:
            self._open_file()
        except OSError as exc:
            self._fail(exc)
            return False
        if self._warned:
            _log.info(
                "request log %s is writable again (%d records dropped)", self.path, self.dropped
            )
            self._warned = False
        self._retry_at = None
        return True

    def _open_file(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "ab")  # noqa: SIM115 - kept open across records, closed in _close_file
        try:
            self._size = os.fstat(file.fileno()).st_size
            if self._size > 0 and not _ends_with_newline(self.path):
                # A crash or full disk left half a line; start ours on a line of its own.
                file.write(b"\n")
                file.flush()
                self._size += 1
        except OSError:
            file.close()
            raise
        self._file = file

    def _rotate(self) -> None:
        self._close_file()
        for index in range(self.keep_files - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self._rotated(index), self._rotated(index + 1))
        with contextlib.suppress(FileNotFoundError):  # someone removed it: just start afresh
            os.replace(self.path, self._rotated(1))  # with keep_files=1 this drops the old path.1
        self._open_file()

    def _rotated(self, index: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{index}")

    def _fail(self, exc: OSError) -> None:
        self._close_file()
        self._retry_at = self._clock() + RETRY_INTERVAL_S
        if not self._warned:
            self._warned = True
            _log.warning(
                "cannot write request log %s: %s; dropping log records, retrying every %.0f s",
                self.path,
                exc.strerror or exc,
                RETRY_INTERVAL_S,
            )

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):  # its lines were flushed already or counted lost
                file.close()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"


def _nearest_rank(values: list[float], percent: int) -> float | None:
    """Nearest-rank percentile: the smallest value with at least `percent`% of values <= it."""
    if not values:
        return None
    ordered = sorted(values)
    rank = -(-percent * len(ordered) // 100)  # ceil in integers: no float rounding at the edges
    return ordered[max(rank, 1) - 1]


class _Sample(NamedTuple):
    """The numbers of one finished request; never the record, whose prompt may hold images."""

    at: float  # Metrics clock
    model: str
    outcome: Outcome
    latency_ms: float
    ttft_ms: float | None
    tokens_per_s: float | None
    # For the dashboard's list of recent requests.
    finished_at: float  # epoch seconds
    status: int
    stream: bool
    completion_tokens: int | None


def _group(samples: Iterable[_Sample], in_flight: int) -> dict[str, Any]:
    chosen = list(samples)
    latency = [s.latency_ms for s in chosen]
    ttft = [s.ttft_ms for s in chosen if s.ttft_ms is not None]
    rate = [s.tokens_per_s for s in chosen if s.tokens_per_s is not None]
    return {
        "requests": len(chosen),
        "errors": sum(s.outcome == "error" for s in chosen),
        "cancelled": sum(s.outcome == "cancelled" for s in chosen),
        "in_flight": in_flight,
        "latency_ms": {
            p: _nearest_rank(latency, n) for p, n in (("p50", 50), ("p95", 95), ("p99", 99))
        },
        "ttft_ms": {"p50": _nearest_rank(ttft, 50), "p95": _nearest_rank(ttft, 95)},
        "tokens_per_s": {"p50": _nearest_rank(rate, 50)},
    }


class Metrics:
    """Request counts and latency percentiles over the last `window_s` seconds, per model.

    Not thread-safe and needs no locks: only the event loop calls it. Memory is bounded by
    `max_samples` (the oldest samples go first, even if still inside the window).
    """

    def __init__(
        self,
        window_s: float = 300.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_samples: int = 10_000,
    ) -> None:
        if window_s <= 0 or max_samples < 1:
            raise ValueError("window_s must be > 0 and max_samples >= 1")
        self.window_s = window_s
        self._clock = clock
        # Appended in clock order, so the oldest are leftmost.
        self._samples: deque[_Sample] = deque(maxlen=max_samples)
        self._in_flight: dict[str, int] = {}
        self._in_flight_total = 0
        self._last_swap: dict[str, Any] | None = None

    def request_started(self, model: str | None) -> None:
        key = model or "unknown"
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        self._in_flight_total += 1

    def request_finished(self, record: RequestRecord) -> None:
        # The proxy starts a request under its resolved (logical) name once resolution succeeds;
        # a caller that only knew the requested name is matched by the fallback.
        for key in (record.model_resolved, record.model_requested or "unknown"):
            if key is not None and self._in_flight.get(key, 0) > 0:
                self._in_flight[key] -= 1
                if self._in_flight[key] == 0:
                    del self._in_flight[key]
                self._in_flight_total -= 1
                break
        rate = None
        if record.completion_tokens is not None and record.latency_ms > 0:
            rate = record.completion_tokens / (record.latency_ms / 1000)
        model = record.model_resolved or record.model_requested or "unknown"
        self._samples.append(
            _Sample(
                self._clock(),
                model,
                record.outcome,
                record.latency_ms,
                record.ttft_ms,
                rate,
                record.started_at + record.latency_ms / 1000,
                record.status,
                record.stream,
                record.completion_tokens,
            )
        )
        self._prune()

    @property
    def in_flight(self) -> int:
        return self._in_flight_total

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        """The last `limit` finished requests of the window, newest first."""
        self._prune()
        newest = list(itertools.islice(reversed(self._samples), limit))
        return [
            {
                "at": iso_utc(sample.finished_at),
                "model": sample.model,
                "status": sample.status,
                "outcome": sample.outcome,
                "stream": sample.stream,
                "latency_ms": round(sample.latency_ms, 1),
                "ttft_ms": None if sample.ttft_ms is None else round(sample.ttft_ms, 1),
                "completion_tokens": sample.completion_tokens,
            }
            for sample in newest
        ]

    def series(self, bucket_s: float = 10.0) -> list[dict[str, Any]]:
        """Requests finished in the window, in `bucket_s` buckets of their end time (epoch
        seconds), oldest first: count, mean latency, completion tokens (throughput)."""
        self._prune()
        buckets: dict[float, list[_Sample]] = {}
        for sample in self._samples:
            start = sample.finished_at - sample.finished_at % bucket_s
            buckets.setdefault(start, []).append(sample)
        return [
            {
                "at": start,
                "requests": len(chosen),
                "mean_latency_ms": round(sum(s.latency_ms for s in chosen) / len(chosen), 1),
                "completion_tokens": sum(s.completion_tokens or 0 for s in chosen),
            }
            for start, chosen in sorted(buckets.items())
        ]

    def record_swap(self, duration_s: float) -> None:
        self._last_swap = {"at": iso_utc(time.time()), "duration_s": float(duration_s)}

    def snapshot(self) -> dict[str, Any]:
        self._prune()
        by_model: dict[str, list[_Sample]] = {name: [] for name in self._in_flight}
        for sample in self._samples:
            by_model.setdefault(sample.model, []).append(sample)
        return {
            "window_s": self.window_s,
            "overall": _group(self._samples, self._in_flight_total),
            "models": {
                name: _group(by_model[name], self._in_flight.get(name, 0))
                for name in sorted(by_model)
            },
            "last_swap": None if self._last_swap is None else dict(self._last_swap),
        }

    def _prune(self) -> None:
        oldest_kept = self._clock() - self.window_s
        while self._samples and self._samples[0].at <= oldest_kept:
            self._samples.popleft()
