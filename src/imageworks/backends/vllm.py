"""vLLM's OpenAI server, started by the GPU slot on the single managed port."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from imageworks.backends.argv import Flag, merge_args
from imageworks.backends.base import BackendNotReady, Dialect
from imageworks.backends.endpoints import is_embedding_entry
from imageworks.backends.llamacpp import log_file_name
from imageworks.backends.supervisor import LaunchSpec
from imageworks.registry.paths import resolve_local_path, weights_path
from imageworks.registry.schema import RegistryEntry

DEFAULT_LAUNCHER = (sys.executable, "-m", "vllm.entrypoints.openai.api_server")
# Eager mode skips CUDA-graph capture, the step that most often crashes vLLM at start (a driver
# or a kernel that does not suit the GPU); it costs some decoding speed.
SAFE_MODE_ARGS = ("--enforce-eager",)
CRASH_HINT = (
    "vLLM crashed while loading even with --enforce-eager: its log says why; a lower "
    "CHAT_PROXY_VLLM_GPU_MEMORY_UTILIZATION or CHAT_PROXY_VLLM_MAX_MODEL_LEN, or another vLLM "
    "build (CHAT_PROXY_VLLM_LAUNCHER), may start"
)


def vllm_argv(
    entry: RegistryEntry,
    *,
    registry_dir: Path,
    host: str,
    port: int,
    gpu_memory_utilization: float,
    max_model_len: int | None,  # overrides the entry's backend_config.context_length
    launcher: Sequence[str] = DEFAULT_LAUNCHER,
) -> list[str]:
    model = weights_path(entry, registry_dir)
    if model is None or not model.exists():
        where = f" at {model}" if model else ""
        raise BackendNotReady(f"{entry.name}: model weights not found{where}")
    defaults: list[Flag] = [
        ("--model", str(model)),
        ("--served-model-name", entry.upstream_model_id),
        ("--host", host),
        ("--port", str(port)),
        ("--gpu-memory-utilization", f"{gpu_memory_utilization:g}"),
    ]
    config = entry.backend_config
    # CHAT_PROXY_VLLM_MAX_MODEL_LEN is the runbook's override: it beats the entry's intent.
    context = max_model_len if max_model_len is not None else config.context_length
    if context is not None:
        defaults.append(("--max-model-len", str(context)))
    if config.parallel is not None:
        defaults.append(("--max-num-seqs", str(config.parallel)))
    template = resolve_local_path(entry.chat_template.path, registry_dir)
    if template is not None:
        defaults.append(("--chat-template", str(template)))
    # chat_template.name is llama.cpp's (vLLM has no built-in templates); the weights' is used.
    if is_embedding_entry(entry):
        # A pooling runner serves /v1/embeddings (a generative architecture is converted).
        defaults.append(("--runner", "pooling"))
        if config.pooling is not None:
            pooler = json.dumps({"pooling_type": config.pooling.upper()})
            defaults.append(("--pooler-config", pooler))
    return [*launcher, *merge_args(defaults, config.extra_args)]


def vllm_launch(
    entry: RegistryEntry,
    *,
    registry_dir: Path,
    port: int,
    log_dir: Path,
    gpu_memory_utilization: float,
    max_model_len: int | None,
    launcher: Sequence[str] = DEFAULT_LAUNCHER,
) -> LaunchSpec:
    host = "127.0.0.1"
    argv = vllm_argv(
        entry,
        registry_dir=registry_dir,
        host=host,
        port=port,
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
        launcher=launcher,
    )
    return LaunchSpec(
        name=entry.name,
        argv=tuple(argv),
        port=port,
        host=host,
        log_path=log_dir / "vllm" / log_file_name(entry),
        # vLLM forks workers; forkserver avoids CUDA-after-fork failures in them.
        env={"VLLM_WORKER_MULTIPROC_START_METHOD": "forkserver"},
        dialect=Dialect.VLLM,
        safe_mode_args=SAFE_MODE_ARGS,
        crash_hint=CRASH_HINT,
    )
