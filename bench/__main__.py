"""`uv run python -m bench`: the benchmark of this proxy against direct, the floor, LiteLLM and
nginx, in one command. See bench/README.md for what each number means.

    uv run python -m bench [--rounds 3] [--quick] [--json bench/results/latest.json]
                           [--only direct,floor,proxy] [--skip-swap] [--loadgen auto|wrk|python]

Progress goes to stderr, the machine and the table to stdout, everything to the JSON file.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType

from bench.run import Settings, execute
from bench.targets import ORDER

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"


def parse(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--quick", action="store_true", help="1 short round and 5,000 requests for RSS (tests)"
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write JSON")
    parser.add_argument(
        "--only", default=",".join(ORDER), help=f"targets, comma-separated ({','.join(ORDER)})"
    )
    parser.add_argument(
        "--skip-swap", action="store_true", help="no swap overhead, no /v1/models during a swap"
    )
    parser.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="auto: wrk when on PATH, else the Python one (bench/loadgen.py)",
    )
    args = parser.parse_args(argv)
    only = tuple(name.strip() for name in args.only.split(",") if name.strip())
    unknown = sorted(set(only) - set(ORDER))
    if unknown or not only:
        parser.error(f"--only: unknown targets {unknown}; choose from {','.join(ORDER)}")
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be between 1 and 20")
    return Settings.make(
        rounds=args.rounds,
        quick=args.quick,
        only=only,
        swap=not args.skip_swap,
        json_path=args.json,
        loadgen=args.loadgen,
    )


def _terminated(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through every `finally`: all stopped


def main(argv: list[str] | None = None) -> int:
    settings = parse(argv)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        return execute(settings)
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
