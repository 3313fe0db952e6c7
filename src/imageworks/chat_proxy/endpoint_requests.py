"""The requests of the other model endpoints, typed as lightly as exactly: `/v1/completions`,
`/v1/embeddings` and `/v1/responses`.

Each declares what the proxy needs (`model`, the input, `stream`) and the common fields whose
types OpenAI fixes; everything else a client sends is kept and forwarded as sent, as for chat
(`requests.WireModel`). Errors name the field as the chat request's do (`requests.invalid_request`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, TypeAdapter

from imageworks.chat_proxy.requests import (
    Count,
    Name,
    Penalty,
    Probability,
    Stop,
    StreamOptions,
    Temperature,
    WireModel,
    _one_of,
    replace,
)

Token = Annotated[int, Field(ge=0)]
_TEXT_SHAPES = "a string, an array of strings, an array of token ids or an array of token arrays"


def _text_shape(value: Any) -> str | None:
    """Which of the four shapes OpenAI takes a prompt (or embedding input) in: an array is
    told by its first item, so `["a", 1]` is an array of strings whose item 1 is wrong."""
    if isinstance(value, str):
        return "text:string"
    if not isinstance(value, list):
        return None
    first = value[0] if value else ""
    if isinstance(first, list):
        return "text:token_arrays"
    if isinstance(first, int) and not isinstance(first, bool):
        return "text:tokens"
    return "text:strings"


# A prompt, or the input to embed: one text or several, as text or as token ids.
TextInput = Annotated[
    Annotated[str, Tag("text:string")]
    | Annotated[list[str], Tag("text:strings"), Field(min_length=1)]
    | Annotated[list[Token], Tag("text:tokens"), Field(min_length=1)]
    | Annotated[list[Annotated[list[Token], Field(min_length=1)]], Tag("text:token_arrays")],
    Discriminator(_text_shape, custom_error_type="invalid_type", custom_error_message=_TEXT_SHAPES),
]


class CompletionRequest(WireModel):
    """POST /v1/completions (legacy prompt completion)."""

    model: Name
    prompt: TextInput
    best_of: Count | None = None
    echo: bool | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    n: Count | None = None
    presence_penalty: Penalty | None = None
    seed: int | None = None
    stop: Stop | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    user: str | None = None


class EmbeddingRequest(WireModel):
    """POST /v1/embeddings. Never streamed."""

    model: Name
    input: TextInput
    dimensions: Count | None = None
    encoding_format: Literal["float", "base64"] | None = None
    user: str | None = None

    @property
    def stream(self) -> bool:
        return False


# The Responses API's input: a text, or input items (messages, function call outputs ...),
# each an object whose own shape the backend checks.
ResponseInput = Annotated[
    Annotated[str, Tag("kind:string")] | Annotated[list[dict[str, Any]], Tag("kind:array")],
    _one_of("a string or an array of input items"),
]


class ResponsesRequest(WireModel):
    """POST /v1/responses (stateless: `previous_response_id` and `store` are the backend's)."""

    model: Name
    input: ResponseInput
    instructions: str | None = None
    max_output_tokens: Count | None = None
    metadata: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    stream: bool | None = None
    temperature: Temperature | None = None
    tool_choice: str | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    top_p: Probability | None = None
    user: str | None = None


EndpointRequest = CompletionRequest | EmbeddingRequest | ResponsesRequest
_ADAPTERS: dict[type[WireModel], TypeAdapter[Any]] = {
    model: TypeAdapter(model) for model in (CompletionRequest, EmbeddingRequest, ResponsesRequest)
}


def wire_json(request: EndpointRequest, *, model: str) -> bytes:
    """The request as the backend receives it: for its served `model`, the fields the client
    sent and those a step set, nothing else."""
    adapter = _ADAPTERS[type(request)]
    dumped: bytes = adapter.dump_json(
        replace(request, model=model), exclude_unset=True, by_alias=True, serialize_as_any=True
    )
    return dumped
