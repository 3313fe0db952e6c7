from __future__ import annotations

import random
from typing import Any

import pytest

from imageworks.registry.errors import AmbiguousName, EntryNotFound
from imageworks.registry.naming import (
    NameIndex,
    display_name,
    format_quantization,
    logical_slug,
    normalize_key,
    simplified_display,
)
from imageworks.registry.schema import RegistryEntry


def _entry(name: str, **fields: Any) -> RegistryEntry:
    return RegistryEntry.model_validate({"name": name, "backend": "llamacpp", **fields})


LLAMA = _entry(
    "llama_12.2b_(Q4_K_M)",
    quantization="q4_k_m",
    model_aliases=["llama-chat"],
    served_model_id="llama-12.2b-q4",
)
QWEN = _entry("qwen3_8b_(Q4_K_M)", quantization="Q4_K_M")
MISTRAL = _entry(
    "mistral-small-24b-instruct_(AWQ)",
    backend="vllm",
    display_name="Mistral Small 24B",
    quantization="awq",
    served_model_id="None",
)
GEMMA = _entry("gemma3_270m", display_name="Gemma 3 270M")


def _index(*entries: RegistryEntry) -> NameIndex:
    return NameIndex(entries or (LLAMA, QWEN, MISTRAL, GEMMA))


# -- formatting ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("q4_k_m", "Q4 K M"),
        ("awq", "AWQ"),
        ("Q4-1", "Q4 1"),
        ("  q8__0 ", "Q8 0"),
        ("fp16", "FP16"),
        (None, None),
        ("", None),
        ("   ", None),
        ("unknown", None),
        ("UNKNOWN", None),
    ],
)
def test_format_quantization_table(raw: str | None, shown: str | None) -> None:
    assert format_quantization(raw) == shown


@pytest.mark.parametrize(
    ("name", "quant", "shown"),
    [
        ("qwen3_8b_(Q4_K_M)", "q4_k_m", "qwen3 8b (Q4 K M)"),
        ("mistral-small-24b-instruct_(AWQ)", None, "mistral-small-24b-instruct (AWQ)"),
        ("qwen3__8b", None, "qwen3 8b"),
        ("qwen3_8b", "q4_k_m", "qwen3 8b (Q4 K M)"),
        ("qwen3_8b", "unknown", "qwen3 8b"),
    ],
)
def test_display_name_from_logical_name(name: str, quant: str | None, shown: str) -> None:
    assert display_name(_entry(name, quantization=quant)) == shown


@pytest.mark.parametrize(
    ("given", "quant", "shown"),
    [
        ("Gemma 3 270M", None, "Gemma 3 270M"),
        ("llama 12.2b", "q4_k_m", "llama 12.2b (Q4 K M)"),
        ("llama 12.2b (q4_k_m)", "Q4_K_M", "llama 12.2b (q4_k_m)"),
        ("llama 12.2b (Q4-K-M) ", "q4_k_m", "llama 12.2b (Q4-K-M)"),
        ("llama (Q4 K M)", "Q8_0", "llama (Q4 K M) (Q8 0)"),
    ],
)
def test_display_name_prefers_given_display_name(given: str, quant: str | None, shown: str) -> None:
    assert display_name(_entry("ignored_name", display_name=given, quantization=quant)) == shown


@pytest.mark.parametrize("entry", [LLAMA, QWEN, _entry("phi-4_mini"), _entry("gemma3_270m_(Q8_0)")])
def test_logical_slug_round_trips_display_name(entry: RegistryEntry) -> None:
    assert logical_slug(display_name(entry)) == entry.name


def test_logical_slug_collapses_whitespace() -> None:
    assert logical_slug("  qwen3   8b (Q4 K M) ") == "qwen3_8b_(Q4_K_M)"


@pytest.mark.parametrize(
    ("family", "size", "quant", "shown"),
    [
        ("Qwen3", "8.2B", "q4_k_m", "qwen3 8.2b (Q4 K M)"),
        ("llama-3.1-8b-instruct-awq", None, "awq", "llama-3.1-8b-instruct (AWQ)"),
        ("Qwen3-8B-Q4_K_M-GGUF", "8B", "Q4_K_M", "qwen3-8b (Q4 K M)"),
        ("mistral_small@24b/instruct", "24B", None, "mistral-small-24b-instruct"),
        ("phi 4 mini gptq int4", "3.8B", "gptq", "phi 4 mini 3.8b (GPTQ)"),
        ("model q4-k-m q8_0 q5_1 q4_k bf16", None, None, "model"),
        ("gpt-oss-mxfp4", "20B", "mxfp4", "gpt-oss 20b (MXFP4)"),
        ("qwen-18b", "8B", None, "qwen-18b 8b"),
        ("awqward", None, None, "awqward"),
        ("gemma", " ", "unknown", "gemma"),
    ],
)
def test_simplified_display_table(
    family: str, size: str | None, quant: str | None, shown: str
) -> None:
    assert simplified_display(family, size, quant) == shown


@pytest.mark.parametrize(
    ("text", "key"),
    [("LLAMA 12.2B (q4_k_m)", "llama122bq4km"), ("qwen2.5-vl", "qwen25vl"), ("--", "")],
)
def test_normalize_key_keeps_only_lowercase_letters_and_digits(text: str, key: str) -> None:
    assert normalize_key(text) == key


