"""The registry entry: one model the proxy and the loader know about.

The field set is the one the original ImageWorks registry files use, so those files load as they
are. Every model allows extra fields and serialisation writes only the fields a file set (plus
those changed since), so a load followed by a save leaves unknown and untouched data exactly as it
was.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from imageworks.registry.capabilities import (
    canonical_capabilities,
    capability_state,
    clean_capabilities,
)

# Backends the proxy knows how to reach. Other values load fine (the original used `lmdeploy`,
# `triton`, `gguf`, `unassigned`); the proxy refuses to route them with a clear error.
KNOWN_BACKENDS = ("vllm", "llamacpp", "ollama", "external")

_ABSENT_IDS = {"", "none", "null"}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=(), validate_assignment=True)


class BackendConfig(_Section):
    host: str | None = None
    port: int = 0  # 0 means "the backend's default port"
    base_url: str | None = None
    model_path: str = ""
    # Intent for managed servers; each launcher turns these into its own flags (llama-server:
    # --ctx-size/--parallel, llama-cpp-python: --n_ctx, vLLM: --max-model-len/--max-num-seqs).
    context_length: int | None = Field(default=None, gt=0)  # tokens one request may use
    parallel: int | None = Field(default=None, gt=0)  # requests served at the same time
    # How an embedding entry pools token vectors into one (llama-server --pooling, vLLM
    # --pooler-config); unset: the model's own.
    pooling: Literal["mean", "cls", "last"] | None = None
    extra_args: list[str] = Field(default_factory=list)  # passed raw, after ours; they win
    # A remote that wants a key (another node running this proxy, a vLLM router): the NAME of an
    # environment variable of the proxy's process, whose value is sent as `Authorization:
    # Bearer <value>`. The registry holds only the name, so listings never show a key.
    api_key_env: str | None = None
    # This entry's own limits, over CHAT_PROXY_BACKEND_TIMEOUT_MS (a whole answer, a stream's
    # headers), CHAT_PROXY_STREAM_IDLE_TIMEOUT_MS (silence inside a stream) and the connect
    # timeout (the backend timeout too): a remote across a network wants other limits than a
    # model on this box.
    request_timeout_s: float | None = Field(default=None, gt=0)
    stream_idle_timeout_s: float | None = Field(default=None, gt=0)
    connect_timeout_s: float | None = Field(default=None, gt=0)
    # How often a remote entry's health is checked, over CHAT_PROXY_INSTALLED_REFRESH_S.
    health_check_interval_s: float | None = Field(default=None, gt=0)

    @field_validator("api_key_env", mode="before")
    @classmethod
    def _variable_name(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().removeprefix("$") or None
            if value is not None and not _ENV_NAME.fullmatch(value):
                raise ValueError(
                    "must be the name of an environment variable (letters, digits and _), "
                    "not the key itself"
                )
        return value

    @field_validator("host", "base_url", mode="before")
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        if isinstance(value, str):
            return value.strip() or None
        return value

    @field_validator("port", mode="before")
    @classmethod
    def _null_port_is_default(cls, value: object) -> object:
        return 0 if value is None or value == "" else value

    @field_validator("extra_args", mode="before")
    @classmethod
    def _null_args_are_empty(cls, value: object) -> object:
        return [] if value is None else value


class ChatTemplate(_Section):
    source: str = "embedded"  # embedded | external | extracted
    path: str | None = None  # a template file
    name: str | None = None  # a template built into llama.cpp, e.g. `gemma` or `chatml`
    sha256: str | None = None

    @field_validator("name", mode="before")
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        if isinstance(value, str):
            return value.strip() or None
        return value

    @model_validator(mode="after")
    def _one_template(self) -> ChatTemplate:
        if self.name is not None and self.path is not None:
            raise ValueError("set chat_template.name or chat_template.path, not both")
        return self


class GenerationDefaults(_Section):
    max_tokens: int | None = None
    min_tokens: int | None = None
    top_k: int | None = None
    context_window: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    stop_sequences: list[str] | None = None


class VersionLock(_Section):
    locked: bool = False
    expected_aggregate_sha256: str | None = None
    last_verified: str | None = None


class ArtifactFile(_Section):
    path: str
    sha256: str


class Artifacts(_Section):
    aggregate_sha256: str = ""
    files: list[ArtifactFile] = Field(default_factory=list)


class RegistryEntry(_Section):
    name: str
    backend: str
    display_name: str | None = None
    backend_config: BackendConfig = Field(default_factory=BackendConfig)
    served_model_id: str | None = None
    model_aliases: list[str] = Field(default_factory=list)
    capabilities: dict[str, bool] = Field(default_factory=dict)
    chat_template: ChatTemplate = Field(default_factory=ChatTemplate)
    generation_defaults: GenerationDefaults = Field(default_factory=GenerationDefaults)
    quantization: str | None = None
    family: str | None = None
    download_path: str | None = None
    download_format: str | None = None
    download_size_bytes: int | None = None
    download_files: list[str] = Field(default_factory=list)
    version_lock: VersionLock = Field(default_factory=VersionLock)
    artifacts: Artifacts = Field(default_factory=Artifacts)
    roles: list[str] = Field(default_factory=list)
    deprecated: bool = False
    ttl_s: float | None = Field(default=None, gt=0)  # release the GPU after this long unused
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name", "backend")
    @classmethod
    def _required_text(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must not be empty")
        return value

    @field_validator("backend")
    @classmethod
    def _backend_lower(cls, value: str) -> str:
        return value.lower()

    @field_validator("display_name", "served_model_id", "quantization", "family", mode="before")
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        if isinstance(value, str):
            return value.strip() or None
        return value

    @field_validator("capabilities", mode="before")
    @classmethod
    def _clean_capabilities(cls, value: object) -> object:
        if value is None:
            return {}
        if isinstance(value, dict):
            return clean_capabilities(value)
        return value

    @field_validator(
        "backend_config",
        "chat_template",
        "generation_defaults",
        "version_lock",
        "artifacts",
        mode="before",
    )
    @classmethod
    def _null_section_is_default(cls, value: object) -> object:
        return {} if value is None else value

    @field_validator("model_aliases", "download_files", "roles", mode="before")
    @classmethod
    def _null_list_is_empty(cls, value: object) -> object:
        return [] if value is None else value

    @field_validator("metadata", mode="before")
    @classmethod
    def _null_metadata_is_empty(cls, value: object) -> object:
        return {} if value is None else value

    # -- derived views -------------------------------------------------------------------------

    @property
    def served_id(self) -> str | None:
        """The backend-native model id, if the entry has a real one.

        Original registry files contain the literal string "None"; it means absent."""
        value = self.served_model_id
        if value is None or value.lower() in _ABSENT_IDS:
            return None
        return value

    @property
    def upstream_model_id(self) -> str:
        """The `model` value a backend expects: the served id, else the logical name."""
        return self.served_id or self.name

    def capability(self, name: str) -> bool | None:
        """True/False if the entry declares it (under any synonym), None if it says nothing."""
        return capability_state(self.capabilities, name)

    @property
    def declared_capabilities(self) -> dict[str, bool]:
        return canonical_capabilities(self.capabilities)

    def to_json(self) -> dict[str, Any]:
        """The entry as registry-file JSON: only fields that were given or changed."""
        return self.model_dump(mode="json", exclude_unset=True)
