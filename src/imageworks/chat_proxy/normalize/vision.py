"""Image parts of a chat request: detection, validation, the vision capability check, and the
history truncation applied to image requests.

Only inline `data:` images are inspected; remote `http(s)` URLs are passed through when allowed
and never fetched here (the proxy must not become a URL fetcher, and it cannot know their size).
Messages are the typed ones of `requests.py`, so every image part already has a string URL.
"""

from __future__ import annotations

import binascii
from collections.abc import Iterator
from dataclasses import dataclass

from imageworks.chat_proxy.protocol import CapabilityError, InvalidRequest, PayloadTooLarge
from imageworks.chat_proxy.requests import ImageURLPart, Message, TextPart, UserMessage, replace

_SYSTEM_ROLES = ("system", "developer")
_LIMIT_SETTING = "CHAT_PROXY_MAX_IMAGE_BYTES"

# Declared MIME type -> the format its bytes must have (`image/jpg` is a common misspelling).
_FORMATS = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/webp": "webp",
    "image/gif": "gif",
}


@dataclass(frozen=True)
class ImagePolicy:
    max_image_bytes: int
    allow_remote_urls: bool = False


def has_images(messages: list[Message]) -> bool:
    """Whether any message has an `image_url` part. Nothing is decoded."""
    return any(True for _ in _image_parts(messages))


def validate_images(messages: list[Message], policy: ImagePolicy) -> int:
    """Check every image part and return the total decoded size of the inline ones.

    Sizes come from the base64 length, so an image over the limit (alone or with the ones before
    it) is refused before anything is decoded. Remote URLs count 0 bytes: the proxy never sees
    their content."""
    total = 0
    for where, part in _image_parts(messages):
        url = part.url
        if not url:
            raise InvalidRequest(
                f"{where}: an image_url part needs a non-empty string 'url'.",
                param=where,
                code="invalid_image",
            )
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            total += _check_inline(where, url, policy.max_image_bytes, total)
        elif scheme in ("http", "https"):
            if not policy.allow_remote_urls:
                raise InvalidRequest(
                    f"{where}: remote image URLs are not enabled on this proxy (it does not "
                    "fetch them); send the image inline as a base64 data: URL.",
                    param=where,
                    code="remote_image_url_disabled",
                )
        else:
            raise InvalidRequest(
                f"{where}: unsupported image URL scheme {scheme or url[:20]!r}; "
                "send the image inline as a base64 data: URL.",
                param=where,
                code="unsupported_image_url",
            )
    return total


def require_vision(messages: list[Message], model_name: str, supports_vision: bool | None) -> None:
    """Refuse images for a model the registry says cannot see. Unknown (None) is let through:
    the backend is the better judge than a guess."""
    if supports_vision is not False:
        return
    first = next(_image_parts(messages), None)
    if first is not None:
        raise CapabilityError(
            f"Model '{model_name}' does not support images (vision): remove the image "
            "or choose a model with vision.",
            param=first[0],
            code="model_lacks_vision",
        )


def truncate_for_vision(
    messages: list[Message], *, keep_system: bool, keep_last_n_turns: int
) -> list[Message]:
    """The history of an image request cut to the system messages (if `keep_system`), the last
    `keep_last_n_turns` earlier turns and the current turn.

    A turn is a user message and everything up to the next user message, so an assistant's
    `tool_calls` and the `tool` results answering them are always kept or dropped together.
    The current turn starts at the last user message (the request may end with a tool result).
    If the latest user image was dropped and the current user message has none, its image(s)
    move into the current message so a follow-up question still sees the picture.
    Returns `messages` itself when nothing changes or the request carries no image."""
    if not has_images(messages):
        return messages
    users = [i for i, message in enumerate(messages) if message.role == "user"]
    if not users:
        return messages
    current = users[-1]
    starts = _turn_starts(messages, current)
    earlier = starts[-keep_last_n_turns:] if keep_last_n_turns > 0 else []
    first_kept = earlier[0] if earlier else current

    kept = [
        i
        for i, message in enumerate(messages)
        if (keep_system if message.role in _SYSTEM_ROLES else i >= first_kept)
    ]
    carried = _carried_images(messages, users, first_kept)
    if len(kept) == len(messages) and not carried:
        return messages

    result = [messages[i] for i in kept]
    current_message = messages[current]
    if carried and isinstance(current_message, UserMessage):
        result[kept.index(current)] = _with_images_first(current_message, carried)
    # An image only in dropped non-user messages cannot be carried; such a request is then no
    # longer an image request, so it is left as the client sent it.
    return result if has_images(result) else messages


