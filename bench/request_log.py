"""What the request log costs per record: on the caller's thread and on its writer thread.

    PYTHONPATH=src python bench/request_log.py [--records 100000] [--observe FILE]

`--observe` loads `RequestLog` from another copy of observe.py, to compare with an older one:

    git show <commit>:src/imageworks/chat_proxy/observe.py > /tmp/observe_old.py
    PYTHONPATH=src python bench/request_log.py --observe /tmp/observe_old.py

Each measurement uses a fresh log in a temporary directory, with the default settings (no
prompts logged) and a record like the proxy's:

- encode: `to_json_line` alone, per record (what the writer thread spends serialising).
- burst: `write()` called back to back; wall time per call on the caller's thread (so it
  includes any wait for the GIL the writer thread holds): mean, and p50/p99 of timed calls.
- paced: per record the caller does `--work-us` of pure-Python work, hands the record over and
  polls for I/O (releasing the GIL), as the event loop does serving requests. Reported against
  the same loop without a log (medians of `--repeats` runs): the caller's extra CPU and extra
  time waiting although it had work (wall minus CPU: the GIL hand-overs the issue is about), per
  record; how much longer the loop's slowest iterations took (p99, p99.9: what a request's tail
  latency sees); the writer thread's CPU per record (`time.thread_time` inside it, spent
  holding the GIL too); write+flush calls per second.
"""

from __future__ import annotations

import argparse
import importlib.util
import select
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any


