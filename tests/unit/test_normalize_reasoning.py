from __future__ import annotations

import copy
import itertools
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imageworks.chat_proxy.normalize.reasoning import (
    ThinkStreamSplitter,
    may_contain_think,
    split_think_completion,
)


def _completion(content: Any, **message: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, **message},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
    }


def _chunk(content: Any = None, *, finish: str | None = None, **delta: Any) -> dict[str, Any]:
    if content is not None:
        delta["content"] = content
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _split(content: str) -> tuple[str, str]:
    """(reasoning, content) of a completion whose message content is `content`."""
    message = split_think_completion(_completion(content))["choices"][0]["message"]
    return message.get("reasoning_content", ""), message["content"]


def _stream(
    pieces: list[str], splitter: ThinkStreamSplitter | None = None
) -> tuple[str, str, list[dict[str, Any]]]:
    """Runs pieces through a splitter, the last chunk carrying finish_reason; returns the
    concatenated reasoning and content and the output chunks."""
    splitter = splitter or ThinkStreamSplitter()
    chunks = [_chunk(piece) for piece in pieces] + [_chunk(finish="stop")]
    out = [splitter.normalize_chunk(chunk) for chunk in chunks]
    deltas = [chunk["choices"][0]["delta"] for chunk in out]
    reasoning = "".join(delta.get("reasoning_content", "") for delta in deltas)
    content = "".join(delta.get("content") or "" for delta in deltas)
    return reasoning, content, out


# -- whole responses ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "reasoning", "answer"),
    [
        ("<think>pondering</think>The answer is 4.", "pondering", "The answer is 4."),
        ("<think>\nhmm\n</think>\n\nThe answer", "\nhmm\n", "The answer"),
        ("<think>a</think>X <think>b</think>Y", "a\nb", "X Y"),
        ("Before <think>a</think> after", "a", "Before after"),
        ("<think>still thinking", "still thinking", ""),
        ("<think>cut off mid-tag</thi", "cut off mid-tag</thi", ""),
        ("pondering</think>\n\nThe answer", "pondering", "The answer"),
        ("<think>a</think>b</think>c", "a", "bc"),
        ("<think></think>Answer", "", "Answer"),
    ],
    ids=[
        "one-block",
        "whitespace-after-close",
        "several-blocks",
        "text-around",
        "unclosed",
        "unclosed-partial-close",
        "leading-close",
        "stray-close-dropped",
        "empty-block",
    ],
)
def test_completion_think_blocks_move_to_reasoning(
    content: str, reasoning: str, answer: str
) -> None:
    assert _split(content) == (reasoning, answer)


@pytest.mark.parametrize("content", ["The answer is 4.", "a < b and b > c", "", None, ["x"]])
def test_completion_without_tags_is_the_same_object(content: Any) -> None:
    body = _completion(content)
    assert split_think_completion(body) is body


def test_completion_appends_to_backend_reasoning_content() -> None:
    body = _completion("<think>more</think>Answer", reasoning_content="first")
    message = split_think_completion(body)["choices"][0]["message"]
    assert message["reasoning_content"] == "first\nmore"
    assert message["content"] == "Answer"


def test_completion_backend_reasoning_content_untouched_without_tags() -> None:
    body = _completion("Answer", reasoning_content="vLLM parsed this")
    assert split_think_completion(body) is body


def test_completion_keeps_other_fields_and_does_not_mutate() -> None:
    body = _completion("<think>a</think>b", tool_calls=[{"id": "call_1"}])
    before = copy.deepcopy(body)
    out = split_think_completion(body)
    assert body == before
    assert out["id"] == "chatcmpl-1"
    assert out["usage"] == body["usage"]
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["message"] == {
        "role": "assistant",
        "content": "b",
        "reasoning_content": "a",
        "tool_calls": [{"id": "call_1"}],
    }


def test_completion_splits_each_choice() -> None:
    body = _completion("<think>a</think>b")
    body["choices"].append({"index": 1, "message": {"role": "assistant", "content": "plain"}})
    out = split_think_completion(body)
    assert out["choices"][0]["message"]["reasoning_content"] == "a"
    assert out["choices"][1] is body["choices"][1]


