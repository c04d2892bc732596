"""allocopt.io: atomic directories leave nothing behind, even after a process that was killed mid-write."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from allocopt.errors import AllocoptError
from allocopt.io import LOCK_FILE, _host, atomic_directory, exclusive


def test_a_killed_writers_temp_directory_is_removed_by_the_next_write_a_live_ones_is_kept(tmp_path):
    """`allocopt prune` killed mid-write (SIGKILL) left a hidden .export-*.tmp folder no later run removed."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                            # a pid that no longer runs
    out = tmp_path / "export"
    stale = tmp_path / f".export.{_host()}.{dead.pid}.x1y2.tmp"
    live = tmp_path / f".export.{_host()}.{os.getpid()}.a1b2.tmp"       # another write in progress, in this process
    other_host = tmp_path / ".export.elsewhere.1.c3d4.tmp"              # a shared folder: never judged from here
    for folder in (stale, live, other_host):
        (folder / "model.safetensors").parent.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    with atomic_directory(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (out / "config.json").read_text() == "{}"
    assert not stale.exists() and live.exists() and other_host.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other_host.name, "export"])


def test_a_directory_is_held_by_one_job_and_the_second_is_told_who_holds_it(tmp_path):
    lock = tmp_path / LOCK_FILE
    with exclusive(lock, "folder F", "a test job", "wait for it"):
        assert f"pid {os.getpid()} on " in lock.read_text()
        probe = subprocess.run([sys.executable, "-c",
                                "import sys; from allocopt.io import exclusive; from pathlib import Path\n"
                                "with exclusive(Path(sys.argv[1]), 'F', 'x', 'y'): pass", str(lock)],
                               capture_output=True, text=True)
        assert probe.returncode != 0 and f"F is in use by pid {os.getpid()} on" in probe.stderr
        with pytest.raises(AllocoptError, match=r"^folder F is in use by pid \d+ on .* \(a second job\); wait$"):
            with exclusive(lock, "folder F", "a second job", "wait"):
                pass
    assert not lock.exists()
    with exclusive(lock, "folder F", "again", "-"):        # free again once the holder is done
        pass
