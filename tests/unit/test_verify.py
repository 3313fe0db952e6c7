from __future__ import annotations

import hashlib
import io
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from imageworks.registry.errors import RegistryError
from imageworks.registry.schema import RegistryEntry
from imageworks.registry.verify import (
    CHUNK_SIZE,
    Digest,
    TerminalProgress,
    VerifyStatus,
    compute_digest,
    hash_file,
    lock_patch,
    unlock_patch,
    verified_patch,
    verify_entry,
    weight_files,
)


def make_entry(name: str = "llama_8b", **fields: Any) -> RegistryEntry:
    return RegistryEntry.model_validate({"name": name, "backend": "vllm", **fields})


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeStream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_weight_files_single_file_resolves_against_registry_dir(tmp_path: Path) -> None:
    gguf = write(tmp_path / "models" / "llama.gguf", b"gguf")
    entry = make_entry(download_path="models/llama.gguf")
    assert weight_files(entry, tmp_path) == [("llama.gguf", gguf)]


def test_weight_files_falls_back_to_model_path(tmp_path: Path) -> None:
    gguf = write(tmp_path / "llama.gguf", b"gguf")
    entry = make_entry(backend_config={"model_path": str(gguf)})
    assert weight_files(entry, tmp_path) == [("llama.gguf", gguf)]


def test_weight_files_directory_is_recursive_sorted_and_skips_hidden(tmp_path: Path) -> None:
    root = tmp_path / "qwen"
    write(root / "model.safetensors", b"w")
    write(root / "config.json", b"{}")
    write(root / "tokenizer" / "vocab.json", b"v")
    write(root / ".cache" / "huggingface" / "download.lock", b"x")
    write(root / ".gitattributes", b"x")
    write(root / "tokenizer" / ".hidden", b"x")
    files = weight_files(make_entry(download_path=str(root)), tmp_path)
    assert [rel for rel, _ in files] == ["config.json", "model.safetensors", "tokenizer/vocab.json"]
    assert files[2][1] == root / "tokenizer" / "vocab.json"


def test_weight_files_download_files_restricts_the_set(tmp_path: Path) -> None:
    root = tmp_path / "qwen"
    write(root / "b.safetensors", b"b")
    write(root / "sub" / "a.json", b"a")
    write(root / "README.md", b"notes")
    entry = make_entry(download_path="qwen", download_files=["b.safetensors", "sub/a.json"])
    assert [rel for rel, _ in weight_files(entry, tmp_path)] == ["b.safetensors", "sub/a.json"]


def test_weight_files_missing_listed_file_is_an_error_naming_it(tmp_path: Path) -> None:
    write(tmp_path / "qwen" / "a.safetensors", b"a")
    entry = make_entry(download_path="qwen", download_files=["a.safetensors", "b.safetensors"])
    with pytest.raises(RegistryError, match=r"llama_8b.*b\.safetensors"):
        weight_files(entry, tmp_path)


def test_weight_files_missing_root_is_an_error_naming_entry_and_path(tmp_path: Path) -> None:
    entry = make_entry(download_path="gone/llama.gguf")
    with pytest.raises(RegistryError, match=r"llama_8b.*gone"):
        weight_files(entry, tmp_path)


def test_weight_files_ollama_entry_has_nothing_to_hash(tmp_path: Path) -> None:
    entry = make_entry("phi4", backend="ollama", download_path="ollama:/phi4:14b")
    with pytest.raises(RegistryError, match=r"phi4: no local weights to hash"):
        weight_files(entry, tmp_path)


