"""How many CPU cores other processes are using right now, this process's own work left out.

A background job takes as many intra-op threads as cores are free. The 1-minute load
average cannot tell: it counts this very process's recent work (loading the model
just before the job starts keeps it near 1 for a minute on an idle machine), and it
lags a minute behind. Instead the machine's busy time (``/proc/stat``) and this
process's own CPU time (``/proc/self/stat``, all its threads) are read twice a short
interval apart: the busy time that is not ours, divided by the elapsed time, is the
number of cores the others keep busy. Where ``/proc`` is missing the load average
stands in for it.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SAMPLE_SECONDS = 0.5  # long enough to see a steady job, short against a job of a minute or more
_IDLE_FIELDS = (3, 4)  # idle, iowait among /proc/stat's cpu columns (user nice system idle iowait irq softirq steal)
_COUNTED_FIELDS = 8  # the columns after steal (guest, guest_nice) are already inside user and nice


@dataclass(frozen=True)
class CpuTimes:
    """Cumulative CPU time in clock ticks: the whole machine's busy and total, and this process's own."""

    busy: int
    total: int
    own: int


def parse_proc_stat(text: str) -> tuple[int, int]:
    """(busy, total) ticks of all CPUs from ``/proc/stat``'s aggregate ``cpu`` line."""
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            ticks = [int(v) for v in parts[1:1 + _COUNTED_FIELDS]]
            idle = sum(ticks[i] for i in _IDLE_FIELDS if i < len(ticks))
            return sum(ticks) - idle, sum(ticks)
    raise ValueError("no aggregate cpu line in /proc/stat")


def parse_self_stat(text: str) -> int:
    """This process's user + system ticks (all threads) from ``/proc/self/stat``.

    The command name (field 2) is in parentheses and may hold spaces, so fields are
    counted after its closing parenthesis: utime and stime are fields 14 and 15.
    """
    after_name = text[text.rindex(")") + 2:].split()
    return int(after_name[11]) + int(after_name[12])


def read_cpu_times(proc: Path = Path("/proc")) -> CpuTimes | None:
    """The machine's and this process's CPU times now; None where ``/proc`` cannot be read."""
    try:
        busy, total = parse_proc_stat((proc / "stat").read_text())
        own = parse_self_stat((proc / "self" / "stat").read_text())
    except (OSError, ValueError, IndexError):
        return None
    return CpuTimes(busy, total, own)


def cores_busy_elsewhere(before: CpuTimes, after: CpuTimes, cpus: int) -> float:
    """Cores other processes kept busy between two readings: busy ticks not ours over all ticks, times ``cpus``."""
    elapsed = after.total - before.total
    if elapsed <= 0:
        return 0.0
    others = (after.busy - before.busy) - (after.own - before.own)
    return min(float(cpus), max(0.0, others) / elapsed * cpus)


def others_load(cpus: int, read: Callable[[], CpuTimes | None] = read_cpu_times,
                wait: Callable[[float], None] = time.sleep, seconds: float = SAMPLE_SECONDS,
                loadavg: Callable[[], tuple[float, float, float]] | None = None) -> float:
    """Cores the other processes are using, measured over ``seconds``; the 1-minute load average without ``/proc``."""
    before = read()
    if before is not None:
        wait(seconds)
        after = read()
        if after is not None:
            return cores_busy_elsewhere(before, after, cpus)
    try:
        return (loadavg or os.getloadavg)()[0]
    except (AttributeError, OSError):  # no load average on this platform: take the machine as idle
        return 0.0


def free_core_count(cpus: int, most: int, busy_elsewhere: float) -> int:
    """Threads for a job: the cores the others leave free, rounded, at least one and at most ``most``."""
    return max(1, min(most, round(cpus - busy_elsewhere)))
