"""The OpenAPI document the proxy serves at `GET /v1/openapi.json`, written out deliberately.

The chat route reads its own body (size limit, disconnects), so a framework could not see what
it accepts: the request schema here is the typed request's own (`requests.py`), the error
envelope is the one every error has, and a streamed answer is `text/event-stream`. Every route
the app serves is described here and nothing else (a test holds the two together).
"""

from __future__ import annotations

from typing import Any

from imageworks.chat_proxy.endpoint_requests import (
    CompletionRequest,
    EmbeddingRequest,
    ResponsesRequest,
)
from imageworks.chat_proxy.requests import ChatCompletionRequest

_REF = "#/components/schemas/{model}"
JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": _ref(name)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    said = {
        400: "A malformed request: `param` names the field and the message what was expected",
        404: "No such model (the message lists close names) or endpoint",
        413: "The body is beyond CHAT_PROXY_MAX_BODY_BYTES (the connection is closed), or an "
        "image beyond CHAT_PROXY_MAX_IMAGE_BYTES",
        502: "The backend failed or answered something that is not OpenAI's",
        503: "The backend cannot be reached or started, or the GPU slot was not free in time "
        "(with Retry-After)",
        504: "The backend said nothing within the configured time",
        401: "CHAT_PROXY_API_KEYS is set and the bearer key is missing or wrong",
        403: "A Host name not served on this bind, a foreign Origin on a request that changes "
        "something, or a user key on an admin endpoint (CHAT_PROXY_ADMIN_KEY)",
        415: "An admin request that changes something without Content-Type: application/json",
    }
    return {str(status): _json("ErrorResponse", said[status]) for status in statuses}


_OBJECT: dict[str, Any] = {"type": "object", "additionalProperties": True}
_NULLABLE_STRING: dict[str, Any] = {"type": ["string", "null"]}

_SCHEMAS: dict[str, Any] = {
    "ErrorResponse": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": _NULLABLE_STRING,
                    "code": _NULLABLE_STRING,
                },
            }
        },
    },
    "ChatCompletion": {
        "type": "object",
        "description": "The backend's answer, with tool calls and think tags normalized.",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "chat.completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "message", "finish_reason"],
                    "properties": {
                        "index": {"type": "integer"},
                        "message": _ref("AssistantAnswer"),
                        "logprobs": {"type": ["object", "null"]},
                        "finish_reason": _NULLABLE_STRING,
                    },
                },
            },
            "usage": _ref("Usage"),
        },
    },
    "AssistantAnswer": {
        "type": "object",
        "properties": {
            "role": {"const": "assistant"},
            "content": _NULLABLE_STRING,
            "refusal": _NULLABLE_STRING,
            "reasoning_content": _NULLABLE_STRING,
            "tool_calls": {"type": "array", "items": _ref("ToolCall")},
        },
    },
    "ChatCompletionChunk": {
        "type": "object",
        "description": "One event of a streamed answer (`data: <chunk>`); the stream ends with "
        '`data: [DONE]`, or with `data: {"error": ...}` and `data: [DONE]` when it fails '
        "after it began.",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "chat.completion.chunk"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "index": {"type": "integer"},
                        "delta": _OBJECT,
                        "finish_reason": _NULLABLE_STRING,
                    },
                },
            },
            "usage": {"anyOf": [_ref("Usage"), {"type": "null"}]},
        },
    },
    "Completion": {
        "type": "object",
        "description": "A prompt's completion; a streamed one is a series of these, each "
        "`data: <Completion>` with the text's next piece, then `data: [DONE]`.",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "text_completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "text"],
                    "properties": {
                        "index": {"type": "integer"},
                        "text": {"type": "string"},
                        "logprobs": {"type": ["object", "null"]},
                        "finish_reason": _NULLABLE_STRING,
                    },
                },
            },
            "usage": {"anyOf": [_ref("Usage"), {"type": "null"}]},
        },
    },
    "EmbeddingList": {
        "type": "object",
        "required": ["object", "data", "model"],
        "properties": {
            "object": {"const": "list"},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["object", "index", "embedding"],
                    "properties": {
                        "object": {"const": "embedding"},
                        "index": {"type": "integer"},
                        "embedding": {
                            "anyOf": [
                                {"type": "array", "items": {"type": "number"}},
                                {"type": "string", "description": "base64 float32s"},
                            ]
                        },
                    },
                },
            },
            "model": {"type": "string"},
            "usage": {
                "type": "object",
                "properties": {
                    "prompt_tokens": {"type": "integer"},
                    "total_tokens": {"type": "integer"},
                },
            },
        },
    },
    "Response": {
        **_OBJECT,
        "description": "The backend's Responses API object (`object: response`, `output`, "
        "`usage`), as it sent it.",
        "required": ["id", "object"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "response"},
            "status": {"type": "string"},
            "model": {"type": "string"},
            "output": {"type": "array", "items": _OBJECT},
            "usage": _OBJECT,
        },
    },
    "Usage": {
        "type": "object",
        "properties": {
            "prompt_tokens": {"type": "integer"},
            "completion_tokens": {"type": "integer"},
            "total_tokens": {"type": "integer"},
        },
    },
    "Model": {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {
            "id": {"type": "string", "description": "The display name to request"},
            "object": {"const": "model"},
            "created": {"type": "integer", "description": "Unix seconds (downloaded, or edited)"},
            "owned_by": {"type": "string"},
            "extensions": _OBJECT,
            "status": {
                "type": "object",
                "description": "Is it warm? In llama.cpp's router shape (see the README)",
                "required": ["value"],
                "properties": {
                    "value": {"enum": ["unloaded", "loading", "loaded"]},
                    "step": {"type": "string", "description": "How far a load has got"},
                    "failed": {"const": True},
                    "error": {"type": "string", "description": "Why the last start failed"},
                },
            },
        },
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"const": "ok"},
            "uptime_s": {"type": "number"},
            "registry_entries": {"type": ["integer", "null"]},
            "active_backend": _NULLABLE_STRING,
            "slot": _OBJECT,
        },
    },
    "Metrics": {**_OBJECT, "description": "Rolling per-model metrics and the GPU slot."},
    "AdminStatus": {
        "type": "object",
        "properties": {
            "slot": _OBJECT,
            "state_file": {
                "anyOf": [_OBJECT, {"type": "null"}],
                "description": "The managed model process on record",
            },
        },
    },
    "Reloaded": {
        "type": "object",
        "required": ["entries", "listed", "warnings"],
        "properties": {
            "entries": {"type": "integer"},
            "listed": {"type": "integer", "description": "of them, in /v1/models"},
            "warnings": {"type": "array", "items": {"type": "string"}},
        },
    },
    "Restarting": {
        "type": "object",
        "required": ["restarting", "mode"],
        "properties": {"restarting": {"const": True}, "mode": {"enum": ["exec", "exit"]}},
    },
    "Overview": {
        "type": "object",
        "required": ["proxy", "models", "slot", "requests"],
        "properties": {
            "proxy": {**_OBJECT, "description": "version, boot_id (new on every start), pid"},
            "models": {"type": "array", "items": _OBJECT},
            "slot": {**_OBJECT, "description": "holder, activity and since when, last swaps"},
            "requests": {**_OBJECT, "description": "in flight, recent, a 10 s series"},
        },
    },
    "ActivateRequest": {
        "type": "object",
        "required": ["model"],
        "properties": {"model": {"type": "string"}},
    },
}