# -- resolution ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        ("llama_12.2b_(Q4_K_M)", LLAMA),
        ("  llama_12.2b_(Q4_K_M)\n", LLAMA),
        ("llama 12.2b (Q4 K M)", LLAMA),
        ("Mistral Small 24B", MISTRAL),
        ("Mistral Small 24B (AWQ)", MISTRAL),
        ("llama-chat", LLAMA),
        ("llama-12.2b-q4", LLAMA),
        ("LLAMA 12.2B (q4_k_m)", LLAMA),
        ("gemma-3-270m", GEMMA),
    ],
)
def test_resolve_finds_entry_by_any_of_its_names(requested: str, expected: RegistryEntry) -> None:
    assert _index().resolve(requested) is expected


def test_resolve_exact_name_beats_loose_match() -> None:
    spaced = _entry("qwen3_8b", display_name="Qwen3 8B")
    packed = _entry("QWEN3-8B")  # normalises to the same key as `spaced`'s names

    assert _index(spaced, packed).resolve("QWEN3-8B") is packed
    assert _index(spaced, packed).resolve("Qwen3 8B") is spaced


def test_resolve_logical_name_beats_another_entrys_alias() -> None:
    target = _entry("coder")
    squatter = _entry("other", model_aliases=["coder"])

    assert _index(target, squatter).resolve("coder") is target


def test_resolve_ambiguous_display_name_lists_both_by_usable_name() -> None:
    first = _entry("llama_a", display_name="Llama")
    second = _entry("llama_b", display_name="Llama")
    index = _index(first, second)

    with pytest.raises(AmbiguousName) as caught:
        index.resolve("Llama")

    assert caught.value.candidates == ["llama_a", "llama_b"]
    assert [index.resolve(c) for c in caught.value.candidates] == [first, second]


def test_resolve_ambiguous_loose_match_lists_both_candidates() -> None:
    dotted = _entry("qwen2.5-vl_7b")
    packed = _entry("qwen25vl_7b")

    with pytest.raises(AmbiguousName) as caught:
        _index(dotted, packed).resolve("QWEN25VL 7B")

    assert caught.value.candidates == ["qwen2.5-vl 7b", "qwen25vl 7b"]
    assert "matches several models" in str(caught.value)


def test_resolve_unknown_name_suggests_close_display_names() -> None:
    with pytest.raises(EntryNotFound) as caught:
        _index().resolve("lama 12.2b")

    assert caught.value.suggestions == ["llama 12.2b (Q4 K M)"]
    assert "did you mean" in str(caught.value)


def test_resolve_fragment_suggests_the_names_containing_it() -> None:
    gemma = _entry("gemma3_270m", quantization="q4_k_m")
    smol = _entry("smollm2_135m", quantization="q4_1")

    with pytest.raises(EntryNotFound) as caught:
        _index(gemma, smol).resolve("gemma")

    assert caught.value.suggestions == ["gemma3 270m (Q4 K M)"]


def test_resolve_unknown_name_suggests_at_most_five_distinct_entries() -> None:
    entries = [_entry(f"model_{n}b") for n in range(1, 9)]

    with pytest.raises(EntryNotFound) as caught:
        _index(*entries).resolve("model 3")

    assert len(caught.value.suggestions) == 5
    assert len(set(caught.value.suggestions)) == 5
    assert caught.value.suggestions[0] == "model 3b"


def test_resolve_nothing_close_gives_no_suggestions() -> None:
    with pytest.raises(EntryNotFound) as caught:
        _index().resolve("stable-diffusion-xl")

    assert caught.value.suggestions == []


@pytest.mark.parametrize("requested", ["", "   ", "--", "(-)"])
def test_resolve_blank_or_punctuation_only_request_is_not_found(requested: str) -> None:
    # The alias normalises to "", which must not make it a loose match for every such request.
    punctuated = _entry("odd", model_aliases=["()"])

    with pytest.raises(EntryNotFound):
        _index(punctuated).resolve(requested)


def test_resolve_punctuation_only_alias_still_matches_exactly() -> None:
    punctuated = _entry("odd", model_aliases=["()"])

    assert _index(punctuated).resolve("()") is punctuated


def test_name_index_is_independent_of_input_order() -> None:
    entries = [
        LLAMA,
        QWEN,
        MISTRAL,
        GEMMA,
        _entry("qwen2.5-vl_7b"),
        _entry("qwen25vl_7b"),
        _entry("llama_a", display_name="Llama"),
        _entry("llama_b", display_name="Llama"),
    ]
    requests = ["LLAMA 12.2B (q4_k_m)", "QWEN25VL 7B", "Llama", "qwen", "lama", "gemma 3"]

    def outcomes(index: NameIndex) -> list[object]:
        results: list[object] = []
        for requested in requests:
            try:
                results.append(index.resolve(requested).name)
            except (AmbiguousName, EntryNotFound) as error:
                results.append(str(error))
        return results

    reference = NameIndex(entries)
    shuffler = random.Random(7)
    for _ in range(10):
        shuffled = entries[:]
        shuffler.shuffle(shuffled)
        index = NameIndex(shuffled)
        assert [e.name for e in index.entries] == [e.name for e in reference.entries]
        assert outcomes(index) == outcomes(reference)


def test_name_index_entries_sorted_and_get_by_exact_name() -> None:
    index = NameIndex([QWEN, MISTRAL, LLAMA])

    assert [e.name for e in index.entries] == sorted(e.name for e in (QWEN, MISTRAL, LLAMA))
    assert len(index) == 3
    assert index.get("qwen3_8b_(Q4_K_M)") is QWEN
    assert index.get("qwen3 8b (Q4 K M)") is None  # display names are resolve()'s job
