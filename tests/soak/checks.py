"""What the soak checks once the traffic is over: the request log against what each client
received, the slot's history, and the figures of the one-line summary."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from soak.traffic import Call, Event, Soak

TAG = re.compile(r"soak-c\d+-\d+")
JSON = dict[str, Any]
KINDS_SHOWN = 12  # per section of the report
EXAMPLES_SHOWN = 3  # per kind of problem
DETAIL_CHARS = 1500

# The slot's history, one holder at a time: event -> {phase it may come in: phase it leads to}.
# "ended": a start failed or was cancelled (empty again, or a leftover process to stop); "stuck":
# a stop failed. Every event but a start names the holder of the moment.
TRANSITIONS: dict[str, dict[str, str]] = {
    "starting": {"empty": "starting", "ended": "starting"},
    "adopted": {"empty": "starting"},
    "ready": {"starting": "ready"},
    "failed": {"starting": "ended"},
    "cancelled": {"starting": "ended"},
    "stopping": {
        "ready": "stopping",
        "starting": "stopping",
        "ended": "stopping",
        "stuck": "stopping",
    },
    "stopped": {"stopping": "empty"},
    "stop failed": {"stopping": "stuck"},
}
STARTS = frozenset({"starting", "adopted"})


class Problem(NamedTuple):
    kind: str  # what went wrong, in the same words each time it happens
    detail: str  # which request, what it received, its log line

    @classmethod
    def of(cls, kind: str, detail: str) -> Problem:
        kind = kind.strip().splitlines()[0] if kind.strip() else "?"
        detail = " ".join(detail.split())
        if len(detail) > DETAIL_CHARS:
            detail = detail[:DETAIL_CHARS] + "..."
        return cls(kind if len(kind) <= 200 else kind[:200] + "...", detail)


def report(sections: dict[str, list[Problem]]) -> list[str]:
    """The problems of each section, grouped by kind, the most frequent first."""
    lines = []
    for title, problems in sections.items():
        if not problems:
            continue
        lines.append(f"{title} ({len(problems)}):")
        kinds: dict[str, list[Problem]] = {}
        for found in problems:
            kinds.setdefault(found.kind, []).append(found)
        ranked = sorted(kinds.items(), key=lambda item: -len(item[1]))
        for kind, group in ranked[:KINDS_SHOWN]:
            lines.append(f"  {len(group)} x {kind}")
            lines += [f"      e.g. {found.detail}" for found in group[:EXAMPLES_SHOWN]]
        if len(ranked) > KINDS_SHOWN:
            lines.append(f"  ... and {len(ranked) - KINDS_SHOWN} more kinds")
    return lines


def read_request_log(path: Path) -> list[JSON]:
    """Every line of the request log, the rotated files (`.5` ... `.1`) first."""
    rotated = sorted(
        (p for p in path.parent.glob(path.name + ".*") if p.suffix[1:].isdigit()),
        key=lambda p: -int(p.suffix[1:]),
    )
    files = [*rotated, path] if path.exists() else rotated
    return [json.loads(line) for p in files for line in p.read_text().splitlines() if line]


def brief(record: JSON) -> str:
    """A log line without the prompt, and with a long response cut short."""
    shown = {k: v for k, v in record.items() if k != "prompt"}
    response = json.dumps(shown.get("response"))
    if len(response) > 200:
        shown["response"] = response[:200] + "..."
    return json.dumps(shown, ensure_ascii=False)


@dataclass
class LogCheck:
    by_tag: dict[str, list[JSON]] = field(default_factory=dict)
    mismatches: list[Problem] = field(default_factory=list)  # missing, doubled, disagreeing
    broken_ok: list[Problem] = field(default_factory=list)  # a failed answer the log calls ok


def check_log(calls: list[Call], records: list[JSON]) -> LogCheck:
    result = LogCheck()
    by_tag: defaultdict[str, list[JSON]] = defaultdict(list)
    for record in records:
        found = TAG.search(json.dumps(record.get("prompt")))
        if found is None:
            result.mismatches.append(Problem.of("a log line no soak client sent", brief(record)))
        else:
            by_tag[found.group()].append(record)
    result.by_tag = dict(by_tag)
    for tag in sorted(set(by_tag) - {call.tag for call in calls}):
        result.mismatches.append(Problem.of("log lines for a request never sent", tag))
    for call in calls:
        lines = by_tag.get(call.tag, [])
        received = f"received {call.shown()}"
        if len(lines) != 1:
            shown = " | ".join(brief(line) for line in lines)
            result.mismatches.append(
                Problem.of(
                    f"{len(lines)} log lines for one request",
                    f"{call.describe()}: {received}; log [{shown}]",
                )
            )
            continue
        line = lines[0]
        if call.problem is not None:
            if line.get("outcome") == "ok":
                result.broken_ok.append(
                    Problem.of(
                        f"logged as ok, but the client got: {call.problem}",
                        f"{call.describe()}: {received}; log {brief(line)}",
                    )
                )
            continue
        disagreement = _disagreement(call, line)
        if disagreement is not None:
            kind, specifics = disagreement
            result.mismatches.append(
                Problem.of(kind, f"{call.describe()}: {specifics}; {received}; log {brief(line)}")
            )
    return result


def _disagreement(call: Call, line: JSON) -> tuple[str, str] | None:
    """How the log line of a request the client judged fine disagrees with what it received:
    (the kind of disagreement, its specifics)."""
    if line.get("model_requested") != call.model or line.get("stream") != call.stream:
        return "the log line is for another model or stream mode", ""
    outcome, status = line.get("outcome"), line.get("status")
    if call.abandoned:
        if outcome in ("ok", "cancelled") and status in (200, 499):
            return None
        return (
            f"abandoned by the client, logged as {outcome} {status} (a failure nobody saw)",
            str(line.get("error")),
        )
    if outcome != "ok" or status != 200:
        return f"the client got a whole answer, the log says {outcome} {status}", ""
    logged: Any = line.get("response")
    if not call.stream:  # a whole answer's choices
        try:
            logged = logged[0]["message"].get("content")
        except (TypeError, KeyError, IndexError):
            return "the log has no response for it (are prompts logged?)", ""
    if (logged or "") != (call.content or ""):
        return (
            "the logged response is not the text the client got",
            f"logged {logged!r}, received {call.content!r}",
        )
    return None


def holder_problems(history: list[Event], began_wall: float) -> list[Problem]:
    """Events of the slot's history that break "one holder at a time, and a model starts only
    after the previous one has stopped" (see TRANSITIONS)."""
    problems = []
    phase, holder = "empty", None
    for index, (at, event, model) in enumerate(history):
        transitions = TRANSITIONS.get(event, {})
        then = transitions.get(phase)
        if then is None or (event not in STARTS and model != holder):
            before = ", ".join(
                f"+{t - began_wall:.2f}s {e} {m}" for t, e, m in history[max(0, index - 4) : index]
            )
            problems.append(
                Problem.of(
                    f"{event} while {phase}" + ("" if model == holder else " another model"),
                    f"event #{index} at +{at - began_wall:.2f}s: {event} {model} while {phase} "
                    f"{holder}; the events before it: {before}",
                )
            )
        phase = then or next(iter(transitions.values()), phase)  # carry on after a fault
        holder = None if phase == "empty" else model
    return problems


