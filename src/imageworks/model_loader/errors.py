"""What a failed `imageworks-loader` command says: one line, the problem and then what to do.

    LoaderError          the command could not do what was asked (exit 1); `fix` says what to do
    └── ActivationError  starting or stopping a model server failed; `log_tail` holds the model
                         server's last log lines when it wrote any

The loader's modules raise these in their own words. `cli.main` prints them, and is the one
place that translates the registry's, the settings' and the operating system's errors.
"""

from __future__ import annotations

PROG = "imageworks-loader"


class LoaderError(Exception):
    """`problem; fix`, on one line."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.problem}; {self.fix}" if self.fix else self.problem


class ActivationError(LoaderError):
    """A model server did not start or stop. `log_tail` is its log's last lines (or "")."""

    def __init__(self, problem: str, fix: str | None = None, *, log_tail: str = "") -> None:
        super().__init__(problem, fix)
        self.log_tail = log_tail
