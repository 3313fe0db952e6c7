"""The restarts-under-load test's option, a plugin tests/conftest.py registers (a conftest.py of
its own in tests/integration would shadow tests/conftest.py, which tests import as `conftest`).

    pytest tests/integration/test_restart_under_load.py                      # the short form
    pytest tests/integration/test_restart_under_load.py --restart-rounds 40  # ~40 restarts
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

SHORT_RESTART_ROUNDS = 3
# A guard against a hang, not a speed goal: the drain, the exec, a model start and some answers
# take ~10 s a round on 2 idle cores, and one run took 180 s for 3 rounds on cores that were
# also compiling llama.cpp.
SECONDS_PER_RESTART_ROUND = 45.0
RESTART_OVERHEAD_S = 180.0  # preparing the models, the proxy's first start, its last stop

_SUMMARY = pytest.StashKey[list[str]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("restart").addoption(
        "--restart-rounds",
        type=int,
        default=0,
        help="restarts under load in test_restart_under_load (0, the default: the short form)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_SUMMARY] = []


def restart_rounds(config: pytest.Config) -> int:
    rounds = int(config.getoption("restart_rounds", default=0) or 0)
    return rounds if rounds > 0 else SHORT_RESTART_ROUNDS


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    timeout = RESTART_OVERHEAD_S + SECONDS_PER_RESTART_ROUND * restart_rounds(config)
    for item in items:
        if "restart_rounds" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(timeout))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = terminalreporter.config.stash.get(_SUMMARY, [])
    if lines:
        terminalreporter.section("restarts under load")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(name="restart_rounds")
def restart_rounds_fixture(pytestconfig: pytest.Config) -> int:
    return restart_rounds(pytestconfig)


@pytest.fixture
def restart_summary(pytestconfig: pytest.Config) -> Callable[[str], None]:
    """Adds a line to the `restarts under load` section of pytest's report (passed or failed)."""
    return pytestconfig.stash[_SUMMARY].append
