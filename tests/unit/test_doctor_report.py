"""`model_loader.doctor_report`: the doctor's lines, its summary and its JSON document."""

from __future__ import annotations

import pytest

from imageworks.model_loader.doctor_report import (
    Finding,
    Gpu,
    Status,
    describe_gpus,
    document,
    fail,
    line,
    ok,
    parse_nvidia_smi,
    text,
    version_line,
    warn,
)

pytestmark = pytest.mark.timeout(10)


def test_line_is_status_name_and_what_was_found() -> None:
    assert line(ok("gpu", "no NVIDIA GPU found (CPU only)")) == (
        "ok    gpu           no NVIDIA GPU found (CPU only)"
    )


def test_line_of_a_problem_ends_with_its_fix() -> None:
    finding = fail("llama-server", "X=/a is not an executable file", "point X at it, or unset it")
    assert line(finding) == (
        "FAIL  llama-server  X=/a is not an executable file; point X at it, or unset it"
    )


def test_line_folds_a_found_text_spread_over_lines_into_one() -> None:
    assert line(warn("ollama", "down\n  (refused)")) == "warn  ollama        down (refused)"


def test_line_of_a_failed_start_adds_the_last_log_lines_indented() -> None:
    tail = "\n".join(f"log {n}" for n in range(1, 9)) + "\n\n"
    finding = Finding("model", Status.FAIL, "exited with code 3", "that log says why", {}, tail)
    rows = line(finding).splitlines()
    assert rows[0].startswith("FAIL  model")
    assert rows[1:] == [f"      log {n}" for n in range(4, 9)]  # the last five, blank lines out


def test_text_ends_with_a_summary_of_failures_and_warnings() -> None:
    findings = [ok("registry", "5 entries"), warn("ollama", "down"), fail("model", "dead")]
    assert text(findings, 2.345).splitlines()[-1] == "1 failed, 1 warning(s) (3 checks in 2.3 s)"
    assert text(findings[:2], 1.0).splitlines()[-1] == (
        "nothing failed, 1 warning(s) (2 checks in 1.0 s)"
    )
    assert text(findings[:1], 1.0).splitlines()[-1] == "everything is ok (1 checks in 1.0 s)"


def test_document_has_the_same_results_with_their_details() -> None:
    findings = [
        ok("llama-server", "version: 1 at /bin/ls", path="/bin/ls"),
        Finding("model", Status.FAIL, "exited", None, {"log": "m.log"}, "last words"),
    ]
    assert document(findings, 1.234) == {
        "ok": False,
        "seconds": 1.23,
        "checks": [
            {
                "name": "llama-server",
                "status": "ok",
                "found": "version: 1 at /bin/ls",
                "fix": None,
                "path": "/bin/ls",
            },
            {
                "name": "model",
                "status": "FAIL",
                "found": "exited",
                "fix": None,
                "log": "m.log",
                "log_tail": "last words",
            },
        ],
    }
    assert document(findings[:1], 0)["ok"] is True


def test_version_line_skips_what_llama_server_prints_before_it() -> None:
    output = "load_backend: loaded CPU backend\nversion: 6500 (abc)\nbuilt with GNU 12"
    assert version_line(output) == "version: 6500 (abc)"
    assert version_line("\n vllm 0.11.0 \n") == "vllm 0.11.0"
    assert version_line("") == ""


def test_parse_nvidia_smi_reads_each_gpu_and_skips_other_lines() -> None:
    output = "NVIDIA GeForce RTX 4090, 23000, 24564\nA100, SXM4 80GB, 81000.0, 81920\nnotice\n"
    assert parse_nvidia_smi(output) == [
        Gpu("NVIDIA GeForce RTX 4090", 23000, 24564),
        Gpu("A100, SXM4 80GB", 81000, 81920),  # a name may hold commas
    ]
    assert parse_nvidia_smi("No devices were found") == []
    assert parse_nvidia_smi("GPU, [N/A], [N/A]") == []


def test_describe_gpus_gives_free_and_total_memory_in_gib() -> None:
    gpus = [Gpu("RTX 4090", 23040, 24576), Gpu("T4", 15360, 15360)]
    assert describe_gpus(gpus) == (
        "RTX 4090: 22.5 GiB free of 24.0 GiB, T4: 15.0 GiB free of 15.0 GiB"
    )
