from __future__ import annotations

import base64
import binascii
from typing import Any

import pytest

from imageworks.chat_proxy.normalize.vision import (
    ImagePolicy,
    has_images,
    require_vision,
    truncate_for_vision,
    validate_images,
)
from imageworks.chat_proxy.protocol import CapabilityError, InvalidRequest, PayloadTooLarge
from support.wire import plain, typed_messages, typed_request

# Just the magic numbers plus a few bytes: enough for a format check, no real decoder needed.
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"
GIF = b"GIF89a\x01\x00\x01\x00\x00"
GIF87 = b"GIF87a\x01\x00\x01\x00\x00"
WEBP = b"RIFF\x1a\x00\x00\x00WEBPVP8 "

POLICY = ImagePolicy(max_image_bytes=6_000_000)
WHERE = "messages[1].content[2]"


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def user(*parts: dict[str, Any] | str) -> dict[str, Any]:
    if len(parts) == 1 and isinstance(parts[0], str):
        return {"role": "user", "content": parts[0]}
    return {"role": "user", "content": [text(p) if isinstance(p, str) else p for p in parts]}


def typed(messages: list[dict[str, Any]]) -> Any:
    return typed_messages(messages) if messages else []


def at_where(url: str) -> list[dict[str, Any]]:
    """A request whose only image sits at messages[1].content[2]."""
    return [
        {"role": "system", "content": "be brief"},
        user("first", "second", image(url)),
    ]


SYSTEM = {"role": "system", "content": "be brief"}
PICTURE_A = image(data_url("image/png", PNG))
PICTURE_B = image(data_url("image/jpeg", JPEG))
PICTURE_C = image(data_url("image/gif", GIF))


# -- has_images ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([], False),
        ([user("plain text")], False),
        ([user("only", "text parts")], False),
        ([{"role": "assistant", "content": None}], False),
        ([user("look", PICTURE_A)], True),
        ([user({"type": "image_url", "image_url": "https://example.com/a.png"})], True),
        ([SYSTEM, user("hi"), user(PICTURE_B)], True),
    ],
)
def test_has_images_finds_image_parts(messages: list[dict[str, Any]], expected: bool) -> None:
    assert has_images(typed(messages)) is expected


# -- validate_images: accepted -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("mime", "data"),
    [
        ("image/png", PNG),
        ("image/jpeg", JPEG),
        ("image/jpg", JPEG),
        ("image/webp", WEBP),
        ("image/gif", GIF),
        ("image/gif", GIF87),
        ("IMAGE/PNG", PNG),
    ],
)
def test_validate_images_accepts_supported_type(mime: str, data: bytes) -> None:
    assert validate_images(typed([user("look", image(data_url(mime, data)))]), POLICY) == len(data)


def test_validate_images_accepts_bare_string_image_url() -> None:
    part = {"type": "image_url", "image_url": data_url("image/png", PNG)}
    assert validate_images(typed([user(part)]), POLICY) == len(PNG)


def test_validate_images_strips_whitespace_in_payload() -> None:
    encoded = base64.b64encode(PNG + JPEG).decode()
    wrapped = "\n".join(encoded[i : i + 8] for i in range(0, len(encoded), 8)) + "\n"
    url = f"data:image/png;base64,{wrapped}"
    assert validate_images(typed([user(image(url))]), POLICY) == len(PNG + JPEG)


def test_validate_images_sums_inline_images() -> None:
    messages = [user(PICTURE_A, "and"), {"role": "assistant", "content": "ok"}, user(PICTURE_B)]
    assert validate_images(typed(messages), POLICY) == len(PNG) + len(JPEG)


def test_validate_images_without_images_is_zero() -> None:
    assert validate_images(typed([SYSTEM, user("hello")]), POLICY) == 0


def test_validate_images_does_not_mutate_input() -> None:
    messages = typed([SYSTEM, user("look", PICTURE_A)])
    before = plain(messages)
    validate_images(messages, POLICY)
    assert plain(messages) == before


# -- validate_images: refused (400) --------------------------------------------------------------

_PNG_B64 = base64.b64encode(PNG).decode()


