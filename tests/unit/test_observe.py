from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import logging
import random
import threading
import time
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imageworks.chat_proxy import observe
from imageworks.chat_proxy.observe import (
    BATCH_INTERVAL_S,
    RETRY_INTERVAL_S,
    Metrics,
    RequestLog,
    RequestRecord,
    _encode_line_with_json,
)

LOGGER = "imageworks.chat_proxy.observe"


def _record(request_id: str = "req-1", **changes: Any) -> RequestRecord:
    base = RequestRecord(
        request_id=request_id,
        started_at=1_700_000_000.1234,
        model_requested="chat",
        model_resolved="llama-3-8b",
        backend="llamacpp",
        stream=False,
        status=200,
        outcome="ok",
        latency_ms=1234.56,
        ttft_ms=None,
        prompt_tokens=10,
        completion_tokens=20,
        total_tokens=30,
        error=None,
    )
    return dataclasses.replace(base, **changes)


def _text(record: RequestRecord, log_prompts: bool = False) -> str:
    return record.to_json_line(log_prompts).decode("utf-8")  # strict: the line is valid UTF-8


def _parse(record: RequestRecord, log_prompts: bool = False) -> dict[str, Any]:
    line = _text(record, log_prompts)
    assert line.endswith("\n")
    assert line.count("\n") == 1
    parsed: dict[str, Any] = json.loads(line)
    return parsed


def _log_files(path: Path) -> list[Path]:
    """The log and its rotations, oldest first."""
    rotated = sorted(path.parent.glob(f"{path.name}.*"), key=lambda p: int(p.suffix[1:]))
    return [*reversed(rotated), *([path] if path.exists() else [])]


def _lines(path: Path) -> list[dict[str, Any]]:
    """Every logged line, oldest first; fails if any line is not a whole JSON object."""
    lines: list[dict[str, Any]] = []
    for file in _log_files(path):
        text = file.read_text(encoding="utf-8")
        assert text == "" or text.endswith("\n")
        lines.extend(json.loads(line) for line in text.splitlines())
    return lines


def _write_all(log: RequestLog, records: list[RequestRecord]) -> None:
    log.start()
    for record in records:
        log.write(record)
    log.close()


# -- RequestRecord.to_json_line --------------------------------------------------------------------


def test_record_json_line_ok_has_documented_keys_and_values() -> None:
    line = _parse(_record())

    assert line == {
        "ts": "2023-11-14T22:13:20.123Z",
        "request_id": "req-1",
        "endpoint": "/v1/chat/completions",
        "model_requested": "chat",
        "model_resolved": "llama-3-8b",
        "backend": "llamacpp",
        "stream": False,
        "status": 200,
        "outcome": "ok",
        "latency_ms": 1234.6,
        "ttft_ms": None,
        "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30},
        "error": None,
        "queue_ms": None,
        "upstream_ms": None,
        "proxy_ms": None,
    }


def test_record_json_line_has_the_request_timings_in_milliseconds() -> None:
    line = _parse(_record(queue_ms=2000.04, upstream_ms=312.449, proxy_ms=0.91))
    assert (line["queue_ms"], line["upstream_ms"], line["proxy_ms"]) == (2000.0, 312.4, 0.9)


def test_record_json_line_is_compact() -> None:
    assert ", " not in _text(_record())
    assert '": ' not in _text(_record())


def test_record_json_line_error_keeps_status_and_one_line_message() -> None:
    record = _record(
        status=502,
        outcome="error",
        error="backend failed:\n  Traceback ...\n  boom",
        prompt_tokens=None,
        completion_tokens=None,
        total_tokens=None,
    )

    line = _parse(record)

    assert (line["status"], line["outcome"]) == (502, "error")
    assert line["error"] == "backend failed: Traceback ... boom"
    assert line["usage"] is None