# -- streams --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pieces",
    [
        ["<thi", "nk>pondering", "</think>The answer", " is 4."],
        ["<thi", "nk>pond", "ering</th", "ink>The answer", " is 4."],
        ["<think>pondering</think>The answer is 4."],
        ["<", "think", ">", "pondering", "<", "/", "think", ">", "The answer is 4."],
        ["<think>pondering</think>", "\n\n", "The answer is 4."],
        ["<think>pondering</think>\n", "\nThe answer is 4."],
    ],
)
def test_stream_tags_split_across_chunks(pieces: list[str]) -> None:
    reasoning, content, _ = _stream(pieces)
    assert (reasoning, content) == ("pondering", "The answer is 4.")


def test_stream_example_chunks_one_by_one() -> None:
    splitter = ThinkStreamSplitter()
    deltas = [
        splitter.normalize_chunk(_chunk(piece))["choices"][0]["delta"]
        for piece in ["<thi", "nk>pondering", "</think>The answer", " is 4."]
    ]
    assert deltas == [
        {},  # "<thi" held back: it may be a tag
        {"reasoning_content": "pondering"},
        {"content": "The answer"},
        {"content": " is 4."},
    ]


TEXTS = [
    "<think>ab</think>\n\ncd",
    "x<think>a</think>b<think>c</think>d",
    "a < b <th <think>1<2</think> ok </thin",
    "<think>unclosed <",
    "no tags here",
]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_every_split_point_matches_the_whole_text(text: str) -> None:
    expected = _split(text)
    for cut in range(len(text) + 1):
        reasoning, content, _ = _stream([text[:cut], text[cut:]])
        assert (reasoning, content) == expected, cut
    for cut1 in range(len(text) + 1):
        for cut2 in range(cut1, len(text) + 1):
            pieces = [text[:cut1], text[cut1:cut2], text[cut2:]]
            assert _stream(pieces)[:2] == expected, (cut1, cut2)
    assert _stream(list(text))[:2] == expected  # one character per chunk


_PIECES = st.sampled_from(["<think>", "</think>", "<", "</th", "nk>", "a", "b", " ", "\n"])


@given(parts=st.lists(_PIECES, max_size=12), cuts=st.lists(st.integers(0, 60), max_size=5))
def test_stream_random_texts_and_cuts_match_the_whole_text(
    parts: list[str], cuts: list[int]
) -> None:
    text = "".join(parts)
    bounds = sorted({0, len(text), *(min(cut, len(text)) for cut in cuts)})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    # A leading `</think>` is what the caller knows from the chat template in a stream.
    first_open, first_close = text.find("<think>"), text.find("</think>")
    leading_close = first_close != -1 and (first_open == -1 or first_close < first_open)
    splitter = ThinkStreamSplitter(starts_in_think=leading_close)
    assert _stream(pieces, splitter)[:2] == _split(text)


def test_stream_leading_close_when_the_template_opened_the_block() -> None:
    text = "pondering</think>\n\nThe answer"
    for cut in range(len(text) + 1):
        splitter = ThinkStreamSplitter(starts_in_think=True)
        assert _stream([text[:cut], text[cut:]], splitter)[:2] == _split(text)


def test_stream_stray_close_without_template_hint_is_dropped() -> None:
    # Without starts_in_think the text before `</think>` has already gone out as content.
    reasoning, content, _ = _stream(["pondering", "</think>", "The answer"])
    assert (reasoning, content) == ("", "ponderingThe answer")


def test_stream_unclosed_block_flushed_on_finish_reason() -> None:
    splitter = ThinkStreamSplitter()
    splitter.normalize_chunk(_chunk("<think>deep</th"))
    last = splitter.normalize_chunk(_chunk(finish="length"))
    assert last["choices"][0] == {
        "index": 0,
        "delta": {"reasoning_content": "</th"},
        "finish_reason": "length",
    }


def test_stream_held_back_text_flushed_on_finish_reason_as_content() -> None:
    splitter = ThinkStreamSplitter()
    assert splitter.normalize_chunk(_chunk("1 <"))["choices"][0]["delta"] == {"content": "1 "}
    last = splitter.normalize_chunk(_chunk(finish="stop"))
    assert last["choices"][0]["delta"] == {"content": "<"}


def test_stream_flush_without_finish_reason() -> None:
    splitter = ThinkStreamSplitter()
    splitter.normalize_chunk(_chunk("answer </thi"))
    assert splitter.flush() == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": "</thi"}, "finish_reason": None}],
    }
    assert splitter.flush() is None


def test_stream_flush_with_nothing_held_is_none() -> None:
    splitter = ThinkStreamSplitter()
    splitter.normalize_chunk(_chunk("plain"))
    assert splitter.flush() is None