@pytest.mark.parametrize(
    ("url", "code", "fragment"),
    [
        (
            data_url("image/png", JPEG),
            "invalid_image",
            "declared as image/png but its bytes are JPEG",
        ),
        (data_url("image/gif", WEBP), "invalid_image", "bytes are WEBP"),
        (data_url("image/jpeg", b"hello world!"), "invalid_image", "not a PNG, JPEG"),
        (data_url("image/png", b""), "invalid_image", "not a PNG, JPEG"),
        (data_url("image/bmp", b"BM\x00\x00"), "unsupported_image_type", "'image/bmp'"),
        (data_url("text/plain", PNG), "unsupported_image_type", "not supported"),
        (f"data:;base64,{_PNG_B64}", "unsupported_image_type", "(missing)"),
        (f"data:image/png,{_PNG_B64}", "invalid_image", "data:<type>;base64,<data>"),
        ("data:image/png;base64", "invalid_image", "data:<type>;base64,<data>"),
        ("data:image/png;base64,iVBO!!==", "invalid_image", "not valid base64"),
        (f"data:image/png;base64,{_PNG_B64[:-1]}", "invalid_image", "not valid base64"),
        (f"data:image/png;base64,{_PNG_B64}=", "invalid_image", "not valid base64"),
        ("data:image/png;base64,iVBORw0KGgoé===", "invalid_image", "not valid base64"),
        ("http://example.com/cat.png", "remote_image_url_disabled", "remote image URLs are not"),
        ("HTTPS://example.com/cat.png", "remote_image_url_disabled", "not enabled"),
        ("file:///etc/passwd", "unsupported_image_url", "scheme 'file'"),
        ("cat.png", "unsupported_image_url", "'cat.png'"),
        ("", "invalid_image", "non-empty string 'url'"),
    ],
)
def test_validate_images_refuses_bad_image(url: str, code: str, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_images(typed(at_where(url)), POLICY)
    error = caught.value
    assert (error.status, error.code, error.param) == (400, code, WHERE)
    assert error.message.startswith(f"{WHERE}: ")
    assert fragment in error.message


@pytest.mark.parametrize(
    ("part", "param"),
    [
        ({"type": "image_url"}, "messages[1].content[2].image_url"),
        ({"type": "image_url", "image_url": {}}, "messages[1].content[2].image_url.url"),
        ({"type": "image_url", "image_url": {"url": 42}}, "messages[1].content[2].image_url.url"),
    ],
)
def test_a_part_without_a_url_string_never_gets_here(part: dict[str, Any], param: str) -> None:
    # The typed request refuses it, naming the field; every image part that reaches
    # validate_images has a string URL.
    messages = [SYSTEM, user("a", "b", part)]
    with pytest.raises(InvalidRequest) as caught:
        typed_request({"model": "m", "messages": messages})
    assert (caught.value.status, caught.value.param) == (400, param)


# -- validate_images: size (413) ---------------------------------------------------------------


def test_validate_images_refuses_oversize_image_without_decoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def never(*_args: object, **_kwargs: object) -> bytes:
        raise AssertionError("an image over the limit was decoded")

    monkeypatch.setattr(binascii, "a2b_base64", never)
    payload = "A" * 9_466_668  # 7,100,001 bytes once decoded
    with pytest.raises(PayloadTooLarge) as caught:
        validate_images(typed(at_where(f"data:image/png;base64,{payload}")), POLICY)
    error = caught.value
    assert (error.status, error.code, error.param) == (413, "image_too_large", WHERE)
    assert error.message == (
        f"{WHERE}: image is 7.1 MB, larger than the 6.0 MB limit (CHAT_PROXY_MAX_IMAGE_BYTES)."
    )
    # Padding counts at most two characters, so a payload of "=" cannot pass as tiny.
    with pytest.raises(PayloadTooLarge):
        validate_images(typed(at_where("data:image/png;base64," + "=" * 9_466_668)), POLICY)


def test_validate_images_size_counts_padding() -> None:
    # 10 bytes -> 16 base64 characters with "==": exactly at a 10-byte limit, so accepted.
    data = PNG[:8] + b"\x00\x00"
    assert len(data) == 10
    assert validate_images(typed([user(image(data_url("image/png", data)))]), ImagePolicy(10)) == 10
    with pytest.raises(PayloadTooLarge) as caught:
        validate_images(typed([user(image(data_url("image/png", data)))]), ImagePolicy(9))
    # Both round to 0.0 MB, so the message falls back to exact bytes.
    assert "image is 10 bytes, larger than the 9 bytes limit" in caught.value.message


def test_validate_images_refuses_total_over_limit_before_decoding_the_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decoded: list[object] = []
    real = binascii.a2b_base64

    def counting(data: str, **kwargs: bool) -> bytes:
        decoded.append(data)
        return real(data, **kwargs)

    monkeypatch.setattr(binascii, "a2b_base64", counting)
    first, second = PNG + b"\x00" * 4, JPEG + b"\x00" * 9
    assert len(first) == len(second) == 20
    messages = [
        user("one", image(data_url("image/png", first))),
        {"role": "assistant", "content": "ok"},
        user(image(data_url("image/jpeg", second))),
    ]
    assert validate_images(typed(messages[:1]), ImagePolicy(30)) == 20
    decoded.clear()
    with pytest.raises(PayloadTooLarge) as caught:
        validate_images(typed(messages), ImagePolicy(30))
    error = caught.value
    assert (error.status, error.code, error.param) == (
        413,
        "images_too_large",
        "messages[2].content[0]",
    )
    assert "messages[2].content[0]: the images so far total" in error.message
    assert len(decoded) == 1  # only the first image was decoded


# -- validate_images: remote URLs --------------------------------------------------------------


@pytest.mark.parametrize(
    "part",
    [
        image("https://example.com/cat.png"),
        image("http://example.com/cat.png"),
        {"type": "image_url", "image_url": "https://example.com/cat.png"},
        {"type": "image_url", "image_url": {"url": "https://example.com/x", "detail": "low"}},
    ],
)
def test_validate_images_passes_remote_url_when_allowed(part: dict[str, Any]) -> None:
    messages = typed([user("look", part)])
    before = plain(messages)
    policy = ImagePolicy(max_image_bytes=10, allow_remote_urls=True)
    assert validate_images(messages, policy) == 0  # never fetched, so never counted
    assert plain(messages) == before


def test_validate_images_counts_only_inline_images_next_to_remote() -> None:
    messages = [user(image("https://example.com/cat.png"), PICTURE_A)]
    policy = ImagePolicy(max_image_bytes=6_000_000, allow_remote_urls=True)
    assert validate_images(typed(messages), policy) == len(PNG)


# -- require_vision --------------------------------------------------------------------------


def test_require_vision_refuses_images_for_model_without_vision() -> None:
    messages = [SYSTEM, user("hello"), user("look", PICTURE_A)]
    with pytest.raises(CapabilityError) as caught:
        require_vision(typed(messages), "tiny-text", supports_vision=False)
    error = caught.value
    assert (error.status, error.type, error.code) == (400, "capability_error", "model_lacks_vision")
    assert error.param == "messages[2].content[1]"
    assert error.message.startswith("Model 'tiny-text' does not support images (vision)")


@pytest.mark.parametrize(
    ("messages", "supports_vision"),
    [
        ([user("look", PICTURE_A)], True),
        ([user("look", PICTURE_A)], None),
        ([user("just text")], False),
    ],
)
def test_require_vision_allows(
    messages: list[dict[str, Any]], supports_vision: bool | None
) -> None:
    require_vision(typed(messages), "m", supports_vision)  # no error


# -- truncate_for_vision -----------------------------------------------------------------------

CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    ],
}
RESULT = {"role": "tool", "tool_call_id": "c1", "content": "sunny"}