def _chat_completions() -> dict[str, Any]:
    return {
        "post": {
            "summary": "Create a chat completion",
            "description": "Forwarded to the registry entry's backend with `model` rewritten "
            "to its served id. Fields not in the schema are forwarded as sent.",
            "operationId": "createChatCompletion",
            "requestBody": {
                "required": True,
                "content": {JSON: {"schema": _ref("ChatCompletionRequest")}},
            },
            "responses": {
                "200": {
                    "description": "The answer, or with `stream: true` its events as they come "
                    "(`: loading` comments first while the model loads)",
                    "content": {
                        JSON: {"schema": _ref("ChatCompletion")},
                        "text/event-stream": {
                            "schema": {
                                "type": "string",
                                "description": "Server-sent events, each `data: "
                                "<ChatCompletionChunk>`, then `data: [DONE]`",
                            },
                            "x-event-data": _ref("ChatCompletionChunk"),
                        },
                    },
                },
                **_errors(400, 404, 413, 502, 503, 504),
            },
        }
    }


def _model_post(
    summary: str,
    operation: str,
    request: str,
    answer: str,
    events: str | None,
    description: str,
) -> dict[str, Any]:
    """A model endpoint's POST: routed by `model`, errors as chat's, a stream if `events`."""
    content: dict[str, Any] = {JSON: {"schema": _ref(answer)}}
    if events is not None:
        content["text/event-stream"] = {
            "schema": {"type": "string", "description": events},
            "x-event-data": _ref(answer),
        }
    return {
        "post": {
            "summary": summary,
            "description": description + " Fields not in the schema are forwarded as sent. A "
            "model whose backend lacks this endpoint is a 400 `unsupported_endpoint` naming "
            "the endpoints it has.",
            "operationId": operation,
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref(request)}}},
            "responses": {
                "200": {"description": "The answer", "content": content},
                **_errors(400, 404, 413, 502, 503, 504),
            },
        }
    }


def _post(summary: str, operation: str, ok: dict[str, Any], *errors: int) -> dict[str, Any]:
    return {"post": _get(summary, operation, ok, *errors)["get"]}


def _get(summary: str, operation: str, ok: dict[str, Any], *errors: int) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "operationId": operation,
            "responses": {"200": ok, **_errors(*errors)},
        }
    }


