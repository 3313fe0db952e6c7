"""Command lines for model servers: our defaults, then the entry's `extra_args`, which win."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Flag = tuple[str, str | None]  # ("--port", "24001"), or ("--enforce-eager", None) for a switch


def _flag_key(flag: str) -> str:
    # `--n_ctx`, `--n-ctx` and `--n-ctx=512` all name one option.
    return flag.split("=", 1)[0].lstrip("-").replace("_", "-").lower()


def flags_in(args: Iterable[str]) -> set[str]:
    return {_flag_key(arg) for arg in args if arg.startswith("-") and not _is_number(arg)}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def merge_args(defaults: Sequence[Flag], extra_args: Sequence[str]) -> list[str]:
    """`defaults` without the flags `extra_args` sets, followed by `extra_args` as given, so an
    entry can override any default and no flag appears twice."""
    overridden = flags_in(extra_args)
    argv: list[str] = []
    for flag, value in defaults:
        if _flag_key(flag) in overridden:
            continue
        argv.append(flag)
        if value is not None:
            argv.append(value)
    return [*argv, *extra_args]