def load_observe(path: Path | None) -> ModuleType:
    if path is None:
        from imageworks.chat_proxy import observe

        return observe
    spec = importlib.util.spec_from_file_location("observe_under_test", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def make_record(observe: ModuleType, n: int) -> Any:
    return observe.RequestRecord(
        request_id=f"chatcmpl-{n:024x}",
        started_at=1_700_000_000.0 + n / 1000,
        model_requested="chat",
        model_resolved="llama-3-8b-instruct",
        backend="llamacpp",
        stream=True,
        status=200,
        outcome="ok",
        latency_ms=812.345,
        ttft_ms=41.27,
        prompt_tokens=512,
        completion_tokens=128,
        total_tokens=640,
        error=None,
        queue_ms=0.12,
        upstream_ms=800.4,
        proxy_ms=1.9,
    )


class Instrumented:
    """A started log whose writer thread reports its CPU time and counts its write calls."""

    def __init__(self, observe: ModuleType, directory: Path) -> None:
        self.log = observe.RequestLog(directory / "requests.jsonl", 1 << 40)
        self.writer_cpu_s = 0.0
        self.appends = 0
        run, append = self.log._run, self.log._append

        def timed_run() -> None:
            started = time.thread_time()
            try:
                run()
            finally:
                self.writer_cpu_s = time.thread_time() - started

        def counted_append(data: bytes) -> None:
            self.appends += 1
            append(data)

        self.log._run, self.log._append = timed_run, counted_append
        self.log.start()

    def close(self) -> None:
        self.log.close(timeout_s=60.0)


def bench_encode(records: list[Any]) -> None:
    started = time.perf_counter()
    for record in records:
        record.to_json_line(False)
    per = (time.perf_counter() - started) / len(records)
    print(f"encode   to_json_line: {per * 1e9:7.0f} ns/record")


def bench_burst(observe: ModuleType, records: list[Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subject = Instrumented(observe, Path(tmp))
        write = subject.log.write
        time.sleep(0.2)  # let the writer settle into its idle wait
        started = time.perf_counter()
        for record in records:
            write(record)
        mean = (time.perf_counter() - started) / len(records)
        subject.close()
    with tempfile.TemporaryDirectory() as tmp:
        subject = Instrumented(observe, Path(tmp))
        write, clock = subject.log.write, time.perf_counter_ns
        time.sleep(0.2)
        samples = []
        for record in records:
            before = clock()
            write(record)
            samples.append(clock() - before)
        subject.close()
    timer = min(-(clock() - clock()) for _ in range(1000))  # what timing a call adds by itself
    cuts = statistics.quantiles(samples, n=100)
    print(
        f"burst    write(): mean {mean * 1e9:5.0f} ns/call; timed calls p50 "
        f"{cuts[49] - timer:5.0f} ns, p99 {cuts[98] - timer:7.0f} ns "
        f"(timer {timer} ns subtracted); {subject.appends} write calls for {len(records)}"
    )


def calibrate(work_us: float) -> int:
    """Loop iterations that take `work_us` of CPU on this thread with nothing else running."""
    spins = 10_000
    while True:
        started = time.thread_time()
        spin(spins)
        took = time.thread_time() - started
        if took > 0.05:
            return max(1, round(spins * work_us * 1e-6 / took))
        spins *= 2


def spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


def caller_loop(records: list[Any], spins: int, write: Any) -> tuple[float, float, list[int]]:
    """Like the event loop under load: per request some work, the record handed over, and a
    poll for I/O (which releases the GIL, as epoll does). Returns this thread's wall and CPU
    seconds and each iteration's wall nanoseconds."""
    took, clock = [], time.perf_counter_ns
    wall, cpu = time.perf_counter(), time.thread_time()
    for record in records:
        started = clock()
        spin(spins)
        if write is not None:
            write(record)
        select.select([], [], [], 0)
        took.append(clock() - started)
    return time.perf_counter() - wall, time.thread_time() - cpu, took


def bench_paced(observe: ModuleType, records: list[Any], work_us: float, repeats: int) -> None:
    spins = calibrate(work_us)
    count = len(records)
    cpu, waited, writer, appends, rate, p99, p999 = [], [], [], [], [], [], []
    for _ in range(repeats):  # alternate with and without the log: the machine's drift cancels
        alone_wall, alone_cpu, alone_took = caller_loop(records, spins, None)
        with tempfile.TemporaryDirectory() as tmp:
            subject = Instrumented(observe, Path(tmp))
            time.sleep(0.2)
            logged_wall, logged_cpu, logged_took = caller_loop(records, spins, subject.log.write)
            subject.close()
        # Time the caller was not running although it had work: waiting for the GIL (or for a
        # CPU, which the run without the log measures and we subtract).
        waited.append(((logged_wall - logged_cpu) - (alone_wall - alone_cpu)) / count)
        cpu.append((logged_cpu - alone_cpu) / count)
        writer.append(subject.writer_cpu_s / count)
        appends.append(subject.appends / logged_wall)
        rate.append(count / logged_wall)
        alone_cuts = statistics.quantiles(alone_took, n=1000)
        logged_cuts = statistics.quantiles(logged_took, n=1000)
        p99.append((logged_cuts[989] - alone_cuts[989]) * 1e-9)
        p999.append((logged_cuts[998] - alone_cuts[998]) * 1e-9)

    def ns(values: list[float]) -> str:
        return f"{statistics.median(values) * 1e9:+7.0f}"

    print(
        f"paced {work_us:5.0f} us work/record ({statistics.median(rate):5.0f} records/s): caller "
        f"CPU {ns(cpu)} ns/record, waiting {ns(waited)} ns/record, iteration p99 {ns(p99)} ns "
        f"p99.9 {ns(p999)} ns; writer CPU {ns(writer)} ns/record, "
        f"{statistics.median(appends):5.0f} write calls/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--observe", type=Path, help="an observe.py to measure instead")
    parser.add_argument(
        "--work-us", type=float, nargs="+", default=[20.0, 100.0, 500.0], metavar="US"
    )
    parser.add_argument("--paced-seconds", type=float, default=1.0, help="length of a paced run")
    parser.add_argument("--repeats", type=int, default=5, help="paced runs per work size")
    args = parser.parse_args()
    observe = load_observe(args.observe)
    print(f"{observe.__file__}, switch interval {sys.getswitchinterval() * 1e3:.0f} ms")
    records = [make_record(observe, n) for n in range(args.records)]
    with tempfile.TemporaryDirectory() as tmp:  # warm up: the heap's first touch is costly in VMs
        warm = Instrumented(observe, Path(tmp))
        for record in records:
            warm.log.write(record)
        warm.close()
    bench_encode(records)
    bench_burst(observe, records)
    for work_us in args.work_us:
        count = max(100, min(args.records, round(args.paced_seconds / (work_us * 1e-6))))
        bench_paced(observe, records[:count], work_us, args.repeats)


if __name__ == "__main__":
    main()