def test_record_json_line_cancelled_stream_keeps_ttft_and_partial_usage() -> None:
    record = _record(
        stream=True,
        outcome="cancelled",
        status=200,
        ttft_ms=87.04,
        prompt_tokens=12,
        completion_tokens=None,
        total_tokens=None,
    )

    line = _parse(record)

    assert (line["stream"], line["outcome"], line["ttft_ms"]) == (True, "cancelled", 87.0)
    assert line["usage"] == {"prompt_tokens": 12, "completion_tokens": None, "total_tokens": None}


def test_record_json_line_includes_prompt_and_response_only_with_log_prompts() -> None:
    record = _record(prompt=[{"role": "user", "content": "secret plans"}], response="the answer")

    hidden = _parse(record, log_prompts=False)
    shown = _parse(record, log_prompts=True)

    assert "prompt" not in hidden
    assert "response" not in hidden
    assert "secret plans" not in _text(record)
    assert shown["prompt"] == [{"role": "user", "content": "secret plans"}]
    assert shown["response"] == "the answer"


def test_record_json_line_keeps_non_ascii_text_readable() -> None:
    line = _text(_record(error="modèle introuvable: 模型"))

    assert "modèle introuvable: 模型" in line


def test_record_has_no_place_for_headers() -> None:
    fields = {field.name for field in dataclasses.fields(RequestRecord)}

    assert not {name for name in fields if "header" in name or "auth" in name}


def test_record_json_line_is_exactly_the_documented_line() -> None:
    # Byte for byte: key order, compact separators, rounding, one newline.
    assert _record(ttft_ms=87.04, error="a\n b").to_json_line(False) == (
        b'{"ts":"2023-11-14T22:13:20.123Z","request_id":"req-1",'
        b'"endpoint":"/v1/chat/completions","model_requested":"chat",'
        b'"model_resolved":"llama-3-8b","backend":"llamacpp","stream":false,"status":200,'
        b'"outcome":"ok","latency_ms":1234.6,"ttft_ms":87.0,"usage":{"prompt_tokens":10,'
        b'"completion_tokens":20,"total_tokens":30},"error":"a b","queue_ms":null,'
        b'"upstream_ms":null,"proxy_ms":null}\n'
    )


_JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text()


def _json_values(scalars: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=12,
    )


@given(prompt=_json_values(_JSON_SCALARS), response=_json_values(_JSON_SCALARS))
def test_record_json_line_is_json_dumps_byte_for_byte(prompt: Any, response: Any) -> None:
    record = _record(prompt=prompt, response=response, error=str(prompt))

    assert record.to_json_line(True) == _encode_line_with_json(record._line(True))


@given(prompt=_json_values(_JSON_SCALARS | st.floats(allow_nan=False, allow_infinity=False)))
def test_record_json_line_floats_mean_what_json_dumps_wrote(prompt: Any) -> None:
    # Exponents are spelled differently (1e-05 or 0.00001), the numbers are the same.
    record = _record(prompt=prompt, latency_ms=prompt if isinstance(prompt, float) else 1.0)

    line = record.to_json_line(True)

    assert json.loads(line) == json.loads(_encode_line_with_json(record._line(True)))


def test_record_json_line_replaces_a_lone_surrogate_and_keeps_the_rest() -> None:
    line = _record(prompt="bad \ud800 half", response="模型").to_json_line(True)

    assert json.loads(line)["prompt"] == "bad ? half"  # as the json path has always written it
    assert json.loads(line)["response"] == "模型"


def test_record_json_line_takes_the_keys_and_integers_json_takes() -> None:
    prompt = {7: "int", 2.5: "float", True: "bool", None: "none", "big": 2**70}

    line = _record(prompt=prompt).to_json_line(True)

    assert json.loads(line)["prompt"] == {
        "7": "int",
        "2.5": "float",
        "true": "bool",
        "null": "none",
        "big": 2**70,
    }


