"""Model names: the clean display form users see, and resolving whatever name a user types.

An entry answers to its logical `name` (`qwen3_8b_(Q4_K_M)`), its display name
(`qwen3 8b (Q4 K M)`), its aliases and its served id. `NameIndex.resolve` tries those in that
order of trust, then a loose match that ignores case and punctuation, and otherwise fails with
close matches to suggest. Everything here is pure: no files, no registry loading.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Collection, Iterable, Sequence

from imageworks.registry.errors import AmbiguousName, EntryNotFound
from imageworks.registry.schema import RegistryEntry

_MAX_SUGGESTIONS = 5
_SUGGESTION_CUTOFF = 0.6

# Format and quantization markers that repository names carry but display names should not.
# Longer quant forms come first so `q4_k_m` is removed whole rather than leaving `_m` behind.
_NOISE_TOKEN = re.compile(
    r"(?<![a-z0-9])"
    r"(?:gguf|safetensors"
    r"|q\d+_k_[sml]|q\d+-k-[sml]|q\d+_k|q\d+_[01]"
    r"|awq|gptq|int4|int8|fp16|bf16|fp8|nf4|mxfp4|mxfp8)"
    r"(?![a-z0-9])"
)
_TRAILING_PARENS = re.compile(r"\(([^()]*)\)\s*$")

_KeysOf = Callable[[RegistryEntry], Collection[str]]


def normalize_key(text: str) -> str:
    """`text` reduced to lower-case letters and digits, for matching that ignores punctuation."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


def format_quantization(quantization: str | None) -> str | None:
    """`q4_k_m` -> `Q4 K M`; None when there is no real quantization to show."""
    if quantization is None:
        return None
    words = quantization.replace("_", " ").replace("-", " ").split()
    if not words or (len(words) == 1 and words[0].lower() == "unknown"):
        return None
    return " ".join(words).upper()


def display_name(entry: RegistryEntry) -> str:
    """The name shown to users, e.g. `llama 12.2b (Q4 K M)`."""
    base = entry.display_name or " ".join(entry.name.replace("_", " ").split())
    quant = format_quantization(entry.quantization)
    if quant is None or _ends_with_quant(base, quant):
        return base
    return f"{base} ({quant})"


def _ends_with_quant(text: str, quant: str) -> bool:
    # `(q4_k_m)` and `(Q4 K M)` are the same quant; showing it twice would look broken.
    match = _TRAILING_PARENS.search(text)
    return match is not None and normalize_key(match.group(1)) == normalize_key(quant)


def logical_slug(display: str) -> str:
    """`qwen3 8b (Q4 K M)` -> `qwen3_8b_(Q4_K_M)`: the inverse of the default display name."""
    return "_".join(display.split())


def simplified_display(family: str, parameter_size: str | None, quantization: str | None) -> str:
    """A display name for an imported model, built from what the importer knows about it.

    `("Qwen3", "8.2B", "q4_k_m")` -> `qwen3 8.2b (Q4 K M)`."""
    cleaned = _NOISE_TOKEN.sub("", family.lower())
    cleaned = " ".join(cleaned.split())
    cleaned = re.sub(r"[@_/]", "-", cleaned)
    cleaned = re.sub(r"-{2,}", "-", cleaned).strip("- ")

    parts = [cleaned] if cleaned else []
    size = (parameter_size or "").strip().lower()
    if size and not _contains_token(cleaned, size):
        parts.append(size)
    quant = format_quantization(quantization)
    if quant is not None:
        parts.append(f"({quant})")
    return " ".join(parts)


def _contains_token(text: str, token: str) -> bool:
    # Whole tokens only: `llama-3.1-8b` contains `8b`, but `qwen-18b` and `qwen-1.8b` do not.
    return re.search(rf"(?<![a-z0-9.]){re.escape(token)}(?![a-z0-9])", text) is not None