def _image_parts(messages: list[Message]) -> Iterator[tuple[str, ImageURLPart]]:
    """(location, part) for every `image_url` part, location as `messages[i].content[j]`."""
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, ImageURLPart):
                    yield f"messages[{i}].content[{j}]", part


def _check_inline(where: str, url: str, limit: int, total_before: int) -> int:
    """The decoded size of one `data:` image, after checking its size, encoding and format."""
    header, comma, payload = url[len("data:") :].partition(",")
    params = [p.strip().lower() for p in header.split(";")]
    if not comma or params[-1] != "base64":
        raise InvalidRequest(
            f"{where}: an inline image must be a data:<type>;base64,<data> URL.",
            param=where,
            code="invalid_image",
        )
    mime = params[0]
    expected = _FORMATS.get(mime)
    if expected is None:
        raise InvalidRequest(
            f"{where}: image type {mime or '(missing)'!r} is not supported; "
            "send PNG, JPEG, WEBP or GIF.",
            param=where,
            code="unsupported_image_type",
        )
    # Newlines from wrapped base64 are common; strict decoding would reject them.
    compact = "".join(payload.split())
    padding = 2 if compact.endswith("==") else 1 if compact.endswith("=") else 0
    size = len(compact) * 3 // 4 - padding
    if size > limit:
        raise PayloadTooLarge(
            f"{where}: image is {_sizes(size, limit)} limit ({_LIMIT_SETTING}).",
            param=where,
            code="image_too_large",
        )
    if total_before + size > limit:
        raise PayloadTooLarge(
            f"{where}: the images so far total {_sizes(total_before + size, limit)} "
            f"limit ({_LIMIT_SETTING}).",
            param=where,
            code="images_too_large",
        )
    try:
        data = binascii.a2b_base64(compact, strict_mode=True)
    except ValueError as exc:  # binascii.Error, or a non-ASCII character
        raise InvalidRequest(
            f"{where}: the image data is not valid base64 ({exc}).",
            param=where,
            code="invalid_image",
        ) from None
    found = _format_of(data)
    if found != expected:
        raise InvalidRequest(
            f"{where}: the image is declared as {mime} but its bytes are "
            f"{found.upper() + ' data' if found else 'not a PNG, JPEG, WEBP or GIF image'}.",
            param=where,
            code="invalid_image",
        )
    return len(data)


def _format_of(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _sizes(size: int, limit: int) -> str:
    """'7.1 MB, larger than the 6.0 MB' — in bytes when rounding would make them look equal."""
    shown, cap = f"{size / 1e6:.1f} MB", f"{limit / 1e6:.1f} MB"
    if shown == cap:
        shown, cap = f"{size:,} bytes", f"{limit:,} bytes"
    return f"{shown}, larger than the {cap}"


def _turn_starts(messages: list[Message], current: int) -> list[int]:
    """Where each turn before `current` begins. Non-system messages before the first user
    message (a greeting, say) count as a turn of their own."""
    starts = [i for i in range(current) if messages[i].role == "user"]
    preamble = next((i for i in range(current) if messages[i].role not in _SYSTEM_ROLES), current)
    if preamble < current and messages[preamble].role != "user":
        starts.insert(0, preamble)
    return starts


def _carried_images(
    messages: list[Message], users: list[int], first_kept: int
) -> list[ImageURLPart]:
    """The image parts to move into the current user message: those of the latest user message
    with images, if that message was dropped and the current one has none of its own."""
    with_images = [i for i in users if has_images([messages[i]])]
    if not with_images or with_images[-1] >= first_kept:
        return []
    return [part for _, part in _image_parts([messages[with_images[-1]]])]


def _with_images_first(message: UserMessage, images: list[ImageURLPart]) -> UserMessage:
    content = message.content
    rest = content if isinstance(content, list) else []
    if isinstance(content, str) and content:
        rest = [TextPart(type="text", text=content)]
    return replace(message, content=[*images, *rest])
