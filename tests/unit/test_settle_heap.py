"""Once started, the proxy's heap is frozen out of the cyclic collector's sight and the youngest
generation is collected less often (app.settle_the_heap; why: its docstring). Run in a child
process, so this test process keeps its own collector settings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

CHECK = """
import gc, json
from imageworks.chat_proxy.app import YOUNG_COLLECTION_THRESHOLD, settle_the_heap
before = gc.get_threshold()
settle_the_heap()
print(json.dumps({"before": before, "after": gc.get_threshold(), "frozen": gc.get_freeze_count(),
                  "young": YOUNG_COLLECTION_THRESHOLD}))
"""


def test_settling_freezes_what_start_up_built_and_collects_the_young_less_often() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, check=True, timeout=60
    )
    seen = json.loads(done.stdout)
    assert seen["frozen"] > 10_000  # the modules' objects, at least
    assert seen["after"] == [seen["young"], *seen["before"][1:]]
    assert seen["young"] > seen["before"][0]
