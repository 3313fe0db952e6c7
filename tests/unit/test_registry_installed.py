from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from imageworks.registry.installed import (
    HttpServedModels,
    Installed,
    OllamaDown,
    ServedApi,
    ServedModelsQuery,
    Unanswered,
    installed_report,
    installed_states,
)
from imageworks.registry.schema import RegistryEntry

OLLAMA = "http://127.0.0.1:11434"


def _entry(name: str, backend: str, **fields: Any) -> RegistryEntry:
    return RegistryEntry.model_validate({"name": name, "backend": backend, **fields})


class FakeSource:
    def __init__(self, answers: dict[str, frozenset[str] | Unanswered]) -> None:
        self.answers = answers
        self.asked: list[ServedModelsQuery] = []

    def served_models(self, query: ServedModelsQuery) -> frozenset[str] | Unanswered:
        self.asked.append(query)
        return self.answers.get(query.url, Unanswered("cannot connect", down=True))


def test_local_weights_are_installed_when_the_path_exists(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "a.gguf").write_bytes(b"gguf")
    entries = [
        _entry("relative", "llamacpp", download_path="models/a.gguf"),
        _entry("absolute", "vllm", backend_config={"model_path": str(tmp_path / "models")}),
        _entry("missing", "vllm", download_path=str(tmp_path / "nope")),
        _entry("nothing", "vllm"),
    ]
    states = installed_states(entries, tmp_path, None, OLLAMA)
    assert states == {
        "relative": Installed.YES,
        "absolute": Installed.YES,
        "missing": Installed.NO,
        "nothing": Installed.NO,
    }


def test_ollama_entries_are_installed_when_their_tag_is_listed(tmp_path: Path) -> None:
    entries = [
        _entry("pulled", "ollama", served_model_id="qwen3:8b"),
        _entry("latest", "ollama", backend_config={"model_path": "ollama:/Phi4"}),
        _entry("absent", "ollama", served_model_id="llava:7b"),
        _entry(
            "elsewhere", "ollama", served_model_id="qwen3:8b", backend_config={"host": "other-box"}
        ),
    ]
    source = FakeSource({OLLAMA: frozenset({"qwen3:8b", "phi4:latest"})})
    states = installed_states(entries, tmp_path, source, OLLAMA)
    assert states == {
        "pulled": Installed.YES,
        "latest": Installed.YES,
        "absent": Installed.NO,
        "elsewhere": Installed.UNKNOWN,  # other-box did not answer
    }
    # one question per distinct backend, not one per entry
    assert sorted(q.url for q in source.asked) == [OLLAMA, "http://other-box:11434"]


def test_external_entries_ask_the_openai_models_list(tmp_path: Path) -> None:
    entries = [
        _entry(
            "remote",
            "external",
            served_model_id="big-model",
            backend_config={"base_url": "http://cluster:8000/v1"},
        ),
        _entry(
            "gone",
            "external",
            served_model_id="old-model",
            backend_config={"base_url": "http://cluster:8000/v1"},
        ),
    ]
    source = FakeSource({"http://cluster:8000/v1": frozenset({"big-model"})})
    states = installed_states(entries, tmp_path, source, OLLAMA)
    assert states == {"remote": Installed.YES, "gone": Installed.NO}
    assert [q.api for q in source.asked] == [ServedApi.OPENAI]


def test_without_a_source_backend_served_entries_are_unknown(tmp_path: Path) -> None:
    states = installed_states([_entry("o", "ollama")], tmp_path, None, OLLAMA)
    assert states == {"o": Installed.UNKNOWN}


def test_a_down_ollama_leaves_its_entries_unknown_and_says_where_and_what_to_do(
    tmp_path: Path,
) -> None:
    entries = [
        _entry("default", "ollama", served_model_id="qwen3:8b"),
        _entry("own", "ollama", served_model_id="qwen3:8b", backend_config={"host": "gpu-box"}),
    ]
    source = FakeSource({})  # every backend: "cannot connect", down
    report = installed_report(entries, tmp_path, source, OLLAMA)
    assert report.states == {"default": Installed.UNKNOWN, "own": Installed.UNKNOWN}
    assert report.reasons == {}  # only remotes are UNREACHABLE
    assert report.ollama_down == {
        "default": OllamaDown(
            f"Ollama at {OLLAMA} does not answer: cannot connect",
            "start it or set IMAGEWORKS_OLLAMA_HOST",
        ),
        "own": OllamaDown(
            "Ollama at http://gpu-box:11434 does not answer: cannot connect",
            "start it, or correct the entry's backend_config.host",
        ),
    }


def test_an_ollama_that_answers_oddly_is_not_down(tmp_path: Path) -> None:
    source = FakeSource({OLLAMA: Unanswered("/api/tags answered HTTP 404", down=False)})
    report = installed_report([_entry("o", "ollama")], tmp_path, source, OLLAMA)
    assert report.states == {"o": Installed.UNKNOWN}
    assert report.ollama_down == {}


class _TagsHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/api/tags":
            body = {"models": [{"name": "qwen3:8b", "model": "qwen3:8b"}]}
        elif self.path == "/v1/models":
            body = {"object": "list", "data": [{"id": "Served-Model", "object": "model"}]}
        else:
            self.send_error(404)
            return
        payload = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_backend() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _TagsHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_source_reads_ollama_tags_and_openai_models(http_backend: str) -> None:
    source = HttpServedModels(timeout_s=5)
    assert source.served_models(ServedModelsQuery(ServedApi.OLLAMA, http_backend)) == {"qwen3:8b"}
    assert source.served_models(ServedModelsQuery(ServedApi.OPENAI, http_backend + "/v1")) == {
        "served-model"
    }


def test_http_source_says_a_dead_backend_is_down() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    source = HttpServedModels(timeout_s=5)
    answer = source.served_models(ServedModelsQuery(ServedApi.OLLAMA, dead))
    assert isinstance(answer, Unanswered)
    assert answer.down
    assert "cannot connect" in answer.reason


def test_http_source_gives_up_on_a_silent_backend_after_its_timeout() -> None:
    with socket.socket() as listener:  # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        source = HttpServedModels(timeout_s=0.2)
        answer = source.served_models(ServedModelsQuery(ServedApi.OLLAMA, url))
        assert isinstance(answer, Unanswered)
        assert answer.down
        assert "no answer within 0.2s" in answer.reason
