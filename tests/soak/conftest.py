"""Options and marker of the soak test.

    pytest tests/soak                      # the short form, about 40 s of traffic (also `pytest`)
    pytest tests/soak --soak-minutes 30    # half an hour of traffic
    pytest tests/soak --soak-seed 1234     # other random choices (the default seed is fixed,
                                           # so every run makes the same choices)

The options exist when pytest is pointed at tests/soak or a file in it; a plain `pytest` run
reads this file after its command line, so there the soak always runs its short form.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

SHORT_TRAFFIC_S = 40.0
DEFAULT_SEED = 20261201
# Preparing the models, starting the proxy, the last requests and the shutdown.
OVERHEAD_S = 200.0

_SUMMARY = pytest.StashKey[list[str]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("soak")
    group.addoption(
        "--soak-minutes",
        type=float,
        default=0.0,
        help="minutes of soak traffic (0, the default: the short form, about 40 s)",
    )
    group.addoption("--soak-seed", type=int, default=None, help="seed of the soak's random choices")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "soak: many clients against the real proxy for a while")
    config.stash[_SUMMARY] = []


def traffic_seconds(config: pytest.Config) -> float:
    minutes = float(config.getoption("soak_minutes", default=0.0) or 0.0)
    return minutes * 60 if minutes > 0 else SHORT_TRAFFIC_S


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(pytest.mark.timeout(traffic_seconds(config) + OVERHEAD_S))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = terminalreporter.config.stash.get(_SUMMARY, [])
    if lines:
        terminalreporter.section("soak")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture
def soak_seconds(pytestconfig: pytest.Config) -> float:
    return traffic_seconds(pytestconfig)


@pytest.fixture
def soak_seed(pytestconfig: pytest.Config) -> int:
    seed = pytestconfig.getoption("soak_seed", default=None)
    return int(seed) if seed is not None else DEFAULT_SEED


@pytest.fixture
def soak_summary(pytestconfig: pytest.Config) -> Callable[[str], None]:
    """Adds a line to the `soak` section at the end of pytest's report (passed or failed)."""
    return pytestconfig.stash[_SUMMARY].append
