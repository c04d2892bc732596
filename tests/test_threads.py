"""torch's threads follow the cores other processes leave free (allocopt.runtime.threads), measured on this machine
with real busy processes: the search slowed many times beside one competing process when both spun on every core."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from allocopt.runtime.threads import ThreadGovernor

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="the governor reads /proc/stat (Linux)")


@pytest.fixture
def governor(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("ALLOCOPT_THREADS", raising=False)
    before = torch.get_num_threads()
    gov = ThreadGovernor.for_this_process()
    yield gov
    torch.set_num_threads(before)


def test_a_busy_process_beside_us_takes_a_thread_away(governor):
    if governor.cores < 2 or governor.most < 2:
        pytest.skip("needs two cores for torch")
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        threads = governor.adjust(wait=True)
        assert threads == governor.cores - 1 == torch.get_num_threads()
        assert governor.adjust() is None                       # too soon to choose again: nothing changes
    finally:
        hog.kill()
        hog.wait()
    quiet = governor.adjust(wait=True)                         # whatever the machine has free now, at least one
    assert quiet is not None and 1 <= quiet <= governor.most and torch.get_num_threads() == quiet


def test_the_user_choice_wins(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("ALLOCOPT_THREADS", "1")
        assert ThreadGovernor.for_this_process() is None and torch.get_num_threads() == 1
        monkeypatch.setenv("ALLOCOPT_THREADS", "auto")
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert ThreadGovernor.for_this_process() is None
    finally:
        torch.set_num_threads(before)
