"""One measurement each, as a JSON-ready record with `valid`: load at c1/c32 (and on
/v1/models), streams, and memory over many requests.

A record is valid only when nothing went wrong: no non-2xx, no socket error, every stream
complete and in order. An exception becomes an invalid record with its reason, so one broken
target never ends the run nor hides the others' numbers.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from typing import Any

from bench.http1 import KeepAlive, request_bytes
from bench.load import Generator, LoadResult, LoadSpec
from bench.rss import tree_rss_mib
from bench.stats import percentile
from bench.streaming import stream_run
from bench.targets import CHAT_PATH, Running

Record = dict[str, Any]
CHUNKS = 200
CHUNK_INTERVAL_MS = 1.0
WARMUP_REQUESTS = 100
MIB_TO_MB = 1024 * 1024 / 1e6


def chat_body(model: str, stream: bool) -> bytes:
    """The request every target gets: short, compact JSON, streamed or not."""
    body: Record = {"model": model, "messages": [{"role": "user", "content": "ping"}]}
    body["max_tokens"] = 16
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def failed(exc: BaseException) -> Record:
    return {"valid": False, "error": f"{type(exc).__name__}: {exc}"}


def load(generator: Generator, spec: LoadSpec) -> Record:
    try:
        result: LoadResult = generator.run(spec)
    except Exception as exc:  # noqa: BLE001 (an invalid record, the run goes on)
        return failed(exc)
    return {**result.as_json(), "valid": result.errors == 0 and result.requests > 0}


def streams(target: Running, count: int) -> Record:
    """`count` streams in sequence after one warm-up stream; TTFT and per-chunk transit."""
    body = chat_body(target.model, True)
    try:
        stream_run("127.0.0.1", target.port, CHAT_PATH, body, 1, CHUNKS)
        run = stream_run("127.0.0.1", target.port, CHAT_PATH, body, count, CHUNKS)
    except Exception as exc:  # noqa: BLE001 (an invalid record, the run goes on)
        return failed(exc)
    transit = sorted(run.transit_us)
    record: Record = {
        "streams": run.streams,
        "chunks_per_stream": CHUNKS,
        "chunk_interval_ms": CHUNK_INTERVAL_MS,
        "complete_streams": len(run.ttft_ms),
        "ttft_p50_ms": statistics.median(run.ttft_ms) if run.ttft_ms else None,
        "transit_p50_us": percentile(transit, 50) if transit else None,
        "transit_p99_us": percentile(transit, 99) if transit else None,
        "transit_max_us": transit[-1] if transit else None,
        "problems": run.problems[:10],
        "problem_count": len(run.problems),
        "valid": not run.problems and len(run.ttft_ms) == run.streams,
    }
    if not record["valid"]:
        record["error"] = "; ".join(run.problems[:3]) or "incomplete streams"
    return record


def memory(generator: Generator, target: Running, requests: int, max_s: float) -> Record:
    """RSS after WARMUP_REQUESTS sequential requests, then after `requests` more at c32 (or
    as many as `max_s` allows), in MB summed over the server's process tree."""
    try:
        return _memory(generator, target, requests, max_s)
    except Exception as exc:  # noqa: BLE001 (an invalid record, the run goes on)
        return failed(exc)


def _memory(generator: Generator, target: Running, requests: int, max_s: float) -> Record:
    assert target.server is not None
    body = chat_body(target.model, False)
    client = KeepAlive("127.0.0.1", target.port)
    request = request_bytes("POST", "127.0.0.1", target.port, CHAT_PATH, body)
    errors = 0
    try:
        for _ in range(WARMUP_REQUESTS):
            errors += client.send(request).status != 200
    finally:
        client.close()
    time.sleep(0.5)  # let what the warm-up left settle before reading
    idle = tree_rss_mib(target.server.pid) * MIB_TO_MB
    began = time.monotonic()
    # The first tenth at c32 is read too: what a server holds once its connections, buffers and
    # heap have grown to the load (warm) apart from what keeps growing after (a leak).
    warm_requests = requests // 10
    warmed, more_errors = _load_up_to(generator, target, body, warm_requests, began + max_s)
    time.sleep(0.5)
    warm = tree_rss_mib(target.server.pid) * MIB_TO_MB
    rest, rest_errors = _load_up_to(generator, target, body, requests - warmed, began + max_s)
    done = warmed + rest
    errors += more_errors + rest_errors
    time.sleep(0.5)
    after = tree_rss_mib(target.server.pid) * MIB_TO_MB
    return {
        "idle_mb": idle,
        "after_mb": after,
        "growth_pct": (after - idle) / idle * 100,
        "warm_mb": warm,
        "warm_requests": warmed,
        "growth_after_warm_pct": (after - warm) / warm * 100,
        "warmup_requests": WARMUP_REQUESTS,
        "requests": done,
        "requests_planned": requests,
        "capped_at_s": max_s if done < requests else None,
        "errors": errors,
        "valid": errors == 0,
    }


def _load_up_to(
    generator: Generator, target: Running, body: bytes, requests: int, deadline: float
) -> tuple[int, int]:
    """About `requests` requests at c32 (fewer if `deadline` comes first): (done, errors)."""
    done, errors, seconds = 0, 0, 1.0
    while done < requests:
        left_s = deadline - time.monotonic()
        if left_s < 1:
            break
        spec = LoadSpec(target.url + CHAT_PATH, "POST", body, 32, min(seconds, left_s))
        result = generator.run(spec)
        done += result.requests
        errors += result.errors
        # aim a little short of what is left, so the last run tops up instead of overshooting
        left = requests - done
        seconds = float(max(1, math.ceil(0.8 * left / max(result.rps, 1.0))))
    return done, errors
