"""Inline `<think>…</think>` blocks moved out of `content` into `reasoning_content`.

Backends with a reasoning parser (vLLM) already send `reasoning_content`; it is never touched,
only appended to. Others leave the model's think blocks in `content`, where a client shows them
as part of the answer. Both the whole-response and the streaming paths run the same state
machine (`_ThinkState`), so a stream and a non-stream response split the same text the same way.

Rules, for one choice's text:
- text inside `<think>…</think>` is reasoning; several blocks are joined with a newline;
- an unclosed `<think>` makes the rest of the text reasoning;
- whitespace right after `</think>` is dropped (models put a blank line before the answer);
- a `</think>` before any `<think>` means the chat template opened the block (DeepSeek-R1,
  QwQ): the whole response sees that and treats everything before it as reasoning, while a
  stream cannot look ahead, so its caller says so with `ThinkStreamSplitter(starts_in_think=True)`;
  anywhere else a stray `</think>` is dropped.
"""

from __future__ import annotations

from typing import Any

OPEN = "<think>"
CLOSE = "</think>"
_TAGS = (OPEN, CLOSE)


def may_contain_think(event: bytes) -> bool:
    """Whether a raw SSE event could start a think tag: every tag begins with `<`, which JSON
    writes either as it is or escaped (Go's encoder, hence Ollama, writes `\\u003c`).

    The skip rule for a stream is `splitter.active or may_contain_think(event)`
    (`ThinkStreamSplitter.wants`): once a stream is inside a block, holding back part of a
    tag or about to strip whitespace after one, every chunk matters even without a `<`."""
    return b"<" in event or b"\\u003c" in event or b"\\u003C" in event


class _ThinkState:
    """The split of one choice's text, fed in pieces; returns (reasoning, content) per piece."""

    def __init__(self, *, inside: bool) -> None:
        self.inside = inside
        self.pending = ""  # a suffix that may be the start of a tag, not yet decided
        self.strip_next = False  # drop whitespace before the next content (after `</think>`)
        self.had_reasoning = False

    @property
    def active(self) -> bool:
        return self.inside or bool(self.pending) or self.strip_next

    def feed(self, text: str) -> tuple[str, str]:
        text = self.pending + text
        self.pending = ""
        reasoning: list[str] = []
        content: list[str] = []
        while text:
            at, tag = _first_tag(text, (CLOSE,) if self.inside else _TAGS)
            if tag is None:
                keep = _partial_tag_length(text)
                self.pending = text[len(text) - keep :]
                self._emit(text[: len(text) - keep], reasoning, content)
                break
            self._emit(text[:at], reasoning, content)
            text = text[at + len(tag) :]
            if tag == OPEN:
                self.inside = True
                self.strip_next = False
                if self.had_reasoning:
                    reasoning.append("\n")
            elif self.inside:
                self.inside = False
                self.strip_next = True
            # else: a stray `</think>` outside a block is dropped.
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        """The held-back text, in the field it would have gone to; the state is then spent."""
        reasoning: list[str] = []
        content: list[str] = []
        self._emit(self.pending, reasoning, content)
        self.pending = ""
        return "".join(reasoning), "".join(content)

    def _emit(self, text: str, reasoning: list[str], content: list[str]) -> None:
        if not text:
            return
        if self.inside:
            reasoning.append(text)
            self.had_reasoning = True
            return
        if self.strip_next:
            text = text.lstrip()
            if not text:
                return
            self.strip_next = False
        content.append(text)


def _first_tag(text: str, tags: tuple[str, ...]) -> tuple[int, str | None]:
    found: tuple[int, str | None] = (len(text), None)
    for tag in tags:
        at = text.find(tag)
        if at != -1 and at < found[0]:
            found = (at, tag)
    return found


