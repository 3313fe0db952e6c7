"""The soak's clients: what each request asked for and what it received, and how that is judged.

Every request carries a tag (`soak-c3-0042`) in its prompt; with prompts in the request log, the
tag finds the log line of each request, so the log is checked request by request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from support.proxy_process import processes_listening_on

CHAT = "/v1/chat/completions"
MAX_TOKENS = (4, 16)  # Gemma is a base model: it always runs to max_tokens
LEAVE_CHANCE = 0.2  # requests the client abandons on purpose
SHORT_TIMEOUT_S = 0.3  # ...a whole answer it stops waiting for this soon
CALL_BUDGET_S = 120.0  # a request not finished in this long is a failure (as a backend timeout)
STOP_EVERY_S = (8.0, 16.0)  # an admin stop now and then, by whichever client is due
POLL_S = 0.5  # the slot status (its history keeps only 200 events) and the process table
EXPECTED_ERROR_CODES: frozenset[str] = frozenset()  # none in this soak

Event = tuple[float, str, str]  # (wall-clock time, event, model) from the slot's history


@dataclass
class Call:
    tag: str
    client: int
    model: str
    stream: bool
    max_tokens: int
    leave: bool  # abandon on purpose: after the first stream event, or by a short timeout
    at: float  # seconds into the soak
    took: float = 0.0
    status: int | None = None
    received: list[str] = field(default_factory=list)  # SSE lines, or the body of an answer
    content: str | None = None  # the text of an answer the client got whole
    abandoned: bool = False
    problem: str | None = None  # set: an unexpected failure
    error_code: str | None = None

    def describe(self) -> str:
        kind = "stream" if self.stream else "non-stream"
        plan = ", leaving early" if self.leave else ""
        return (
            f"{self.tag} ({self.model!r}, {kind}, max_tokens={self.max_tokens}{plan}, "
            f"sent at +{self.at:.1f}s, took {self.took:.1f}s, status {self.status})"
        )

    def shown(self) -> str:
        """The end of what the client received, short enough to read in a report."""
        tail = [line if len(line) < 360 else line[:360] + "..." for line in self.received[-4:]]
        skipped = len(self.received) - len(tail)
        return (f"[... {skipped} lines] " if skipped else "") + repr(tail)


@dataclass
class Stop:
    client: int
    at: float
    took: float = 0.0
    problem: str | None = None


@dataclass
class Soak:
    url: str
    model_port: int
    models: tuple[str, ...]
    seed: int
    seconds: float
    clients: int = 8
    began: float = field(default_factory=time.monotonic)
    began_wall: float = field(default_factory=time.time)
    calls: list[Call] = field(default_factory=list)
    stops: list[Stop] = field(default_factory=list)
    history: list[Event] = field(default_factory=list)
    slot: dict[str, Any] = field(default_factory=dict)  # the last status seen
    problems: list[str] = field(default_factory=list)  # seen by the monitor
    most_processes: int = 0

    def __post_init__(self) -> None:
        self._stop_rng = random.Random(f"{self.seed}:stops")
        self._next_stop = self.began + self._stop_rng.uniform(*STOP_EVERY_S)

    def now(self) -> float:
        return time.monotonic() - self.began

    async def run(self) -> None:
        done = asyncio.Event()
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as http:
            watcher = asyncio.create_task(self._monitor(http, done))
            try:
                await asyncio.gather(*(self._client(index) for index in range(self.clients)))
            finally:
                done.set()
                await watcher

    # -- the clients --------------------------------------------------------------------------

    async def _client(self, index: int) -> None:
        rng = random.Random(f"{self.seed}:{index}")
        async with httpx.AsyncClient(base_url=self.url, timeout=CALL_BUDGET_S) as http:
            for number in range(1_000_000):  # bounded by the clock below
                if self.now() >= self.seconds:
                    return
                if self._stop_due():
                    await self._admin_stop(http, index)
                    continue
                call = Call(
                    tag=f"soak-c{index}-{number:04d}",
                    client=index,
                    model=rng.choice(self.models),
                    stream=rng.random() < 0.5,
                    max_tokens=rng.randint(*MAX_TOKENS),
                    leave=rng.random() < LEAVE_CHANCE,
                    at=self.now(),
                )
                self.calls.append(call)
                await self._send(http, call)

    def _stop_due(self) -> bool:
        if time.monotonic() < self._next_stop:
            return False
        self._next_stop = time.monotonic() + self._stop_rng.uniform(*STOP_EVERY_S)
        return True

    async def _admin_stop(self, http: httpx.AsyncClient, index: int) -> None:
        stop = Stop(index, self.now())
        self.stops.append(stop)
        try:
            async with asyncio.timeout(CALL_BUDGET_S):
                response = await http.post("/v1/admin/stop")
            if response.status_code != 200:
                stop.problem = f"HTTP {response.status_code}: {response.text[:300]}"
        except TimeoutError:
            stop.problem = f"no answer within {CALL_BUDGET_S:g}s"
        except httpx.HTTPError as exc:
            stop.problem = f"{type(exc).__name__}: {exc}"
        stop.took = self.now() - stop.at

    async def _send(self, http: httpx.AsyncClient, call: Call) -> None:
        payload = {
            "model": call.model,
            "messages": [{"role": "user", "content": f"[{call.tag}] Say hello."}],
            "max_tokens": call.max_tokens,
            "stream": call.stream,
        }
        try:
            async with asyncio.timeout(CALL_BUDGET_S):
                if call.stream:
                    await _stream(http, call, payload)
                else:
                    await _whole(http, call, payload)
        except TimeoutError:
            call.problem = f"not finished within {CALL_BUDGET_S:g}s"
        except httpx.HTTPError as exc:  # e.g. the connection closed in the middle of the body
            call.problem = f"{type(exc).__name__}: {exc}"
        else:
            call.problem = judge_stream(call) if call.stream else judge_whole(call)
        call.took = self.now() - call.at

    # -- the monitor --------------------------------------------------------------------------

    async def _monitor(self, http: httpx.AsyncClient, done: asyncio.Event) -> None:
        while not done.is_set():
            await self.poll(http)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), POLL_S)
        await self.poll(http)

    async def poll(self, http: httpx.AsyncClient) -> None:
        try:
            response = await http.get("/v1/admin/status")
            response.raise_for_status()
            self.slot = response.json()["slot"]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            self.problems.append(f"+{self.now():.1f}s GET /v1/admin/status failed: {exc!r}")
            return
        self._merge([(e["at"], e["event"], e["model"]) for e in self.slot["history"]])
        pids = await asyncio.to_thread(processes_listening_on, self.model_port)
        self.most_processes = max(self.most_processes, len(pids))
        if len(pids) > 1:
            self.problems.append(f"+{self.now():.1f}s {len(pids)} model processes: {pids}")

    def _merge(self, snapshot: list[Event]) -> None:
        """Add the events of a history snapshot that are newer than those already seen."""
        if self.history and self.history[-1] in snapshot:
            new = snapshot[snapshot.index(self.history[-1]) + 1 :]
        else:
            if self.history:  # more than the history's length happened between two polls
                self.problems.append(f"+{self.now():.1f}s slot history has a gap")
            last = self.history[-1][0] if self.history else float("-inf")
            new = [event for event in snapshot if event[0] > last]
        self.history.extend(new)


async def _stream(http: httpx.AsyncClient, call: Call, payload: dict[str, Any]) -> None:
    async with http.stream("POST", CHAT, json=payload) as response:
        call.status = response.status_code
        if response.status_code != 200:
            call.received.append((await response.aread()).decode(errors="replace"))
            return
        async for line in response.aiter_lines():
            if not line:
                continue
            call.received.append(line)
            if call.leave and line.startswith("data:"):
                call.abandoned = True
                return  # leaving the block closes the connection mid-stream


async def _whole(http: httpx.AsyncClient, call: Call, payload: dict[str, Any]) -> None:
    timeout = SHORT_TIMEOUT_S if call.leave else CALL_BUDGET_S
    try:
        response = await http.post(CHAT, json=payload, timeout=timeout)
    except httpx.TimeoutException:
        if not call.leave:
            raise
        call.abandoned = True
        return
    call.status = response.status_code
    call.received.append(response.text)


def _error_of(body: Any) -> dict[str, Any] | None:
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else None


def judge_stream(call: Call) -> str | None:
    """Why what a stream's client received is not a complete answer (None: it is)."""
    if call.status != 200:
        return judge_whole(call)
    data = [line[5:].strip() for line in call.received if line.startswith("data:")]
    chunks = []
    for item in data:
        if item == "[DONE]":
            continue
        try:
            chunk = json.loads(item)
        except ValueError:
            return f"an event is not JSON: {item[:200]!r}"
        if (error := _error_of(chunk)) is not None:
            call.error_code = str(error.get("code"))
            if call.error_code not in EXPECTED_ERROR_CODES:
                return f"error event {call.error_code}: {error.get('message')}"
        chunks.append(chunk)
    if call.abandoned:
        return None
    if not data or data[-1] != "[DONE]":
        return "the stream did not end with data: [DONE]"
    if data.count("[DONE]") > 1:
        return "more than one data: [DONE]"
    texts, finishes = [], []
    for chunk in chunks:
        choices = chunk.get("choices") if isinstance(chunk, dict) else None
        if not choices or not isinstance(choices[0], dict):
            continue
        delta = choices[0].get("delta") or {}
        if isinstance(delta, dict) and delta.get("content"):
            texts.append(str(delta["content"]))
        if choices[0].get("finish_reason"):
            finishes.append(choices[0]["finish_reason"])
    call.content = "".join(texts)
    if not texts and not finishes:
        return f"an empty stream: {len(chunks)} events, no content and no finish_reason"
    if not finishes:
        return f"no finish_reason ({len(texts)} content deltas)"
    return None


def judge_whole(call: Call) -> str | None:
    """Why a non-stream answer (or a stream refused before it began) is not a good answer."""
    if call.abandoned:
        return None
    text = call.received[-1] if call.received else ""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if call.status != 200:
        error = _error_of(body) or {}
        call.error_code = str(error.get("code"))
        return f"HTTP {call.status} {call.error_code}: {error.get('message', text[:300])}"
    try:
        choice = body["choices"][0]
        message = choice["message"]
    except (TypeError, KeyError, IndexError):
        return f"not a chat completion: {text[:300]!r}"
    if not choice.get("finish_reason"):
        return "no finish_reason"
    call.content = message.get("content") or ""
    return None
