"""Is an entry installed, i.e. can it be served right now without a download?

- An entry with local weights (`download_path` or `backend_config.model_path`) is installed
  when that file or directory exists.
- An entry its backend serves by id (an Ollama tag, a model behind an external URL) is installed
  when the backend lists it. Asking is network I/O, so it sits behind `ServedModelsSource`, runs
  in parallel per backend, and is bounded by a short timeout: a dead backend makes its entries
  "unknown", it never stalls the listing.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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


class ServedApi(enum.Enum):
    OLLAMA = "ollama"  # GET <root>/api/tags
    OPENAI = "openai"  # GET <base>/models


@dataclass(frozen=True, slots=True)
class ServedModelsQuery:
    api: ServedApi
    url: str


class ServedModelsSource(Protocol):
    def served_models(self, query: ServedModelsQuery) -> frozenset[str] | None:
        """Lower-cased ids the backend serves, or None if it could not be asked."""


class HttpServedModels:
    """Asks backends over HTTP with one short timeout per request."""

    def __init__(self, timeout_s: float) -> None:
        # One client for every ask (its pool is thread-safe; the asks run in a few threads):
        # a new one per request would load the CA bundle each time, ~10-20 ms of CPU holding
        # the GIL that the proxy's event loop needs meanwhile.
        self._client = httpx.Client(timeout=httpx.Timeout(timeout_s))

    def served_models(self, query: ServedModelsQuery) -> frozenset[str] | None:
        path = "/api/tags" if query.api is ServedApi.OLLAMA else "/models"
        try:
            response = self._client.get(query.url + path)
            response.raise_for_status()
            body = response.json()
        except (httpx.HTTPError, ValueError):
            return None
        key = "models" if query.api is ServedApi.OLLAMA else "data"
        items = body.get(key) if isinstance(body, dict) else None
        if not isinstance(items, list):
            return None
        ids: set[str] = set()
        for item in items:
            if isinstance(item, dict):
                for field in ("name", "model", "id"):
                    value = item.get(field)
                    if isinstance(value, str):
                        ids.add(value.lower())
        return frozenset(ids)


def _served_by_id_query(entry: RegistryEntry, ollama_host: str) -> ServedModelsQuery | None:
    if entry.backend == "ollama":
        return ServedModelsQuery(ServedApi.OLLAMA, backend_root(entry, ollama_host))
    if entry.backend == "external":
        return ServedModelsQuery(ServedApi.OPENAI, openai_base_url(entry, ollama_host))
    return None


def _wanted_id(entry: RegistryEntry) -> str:
    return (ollama_tag(entry) if entry.backend == "ollama" else entry.upstream_model_id).lower()


def _matches(wanted: str, served: frozenset[str]) -> bool:
    # Ollama lists `phi4:latest` for a model pulled as `phi4`.
    return wanted in served or (":" not in wanted and f"{wanted}:latest" in served)


def installed_states(
    entries: Sequence[RegistryEntry],
    base_dir: Path,
    source: ServedModelsSource | None,
    ollama_host: str,
) -> dict[str, Installed]:
    """Entry name -> installed state. With no `source`, backend-served entries are UNKNOWN."""
    states: dict[str, Installed] = {}
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
        else:
            wanted = _wanted_id(by_name[name])
            states[name] = Installed.YES if _matches(wanted, served) else Installed.NO
    return states


def _ask_all(
    queries: Iterable[ServedModelsQuery], source: ServedModelsSource | None
) -> Mapping[ServedModelsQuery, frozenset[str] | None]:
    ordered = sorted(queries, key=lambda q: (q.api.value, q.url))
    if source is None or not ordered:
        return {}
    # One request per distinct backend, all at once, so N dead backends cost one timeout.
    with ThreadPoolExecutor(max_workers=min(8, len(ordered))) as pool:
        results = list(pool.map(source.served_models, ordered))
    return dict(zip(ordered, results, strict=True))