def test_hash_file_larger_than_chunk_matches_hashlib(tmp_path: Path) -> None:
    data = bytes(range(256)) * (3 * CHUNK_SIZE // 256) + b"tail"
    path = write(tmp_path / "big.bin", data)
    seen: list[int] = []
    assert hash_file(path, seen.append) == sha(data)
    assert len(seen) == 4
    assert sum(seen) == len(data)


def test_compute_digest_aggregate_is_sha256sum_of_sha256sum_lines(tmp_path: Path) -> None:
    a = write(tmp_path / "a.json", b"alpha")
    b = write(tmp_path / "sub" / "b.bin", b"beta")
    digest = compute_digest([("sub/b.bin", b), ("a.json", a)])
    listing = f"{sha(b'alpha')}  a.json\n{sha(b'beta')}  sub/b.bin\n"
    assert digest.aggregate_sha256 == sha(listing.encode())
    assert digest.files == (("a.json", sha(b"alpha")), ("sub/b.bin", sha(b"beta")))
    assert digest.total_bytes == 9


def test_verify_entry_one_changed_byte_flips_ok_to_changed(tmp_path: Path) -> None:
    root = tmp_path / "qwen"
    write(root / "config.json", b"{}")
    weights = write(root / "model.safetensors", b"\x00" * 1000)
    entry = make_entry(download_path="qwen")
    digest = verify_entry(entry, tmp_path).digest
    locked = make_entry(
        download_path="qwen",
        version_lock={"locked": True, "expected_aggregate_sha256": digest.aggregate_sha256},
    )
    assert verify_entry(locked, tmp_path).status is VerifyStatus.OK

    weights.write_bytes(b"\x00" * 500 + b"\x01" + b"\x00" * 499)
    result = verify_entry(locked, tmp_path)
    assert result.status is VerifyStatus.CHANGED
    assert result.expected == digest.aggregate_sha256
    assert result.digest.aggregate_sha256 != digest.aggregate_sha256


def test_verify_entry_without_expectation_is_unlocked(tmp_path: Path) -> None:
    write(tmp_path / "llama.gguf", b"gguf")
    result = verify_entry(make_entry(download_path="llama.gguf"), tmp_path)
    assert result.name == "llama_8b"
    assert result.status is VerifyStatus.UNLOCKED
    assert result.expected is None


def test_verify_entry_unlocked_entry_ignores_stale_expectation(tmp_path: Path) -> None:
    write(tmp_path / "llama.gguf", b"gguf")
    entry = make_entry(
        download_path="llama.gguf",
        version_lock={"locked": False, "expected_aggregate_sha256": "0" * 64},
    )
    assert verify_entry(entry, tmp_path).status is VerifyStatus.UNLOCKED


def test_progress_draws_bar_on_tty_and_ends_line(tmp_path: Path) -> None:
    data = b"x" * (2 * CHUNK_SIZE)
    path = write(tmp_path / "llama.gguf", data)
    stream = FakeStream(tty=True)
    result = verify_entry(
        make_entry(download_path=str(path)), tmp_path, TerminalProgress(stream=stream)
    )
    output = stream.getvalue()
    assert result.digest.aggregate_sha256
    assert output.startswith("\rhashing llama_8b    0%  0.0/2.1 MB")
    assert output.endswith("\rhashing llama_8b  100%  2.1/2.1 MB\n")
    assert output.count("\n") == 1


def test_progress_writes_nothing_to_non_tty(tmp_path: Path) -> None:
    path = write(tmp_path / "llama.gguf", b"x" * 100)
    stream = FakeStream(tty=False)
    verify_entry(make_entry(download_path=str(path)), tmp_path, TerminalProgress(stream=stream))
    assert stream.getvalue() == ""


def test_progress_redraws_at_most_ten_times_a_second() -> None:
    stream, clock = FakeStream(tty=True), FakeClock()
    progress = TerminalProgress(stream=stream, clock=clock)
    progress.start("llama_8b", 100)
    for _ in range(50):  # a burst of chunks within 50 ms: no redraws
        clock.now += 0.001
        progress.advance(1)
    clock.now += 0.1
    progress.advance(1)
    assert stream.getvalue().count("\r") == 2
    assert stream.getvalue().endswith(" 51%  51/100 B")


def test_lock_patch_records_expectation_artifacts_and_utc_time() -> None:
    digest = Digest("agg", (("a.json", "s1"), ("b.bin", "s2")), 9)
    now = datetime(2025, 3, 1, 14, 30, 15, 999, tzinfo=timezone(timedelta(hours=2)))
    assert lock_patch(digest, now) == {
        "version_lock": {
            "locked": True,
            "expected_aggregate_sha256": "agg",
            "last_verified": "2025-03-01T12:30:15+00:00",
        },
        "artifacts": {
            "aggregate_sha256": "agg",
            "files": [{"path": "a.json", "sha256": "s1"}, {"path": "b.bin", "sha256": "s2"}],
        },
    }


def test_verified_patch_only_touches_last_verified() -> None:
    now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    assert verified_patch(now) == {"version_lock": {"last_verified": "2025-03-01T12:00:00+00:00"}}


def test_unlock_patch_only_clears_locked_flag() -> None:
    assert unlock_patch() == {"version_lock": {"locked": False}}


def test_lock_patch_then_verify_reports_ok(tmp_path: Path) -> None:
    write(tmp_path / "llama.gguf", b"gguf")
    entry = make_entry(download_path="llama.gguf")
    patch = lock_patch(verify_entry(entry, tmp_path).digest, datetime.now(UTC))
    locked = make_entry(download_path="llama.gguf", **patch)
    assert verify_entry(locked, tmp_path).status is VerifyStatus.OK