def test_record_json_line_writes_what_json_cannot_encode_as_str() -> None:
    @dataclasses.dataclass
    class Part:
        kind: str

    class Image:
        def __str__(self) -> str:
            return "<image 3 MB>"

    when = datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    prompt = {"when": when, "part": Part("text"), "image": Image(), "raw": b"\x00", "tags": {"a"}}

    line = _record(prompt=prompt).to_json_line(True)

    assert json.loads(line)["prompt"] == {
        "when": "2023-11-14 22:13:20+00:00",
        "part": "test_record_json_line_writes_what_json_cannot_encode_as_str.<locals>.Part"
        "(kind='text')",
        "image": "<image 3 MB>",
        "raw": "b'\\x00'",
        "tags": "{'a'}",
    }


# -- RequestLog ------------------------------------------------------------------------------------


def test_request_log_has_every_record_on_disk_when_close_returns(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "nested" / "proxy.jsonl"  # parents do not exist yet
    log = RequestLog(path, 1_000_000)

    _write_all(log, [_record(f"req-{i}") for i in range(100)])

    assert [line["request_id"] for line in _lines(path)] == [f"req-{i}" for i in range(100)]
    assert log.dropped == 0


def test_request_log_logs_prompts_only_when_configured(tmp_path: Path) -> None:
    record = _record(prompt=[{"role": "user", "content": "hi"}], response="hello")
    quiet, verbose = tmp_path / "quiet.jsonl", tmp_path / "verbose.jsonl"

    _write_all(RequestLog(quiet, 10_000), [record])
    _write_all(RequestLog(verbose, 10_000, log_prompts=True), [record])

    assert "prompt" not in _lines(quiet)[0]
    assert _lines(verbose)[0]["response"] == "hello"


def test_request_log_rotation_keeps_every_line_whole_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "proxy.jsonl"
    max_bytes = 1_000
    log = RequestLog(path, max_bytes, keep_files=100)

    _write_all(log, [_record(f"req-{i}") for i in range(60)])

    files = _log_files(path)
    assert len(files) > 5  # rotation really happened
    assert all(file.stat().st_size <= max_bytes for file in files)
    assert [line["request_id"] for line in _lines(path)] == [f"req-{i}" for i in range(60)]


def test_request_log_rotation_with_few_keep_files_keeps_only_the_newest(tmp_path: Path) -> None:
    path = tmp_path / "proxy.jsonl"
    log = RequestLog(path, 1_000, keep_files=2)

    _write_all(log, [_record(f"req-{i}") for i in range(60)])

    assert _log_files(path) == [tmp_path / "proxy.jsonl.2", tmp_path / "proxy.jsonl.1", path]
    ids = [line["request_id"] for line in _lines(path)]
    assert ids == [f"req-{i}" for i in range(60 - len(ids), 60)]


def test_request_log_line_longer_than_max_bytes_gets_a_file_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "proxy.jsonl"
    huge = _record("huge", prompt="x" * 5_000)
    assert len(_record().to_json_line(True)) < 600 < len(huge.to_json_line(True))
    log = RequestLog(path, 600, keep_files=5, log_prompts=True)

    _write_all(log, [_record("before"), huge, _record("after")])

    per_file = [[line["request_id"] for line in _lines_of(file)] for file in _log_files(path)]
    assert per_file == [["before"], ["huge"], ["after"]]
    assert _lines(path)[1]["prompt"] == "x" * 5_000


def _lines_of(file: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines()]


def test_request_log_concurrent_writers_lose_and_split_nothing(tmp_path: Path) -> None:
    path = tmp_path / "proxy.jsonl"
    log = RequestLog(path, 20_000, keep_files=1_000)
    log.start()
    all_ready = threading.Barrier(8)

    def writer(thread_no: int) -> None:
        all_ready.wait()
        for i in range(200):
            log.write(_record(f"t{thread_no}-{i}", error="é" * (i % 7)))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()

    ids = [line["request_id"] for line in _lines(path)]
    assert len(_log_files(path)) > 1
    assert len(ids) == 8 * 200
    assert set(ids) == {f"t{n}-{i}" for n in range(8) for i in range(200)}
    assert log.dropped == 0


def test_request_log_unwritable_path_warns_once_and_drops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "proxy.jsonl"
    path.mkdir()  # a directory where the log file should be
    ticks = itertools.count(0.0, RETRY_INTERVAL_S + 1)
    log = RequestLog(path, 10_000, clock=lambda: next(ticks))  # every record finds a retry due

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _write_all(log, [_record(f"req-{i}") for i in range(5)])

    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(path) in warnings[0].getMessage()
    assert "directory" in warnings[0].getMessage().lower()
    assert log.dropped == 5


def test_request_log_recovers_when_the_path_is_fixed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "proxy.jsonl"
    path.mkdir()
    times = iter([0.0, 10.0, 40.0])

    def clock() -> float:
        # Only the writer thread reads the clock: first right after the failed open at start-up
        # (so fixing the path here cannot race it), then once per record while the log is broken.
        now = next(times)
        if now == 0.0:
            path.rmdir()
        return now

    log = RequestLog(path, 10_000, clock=clock)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _write_all(log, [_record("too-early"), _record("retried"), _record("normal")])

    assert [line["request_id"] for line in _lines(path)] == ["retried", "normal"]
    assert log.dropped == 1
    ours = [r for r in caplog.records if r.name == LOGGER]
    assert [r.levelno for r in ours] == [logging.WARNING, logging.INFO]


def test_request_log_counts_a_record_no_encoder_takes_and_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no text")

    circular: list[Any] = []
    circular.append(circular)
    refused = [
        _record("circular", prompt=circular),
        _record("tuple-key", prompt={(1, 2): "x"}),
        _record("unprintable", prompt=Unprintable()),
    ]
    path = tmp_path / "proxy.jsonl"
    log = RequestLog(path, 10_000, log_prompts=True)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _write_all(log, [*refused, _record("fine")])

    assert [line["request_id"] for line in _lines(path)] == ["fine"]
    assert log.dropped == 3
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert [message.split()[1] for message in warnings] == ["circular", "tuple-key", "unprintable"]


def test_request_log_write_does_not_wait_for_a_stuck_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "proxy.jsonl"
    log = RequestLog(path, 1_000_000)
    writer_stuck, release = threading.Event(), threading.Event()
    real_append = log._append

    def stuck_append(data: bytes) -> None:
        writer_stuck.set()
        release.wait()
        real_append(data)

    monkeypatch.setattr(log, "_append", stuck_append)
    log.start()
    try:
        log.write(_record("first"))
        assert writer_stuck.wait(timeout=10)
        for i in range(50):
            log.write(_record(f"queued-{i}"))
        # All 51 writes returned while not a byte has reached the file.
        assert path.read_bytes() == b""
    finally:
        release.set()
    log.close()

    assert len(_lines(path)) == 51


def test_request_log_write_before_start_or_after_close_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "proxy.jsonl"
    log = RequestLog(path, 10_000)

    log.write(_record("early"))
    log.start()
    log.write(_record("kept"))
    log.close()
    log.write(_record("late"))
    log.close()  # a second close is harmless

    assert [line["request_id"] for line in _lines(path)] == ["kept"]
    assert log.dropped == 2


def test_request_log_close_without_start_returns(tmp_path: Path) -> None:
    log = RequestLog(tmp_path / "proxy.jsonl", 10_000)

    log.close()

    assert not (tmp_path / "proxy.jsonl").exists()


def test_request_log_appends_after_a_half_written_line_on_a_fresh_line(tmp_path: Path) -> None:
    path = tmp_path / "proxy.jsonl"
    path.write_text('{"request_id":"old"}\n{"request_id":"cut-of', encoding="utf-8")

    _write_all(RequestLog(path, 10_000), [_record("new")])

    lines = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0]) == {"request_id": "old"}
    assert json.loads(lines[-1])["request_id"] == "new"
    assert len(lines) == 3


