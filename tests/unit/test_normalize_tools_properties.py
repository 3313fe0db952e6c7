from __future__ import annotations

import copy
import itertools
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from imageworks.chat_proxy.normalize.tools import (
    ToolStreamNormalizer,
    may_need_tool_normalization,
    normalize_completion,
    normalize_tool_request,
)
from support.wire import plain, typed_request

JsonDict = dict[str, Any]
TOOL_KEYS = ("tool_calls", "function_call")
REQUEST_KEYS = ("tools", "functions", "function_call")
KEYS = ["choices", "index", "delta", "message", "role", "content", "finish_reason", "id", "type"]
KEYS += ["function", "name", "arguments", "usage", *REQUEST_KEYS[:2], "tool_choice"]
# Strings that come close to the tool keys once JSON-encoded, plus text that looks like a call.
TRICKY = ['"tool_calls"', 'a"tool_calls', 'x"function_call', "tool_calls\\", "\\", '"', "é"]
TRICKY += ["function_call ", "call_", '{"name": "f", "arguments": {}}', "<name>f</name>"]

modest = settings(max_examples=200, deadline=None)


def _texts(*, tools: bool) -> st.SearchStrategy[str]:
    plain = st.text(max_size=12) | st.sampled_from(TRICKY + KEYS)
    if tools:
        return plain | st.sampled_from(TOOL_KEYS)
    return plain.filter(lambda text: text not in TOOL_KEYS)


def _json(texts: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)  # NaN != NaN would defeat ==
        | texts
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=5),
        max_leaves=12,
    )


