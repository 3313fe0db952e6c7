"""`model_loader.report`: how the managed port is described to a person."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime, timedelta

import pytest

from imageworks.backends.state import ManagedState
from imageworks.model_loader.report import age, describe_record, describe_status

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
URL = "http://127.0.0.1:8100"


def names(entry: str) -> str | None:
    return {"smol_(Q4)": "smol (Q4)"}.get(entry)


def record(**fields: object) -> ManagedState:
    values: dict[str, object] = {
        "entry": "smol_(Q4)",
        "served_model_id": "smol",
        "backend": "llamacpp",
        "port": 24001,
        "pid": 4242,
        "process_start": 1,
        "command": ["llama-server", "--port", "24001"],
        "started_at": (NOW - timedelta(minutes=3, seconds=12)).isoformat(),
        "log_path": "logs/llamacpp/smol.log",
        "owner": "loader",
        **fields,
    }
    return ManagedState(**values)  # type: ignore[arg-type]


def rows(text: str) -> dict[str, str]:
    return dict(line.strip().split(None, 1) for line in text.splitlines()[1:] if "  " in line)


@pytest.mark.parametrize(
    ("seconds", "said"),
    [(0, "0s"), (45.9, "45s"), (192, "3m 12s"), (7_500, "2h 05m"), (273_600, "3d 4h")],
)
def test_age_shows_at_most_two_units(seconds: float, said: str) -> None:
    assert age(seconds) == said


def test_describe_record_of_nothing_is_one_sentence() -> None:
    text = describe_record(None, port=24001, source="the state file", names=names, now=NOW)
    assert text == "No model is active on port 24001.\n"


def test_describe_record_titles_the_display_name_and_shows_the_uptime() -> None:
    text = describe_record(record(), port=24001, source="the state file x", names=names, now=NOW)
    assert text.splitlines()[0] == "smol (Q4) is active on port 24001."
    assert "  logical name  smol_(Q4)" in text.splitlines()
    fields = rows(text)
    assert fields["since"].endswith("(up 3m 12s)")
    assert fields["command"] == "llama-server --port 24001"
    assert fields["source"] == "the state file x"


def test_describe_record_of_an_entry_no_longer_in_the_registry_uses_its_logical_name() -> None:
    text = describe_record(record(entry="gone_7b"), port=24001, source="s", names=names, now=NOW)
    assert text.splitlines()[0] == "gone_7b is active on port 24001."
    assert "logical name" not in text


def test_describe_status_with_an_empty_slot_names_the_proxy() -> None:
    status = {"slot": {"holder": None, "starting": None, "state": "empty"}, "state_file": None}
    text = describe_status(status, url=URL, port=24001, names=names, now=NOW)
    assert text == f"No model is active on port 24001 (according to the proxy at {URL}).\n"


def test_describe_status_says_when_ollama_holds_the_gpu() -> None:
    status = {"slot": {"holder": "@ollama http://127.0.0.1:11434", "state": "ready"}}
    text = describe_status(status, url=URL, port=24001, names=names, now=NOW)
    assert text.startswith("No model server is active on port 24001: Ollama at http://127.0.0")


def test_describe_status_fills_in_from_the_record_of_the_same_model() -> None:
    state_file = asdict(record())
    slot = {
        "holder": "smol_(Q4)",
        "pid": 4242,
        "state": "ready",
        "activity": "serving",
        "active_requests": 2,
        "waiting": {"smol_(Q4)": 1},
        "last_error": None,
    }
    text = describe_status(
        {"slot": slot, "state_file": state_file}, url=URL, port=24001, names=names, now=NOW
    )
    fields = rows(text)
    assert fields["phase"] == "ready (serving)"
    assert fields["backend"] == "llamacpp"
    assert fields["requests"] == "2 running, 1 waiting"
    assert fields["source"] == f"the GPU slot of the proxy at {URL}"


def test_describe_status_of_a_starting_model_without_a_record() -> None:
    slot = {"holder": None, "starting": "smol_(Q4)", "pid": None, "state": "starting"}
    text = describe_status(
        {"slot": slot, "state_file": None}, url=URL, port=24001, names=names, now=NOW
    )
    fields = rows(text)
    assert text.splitlines()[0] == "smol (Q4) is active on port 24001."
    assert fields["phase"] == "starting"
    assert fields["pid"] == "-"