# -- RequestLog batches ----------------------------------------------------------------------------


class Appends:
    """Counts the log's write calls; `hold()` makes the first one wait until `release()`."""

    def __init__(self, log: RequestLog, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        self.stuck, self._released = threading.Event(), threading.Event()
        self._released.set()
        real = log._append

        def counted(data: bytes) -> None:
            self.sizes.append(len(data))
            self.stuck.set()
            self._released.wait()
            real(data)

        monkeypatch.setattr(log, "_append", counted)

    def hold(self) -> None:
        self._released.clear()

    def release(self) -> None:
        self._released.set()


def _wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def _ids(path: Path) -> list[str]:
    return [line["request_id"] for line in _lines(path)]


def _ids_so_far(path: Path) -> list[str]:
    """The ids of the whole lines in `path` now, while the writer may be appending."""
    whole = path.read_bytes().rpartition(b"\n")[0] if path.exists() else b""
    return [json.loads(line)["request_id"] for line in whole.splitlines()]


def test_request_log_writes_what_queued_meanwhile_in_one_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "proxy.jsonl"
    log = RequestLog(path, 1_000_000)
    appends = Appends(log, monkeypatch)
    appends.hold()
    log.start()
    log.write(_record("req-0"))
    assert appends.stuck.wait(timeout=10)  # the writer took req-0 alone and is writing it
    for i in range(1, 500):
        log.write(_record(f"req-{i}"))
    appends.release()
    log.close()

    assert _ids(path) == [f"req-{i}" for i in range(500)]
    assert len(appends.sizes) == 2  # req-0, then the 499 queued while it was being written
    assert sum(appends.sizes) == path.stat().st_size


def test_request_log_wakes_at_most_every_batch_interval_under_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "proxy.jsonl"
    log = RequestLog(path, 1_000_000)
    appends = Appends(log, monkeypatch)
    log.start()
    started = time.monotonic()
    for i in range(2_000):
        log.write(_record(f"req-{i}"))
    busy_s = time.monotonic() - started
    log.close()

    assert _ids(path) == [f"req-{i}" for i in range(2_000)]
    # One batch at once and one per interval while records kept coming; then at most the
    # batch after the last pause and the last drain of close().
    assert len(appends.sizes) <= 1 + busy_s / BATCH_INTERVAL_S + 2


def test_request_log_writes_the_first_record_after_a_quiet_spell_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "proxy.jsonl"
    monkeypatch.setattr(observe, "BATCH_INTERVAL_S", 0.01)
    log = RequestLog(path, 1_000_000)
    log.start()
    log.write(_record("first"))
    assert _wait_until(lambda: _ids_so_far(path) == ["first"])
    assert _wait_until(lambda: log._idle)  # its pause is over and nothing came: quiet
    # From now on the writer pauses for a minute after each batch: only the one that a record
    # after a quiet spell starts at once can put that record on disk within the second.
    monkeypatch.setattr(observe, "BATCH_INTERVAL_S", 60.0)
    log.write(_record("after-quiet"))
    assert _wait_until(lambda: _ids_so_far(path) == ["first", "after-quiet"], timeout_s=1.0)
    log.write(_record("in-the-pause"))
    started = time.monotonic()
    log.close()

    assert time.monotonic() - started < 5.0  # close() cut the minute short
    assert _ids(path) == ["first", "after-quiet", "in-the-pause"]


def test_request_log_rotation_cuts_a_batch_at_the_lines_that_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "proxy.jsonl"
    max_bytes = 1_000
    log = RequestLog(path, max_bytes, keep_files=100)
    appends = Appends(log, monkeypatch)
    appends.hold()
    log.start()
    log.write(_record("req-0"))
    assert appends.stuck.wait(timeout=10)
    for i in range(1, 60):
        log.write(_record(f"req-{i}"))
    appends.release()
    log.close()

    files = _log_files(path)
    assert len(files) > 5
    assert _ids(path) == [f"req-{i}" for i in range(60)]
    for file, following in itertools.pairwise(files):
        size = file.stat().st_size
        first_of_next = len(following.read_bytes().splitlines(keepends=True)[0])
        assert size <= max_bytes < size + first_of_next  # full: the next line did not fit
    # req-0 alone, then the batch: one write per file it went to.
    assert len(appends.sizes) == 1 + len(files)


def test_request_log_close_writes_a_large_backlog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "proxy.jsonl"
    log = RequestLog(path, 10_000_000, keep_files=10)
    appends = Appends(log, monkeypatch)
    appends.hold()
    log.start()
    log.write(_record("req-0"))
    assert appends.stuck.wait(timeout=10)
    for i in range(1, 10_000):
        log.write(_record(f"req-{i}"))
    appends.release()
    log.close()

    assert _ids(path) == [f"req-{i}" for i in range(10_000)]
    assert log.dropped == 0


class CloseInTheMiddle(RequestLog):
    """A log whose next write() reads _accepting, then lets close() run to its end, and only
    then appends: the race write() takes no lock against."""

    race = False

    @property  # type: ignore[override]
    def _accepting(self) -> bool:
        accepting: bool = self.__dict__["_accepting"]
        if self.race and accepting:
            self.race = False
            closer = threading.Thread(target=self.close)
            closer.start()
            closer.join()
        return accepting

    @_accepting.setter
    def _accepting(self, value: bool) -> None:
        self.__dict__["_accepting"] = value


def test_request_log_counts_a_record_that_raced_close_as_dropped(tmp_path: Path) -> None:
    path = tmp_path / "proxy.jsonl"
    log = CloseInTheMiddle(path, 10_000)
    log.start()
    log.write(_record("before"))
    log.race = True

    log.write(_record("racing"))  # appended after the writer's last drain: never written

    assert _ids(path) == ["before"]
    assert log.dropped == 1


def test_request_log_writers_racing_close_have_each_record_written_or_dropped(
    tmp_path: Path,
) -> None:
    path = tmp_path / "proxy.jsonl"
    log = RequestLog(path, 10_000_000)
    log.start()
    under_way = threading.Semaphore(0)

    def writer(thread_no: int) -> None:
        for i in range(5_000):
            log.write(_record(f"t{thread_no}-{i}"))
            if i == 100:
                under_way.release()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for _ in threads:
        assert under_way.acquire(timeout=10)
    log.close()
    for thread in threads:
        thread.join()

    written = _ids(path)
    assert len(written) + log.dropped == 4 * 5_000
    for n in range(4):  # each thread's records up to where close() cut it, in order
        mine = [request_id for request_id in written if request_id.startswith(f"t{n}-")]
        assert mine == [f"t{n}-{i}" for i in range(len(mine))]
        assert len(mine) > 100


# -- Metrics ---------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def _finish(metrics: Metrics, model: str = "llama-3-8b", **changes: Any) -> None:
    changes.setdefault("model_requested", model)
    metrics.request_started(changes["model_requested"])
    metrics.request_finished(_record(model_resolved=model, **changes))


def test_metrics_percentiles_use_nearest_rank() -> None:
    metrics = Metrics()
    latencies = list(range(1, 101))
    random.Random(7).shuffle(latencies)
    for latency in latencies:
        _finish(metrics, latency_ms=float(latency), completion_tokens=None)

    overall = metrics.snapshot()["overall"]

    assert overall["requests"] == 100
    assert overall["latency_ms"] == {"p50": 50.0, "p95": 95.0, "p99": 99.0}
    assert overall["tokens_per_s"] == {"p50": None}


def test_metrics_percentiles_on_a_small_set_round_the_rank_up() -> None:
    metrics = Metrics()
    for ttft in (40.0, 10.0, 30.0, 20.0):
        _finish(metrics, stream=True, ttft_ms=ttft)

    assert metrics.snapshot()["overall"]["ttft_ms"] == {"p50": 20.0, "p95": 40.0}


def test_metrics_empty_snapshot_has_no_percentiles() -> None:
    snapshot = Metrics(window_s=60.0).snapshot()

    assert snapshot == {
        "window_s": 60.0,
        "overall": {
            "requests": 0,
            "errors": 0,
            "cancelled": 0,
            "in_flight": 0,
            "latency_ms": {"p50": None, "p95": None, "p99": None},
            "ttft_ms": {"p50": None, "p95": None},
            "tokens_per_s": {"p50": None},
        },
        "models": {},
        "last_swap": None,
    }


def test_metrics_counts_errors_and_cancellations() -> None:
    metrics = Metrics()
    _finish(metrics)
    _finish(metrics, outcome="error", status=502)
    _finish(metrics, outcome="error", status=400)
    _finish(metrics, outcome="cancelled")

    overall = metrics.snapshot()["overall"]

    assert (overall["requests"], overall["errors"], overall["cancelled"]) == (4, 2, 1)


def test_metrics_in_flight_goes_up_and_down_per_model() -> None:
    metrics = Metrics()
    metrics.request_started("chat")
    metrics.request_started("chat")
    metrics.request_started(None)

    during = metrics.snapshot()
    metrics.request_finished(_record(model_requested="chat", model_resolved="llama-3-8b"))
    after = metrics.snapshot()

    assert during["overall"]["in_flight"] == 3
    assert (during["models"]["chat"]["in_flight"], during["models"]["chat"]["requests"]) == (2, 0)
    assert during["models"]["unknown"]["in_flight"] == 1
    assert after["overall"]["in_flight"] == 2
    assert after["models"]["chat"]["in_flight"] == 1
    assert after["models"]["llama-3-8b"]["requests"] == 1


def test_metrics_in_flight_never_goes_negative() -> None:
    metrics = Metrics()

    metrics.request_finished(_record())  # finished without a start: a caller bug, not a crash

    assert metrics.snapshot()["overall"]["in_flight"] == 0


def test_metrics_window_drops_old_samples() -> None:
    clock = FakeClock()
    metrics = Metrics(window_s=300.0, clock=clock)
    _finish(metrics, model="old-model")
    clock.now += 200
    _finish(metrics, model="new-model")

    clock.now += 150  # old sample is 350 s old, new one 150 s

    snapshot = metrics.snapshot()
    assert snapshot["overall"]["requests"] == 1
    assert list(snapshot["models"]) == ["new-model"]


def test_metrics_separates_models_and_sums_overall() -> None:
    metrics = Metrics()
    _finish(metrics, model="zeta", latency_ms=100.0)
    _finish(metrics, model="alpha", latency_ms=300.0)
    _finish(metrics, model="alpha", latency_ms=500.0, outcome="error")

    snapshot = metrics.snapshot()

    assert list(snapshot["models"]) == ["alpha", "zeta"]
    assert snapshot["models"]["alpha"]["requests"] == 2
    assert snapshot["models"]["alpha"]["errors"] == 1
    assert snapshot["models"]["alpha"]["latency_ms"]["p99"] == 500.0
    assert snapshot["models"]["zeta"]["latency_ms"]["p50"] == 100.0
    assert snapshot["overall"]["requests"] == 3
    assert snapshot["overall"]["latency_ms"]["p50"] == 300.0


def test_metrics_falls_back_to_requested_name_then_unknown() -> None:
    metrics = Metrics()
    metrics.request_finished(_record(model_requested="typo-model", model_resolved=None))
    metrics.request_finished(_record(model_requested=None, model_resolved=None))

    assert list(metrics.snapshot()["models"]) == ["typo-model", "unknown"]


def test_metrics_tokens_per_s_uses_completion_tokens_over_latency() -> None:
    metrics = Metrics()
    _finish(metrics, completion_tokens=100, latency_ms=2_000.0)  # 50 tok/s
    _finish(metrics, completion_tokens=30, latency_ms=1_000.0)  # 30 tok/s
    _finish(metrics, completion_tokens=None, latency_ms=1_000.0)  # unknown: not counted
    _finish(metrics, completion_tokens=10, latency_ms=0.0)  # no duration: not counted

    assert metrics.snapshot()["overall"]["tokens_per_s"] == {"p50": 30.0}


def test_metrics_max_samples_bounds_memory() -> None:
    metrics = Metrics(max_samples=3)
    for _ in range(10):
        _finish(metrics)

    assert metrics.snapshot()["overall"]["requests"] == 3


def test_metrics_does_not_keep_prompts_alive() -> None:
    class Prompt:
        pass

    metrics = Metrics()
    prompt = Prompt()
    alive = weakref.ref(prompt)
    metrics.request_finished(_record(prompt=prompt))
    del prompt
    gc.collect()

    assert alive() is None  # large prompts (images) are not held for the whole window
    assert metrics.snapshot()["overall"]["requests"] == 1


def test_metrics_remembers_last_swap() -> None:
    metrics = Metrics()
    metrics.record_swap(3.0)
    metrics.record_swap(12.5)

    last_swap = metrics.snapshot()["last_swap"]

    assert last_swap["duration_s"] == 12.5
    assert last_swap["at"].endswith("Z")
    assert datetime.fromisoformat(last_swap["at"]).tzinfo == UTC


def test_metrics_recent_lists_the_newest_requests_first_with_what_the_user_got() -> None:
    metrics = Metrics()
    metrics.request_finished(_record("a", status=200, latency_ms=1000.0, completion_tokens=7))
    metrics.request_finished(
        _record("b", status=502, outcome="error", stream=True, ttft_ms=12.34, completion_tokens=0)
    )
    recent = metrics.recent(limit=5)
    assert [item["status"] for item in recent] == [502, 200]
    assert recent[0] == {
        "at": recent[0]["at"],
        "model": "llama-3-8b",
        "status": 502,
        "outcome": "error",
        "stream": True,
        "latency_ms": 1234.6,
        "ttft_ms": 12.3,
        "completion_tokens": 0,
    }
    # The end of the request: its start (2023-11-14T22:13:20.123Z) plus its latency.
    assert recent[1]["at"] == "2023-11-14T22:13:21.123Z"
    assert len(metrics.recent(limit=1)) == 1


def test_metrics_series_buckets_requests_by_when_they_finished() -> None:
    metrics = Metrics()
    start = 1_700_000_000.0  # a multiple of 10
    for offset, latency, tokens in ((1.0, 100.0, 5), (2.0, 300.0, 7), (15.0, 50.0, None)):
        metrics.request_finished(
            _record(started_at=start + offset, latency_ms=latency, completion_tokens=tokens)
        )
    assert metrics.series(bucket_s=10.0) == [
        {"at": start, "requests": 2, "mean_latency_ms": 200.0, "completion_tokens": 12},
        {"at": start + 10, "requests": 1, "mean_latency_ms": 50.0, "completion_tokens": 0},
    ]


@pytest.mark.parametrize("log_prompts", [False, True])
def test_lines_without_prompts_are_encoded_by_the_caller_and_with_prompts_by_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_prompts: bool
) -> None:
    # Without prompts a line is a few µs, spread over the requests; with prompts (images) it
    # may be megabytes, kept off the event loop's thread.
    encoded_on: list[str] = []
    encode = RequestRecord.to_json_line

    def watched(record: RequestRecord, prompts: bool) -> bytes:
        encoded_on.append(threading.current_thread().name)
        return encode(record, prompts)

    monkeypatch.setattr(RequestRecord, "to_json_line", watched)
    path = tmp_path / "proxy.jsonl"
    log = RequestLog(path, 10_000, log_prompts=log_prompts)
    log.start()
    log.write(_record("req-1"))
    log.close()
    expected = "imageworks-request-log" if log_prompts else threading.current_thread().name
    assert encoded_on == [expected]
    assert [line["request_id"] for line in _lines(path)] == ["req-1"]