def test_stream_unchanged_chunks_are_the_same_object() -> None:
    splitter = ThinkStreamSplitter()
    chunks = [
        _chunk("", role="assistant"),
        _chunk("plain text"),
        _chunk(tool_calls=[{"index": 0, "id": "call_1", "function": {"name": "f"}}]),
        {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [], "usage": {}},
        _chunk(finish="stop"),
    ]
    for chunk in chunks:
        assert splitter.normalize_chunk(chunk) is chunk


def test_stream_backend_reasoning_content_passes_through() -> None:
    splitter = ThinkStreamSplitter()
    chunk = _chunk(reasoning_content="vLLM parsed this")
    assert splitter.normalize_chunk(chunk) is chunk
    mixed = _chunk("<think>more", reasoning_content="parsed ")
    assert splitter.normalize_chunk(mixed)["choices"][0]["delta"] == {
        "reasoning_content": "parsed more"
    }


def test_stream_keeps_other_fields_and_does_not_mutate() -> None:
    splitter = ThinkStreamSplitter()
    chunk = _chunk("<think>a</think>b", finish="stop", role="assistant")
    chunk["usage"] = {"total_tokens": 3}
    chunk["system_fingerprint"] = "fp"
    before = copy.deepcopy(chunk)
    out = splitter.normalize_chunk(chunk)
    assert chunk == before
    assert {k: v for k, v in out.items() if k != "choices"} == {
        k: v for k, v in before.items() if k != "choices"
    }
    assert out["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": "b", "reasoning_content": "a"},
            "finish_reason": "stop",
        }
    ]


def test_stream_choices_are_split_independently() -> None:
    splitter = ThinkStreamSplitter()
    chunk = {
        "id": "c",
        "choices": [
            {"index": 0, "delta": {"content": "<think>a"}, "finish_reason": None},
            {"index": 1, "delta": {"content": "plain"}, "finish_reason": None},
        ],
    }
    out = splitter.normalize_chunk(chunk)
    assert out["choices"][0]["delta"] == {"reasoning_content": "a"}
    assert out["choices"][1] is chunk["choices"][1]
    nxt = splitter.normalize_chunk(
        {"id": "c", "choices": [{"index": 1, "delta": {"content": "more"}, "finish_reason": None}]}
    )
    assert nxt["choices"][0]["delta"] == {"content": "more"}  # choice 0's block is not choice 1's


# -- the cheap byte check -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [("<think>", True), ("<", True), ("plain", False), ("a > b", False)],
)
def test_may_contain_think(content: str, expected: bool) -> None:
    event = b"data: " + json.dumps(_chunk(content)).encode() + b"\n\n"
    assert may_contain_think(event) is expected


def test_may_contain_think_sees_json_escaped_angle_bracket() -> None:
    # Go's encoder (Ollama) escapes `<` as \u003c.
    assert may_contain_think(b'data: {"content":"\\u003cthink\\u003e"}')
    assert may_contain_think(b'data: {"content":"\\u003Cthink"}')


def test_splitter_active_while_a_tag_or_block_is_open() -> None:
    splitter = ThinkStreamSplitter()
    assert not splitter.active
    splitter.normalize_chunk(_chunk("<thi"))
    assert splitter.active  # holding a possible tag
    splitter.normalize_chunk(_chunk("nk>pondering"))
    assert splitter.active  # inside a block: chunks with no `<` are reasoning
    splitter.normalize_chunk(_chunk("</think>"))
    assert splitter.active  # whitespace after `</think>` is still to be dropped
    splitter.normalize_chunk(_chunk("The answer"))
    assert not splitter.active
    assert not splitter.wants(b'data: {"content":"plain"}')
    assert splitter.wants(b'data: {"content":"<"}')


def test_splitter_starting_in_think_is_active_from_the_start() -> None:
    assert ThinkStreamSplitter(starts_in_think=True).active


def test_skipping_chunks_by_the_wants_rule_gives_the_same_result() -> None:
    pieces = ["Hi ", "<thi", "nk>pon", "der", "ing</think>", "\n", "The", " answer", " <b>"]
    splitter = ThinkStreamSplitter()
    out = []
    for piece in [*pieces, None]:
        chunk = _chunk(piece, finish=None if piece is not None else "stop")
        event = json.dumps(chunk).encode()
        out.append(splitter.normalize_chunk(chunk) if splitter.wants(event) else chunk)
    deltas = [chunk["choices"][0]["delta"] for chunk in out]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "pondering"
    assert "".join(d.get("content") or "" for d in deltas) == "Hi The answer <b>"
