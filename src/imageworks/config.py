"""Settings shared by the registry and the loader CLI, read once from the environment.

The chat proxy's own `CHAT_PROXY_*` settings live in `imageworks.chat_proxy.config`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class RegistrySettings(BaseSettings):
    """`IMAGEWORKS_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="IMAGEWORKS_", extra="ignore")

    registry_dir: Path = Field(
        default=Path("configs"), description="Directory holding the registry layer files."
    )
    ollama_host: str = Field(
        default="http://127.0.0.1:11434",
        description="Ollama used for entries whose backend_config names no host.",
    )
    weights_dir: Path | None = Field(
        default=None,
        description="Directory `imageworks-loader discover` scans for model weights by default.",
    )
    installed_check_timeout_s: float = Field(
        default=1.5,
        gt=0,
        description="How long a listing waits for a backend to say which models it serves.",
    )

    @field_validator("weights_dir", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value