# Indices:      0       1              2                                           3
HISTORY = [SYSTEM, user("hi"), {"role": "assistant", "content": "hello"}, user("weather?")]
HISTORY += [CALL, RESULT, {"role": "assistant", "content": "It is sunny."}]  # 4, 5, 6
HISTORY += [user("what is this?", PICTURE_C)]  # 7: the current message, with its own image


def _tool_pairs_whole(messages: list[dict[str, Any]]) -> bool:
    calls = {c["id"] for m in messages for c in m.get("tool_calls") or []}
    answers = {m["tool_call_id"] for m in messages if m.get("role") == "tool"}
    return calls == answers


def truncated(
    messages: list[dict[str, Any]], *, keep_system: bool = True, keep_last_n_turns: int = 0
) -> list[dict[str, Any]]:
    """truncate_for_vision on the typed messages, as plain data again."""
    return plain(
        truncate_for_vision(
            typed(messages), keep_system=keep_system, keep_last_n_turns=keep_last_n_turns
        )
    )


@pytest.mark.parametrize(
    ("keep_system", "n", "kept"),
    [
        (True, 0, [0, 7]),
        (False, 0, [7]),
        (True, 1, [0, 3, 4, 5, 6, 7]),
        (False, 1, [3, 4, 5, 6, 7]),
        (False, 2, [1, 2, 3, 4, 5, 6, 7]),
        (False, 9, [1, 2, 3, 4, 5, 6, 7]),
    ],
)
def test_truncate_keeps_system_and_last_turns(keep_system: bool, n: int, kept: list[int]) -> None:
    history = typed(HISTORY)
    before = plain(history)
    result = truncate_for_vision(history, keep_system=keep_system, keep_last_n_turns=n)
    assert plain(result) == [HISTORY[i] for i in kept]
    assert all(result[k] is history[i] for k, i in enumerate(kept))
    assert _tool_pairs_whole(plain(result))
    assert plain(history) == before