class NameIndex:
    """Every name a set of registry entries answers to, for resolving user input.

    Built once from a snapshot of entries and never changed afterwards. Entries are ordered by
    logical name before anything else happens, so results never depend on the input order."""

    __slots__ = ("_by_name", "_entries", "_loose", "_suggestion_keys", "_tiers")

    def __init__(self, entries: Sequence[RegistryEntry]) -> None:
        self._entries = tuple(sorted(entries, key=lambda e: e.name))
        by_name = _index(self._entries, lambda e: [e.name])
        self._by_name = {name: found[0] for name, found in by_name.items()}
        # Most trusted first: a name an entry was given exactly beats one it merely resembles.
        self._tiers = (
            by_name,
            _index(self._entries, _display_keys),
            _index(self._entries, _alias_keys),
        )
        self._loose = _index(self._entries, _loose_keys)
        self._suggestion_keys = _index(
            self._entries, lambda e: {e.name.lower(), display_name(e).lower()}
        )

    @property
    def entries(self) -> tuple[RegistryEntry, ...]:
        """All entries, sorted by logical name."""
        return self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> RegistryEntry | None:
        """The entry whose logical name is exactly `name`, if there is one."""
        return self._by_name.get(name)

    def resolve(self, requested: str) -> RegistryEntry:
        """The one entry `requested` names.

        Raises AmbiguousName when the most trusted tier that matches finds several entries,
        EntryNotFound (with close matches) when nothing matches at all."""
        requested = requested.strip()
        if not requested:
            raise EntryNotFound(requested, [])
        for tier in self._tiers:
            found = tier.get(requested)
            if found:
                return _single(requested, found)
        loose = self._loose.get(normalize_key(requested))
        if loose:
            return _single(requested, loose)
        raise EntryNotFound(requested, self._suggestions(requested))

    def _suggestions(self, requested: str) -> list[str]:
        # Ask for every close key, then keep five distinct entries: an entry's logical and
        # display names are often both close, and should not take two of the five places.
        keys = sorted(self._suggestion_keys)
        # A fragment such as `gemma` is too short for difflib's ratio, yet obviously means the
        # names that contain it: those come first.
        needle = normalize_key(requested)
        containing = [key for key in keys if needle and needle in normalize_key(key)]
        close = difflib.get_close_matches(
            requested.lower(), keys, n=len(keys), cutoff=_SUGGESTION_CUTOFF
        )
        suggestions: list[str] = []
        for key in containing + close:
            for entry in self._suggestion_keys[key]:
                label = display_name(entry)
                if label not in suggestions:
                    suggestions.append(label)
        return suggestions[:_MAX_SUGGESTIONS]


def _display_keys(entry: RegistryEntry) -> list[str]:
    keys = [display_name(entry)]
    if entry.display_name:
        keys.append(entry.display_name)
        quant = format_quantization(entry.quantization)
        if quant is not None:
            keys.append(f"{entry.display_name} ({quant})")
    return keys


def _alias_keys(entry: RegistryEntry) -> list[str]:
    served = entry.served_id
    return [*entry.model_aliases, *([served] if served else [])]


def _loose_keys(entry: RegistryEntry) -> set[str]:
    exact = [entry.name, *_display_keys(entry), *_alias_keys(entry)]
    # A key of pure punctuation normalises to "" and would match any such request.
    return {normalize_key(key) for key in exact} - {""}


def _index(
    entries: Iterable[RegistryEntry], keys_of: _KeysOf
) -> dict[str, tuple[RegistryEntry, ...]]:
    """key -> the entries answering to it, each entry once, in the (sorted) order given."""
    index: dict[str, list[RegistryEntry]] = {}
    for entry in entries:
        for key in keys_of(entry):
            bucket = index.setdefault(key, [])
            if not any(e is entry for e in bucket):
                bucket.append(entry)
    return {key: tuple(bucket) for key, bucket in index.items()}


def _single(requested: str, found: Sequence[RegistryEntry]) -> RegistryEntry:
    if len(found) == 1:
        return found[0]
    raise AmbiguousName(requested, _candidate_labels(found))


def _candidate_labels(found: Sequence[RegistryEntry]) -> list[str]:
    # Display names are friendlier, but when two candidates share one the user could not pick
    # either by it, so those fall back to their (unique) logical names.
    displays = [display_name(e) for e in found]
    return sorted(
        shown if displays.count(shown) == 1 else entry.name
        for shown, entry in zip(displays, found, strict=True)
    )