def summary(soak: Soak, log: LogCheck) -> str:
    calls = soak.calls
    per_model = ", ".join(f"{m} {n}" for m, n in Counter(c.model for c in calls).most_common())
    left_streams = sum(c.abandoned and c.stream for c in calls)
    timeouts = sum(c.abandoned and not c.stream for c in calls)
    failures = sum(c.problem is not None for c in calls)
    failures += sum(s.problem is not None for s in soak.stops)
    codes = Counter(c.error_code for c in calls if c.error_code is not None)
    starts = sum(event in STARTS for _, event, _ in soak.history)
    slowest = max((c.took for c in calls if not c.abandoned), default=0.0)
    heartbeats = sum(any(line.startswith(": loading") for line in c.received) for c in calls)
    return (
        f"soak seed={soak.seed}: {soak.seconds:g}s of traffic, {len(calls)} requests "
        f"({per_model}), {sum(c.stream for c in calls)} streams ({heartbeats} with loading "
        f"heartbeats), "
        f"{left_streams + timeouts} disconnects ({left_streams} mid-stream, {timeouts} "
        f"timeouts), {len(soak.stops)} admin stops, {soak.slot.get('swaps')} swaps "
        f"({starts} starts in the slot history), {failures} failures, "
        f"{len(log.broken_ok)} failed answers logged as ok, {len(log.mismatches)} log "
        f"mismatches, error codes {dict(codes) or 'none'}, at most {soak.most_processes} "
        f"model process(es) at once, slowest answer {slowest:.1f}s"
    )
