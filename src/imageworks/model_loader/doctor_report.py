"""What `imageworks-loader doctor` found, and how it is told: one line per check, or one JSON
document. Pure: no I/O; the checks themselves live in `doctor.py` and `doctor_model.py`.

    ok    registry      configs: 5 entries
    FAIL  llama-server  CHAT_PROXY_LLAMA_SERVER_BINARY=/opt/x is not an executable file; ...
    warn  ollama        Ollama at http://127.0.0.1:11434 does not answer (...); start it ...

Each line is the status, the check's name, what was found and, for a problem, what to do
(after `; `, as every loader message ends). A failed start adds its model server's last log
lines, indented, as `activate-model` does.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

_NAME_WIDTH = 13
_TAIL_LINES = 5


class Status(enum.Enum):
    OK = "ok"
    WARN = "warn"  # works, with a limit the user may care about (an optional part is missing)
    FAIL = "FAIL"  # something a new user needs does not work: the command exits 1


@dataclass(frozen=True, slots=True)
class Finding:
    """One check's result. `details` are facts for `--json` (a path, a pid, a version)."""

    name: str
    status: Status
    found: str
    fix: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    log_tail: str = ""  # a model server's last words, when it failed to start


def ok(name: str, found: str, **details: Any) -> Finding:
    return Finding(name, Status.OK, found, None, details)


def warn(name: str, found: str, fix: str | None = None, **details: Any) -> Finding:
    return Finding(name, Status.WARN, found, fix, details)


def fail(name: str, found: str, fix: str | None = None, **details: Any) -> Finding:
    return Finding(name, Status.FAIL, found, fix, details)


def failed(findings: Sequence[Finding]) -> bool:
    return any(finding.status is Status.FAIL for finding in findings)


def line(finding: Finding) -> str:
    said = f"{finding.found}; {finding.fix}" if finding.fix else finding.found
    text = f"{finding.status.value:<5} {finding.name:<{_NAME_WIDTH}} {' '.join(said.split())}"
    tail = [row for row in finding.log_tail.splitlines() if row.strip()][-_TAIL_LINES:]
    return "\n".join([text.rstrip(), *(f"      {row}" for row in tail)])


def text(findings: Sequence[Finding], seconds: float) -> str:
    counts = {status: sum(f.status is status for f in findings) for status in Status}
    if counts[Status.FAIL]:
        verdict = f"{counts[Status.FAIL]} failed"
        if counts[Status.WARN]:
            verdict += f", {counts[Status.WARN]} warning(s)"
    elif counts[Status.WARN]:
        verdict = f"nothing failed, {counts[Status.WARN]} warning(s)"
    else:
        verdict = "everything is ok"
    summary = f"{verdict} ({len(findings)} checks in {seconds:.1f} s)"
    return "".join(line(finding) + "\n" for finding in findings) + summary + "\n"


def document(findings: Sequence[Finding], seconds: float) -> dict[str, Any]:
    """The `--json` document: `ok` is what the exit status says."""
    return {
        "ok": not failed(findings),
        "seconds": round(seconds, 2),
        "checks": [
            {
                "name": finding.name,
                "status": finding.status.value,
                "found": finding.found,
                "fix": finding.fix,
                **finding.details,
                **({"log_tail": finding.log_tail} if finding.log_tail else {}),
            }
            for finding in findings
        ],
    }


def version_line(output: str) -> str:
    """The line of a program's `--version` output that says its version: the one starting with
    `version` (llama-server prints library notes first), else the first line with any text."""
    lines = [row.strip() for row in output.splitlines() if row.strip()]
    for row in lines:
        if row.lower().startswith("version"):
            return row
    return lines[0] if lines else ""


@dataclass(frozen=True, slots=True)
class Gpu:
    name: str
    free_mib: int
    total_mib: int


def parse_nvidia_smi(output: str) -> list[Gpu]:
    """`nvidia-smi --query-gpu=name,memory.free,memory.total --format=csv,noheader,nounits`;
    lines that do not parse (a driver's notice) are left out."""
    gpus = []
    for row in output.splitlines():
        parts = [part.strip() for part in row.rsplit(",", 2)]  # a name may hold commas
        if len(parts) != 3 or not parts[0]:
            continue
        try:
            gpus.append(Gpu(parts[0], int(float(parts[1])), int(float(parts[2]))))
        except ValueError:
            continue
    return gpus


def describe_gpus(gpus: Sequence[Gpu]) -> str:
    return ", ".join(
        f"{gpu.name}: {gpu.free_mib / 1024:.1f} GiB free of {gpu.total_mib / 1024:.1f} GiB"
        for gpu in gpus
    )
