"""torch's intra-op threads sized to the cores this machine has free now, not to the cores it has.

torch's CPU kernels run on an OpenMP pool whose threads spin at every barrier. Beside another busy process a spinning
thread waits for a sibling the kernel has descheduled, so a search that is 70 s on a quiet 2-core machine ran many
times slower beside one competing process (benchmarks/quick_start.py --load 1 measures it). The governor counts the
cores other processes keep busy (``/proc/stat`` minus this process's own CPU time over the last interval) and gives
torch the rest, at least one thread and at most torch's own default; it checks again at most every
``defaults.THREADS_RECHECK_S`` seconds while a search runs, so the thread count follows the load both ways.

It stays out of the way where the user chose: ``OMP_NUM_THREADS`` set, ``ALLOCOPT_THREADS=N`` (a fixed count), or
a platform without ``/proc/stat``.

    governor = ThreadGovernor.for_this_process()     # after torch is imported; None where the user chose
    governor.adjust()                                 # between batches of work
"""
from __future__ import annotations

import logging
import os
import resource
import time

from allocopt import defaults

log = logging.getLogger(__name__)


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from the first line of /proc/stat."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)          # idle + iowait
    total = sum(fields[:8])                                              # guest time is already in user
    return total - idle, total


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class ThreadGovernor:
    """Sets ``torch.set_num_threads`` to the cores left by other processes, measured over the time between calls."""

    def __init__(self, cores: int, most: int):
        self.cores, self.most = cores, most
        self.tick = os.sysconf("SC_CLK_TCK")
        self._mark = (time.monotonic(), _busy_jiffies(), _own_cpu_seconds())
        self.threads: int | None = None

    @classmethod
    def for_this_process(cls) -> "ThreadGovernor | None":
        """A governor for torch in this process, or None where the user fixed the thread count or /proc/stat is
        missing (then torch's own default, or what the user set, stays)."""
        import torch

        chosen = os.environ.get(defaults.THREADS_ENV, "auto").strip().lower()
        if chosen != "auto":
            try:
                torch.set_num_threads(max(1, int(chosen)))
            except ValueError:
                pass                                      # not a number: torch's default
            return None
        if os.environ.get("OMP_NUM_THREADS") or not os.path.exists("/proc/stat"):
            return None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return cls(cores, max(1, min(cores, torch.get_num_threads())))

    def others_busy(self, least_s: float) -> float | None:
        """Cores kept busy by other processes since the last measurement (None when less than ``least_s`` seconds
        passed: too short to tell, or too soon to change)."""
        now, (busy, total), own = time.monotonic(), _busy_jiffies(), _own_cpu_seconds()
        then, (busy0, total0), own0 = self._mark
        if now - then < least_s or total <= total0:
            return None
        self._mark = (now, (busy, total), own)
        cpus = (total - total0) / self.tick / max(now - then, 1e-6)        # CPUs the counters cover
        share = (busy - busy0) / max(total - total0, 1)                    # their busy fraction
        return max(0.0, share * cpus - (own - own0) / max(now - then, 1e-6))

    def adjust(self, wait: bool = False) -> int | None:
        """Give torch the cores that are free now; ``wait`` samples the machine for ``THREADS_SAMPLE_S`` first (at
        start, when no interval has passed yet). Returns the thread count set, or None when nothing was measured."""
        import torch

        if wait:
            time.sleep(defaults.THREADS_SAMPLE_S)
        others = self.others_busy(defaults.THREADS_SAMPLE_S if wait else defaults.THREADS_RECHECK_S)
        if others is None:
            return None
        threads = max(1, min(self.most, int(self.cores - others + 0.5)))
        if threads != self.threads:
            torch.set_num_threads(threads)
            if self.threads is not None or threads < self.most:
                log.info(f"torch runs {threads} thread(s): other processes keep {others:.1f} of {self.cores} cores busy")
            self.threads = threads
        return threads


__all__ = ["ThreadGovernor"]
