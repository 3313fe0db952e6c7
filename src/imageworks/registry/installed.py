"""Is an entry installed, i.e. can it be served right now without a download?

- An entry with local weights (`download_path` or `backend_config.model_path`) is installed
  when that file or directory exists.
- An entry its backend serves by id (an Ollama tag, a model behind an external URL) is installed
  when the backend lists it. Asking is network I/O, so it sits behind `ServedModelsSource`, runs
  in parallel per backend, and is bounded by a short timeout: a dead backend makes its entries
  "unknown", it never stalls the listing.
- For an `external` entry (a remote) that ask is also its health check: a remote that refuses
  the connection, times out, fails with a 5xx or refuses the key makes its entries
  "unreachable", with the reason (the key's variable named, never its value).
- An Ollama that does not answer leaves its entries "unknown" (the GPU slot deals with Ollama
  itself, and what it has pulled cannot be known), and the report says why and what to do
  (`OllamaDown`), so the dashboard can show them as unreachable rather than ready to load.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx

from imageworks.registry.endpoints import backend_root, ollama_tag, openai_base_url
from imageworks.registry.paths import weights_path
from imageworks.registry.schema import RegistryEntry


class Installed(enum.Enum):
    YES = "yes"
    NO = "no"
    UNKNOWN = "unknown"  # the backend that would know did not answer
    UNREACHABLE = "unreachable"  # a remote entry whose health check fails (it is down)


class ServedApi(enum.Enum):
    OLLAMA = "ollama"  # GET <root>/api/tags
    OPENAI = "openai"  # GET <base>/models


@dataclass(frozen=True, slots=True)
class ServedModelsQuery:
    api: ServedApi
    url: str
    key_env: str | None = None  # the variable holding the backend's key (a name, not the key)


@dataclass(frozen=True, slots=True)
class Unanswered:
    """Why a backend could not be asked. `down`: it is not serving at all (refused, timed out,
    5xx, refused the key), as opposed to answering in a way we cannot read."""

    reason: str
    down: bool


class ServedModelsSource(Protocol):
    def served_models(self, query: ServedModelsQuery) -> frozenset[str] | Unanswered:
        """Lower-cased ids the backend serves, or why it could not be asked."""


class HttpServedModels:
    """Asks backends over HTTP with one short timeout per request."""

    def __init__(self, timeout_s: float, environ: Mapping[str, str] | None = None) -> None:
        # One client for every ask (its pool is thread-safe; the asks run in a few threads):
        # a new one per request would load the CA bundle each time, ~10-20 ms of CPU holding
        # the GIL that the proxy's event loop needs meanwhile.
        self._client = httpx.Client(timeout=httpx.Timeout(timeout_s), trust_env=False)
        self._timeout_s = timeout_s
        # Where `key_env` variables are looked up: the proxy's environment.
        self._environ: Mapping[str, str] = environ if environ is not None else {}

    def served_models(self, query: ServedModelsQuery) -> frozenset[str] | Unanswered:
        path = "/api/tags" if query.api is ServedApi.OLLAMA else "/models"
        headers: dict[str, str] = {}
        if query.key_env is not None:
            key = self._environ.get(query.key_env, "").strip()
            if not key:
                return Unanswered(f"the key variable {query.key_env} is not set", down=True)
            headers["Authorization"] = f"Bearer {key}"
        try:
            response = self._client.get(query.url + path, headers=headers)
        except httpx.TimeoutException:
            return Unanswered(f"no answer within {self._timeout_s:g}s", down=True)
        except httpx.HTTPError as exc:
            # The exception's class, not its text: enough to tell refused from reset, and
            # nothing a request carried can reach a log through it.
            return Unanswered(f"cannot connect ({type(exc).__name__})", down=True)
        status = response.status_code
        if status in (401, 403):
            said = (
                f"the remote refused the key in {query.key_env}"
                if query.key_env
                else "the remote wants a key (set backend_config.api_key_env)"
            )
            return Unanswered(f"{said} (HTTP {status})", down=True)
        if status >= 400:
            return Unanswered(f"{path} answered HTTP {status}", down=status >= 500)
        try:
            body = response.json()
        except ValueError:
            body = None
        key = "models" if query.api is ServedApi.OLLAMA else "data"
        items = body.get(key) if isinstance(body, dict) else None
        if not isinstance(items, list):
            return Unanswered(f"{path} answered something that is not a model list", down=False)
        ids: set[str] = set()
        for item in items:
            if isinstance(item, dict):
                for name in ("name", "model", "id"):
                    value = item.get(name)
                    if isinstance(value, str):
                        ids.add(value.lower())
        return frozenset(ids)


def _served_by_id_query(entry: RegistryEntry, ollama_host: str) -> ServedModelsQuery | None:
    if entry.backend == "ollama":
        return ServedModelsQuery(ServedApi.OLLAMA, backend_root(entry, ollama_host))
    if entry.backend == "external":
        url = openai_base_url(entry, ollama_host)
        return ServedModelsQuery(ServedApi.OPENAI, url, entry.backend_config.api_key_env)
    return None


def _wanted_id(entry: RegistryEntry) -> str:
    return (ollama_tag(entry) if entry.backend == "ollama" else entry.upstream_model_id).lower()


def _matches(wanted: str, served: frozenset[str]) -> bool:
    # Ollama lists `phi4:latest` for a model pulled as `phi4`.
    return wanted in served or (":" not in wanted and f"{wanted}:latest" in served)


@dataclass(frozen=True, slots=True)
class OllamaDown:
    """The Ollama an entry is served by does not answer: why, and what to do."""

    reason: str  # e.g. "Ollama at http://127.0.0.1:11434 does not answer: cannot connect (...)"
    fix: str


@dataclass(frozen=True, slots=True)
class InstalledReport:
    states: dict[str, Installed]  # entry name -> installed state
    # entry name -> why its remote is unreachable, for every UNREACHABLE entry
    reasons: dict[str, str] = field(default_factory=dict)
    # entry name -> its Ollama's outage, for every Ollama entry left UNKNOWN because of it
    ollama_down: dict[str, OllamaDown] = field(default_factory=dict)


def ollama_down(entry: RegistryEntry, url: str, reason: str) -> OllamaDown:
    """An Ollama entry's server is down: where (`url`), why, and the setting that decides it:
    the entry's own `backend_config` when it names a host, else IMAGEWORKS_OLLAMA_HOST."""
    config = entry.backend_config
    if config.base_url or config.host:
        fix = "start it, or correct the entry's backend_config.host"
    else:
        fix = "start it or set IMAGEWORKS_OLLAMA_HOST"
    return OllamaDown(f"Ollama at {url} does not answer: {reason}", fix)