@pytest.mark.parametrize("n", [2, 3, 50])
def test_truncate_returns_same_list_when_everything_is_kept(n: int) -> None:
    history = typed(HISTORY)
    assert truncate_for_vision(history, keep_system=True, keep_last_n_turns=n) is history


def test_truncate_keeps_current_turn_when_last_message_is_tool_result() -> None:
    messages = [
        SYSTEM,
        user("earlier"),
        {"role": "assistant", "content": "ok"},
        user("read the sign with the tool", PICTURE_A),
        CALL,
        RESULT,
    ]
    result = truncated(messages)
    assert result == [SYSTEM, messages[3], CALL, RESULT]
    assert _tool_pairs_whole(result)


def test_truncate_drops_whole_turn_with_tool_pair() -> None:
    messages = [user("weather?"), CALL, RESULT, user("and this?", PICTURE_B)]
    assert truncated(messages) == [messages[3]]


def test_truncate_counts_a_greeting_before_the_first_user_message_as_a_turn() -> None:
    greeting = {"role": "assistant", "content": "How can I help?"}
    messages = [SYSTEM, greeting, user("look", PICTURE_A)]
    kept = typed(messages)
    assert truncate_for_vision(kept, keep_system=True, keep_last_n_turns=1) is kept
    assert truncated(messages) == [SYSTEM, messages[2]]


@pytest.mark.parametrize(
    "follow_up",
    [
        user("what about the left corner?"),
        user("what about the left corner?", "be specific"),
    ],
)
def test_truncate_carries_dropped_image_into_text_follow_up(follow_up: dict[str, Any]) -> None:
    messages = typed(
        [
            SYSTEM,
            user("look at this", PICTURE_A),
            {"role": "assistant", "content": "A cat on a sofa."},
            follow_up,
        ]
    )
    before = plain(messages)
    result = truncate_for_vision(messages, keep_system=True, keep_last_n_turns=0)
    follow_parts = follow_up["content"]
    if isinstance(follow_parts, str):
        follow_parts = [text(follow_parts)]
    assert plain(result) == [SYSTEM, {"role": "user", "content": [PICTURE_A, *follow_parts]}]
    assert plain(messages) == before


def test_truncate_carries_only_the_latest_dropped_images() -> None:
    messages = [
        user("first", PICTURE_A),
        {"role": "assistant", "content": "a"},
        user(PICTURE_B, "second", PICTURE_C),
        {"role": "assistant", "content": "b"},
        user("compare the two"),
    ]
    assert truncated(messages) == [
        {"role": "user", "content": [PICTURE_B, PICTURE_C, text("compare the two")]}
    ]


def test_truncate_does_not_carry_when_latest_image_turn_is_kept() -> None:
    messages = typed(
        [
            user("first", PICTURE_A),
            {"role": "assistant", "content": "a"},
            user("second", PICTURE_B),
            {"role": "assistant", "content": "b"},
            user("and now?"),
        ]
    )
    result = truncate_for_vision(messages, keep_system=True, keep_last_n_turns=1)
    assert result == messages[2:]
    assert result[-1] is messages[-1]


def test_truncate_does_not_carry_when_current_message_has_its_own_image() -> None:
    messages = typed(
        [
            SYSTEM,
            user("old", PICTURE_A),
            {"role": "assistant", "content": "a"},
            user("new one", PICTURE_B),
        ]
    )
    result = truncate_for_vision(messages, keep_system=True, keep_last_n_turns=0)
    assert result == [messages[0], messages[3]]
    assert result[1] is messages[3]


@pytest.mark.parametrize(
    "messages",
    [
        [SYSTEM, user("hi"), {"role": "assistant", "content": "hello"}, user("again")],
        # No user message to anchor the current turn (only user messages carry images).
        [SYSTEM, {"role": "assistant", "content": "hello"}],
    ],
)
def test_truncate_leaves_request_without_usable_image_unchanged(
    messages: list[dict[str, Any]],
) -> None:
    kept = typed(messages)
    assert truncate_for_vision(kept, keep_system=False, keep_last_n_turns=0) is kept