def _partial_tag_length(text: str) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of a tag."""
    for start in range(max(0, len(text) - len(CLOSE) + 1), len(text)):
        suffix = text[start:]
        if any(tag.startswith(suffix) for tag in _TAGS):
            return len(text) - start
    return 0


def split_think_completion(body: dict[str, Any]) -> dict[str, Any]:
    """A `chat.completion` with inline think blocks moved to `message.reasoning_content`.
    Returns `body` itself when no choice has a tag."""
    choices = body.get("choices")
    if not isinstance(choices, list):
        return body
    changed = False
    new_choices: list[Any] = []
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(message, dict) or not isinstance(text, str) or not _has_tag(text):
            new_choices.append(choice)
            continue
        open_at, close_at = text.find(OPEN), text.find(CLOSE)
        leading_close = close_at != -1 and (open_at == -1 or close_at < open_at)
        state = _ThinkState(inside=leading_close)
        reasoning, content = state.feed(text)
        more_reasoning, more_content = state.flush()
        reasoning, content = reasoning + more_reasoning, content + more_content
        existing = message.get("reasoning_content")
        if isinstance(existing, str) and existing and reasoning:
            reasoning = existing + "\n" + reasoning
        elif isinstance(existing, str) and existing:
            reasoning = existing
        new_message = {**message, "content": content}
        if reasoning:
            new_message["reasoning_content"] = reasoning
        new_choices.append({**choice, "message": new_message})
        changed = True
    return {**body, "choices": new_choices} if changed else body


def _has_tag(text: str) -> bool:
    return OPEN in text or CLOSE in text


class ThinkStreamSplitter:
    """The split for one stream of `chat.completion.chunk`s, choice by choice.

    A tag may arrive in pieces (`"<thi"`, `"nk>"`); text that may still become a tag is held
    back (at most `len("</think>") - 1` characters) and sent, in the right field, with a later
    chunk: the next one that decides it, the choice's `finish_reason` chunk, or `flush()`."""

    def __init__(self, *, starts_in_think: bool = False) -> None:
        # Set when the chat template itself opens `<think>`: text is reasoning until `</think>`.
        self._starts_in_think = starts_in_think
        self._states: dict[int, _ThinkState] = {}
        self._envelope: dict[str, Any] = {}

    @property
    def active(self) -> bool:
        """Whether the next chunk must be parsed even if it has no `<` (see `may_contain_think`)."""
        if self._starts_in_think and not self._states:
            return True  # the first content, whatever it is, is reasoning
        return any(state.active for state in self._states.values())

    def wants(self, event: bytes) -> bool:
        """Whether `event` must go through `normalize_chunk`; others are left as they are."""
        return self.active or may_contain_think(event)

    def normalize_chunk(self, chunk: dict[str, Any]) -> dict[str, Any]:
        """`chunk` with its content split; the same object when no delta changes."""
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return chunk
        self._envelope = {k: chunk[k] for k in ("id", "object", "created", "model") if k in chunk}
        new_choices = [self._choice(position, choice) for position, choice in enumerate(choices)]
        if all(new is old for new, old in zip(new_choices, choices, strict=True)):
            return chunk
        return {**chunk, "choices": new_choices}

    def flush(self) -> dict[str, Any] | None:
        """A last chunk with whatever is still held back (for a stream that ended without a
        `finish_reason`), or None when nothing is."""
        deltas: list[dict[str, Any]] = []
        for index, state in sorted(self._states.items()):
            reasoning, content = state.flush()
            if reasoning or content:
                deltas.append({"index": index, "delta": _delta({}, reasoning, content)})
        self._states.clear()
        if not deltas:
            return None
        choices = [{**d, "finish_reason": None} for d in deltas]
        return {"object": "chat.completion.chunk", **self._envelope, "choices": choices}

    def _choice(self, position: int, choice: Any) -> Any:
        if not isinstance(choice, dict):
            return choice
        index = choice.get("index", position)
        index = index if isinstance(index, int) else position
        delta = choice.get("delta")
        delta = delta if isinstance(delta, dict) else {}
        text = delta.get("content")
        state = self._states.get(index)
        if state is None:
            if not isinstance(text, str) or not (self._starts_in_think or "<" in text):
                return choice  # nothing held, nothing open and no `<`: nothing to split
            state = self._states[index] = _ThinkState(inside=self._starts_in_think)
        reasoning, content = state.feed(text) if isinstance(text, str) else ("", "")
        if choice.get("finish_reason") is not None:
            more_reasoning, more_content = state.flush()
            reasoning, content = reasoning + more_reasoning, content + more_content
        if not reasoning and (content == text or (not content and text is None)):
            return choice
        return {**choice, "delta": _delta(delta, reasoning, content)}


def _delta(delta: dict[str, Any], reasoning: str, content: str) -> dict[str, Any]:
    """`delta` with its content replaced and `reasoning` appended to its reasoning_content. An
    emptied content is left out, as vLLM does for reasoning-only deltas."""
    new = {k: v for k, v in delta.items() if k != "content"}
    if content:
        new["content"] = content
    if reasoning:
        existing = delta.get("reasoning_content")
        new["reasoning_content"] = (existing if isinstance(existing, str) else "") + reasoning
    return new
