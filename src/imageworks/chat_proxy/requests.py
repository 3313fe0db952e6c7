"""The chat completion request, typed: what a client may send to `/v1/chat/completions`.

`parse_chat_request(raw)` is the one parse: bytes in, a `ChatCompletionRequest` out, or an
`InvalidRequest` whose `param` is the field's path as OpenAI writes it (`messages[0].role`,
`tools[1].function.name`) and whose message says what was expected.

The models follow OpenAI's Chat Completions API, fields in its order, with a few extensions
fenced and labelled. Declared fields are checked strictly (a string is not a number, 1 is not
`true`). Every model allows extra fields: whatever a client sends that is not declared here
(backend extensions such as `top_k`, `min_p`, `repeat_penalty`, `chat_template_kwargs`,
Ollama's `keep_alive` and `options`) is kept as sent and forwarded, never dropped.

`request_json(request, model=...)` is what the backend receives: the fields the client sent and
those a normalization step set, nothing else (no added nulls or defaults); `replace` is how a
step changes a request (a new one; the input is never mutated).

Unions are tagged by the shape of their input (a message's role, a part's `type`, string or
array), so an error names one field and one expectation instead of one per alternative. The tags
(`kind:array`, `part:text`, a message's role ...) appear in pydantic's error locations and are
dropped from `param`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
)
from pydantic_core import ErrorDetails, core_schema

from imageworks.chat_proxy.protocol import MAX_JSON_DEPTH, InvalidRequest, json_shape_problem

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_PART_TYPES = ("text", "image_url", "input_audio", "file")


class WireModel(BaseModel):
    """A JSON object of the API: strictly typed fields, unknown fields kept as sent."""

    model_config = ConfigDict(extra="allow", strict=True, validate_by_name=True)


M = TypeVar("M", bound=BaseModel)


# -- tags: which alternative of a union an input is --------------------------------------------


def _kind(value: Any) -> str:
    """The JSON kind of a value, as a tag."""
    if isinstance(value, str):
        return "kind:string"
    if isinstance(value, list):
        return "kind:array"
    if isinstance(value, dict | BaseModel):
        return "kind:object"
    return "kind:other"


def _field_tag(field: str, prefix: str) -> Callable[[Any], str | None]:
    """The tag of an object by one of its fields (`part:text`); None when it has none."""

    def tag(value: Any) -> str | None:
        found = value.get(field) if isinstance(value, dict) else getattr(value, field, None)
        return f"{prefix}:{found}" if isinstance(found, str) else None

    return tag


_TAGS = frozenset(
    [f"kind:{kind}" for kind in ("string", "array", "object", "other")]
    + [f"part:{kind}" for kind in (*_PART_TYPES, "refusal", "audio_url", "video_url")]
    + [f"format:{kind}" for kind in ("text", "json_object", "json_schema", "structural_tag")]
    # a prompt's or an embedding input's shape (endpoint_requests.py)
    + [f"text:{kind}" for kind in ("string", "strings", "tokens", "token_arrays")]
)


def _one_of(expected: str) -> Discriminator:
    """Alternatives told apart by JSON kind; any other kind is a type error expecting `expected`."""
    return Discriminator(_kind, custom_error_type="invalid_type", custom_error_message=expected)


def _by_type(*kinds: str) -> Discriminator:
    """Content parts told apart by `type`; another type is an error listing `kinds`."""
    return Discriminator(
        _field_tag("type", "part"),
        custom_error_type="part_type",
        custom_error_message=_listing(kinds),
    )


def _listing(values: Iterable[str]) -> str:
    quoted = [f"'{value}'" for value in values]
    return quoted[0] if len(quoted) == 1 else f"one of {', '.join(quoted)}"


@dataclass(frozen=True)
class _Range:
    """A JSON number from `ge` to `le`; an integer stays one (1 is forwarded as 1, not 1.0)."""

    ge: int
    le: int

    def __get_pydantic_core_schema__(self, _source: Any, _handler: Any) -> core_schema.CoreSchema:
        return core_schema.union_schema(
            [
                core_schema.int_schema(strict=True, ge=self.ge, le=self.le),
                core_schema.float_schema(strict=True, ge=self.ge, le=self.le, allow_inf_nan=False),
            ],
            custom_error_type="number",
            custom_error_message=f"a number from {self.ge} to {self.le}",
        )

    def __get_pydantic_json_schema__(self, _schema: Any, _handler: Any) -> dict[str, Any]:
        return {"type": "number", "minimum": self.ge, "maximum": self.le}


Temperature = Annotated[float, _Range(0, 2)]
Probability = Annotated[float, _Range(0, 1)]
Penalty = Annotated[float, _Range(-2, 2)]
Bias = Annotated[float, _Range(-100, 100)]
Count = Annotated[int, Field(ge=1)]
Name = Annotated[str, Field(min_length=1)]


# -- content parts ------------------------------------------------------------------------------


class TextPart(WireModel):
    type: Literal["text"]
    text: str


class ImageURL(WireModel):
    url: str
    detail: str | None = None  # "auto" | "low" | "high"


class ImageURLPart(WireModel):
    type: Literal["image_url"]
    # Some clients send the URL itself instead of {"url": ...}; backends take both.
    image_url: Annotated[
        Annotated[ImageURL, Tag("kind:object")] | Annotated[str, Tag("kind:string")],
        _one_of("an object with a 'url' or a URL string"),
    ]

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


class InputAudio(WireModel):
    data: str
    format: str  # "wav" | "mp3"


class InputAudioPart(WireModel):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FileRef(WireModel):
    file_data: str | None = None
    file_id: str | None = None
    filename: str | None = None


class FilePart(WireModel):
    type: Literal["file"]
    file: FileRef


class RefusalPart(WireModel):
    type: Literal["refusal"]
    refusal: str


# vLLM's extensions: audio and video by URL, in user messages.
class MediaURL(WireModel):
    url: str


class AudioURLPart(WireModel):
    type: Literal["audio_url"]
    audio_url: MediaURL


class VideoURLPart(WireModel):
    type: Literal["video_url"]
    video_url: MediaURL


UserPart = Annotated[
    Annotated[TextPart, Tag("part:text")]
    | Annotated[ImageURLPart, Tag("part:image_url")]
    | Annotated[InputAudioPart, Tag("part:input_audio")]
    | Annotated[FilePart, Tag("part:file")]
    | Annotated[AudioURLPart, Tag("part:audio_url")]
    | Annotated[VideoURLPart, Tag("part:video_url")],
    _by_type("text", "image_url", "input_audio", "file", "audio_url", "video_url"),
]
TextOnlyPart = Annotated[Annotated[TextPart, Tag("part:text")], _by_type("text")]
AssistantPart = Annotated[
    Annotated[TextPart, Tag("part:text")] | Annotated[RefusalPart, Tag("part:refusal")],
    _by_type("text", "refusal"),
]

TextContent = Annotated[
    Annotated[str, Tag("kind:string")] | Annotated[list[TextOnlyPart], Tag("kind:array")],
    _one_of("a string or an array of text parts"),
]
UserContent = Annotated[
    Annotated[str, Tag("kind:string")] | Annotated[list[UserPart], Tag("kind:array")],
    _one_of("a string or an array of content parts"),
]
AssistantContent = Annotated[
    Annotated[str, Tag("kind:string")] | Annotated[list[AssistantPart], Tag("kind:array")],
    _one_of("a string, an array of text or refusal parts, or null"),
]


# -- messages -----------------------------------------------------------------------------------


class FunctionCall(WireModel):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(WireModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class SystemMessage(WireModel):
    role: Literal["system"]
    content: TextContent
    name: str | None = None


class DeveloperMessage(WireModel):
    role: Literal["developer"]
    content: TextContent
    name: str | None = None


class UserMessage(WireModel):
    role: Literal["user"]
    content: UserContent
    name: str | None = None


class AssistantMessage(WireModel):
    role: Literal["assistant"]
    content: AssistantContent | None = None
    refusal: str | None = None
    name: str | None = None
    audio: dict[str, Any] | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None  # legacy


class ToolMessage(WireModel):
    role: Literal["tool"]
    content: TextContent
    tool_call_id: str


class FunctionMessage(WireModel):  # legacy
    role: Literal["function"]
    name: str
    content: str | None = None


# Told apart by `role` itself (pydantic reads it without calling back into Python: messages are
# the bulk of a request); the role then appears in error locations, after the message's index.
Message = Annotated[
    SystemMessage
    | DeveloperMessage
    | UserMessage
    | AssistantMessage
    | ToolMessage
    | FunctionMessage,
    Field(discriminator="role"),
]


# -- tools, formats, options --------------------------------------------------------------------


class FunctionDefinition(WireModel):
    name: Name
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema object
    strict: bool | None = None


class Tool(WireModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(WireModel):
    name: str


class NamedToolChoice(WireModel):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("kind:string")]
    | Annotated[NamedToolChoice, Tag("kind:object")],
    _one_of("'none', 'auto', 'required' or an object naming a function"),
]
FunctionCallChoice = Annotated[  # legacy
    Annotated[Literal["none", "auto"], Tag("kind:string")]
    | Annotated[FunctionName, Tag("kind:object")],
    _one_of("'none', 'auto' or an object naming a function"),
]


class TextFormat(WireModel):
    type: Literal["text"]


class JSONObjectFormat(WireModel):
    type: Literal["json_object"]  # llama-cpp-python also takes a `schema` beside it


class JSONSchema(WireModel):
    name: Name
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class JSONSchemaFormat(WireModel):
    type: Literal["json_schema"]
    json_schema: JSONSchema


class StructuralTagFormat(WireModel):  # vLLM's extension
    type: Literal["structural_tag"]


ResponseFormat = Annotated[
    Annotated[TextFormat, Tag("format:text")]
    | Annotated[JSONObjectFormat, Tag("format:json_object")]
    | Annotated[JSONSchemaFormat, Tag("format:json_schema")]
    | Annotated[StructuralTagFormat, Tag("format:structural_tag")],
    Discriminator(
        _field_tag("type", "format"),
        custom_error_type="part_type",
        custom_error_message=_listing(["text", "json_object", "json_schema", "structural_tag"]),
    ),
]
Stop = Annotated[
    Annotated[str, Tag("kind:string")] | Annotated[list[str], Tag("kind:array")],
    _one_of("a string or an array of strings"),
]


class StreamOptions(WireModel):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class ChatCompletionRequest(WireModel):
    """POST /v1/chat/completions. Unset fields are not sent on: the backend's defaults apply."""

    messages: Annotated[list[Message], Field(min_length=1)]
    model: Name
    audio: dict[str, Any] | None = None
    frequency_penalty: Penalty | None = None
    function_call: FunctionCallChoice | None = None  # legacy
    functions: list[FunctionDefinition] | None = None  # legacy
    logit_bias: dict[str, Bias] | None = None
    logprobs: bool | None = None
    max_completion_tokens: Count | None = None
    max_tokens: Count | None = None
    metadata: dict[str, Any] | None = None  # OpenAI's values are strings; backends ignore it
    modalities: list[str] | None = None
    n: Count | None = None
    parallel_tool_calls: bool | None = None
    prediction: dict[str, Any] | None = None
    presence_penalty: Penalty | None = None
    prompt_cache_key: str | None = None
    reasoning_effort: str | None = None
    response_format: ResponseFormat | None = None
    safety_identifier: str | None = None
    seed: int | None = None
    service_tier: str | None = None
    stop: Stop | None = None
    store: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    tool_choice: ToolChoice | None = None
    tools: list[Tool] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    top_p: Probability | None = None
    user: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None

    def value(self, name: str) -> Any:
        """A field's value, declared or extra (None when unset), as `dict.get` would give."""
        if name in _DECLARED:
            return getattr(self, name)
        return (self.model_extra or {}).get(name)