def openapi_document(version: str) -> dict[str, Any]:
    """The document: OpenAPI 3.1, whose schemas are JSON Schema 2020-12 as pydantic writes it."""
    schemas: dict[str, Any] = {}
    for model in (ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ResponsesRequest):
        request = model.model_json_schema(by_alias=True, ref_template=_REF)
        schemas.update(request.pop("$defs", {}))
        schemas[model.__name__] = request
    schemas.update(_SCHEMAS)
    admin_status = _json("AdminStatus", "The GPU slot and the state file")
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "ImageWorks Chat Proxy",
            "version": version,
            "description": "One OpenAI-compatible endpoint for the local models of a registry. "
            'Every error is `{"error": {"message", "type", "param", "code"}}`.',
        },
        "paths": {
            "/v1/health": _get("The proxy's own readiness", "health", _json("Health", "Ready")),
            "/v1/models": _get(
                "The models to request, by display name",
                "listModels",
                _json("ModelList", "The installed, non-deprecated entries"),
                503,
            ),
            "/v1/models/{model_id}": {
                "get": {
                    "summary": "One model of the list, by its id (URL-encoded)",
                    "operationId": "retrieveModel",
                    "parameters": [
                        {
                            "name": "model_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {"200": _json("Model", "The model"), **_errors(404, 503)},
                }
            },
            "/v1/chat/completions": _chat_completions(),
            "/v1/completions": _model_post(
                "Complete a prompt (the legacy completions API)",
                "createCompletion",
                "CompletionRequest",
                "Completion",
                "Server-sent events, each `data: <Completion>`, then `data: [DONE]` (`: loading`"
                ' comments first while the model loads; `data: {"error": ...}` and `[DONE]` if '
                "it fails after it began)",
                "Forwarded to the entry's backend with `model` rewritten to its served id; the "
                "entry's generation defaults fill what the request leaves unset.",
            ),
            "/v1/embeddings": _model_post(
                "Embed one text or several",
                "createEmbedding",
                "EmbeddingRequest",
                "EmbeddingList",
                None,
                "For entries with the `embedding` role or capability; `encoding_format` "
                "`base64` is passed to the backend.",
            ),
            "/v1/responses": _model_post(
                "Create a response (the Responses API, stateless)",
                "createResponse",
                "ResponsesRequest",
                "Response",
                "Typed server-sent events (`event: response.output_text.delta` ...) relayed "
                "byte for byte, ending with `response.completed`; an `event: error` (type, "
                "code, message, param, sequence_number) if it fails after it began",
                "Relayed to a backend that has it (llama-server, vLLM, Ollama, external "
                "servers) as it answers.",
            ),
            "/v1/metrics": _get(
                "Rolling metrics (CHAT_PROXY_ENABLE_METRICS=1)",
                "metrics",
                _json("Metrics", "The metrics"),
                404,
            ),
            "/v1/admin/status": _get("The GPU slot", "adminStatus", admin_status),
            "/v1/admin/activate": {
                "post": {
                    "summary": "Load a model now, and answer once it is ready",
                    "operationId": "adminActivate",
                    "requestBody": {
                        "required": True,
                        "content": {JSON: {"schema": _ref("ActivateRequest")}},
                    },
                    "responses": {"200": admin_status, **_errors(400, 404, 413, 503)},
                }
            },
            "/v1/admin/stop": {
                "post": {
                    "summary": "Stop the model holding the GPU once its requests have finished",
                    "operationId": "adminStop",
                    "responses": {"200": admin_status, **_errors(503)},
                }
            },
            "/v1/admin/reload": _post(
                "Re-read the registry now",
                "adminReload",
                _json("Reloaded", "What was read: entries, listed models, warnings"),
                503,
            ),
            "/v1/admin/restart": {
                "post": {
                    "summary": "Drain, stop the model and start the proxy afresh "
                    "(CHAT_PROXY_RESTART_MODE: exec, or exit for Docker/systemd)",
                    "operationId": "adminRestart",
                    "responses": {
                        "202": _json("Restarting", "The restart has begun"),
                        **_errors(503),
                    },
                }
            },
            "/v1/admin/overview": _get(
                "Everything the dashboard at /ui shows: models, GPU slot, recent requests",
                "adminOverview",
                _json("Overview", "The overview"),
            ),
            "/v1/openapi.json": _get(
                "This document",
                "openapi",
                {"description": "OpenAPI 3.1", "content": {JSON: {"schema": _OBJECT}}},
            ),
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Only when CHAT_PROXY_API_KEYS (or CHAT_PROXY_ADMIN_KEY) is set",
                }
            },
        },
    }
    _add_access_errors(document["paths"])
    return document


def _add_access_errors(paths: dict[str, Any]) -> None:
    """What the access guard answers before any route runs (`guard.py`): every path but health
    may need a key and a served Host; admin changes need JSON."""
    for path, operations in paths.items():
        if path == "/v1/health":
            continue
        for method, operation in operations.items():
            statuses = [401, 403] + (
                [415] if path.startswith("/v1/admin/") and method == "post" else []
            )
            operation["responses"].update(_errors(*statuses))
            operation["security"] = [{}, {"bearer": []}]