def installed_states(
    entries: Sequence[RegistryEntry],
    base_dir: Path,
    source: ServedModelsSource | None,
    ollama_host: str,
) -> dict[str, Installed]:
    """Entry name -> installed state. With no `source`, backend-served entries are UNKNOWN."""
    return installed_report(entries, base_dir, source, ollama_host).states


def installed_report(
    entries: Sequence[RegistryEntry],
    base_dir: Path,
    source: ServedModelsSource | None,
    ollama_host: str,
) -> InstalledReport:
    """The installed states, why each unreachable remote is, and each down Ollama's entries."""
    states: dict[str, Installed] = {}
    reasons: dict[str, str] = {}
    down: dict[str, OllamaDown] = {}
    pending: dict[str, ServedModelsQuery] = {}
    for entry in entries:
        path = weights_path(entry, base_dir)
        query = _served_by_id_query(entry, ollama_host)
        if path is not None and (path.exists() or query is None):
            states[entry.name] = Installed.YES if path.exists() else Installed.NO
        elif query is not None:
            pending[entry.name] = query
        else:
            states[entry.name] = Installed.NO
    answers = _ask_all(set(pending.values()), source)
    by_name = {entry.name: entry for entry in entries}
    for name, query in pending.items():
        served = answers.get(query)
        if served is None:
            states[name] = Installed.UNKNOWN
        elif isinstance(served, Unanswered):
            # Only a remote is "down": Ollama entries are served through the GPU slot, which
            # deals with Ollama itself, so an Ollama that does not answer leaves them unknown.
            if served.down and by_name[name].backend == "external":
                states[name] = Installed.UNREACHABLE
                reasons[name] = served.reason
            else:
                states[name] = Installed.UNKNOWN
                if served.down and query.api is ServedApi.OLLAMA:
                    down[name] = ollama_down(by_name[name], query.url, served.reason)
        else:
            wanted = _wanted_id(by_name[name])
            states[name] = Installed.YES if _matches(wanted, served) else Installed.NO
    return InstalledReport(states, reasons, down)


def _ask_all(
    queries: Iterable[ServedModelsQuery], source: ServedModelsSource | None
) -> Mapping[ServedModelsQuery, frozenset[str] | Unanswered]:
    ordered = sorted(queries, key=lambda q: (q.api.value, q.url, q.key_env or ""))
    if source is None or not ordered:
        return {}
    # One request per distinct backend, all at once, so N dead backends cost one timeout.
    with ThreadPoolExecutor(max_workers=min(8, len(ordered))) as pool:
        results = list(pool.map(source.served_models, ordered))
    return dict(zip(ordered, results, strict=True))