_REQUEST = TypeAdapter(ChatCompletionRequest)
RESPONSE_FORMAT: TypeAdapter[ResponseFormat] = TypeAdapter(ResponseFormat)
_DECLARED = frozenset(ChatCompletionRequest.model_fields)


def replace(instance: M, /, *, drop: Iterable[str] = (), **changes: Any) -> M:
    """A copy of `instance` with `changes` set and the fields in `drop` unset (declared or
    extra); the instance itself is untouched. Nothing is validated: steps set values of the
    right types. A shallow copy: what is not changed is shared, not copied."""
    copy = instance.model_copy(update=changes)
    declared = type(copy).model_fields
    for name in drop:
        if name in changes:
            continue
        copy.__pydantic_fields_set__.discard(name)
        if name in declared:
            copy.__dict__[name] = declared[name].get_default()
        elif copy.__pydantic_extra__ is not None:
            copy.__pydantic_extra__.pop(name, None)
    return copy


def request_json(request: ChatCompletionRequest, *, model: str) -> bytes:
    """The request as the backend receives it: for its served `model`, set fields only."""
    # serialize_as_any: each value by its own type, so no union is re-decided on the way out
    # (the same bytes, in half the time).
    return _REQUEST.dump_json(
        replace(request, model=model), exclude_unset=True, by_alias=True, serialize_as_any=True
    )


