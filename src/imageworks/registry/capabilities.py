"""Capability names and their synonyms.

Registry files written over the years spell the same capability many ways (`vl`, `multimodal`,
`function_calling`, ...). Entries keep the keys they were given; everything that asks "can this
model do X?" goes through :func:`capability_state`, which folds the synonyms into one answer.
"""

from __future__ import annotations

from collections.abc import Mapping

# Canonical capability -> every key that means it (the canonical key included).
CAPABILITY_SYNONYMS: Mapping[str, frozenset[str]] = {
    "text": frozenset({"text", "language", "chat"}),
    "vision": frozenset({"vision", "visual", "multimodal", "mm", "image", "vl"}),
    "audio": frozenset({"audio", "speech", "voice", "asr", "tts"}),
    "embedding": frozenset({"embedding", "embed", "text-embedding", "representation"}),
    "tools": frozenset(
        {
            "tools",
            "tool_use",
            "tool-use",
            "tool_call",
            "tool-call",
            "toolcalls",
            "tool_calls",
            "toolchoice",
            "tool_choice",
            "function_call",
            "function-call",
            "function_calls",
            "function_calling",
            "function-calling",
            "function_tools",
            "functioncalling",
            "toolcalling",
            "auto_tool_choice",
        }
    ),
    "thinking": frozenset(
        {
            "thinking",
            "reasoning",
            "reason",
            "think",
            "chain_of_thought",
            "cot",
            "reasoner",
            "o1",
            "o3",
            "r1",
            "deepseek",
        }
    ),
}
# "reasoning" and "thinking" are one capability under two names.
CAPABILITY_SYNONYMS = {**CAPABILITY_SYNONYMS, "reasoning": CAPABILITY_SYNONYMS["thinking"]}

CANONICAL_CAPABILITIES: tuple[str, ...] = tuple(CAPABILITY_SYNONYMS)


def coerce_flag(value: object) -> bool:
    """Read a capability flag the way registry files write them (bools, 0/1, "yes"/"no")."""
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "on", "y"}
    return bool(value)


def clean_capabilities(raw: Mapping[str, object]) -> dict[str, bool]:
    """Lower-case the keys and coerce the values to bools, keeping every key given."""
    return {str(key).strip().lower(): coerce_flag(value) for key, value in raw.items()}


def capability_state(capabilities: Mapping[str, bool], name: str) -> bool | None:
    """True if any synonym of `name` is set, False if synonyms are present but all false,
    None if the entry says nothing about it. Text is assumed unless explicitly denied."""
    synonyms = CAPABILITY_SYNONYMS.get(name, frozenset({name}))
    present = [capabilities[key] for key in sorted(synonyms) if key in capabilities]
    if any(present):
        return True
    if present:
        return False
    return True if name == "text" else None


def canonical_capabilities(capabilities: Mapping[str, bool]) -> dict[str, bool]:
    """The canonical capabilities the entry positively or negatively declares."""
    result: dict[str, bool] = {}
    for name in CANONICAL_CAPABILITIES:
        state = capability_state(capabilities, name)
        if state is not None:
            result[name] = state
    return result
