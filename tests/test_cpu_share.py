"""cpu_share: the cores other processes use, from two readings of /proc with this process's own time left out."""
from __future__ import annotations

from lems_core.cpu_share import (CpuTimes, cores_busy_elsewhere, free_core_count, others_load, parse_proc_stat,
                                 parse_self_stat, read_cpu_times)

PROC_STAT = """cpu  1000 50 200 5000 100 10 20 5 40 0
cpu0 500 25 100 2500 50 5 10 2 20 0
cpu1 500 25 100 2500 50 5 10 3 20 0
intr 12345
"""
# pid (comm with a space and a parenthesis) state ppid ... utime=70 stime=30 (fields 14, 15)
SELF_STAT = "4242 (python (x) y) R 1 2 3 4 5 6 7 8 9 10 70 30 0 0 20 0 3 0 100 200 300"


def test_proc_stat_gives_busy_and_total_ticks_without_the_guest_columns():
    busy, total = parse_proc_stat(PROC_STAT)
    assert total == 1000 + 50 + 200 + 5000 + 100 + 10 + 20 + 5
    assert busy == total - 5000 - 100


def test_self_stat_reads_user_and_system_ticks_past_a_command_name_with_spaces():
    assert parse_self_stat(SELF_STAT) == 100


def test_the_process_own_work_is_not_counted_as_the_others():
    """Two cores, 100 ticks each elapsed: the machine was busy 150 ticks, 100 of them ours: others use half a core."""
    before, after = CpuTimes(busy=0, total=0, own=0), CpuTimes(busy=150, total=200, own=100)
    assert cores_busy_elsewhere(before, after, cpus=2) == 0.5
    assert free_core_count(2, most=2, busy_elsewhere=0.5) == 2  # a quiet machine: both cores
    busy = CpuTimes(busy=180, total=200, own=80)  # one other job at full speed, and us
    assert cores_busy_elsewhere(before, busy, cpus=2) == 1.0
    assert free_core_count(2, most=2, busy_elsewhere=1.0) == 1


def test_the_count_stays_within_one_and_torch_setting():
    assert free_core_count(2, most=2, busy_elsewhere=5.0) == 1
    assert free_core_count(8, most=4, busy_elsewhere=0.0) == 4
    assert cores_busy_elsewhere(CpuTimes(10, 10, 0), CpuTimes(10, 10, 0), cpus=2) == 0.0  # no time elapsed
    assert cores_busy_elsewhere(CpuTimes(0, 0, 0), CpuTimes(10, 100, 50), cpus=2) == 0.0  # own above busy: rounding


def test_others_load_samples_twice_an_interval_apart_and_falls_back_to_the_load_average():
    readings = iter([CpuTimes(0, 0, 0), CpuTimes(busy=120, total=200, own=20)])
    waited = []
    assert others_load(2, read=lambda: next(readings), wait=waited.append, seconds=0.25) == 1.0
    assert waited == [0.25]
    assert others_load(2, read=lambda: None, wait=waited.append, loadavg=lambda: (1.5, 0, 0)) == 1.5
    assert waited == [0.25]  # no /proc: no wait either


def test_readings_come_from_a_proc_folder_and_none_without_one(tmp_path):
    (tmp_path / "self").mkdir()
    (tmp_path / "stat").write_text(PROC_STAT)
    (tmp_path / "self" / "stat").write_text(SELF_STAT)
    assert read_cpu_times(tmp_path) == CpuTimes(busy=1285, total=6385, own=100)
    assert read_cpu_times(tmp_path / "missing") is None