def as_json_data(model: BaseModel) -> dict[str, Any]:
    """A model as plain JSON data (what the client sent, plus what steps set)."""
    return model.model_dump(mode="json", exclude_unset=True, by_alias=True, serialize_as_any=True)


def parse_chat_request(raw: bytes) -> ChatCompletionRequest:
    """The one parse of a request body; InvalidRequest (400) naming the field otherwise."""
    return parse_request(raw, ChatCompletionRequest)


def parse_request(raw: bytes, model: type[M]) -> M:
    """`raw` as a `model` (any endpoint's request); InvalidRequest (400) naming the field."""
    problem = json_shape_problem(raw, MAX_JSON_DEPTH)
    if problem is not None:
        raise InvalidRequest(f"The request body is not valid JSON: {problem}.", code="invalid_json")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise invalid_request(exc.errors(include_url=False)[0]) from None


# -- errors, as OpenAI words them ---------------------------------------------------------------

_TYPES = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


def invalid_request(error: ErrorDetails) -> InvalidRequest:
    """The 400 for one pydantic error: `param` is its path, the message what was expected."""
    kind, got, message = error["type"], error.get("input"), error["msg"]
    loc = list(error["loc"])
    if len(loc) > 2 and loc[0] == "messages" and isinstance(loc[1], int) and loc[2] in ROLES:
        del loc[2]  # the role that chose the message's model
    path = [part for part in loc if not (isinstance(part, str) and part in _TAGS)]
    if kind == "json_invalid":
        return InvalidRequest(f"The request body is not valid JSON: {message}", code="invalid_json")
    if not path and kind == "model_type":
        return InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    if kind in ("union_tag_invalid", "union_tag_not_found"):  # a message's role
        return _wrong_tag(path, "role", _listing(ROLES), got)
    if kind == "part_type":  # a content part's or response format's type
        return _wrong_tag(path, "type", message, got)
    if kind == "missing":
        return _missing(path)
    if kind in _TYPES:
        return _wrong_type(path, _TYPES[kind], got)
    if kind in ("invalid_type", "number"):
        if kind == "invalid_type" or not _is_number(got):
            return _wrong_type(path, message, got)
        return _wrong_value(path, message, got)
    return _wrong_value(path, _expected_value(error), got)