def _mostly(shaped: st.SearchStrategy[Any], junk: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`shaped` three times in four, so deep structure is reached often, junk otherwise."""
    return st.one_of(shaped, shaped, shaped, junk)


def _records(
    fields: dict[str, st.SearchStrategy[Any]], emphasised: tuple[str, ...]
) -> st.SearchStrategy[JsonDict]:
    """Dicts with any subset of `fields`, and as often one that surely has each emphasised one."""
    variants = [st.fixed_dictionaries({}, optional=fields)]
    for key in emphasised:
        others = {name: value for name, value in fields.items() if name != key}
        variants.append(st.fixed_dictionaries({key: fields[key]}, optional=others))
    return st.one_of(variants)


def _bodies(*, tools: bool) -> st.SearchStrategy[JsonDict]:
    """Chunk- and completion-shaped dicts whose every field may also be junk; with `tools`
    false, no key or string anywhere equals `tool_calls` or `function_call`."""
    texts = _texts(tools=tools)
    anything = _json(texts)
    arguments = anything | st.sampled_from(["", "{", '{"a": 1}', "}"])
    function = st.fixed_dictionaries({}, optional={"name": texts, "arguments": arguments})
    fragment = st.fixed_dictionaries(
        {},
        optional={
            "index": _mostly(st.integers(-1, 3), anything),
            "id": _mostly(st.sampled_from(["call_a", "call_b", ""]), anything),
            "type": _mostly(st.just("function"), anything),
            "function": _mostly(function, anything),
        },
    )
    inner_fields: dict[str, st.SearchStrategy[Any]] = {"role": texts, "content": anything}
    finish = [None, "stop", "length"]
    if tools:
        inner_fields["tool_calls"] = _mostly(
            st.lists(_mostly(fragment, anything), max_size=3), anything
        )
        inner_fields["function_call"] = _mostly(function, anything)
        finish += list(TOOL_KEYS)
    inner = _records(inner_fields, emphasised=TOOL_KEYS if tools else ())
    choice_fields = {
        "index": _mostly(st.integers(0, 2), anything),
        "delta": _mostly(inner, anything),
        "message": _mostly(inner, anything),
        "finish_reason": _mostly(st.sampled_from(finish), anything),
    }
    choice = _records(choice_fields, emphasised=("delta", "message"))
    return st.fixed_dictionaries(
        {"choices": _mostly(st.lists(_mostly(choice, anything), max_size=3), anything)},
        optional={"object": texts, "usage": anything},
    )


def _dicts(*, tools: bool) -> st.SearchStrategy[JsonDict]:
    texts = _texts(tools=tools)
    return _mostly(_bodies(tools=tools), st.dictionaries(texts, _json(texts), max_size=5))


def _requests() -> st.SearchStrategy[JsonDict]:
    """Request bodies with any mix of tool fields, each of a type the typed request accepts."""
    texts = _texts(tools=True)
    name = texts.filter(bool)
    schema = st.dictionaries(texts, _json(texts), max_size=3)
    function = st.fixed_dictionaries({"name": name}, optional={"parameters": schema})
    tool = st.fixed_dictionaries({"type": st.just("function"), "function": function})
    chosen = st.builds(dict, name=texts)
    named = st.fixed_dictionaries({"type": st.just("function"), "function": chosen})
    return st.fixed_dictionaries(
        {"model": name, "messages": st.just([{"role": "user", "content": "hi"}])},
        optional={
            "tools": st.lists(tool, max_size=2) | st.none(),
            "tool_choice": st.sampled_from(["auto", "none", "required"]) | named | st.none(),
            "parallel_tool_calls": st.booleans(),
            "functions": st.lists(function, max_size=2) | st.none(),
            "function_call": st.sampled_from(["auto", "none"]) | st.builds(dict, name=texts),
        },
    )


@modest
@given(body=_dicts(tools=True))
def test_completion_never_raises_nor_mutates(body: JsonDict) -> None:
    before = copy.deepcopy(body)
    result = normalize_completion(body)
    assert body == before
    for choice in result["choices"] if isinstance(result.get("choices"), list) else []:
        message = choice.get("message") if isinstance(choice, dict) else None
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        for call in calls if isinstance(calls, list) else []:
            if isinstance(call, dict) and isinstance(call.get("function"), dict):
                assert isinstance(call["function"]["arguments"], str)


@modest
@given(chunks=st.lists(_dicts(tools=True), max_size=5))
def test_stream_never_raises_nor_mutates(chunks: list[JsonDict]) -> None:
    before = copy.deepcopy(chunks)
    normalizer = ToolStreamNormalizer()
    results = [normalizer.normalize_chunk(chunk) for chunk in chunks]
    assert chunks == before
    for result in results:
        for choice in result["choices"] if isinstance(result.get("choices"), list) else []:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            assert not (isinstance(delta, dict) and isinstance(delta.get("function_call"), dict))
            calls = delta.get("tool_calls") if isinstance(delta, dict) else None
            for call in calls if isinstance(calls, list) else []:
                assert not isinstance(call, dict) or isinstance(call["index"], int)


@modest
@given(body=_requests())
def test_request_never_raises_nor_mutates(body: JsonDict) -> None:
    request = typed_request(body)
    before = plain(request)
    result = plain(normalize_tool_request(request))
    assert plain(request) == before
    assert not set(result) & {"functions", "function_call"}
    assert result.get("tools", True)  # never an empty or null list


@modest
@given(body=_dicts(tools=False))
def test_body_without_tool_keys_is_returned_itself(body: JsonDict) -> None:
    assert may_need_tool_normalization(json.dumps(body).encode()) is False
    assert may_need_tool_normalization(json.dumps(body, ensure_ascii=False).encode()) is False
    assert normalize_completion(body) is body


@modest
@given(chunks=st.lists(_dicts(tools=False), max_size=5))
def test_chunks_without_tool_keys_are_returned_themselves(chunks: list[JsonDict]) -> None:
    normalizer = ToolStreamNormalizer()
    for chunk in chunks:
        assert may_need_tool_normalization(b"data: " + json.dumps(chunk).encode()) is False
        assert normalizer.normalize_chunk(chunk) is chunk


@modest
@given(body=_requests())
def test_request_without_tool_keys_is_returned_itself(body: JsonDict) -> None:
    request = typed_request({key: value for key, value in body.items() if key not in REQUEST_KEYS})
    assert normalize_tool_request(request) is request


@modest
@given(
    name=st.text(min_size=1, max_size=8),
    arguments=st.text(max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=8),
    legacy=st.booleans(),
)
def test_any_split_of_one_call_reassembles_to_the_whole(
    name: str, arguments: str, cuts: list[int], legacy: bool
) -> None:
    bounds = sorted({0, len(arguments), *(cut for cut in cuts if cut < len(arguments))})
    pieces = [arguments[start:end] for start, end in itertools.pairwise(bounds)] or [""]
    deltas: list[JsonDict]
    if legacy:  # the legacy shape, name on the first fragment
        deltas = [{"function_call": {"name": name, "arguments": pieces[0]}}]
        deltas += [{"function_call": {"arguments": piece}} for piece in pieces[1:]]
    else:  # native fragments with neither index nor id
        deltas = [{"tool_calls": [{"function": {"name": name, "arguments": pieces[0]}}]}]
        deltas += [{"tool_calls": [{"function": {"arguments": piece}}]} for piece in pieces[1:]]
    normalizer = ToolStreamNormalizer()
    fragments: list[JsonDict] = []
    for delta in deltas:
        chunk = normalizer.normalize_chunk({"choices": [{"index": 0, "delta": delta}]})
        fragments += chunk["choices"][0]["delta"]["tool_calls"]
    assert {fragment["index"] for fragment in fragments} == {0}
    assert ["id" in fragment for fragment in fragments] == [True] + [False] * (len(pieces) - 1)
    assert "".join(fragment["function"].get("name", "") for fragment in fragments) == name
    assert "".join(fragment["function"]["arguments"] for fragment in fragments) == arguments
