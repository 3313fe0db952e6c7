from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from imageworks.backends.endpoints import is_embedding_entry
from imageworks.backends.templates import check_chat_template, gguf_has_key
from imageworks.registry.schema import RegistryEntry


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def gguf(metadata: list[tuple[str, int, bytes]]) -> bytes:
    """A GGUF v3 header: (key, value type, encoded value) triples, no tensors."""
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, len(metadata))
    for key, value_type, value in metadata:
        header += _string(key) + struct.pack("<I", value_type) + value
    return header


TOKENS = struct.pack("<IQ", 8, 3) + _string("<s>") + _string("a") + _string("b")
SCALARS = [
    ("general.architecture", 8, _string("llama")),
    ("llama.context_length", 4, struct.pack("<I", 2048)),
    ("tokenizer.ggml.tokens", 9, TOKENS),
    ("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, 3) + struct.pack("<3f", 0, 0, 0)),
]


def test_gguf_has_key_finds_the_template_after_arrays() -> None:
    data = gguf([*SCALARS, ("tokenizer.chat_template", 8, _string("{{ messages }}"))])
    assert gguf_has_key(io.BytesIO(data), "tokenizer.chat_template") is True


def test_gguf_without_template() -> None:
    assert gguf_has_key(io.BytesIO(gguf(SCALARS)), "tokenizer.chat_template") is False


def test_gguf_rejects_other_files() -> None:
    with pytest.raises(ValueError, match="not a GGUF"):
        gguf_has_key(io.BytesIO(b"PK\x03\x04"), "x")


def _entry(backend: str = "llamacpp", **fields: Any) -> RegistryEntry:
    return RegistryEntry.model_validate({"name": "m", "backend": backend, **fields})


def test_template_from_gguf_metadata(tmp_path: Path) -> None:
    with_template = tmp_path / "a.gguf"
    with_template.write_bytes(gguf([("tokenizer.chat_template", 8, _string("{{x}}"))]))
    without = tmp_path / "b.gguf"
    without.write_bytes(gguf(SCALARS))
    assert check_chat_template(_entry(download_path="a.gguf"), tmp_path).ok is True
    missing = check_chat_template(_entry(download_path="b.gguf"), tmp_path)
    assert missing.ok is False
    assert "b.gguf embeds no chat template" in missing.reason


def test_template_name_counts_for_llamacpp(tmp_path: Path) -> None:
    (tmp_path / "b.gguf").write_bytes(gguf(SCALARS))
    entry = _entry(download_path="b.gguf", chat_template={"name": "gemma"})
    check = check_chat_template(entry, tmp_path)
    assert check.ok is True
    assert check.reason == "chat_template.name gemma"


def test_template_name_does_not_count_for_vllm(tmp_path: Path) -> None:
    (tmp_path / "b.gguf").write_bytes(gguf(SCALARS))
    entry = _entry("vllm", download_path="b.gguf", chat_template={"name": "chatml"})
    assert check_chat_template(entry, tmp_path).ok is False  # vLLM has no built-in templates


@pytest.mark.parametrize(
    ("extra_args", "ok"),
    [
        (["--chat_format", "gemma"], True),  # llama-cpp-python
        (["--chat-format", "gemma"], True),
        (["--chat-template", "gemma"], True),  # llama-server
        (["--chat-template=chatml"], True),
        (["--chat-template-file", "t.jinja"], True),
        (["--jinja"], False),  # the Jinja engine, not a template
        (["--ctx-size", "512"], False),
    ],
)
def test_template_flags_in_extra_args_count_for_llamacpp(
    tmp_path: Path, extra_args: list[str], ok: bool
) -> None:
    (tmp_path / "b.gguf").write_bytes(gguf(SCALARS))
    entry = _entry(download_path="b.gguf", backend_config={"extra_args": extra_args})
    assert check_chat_template(entry, tmp_path).ok is ok


def test_template_name_and_path_are_exclusive() -> None:
    with pytest.raises(ValidationError, match="not both"):
        _entry(chat_template={"name": "gemma", "path": "t.jinja"})


def test_blank_template_name_is_unset() -> None:
    assert _entry(chat_template={"name": "  "}).chat_template.name is None


def test_template_path_must_exist(tmp_path: Path) -> None:
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    good = _entry("vllm", chat_template={"source": "external", "path": "t.jinja"})
    bad = _entry("vllm", chat_template={"source": "external", "path": "nope.jinja"})
    assert check_chat_template(good, tmp_path).ok is True
    result = check_chat_template(bad, tmp_path)
    assert result.ok is False
    assert "nope.jinja does not exist" in result.reason


@pytest.mark.parametrize(
    ("files", "ok"),
    [
        ({"chat_template.json": "{}"}, True),
        ({"chat_template.jinja": "{{ m }}"}, True),
        ({"tokenizer_config.json": json.dumps({"chat_template": "{{ m }}"})}, True),
        ({"tokenizer_config.json": json.dumps({"bos_token": "<s>"})}, False),
        ({"config.json": "{}"}, False),
    ],
)
def test_template_in_hugging_face_directory(
    tmp_path: Path, files: dict[str, str], ok: bool
) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    for name, text in files.items():
        (weights / name).write_text(text)
    assert check_chat_template(_entry("vllm", download_path=str(weights)), tmp_path).ok is ok


def test_demo_models(demo_models: Path) -> None:
    smol = _entry(download_path=str(demo_models / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    gemma = _entry(download_path=str(demo_models / "gemma-3-270m-q4_k_m.gguf"))
    assert check_chat_template(smol, demo_models).ok is True
    assert check_chat_template(gemma, demo_models).ok is False  # hence chat_template.name


def test_demo_registry_entries_have_templates(demo_registry: Path) -> None:
    raw = json.loads((demo_registry / "model_registry.curated.json").read_text())
    entries = [RegistryEntry.model_validate(item) for item in raw if item["backend"] == "llamacpp"]
    chat = [entry for entry in entries if not is_embedding_entry(entry)]  # embeddings need none
    assert [check_chat_template(entry, demo_registry).ok for entry in chat] == [True, True]