def _expected_value(error: ErrorDetails) -> str:
    context = error.get("ctx") or {}
    kind = error["type"]
    if kind == "literal_error":
        expected = str(context["expected"])
        return f"one of {expected}" if " or " in expected else expected
    if kind == "greater_than_equal":
        return f"a value of at least {context['ge']}"
    if kind == "less_than_equal":
        return f"a value of at most {context['le']}"
    if kind == "too_short":
        least = context["min_length"]
        return f"at least {least} item" + ("s" if least != 1 else "")
    if kind == "string_too_short":
        return "a non-empty string"
    return error["msg"][0].lower() + error["msg"][1:]


def _param(path: list[int | str]) -> str | None:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or None


def _wrong_tag(path: list[int | str], field: str, expected: str, got: Any) -> InvalidRequest:
    """An object whose `field` says which kind it is, but names none of `expected`."""
    if not isinstance(got, dict):
        return _wrong_type(path, "an object", got)
    if field not in got:
        return _missing([*path, field])
    return _wrong_value([*path, field], expected, got[field])


def _missing(path: list[int | str]) -> InvalidRequest:
    param = _param(path)
    return InvalidRequest(
        f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
    )


def _wrong_type(path: list[int | str], expected: str, got: Any) -> InvalidRequest:
    param = _param(path)
    return InvalidRequest(
        f"Invalid type for '{param}': expected {expected}, but got {_kind_name(got)} instead.",
        param=param,
        code="invalid_type",
    )


def _wrong_value(path: list[int | str], expected: str, got: Any) -> InvalidRequest:
    param = _param(path)
    return InvalidRequest(
        f"Invalid value for '{param}': expected {expected}, but got {_shown(got)}.",
        param=param,
        code="invalid_value",
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _kind_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _shown(value: Any) -> str:
    """A scalar as JSON would write it (shortened); anything else by its kind."""
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else repr(value[:40] + "...")
    if _is_number(value) and len(str(value)) <= 40:
        return str(value)
    return _kind_name(value)
