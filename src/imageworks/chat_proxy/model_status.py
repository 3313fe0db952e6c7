"""Whether a model is warm: the `status` object of every `/models` and `/v1/models` item, in
llama.cpp's router shape (`{"value": "unloaded" | "loading" | "loaded", "failed": true, ...}`).

One pure function decides it for both listings, from what the proxy knows without asking
anyone: the GPU slot (`SlotView`) and the catalog's installed state.

- An entry the proxy starts (llama.cpp; vLLM with single-port orchestration) holds the slot
  under its own name: `loading` while the slot starts it (with the step it has reached),
  `loaded` while it serves, `unloaded` otherwise (a model being stopped is on its way out, as
  llama.cpp says of a stopping child). Its last failed start shows as `failed: true` with the
  reason, until it is loaded again.
- An Ollama entry is `loaded` while its Ollama holds the slot: the proxy gave the GPU to that
  Ollama, so a request for it starts no swap (which model Ollama keeps in memory is Ollama's
  business, and asking it on every listing would make reads do I/O).
- Any other entry is someone else's server: the proxy never starts or stops it, so it is
  `loaded` when the catalog last found it serving (installed "yes"); any other state ("no",
  "unknown", "unreachable") means it cannot answer now: `unloaded` and `failed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imageworks.backends.external import external_target
from imageworks.backends.slot import Phase
from imageworks.backends.slot_report import SlotView
from imageworks.registry.installed import Installed
from imageworks.registry.schema import RegistryEntry

UNLOADED = "unloaded"
LOADING = "loading"
LOADED = "loaded"

IDLE = SlotView()
# Why a server the proxy does not start cannot answer, by its installed state.
_DOWN = {
    "no": "its backend does not serve this model",
    "unknown": "its backend did not answer whether it serves this model",
    "unreachable": "its server cannot be reached",
}


@dataclass(frozen=True, slots=True)
class StatusRules:
    """Which entries the proxy starts, and where Ollama entries live."""

    vllm_single_port: bool
    ollama_host: str
    loopback_alias: str | None


def is_managed(entry: RegistryEntry, rules: StatusRules) -> bool:
    """The proxy starts and stops this entry's server (the rule `BackendRouter` routes by)."""
    return entry.backend == "llamacpp" or (entry.backend == "vllm" and rules.vllm_single_port)


def holder_name(entry: RegistryEntry, rules: StatusRules) -> str | None:
    """How the slot names the holder that serves `entry` (`str` of its key), or None when no
    holder does (an external server)."""
    if is_managed(entry, rules):
        return entry.name
    if entry.backend == "ollama":
        target = external_target(entry, rules.ollama_host, rules.loopback_alias)
        return f"@ollama {target.base_url.removesuffix('/v1')}"  # managed.OllamaKey's name
    return None


def entry_status(
    entry: RegistryEntry, installed: Installed, rules: StatusRules, slot: SlotView = IDLE
) -> dict[str, Any]:
    """The `status` object of `entry`'s listed model."""
    if is_managed(entry, rules):
        if slot.holder == entry.name and slot.phase is Phase.STARTING:
            return {"value": LOADING, "step": slot.step or "starting"}
        if slot.holder == entry.name and slot.phase is Phase.READY:
            return {"value": LOADED}
        failure = slot.failures.get(entry.name)
        if failure is not None:
            return {"value": UNLOADED, "failed": True, "error": failure}
        return {"value": UNLOADED}
    if installed is not Installed.YES:
        why = _DOWN.get(installed.value, f"its backend's state is {installed.value!r}")
        return {"value": UNLOADED, "failed": True, "error": why}
    if entry.backend == "ollama":
        name = holder_name(entry, rules)
        if slot.holder == name and slot.phase is Phase.STARTING:
            return {"value": LOADING, "step": slot.step or "starting"}
        if slot.holder == name and slot.phase is Phase.READY:
            return {"value": LOADED}
        failure = slot.failures.get(name) if name is not None else None
        if failure is not None:
            return {"value": UNLOADED, "failed": True, "error": failure}
        return {"value": UNLOADED}
    return {"value": LOADED}
