"""Machine load records: hand-computed /proc arithmetic, real spinners flagged busy, this
process's own work not counted as other processes', no /proc, and the busy-cell table helpers.

The tests with real processes assert only what other jobs on the machine cannot undo: more
load elsewhere only raises ``other_cpu_share``, and the own-work check is retried.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from kfacbench import machine_load as ml
from kfacbench.machine_load import (
    COLUMNS,
    CpuTimes,
    LoadMonitor,
    LoadRecord,
    Sample,
    busy_cells,
    busy_reasons,
    parse_pid_stat,
    parse_proc_stat,
    warning_line,
    window_record,
)

linux = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux /proc")

# user nice system idle iowait irq softirq steal guest guest_nice
PROC_STAT = """\
cpu  3000 30 600 15000 150 15 15 0 90 0
cpu0 1000 10 200 5000 50 5 5 0 30 0
cpu1 1000 10 200 5000 50 5 5 0 30 0
cpu2 1000 10 200 5000 50 5 5 0 30 0
intr 12345 0 0
ctxt 6789
"""


def pid_stat(pid: int, utime: int, stime: int, cutime: int = 0, cstime: int = 0) -> str:
    """A /proc/<pid>/stat line; the command name holds spaces and parentheses on purpose."""
    return f"{pid} (we ird) name) S 1 2 3 4 5 6 7 8 9 10 {utime} {stime} {cutime} {cstime} 20 0 1\n"


def cpu_sample(wall: float, own: dict[int, int], **counters: int) -> Sample:
    return Sample(wall, CpuTimes(**counters), own)


# --- parsing and arithmetic (hand-computed) --------------------------------------------------


def test_parse_proc_stat_sums_usable_cpus_and_ignores_guest() -> None:
    two = parse_proc_stat(PROC_STAT, {0, 1})
    assert two == CpuTimes(2000, 20, 400, 10000, 100, 10, 10, 0)
    assert two.busy == 2000 + 20 + 400 + 10 + 10  # guest (30 per CPU) is inside user already
    assert two.total == two.busy + 10000 + 100
    assert parse_proc_stat(PROC_STAT) == CpuTimes(3000, 30, 600, 15000, 150, 15, 15, 0)
    # A usable CPU without a line (offline): the aggregate line.
    assert parse_proc_stat(PROC_STAT, {0, 7}) == parse_proc_stat(PROC_STAT)
    # Old kernels: fewer fields, the missing ones are 0.
    assert parse_proc_stat("cpu 1 2 3 4\n") == CpuTimes(1, 2, 3, 4)
    with pytest.raises(ValueError):
        parse_proc_stat("intr 1 2\n")


def test_parse_pid_stat_counts_from_the_last_parenthesis() -> None:
    assert parse_pid_stat(pid_stat(42, 120, 30, 7, 3)) == 150
    assert parse_pid_stat(pid_stat(42, 120, 30, 7, 3), children=True) == 160


def test_compare_by_hand() -> None:
    # 1.5 s on 2 CPUs at 100 ticks/s: a capacity of 300 ticks.
    start = cpu_sample(10.0, {1: 500}, user=1000, nice=10, system=200, idle=5000, iowait=50,
                       irq=5, softirq=5, steal=0)  # fmt: skip
    end = cpu_sample(11.5, {1: 600}, user=1150, nice=10, system=230, idle=5095, iowait=50,
                     irq=6, softirq=9, steal=20)  # fmt: skip
    # busy: 150 + 0 + 30 + 1 + 4 = 185 ticks, own 100, other 85; total 185 + 95 + 20 = 300.
    r = window_record(start, end, cpus=2, torch_threads=2, hz=100, load_avg_1m=1.25)
    assert r.load_window_s == pytest.approx(1.5)
    assert r.other_cpu_share == pytest.approx(85 / 300)
    assert r.own_cpu_share == pytest.approx(100 / 300)
    assert r.steal_share == pytest.approx(20 / 300)
    assert (r.torch_threads, r.cpus, r.load_avg_1m) == (2, 2, 1.25)
    # 0.283 minus the resolution 2 × (2 + 1) / 300 = 0.02 is still over 0.25.
    assert r.busy
    assert r.busy_reason == "other processes used 0.28 of the 2 CPUs (threshold 0.25)"


def test_compare_flags_steal_and_not_a_quiet_window() -> None:
    start = cpu_sample(0.0, {1: 0}, user=0, idle=0, steal=0)
    quiet = window_record(
        start, cpu_sample(1.0, {1: 100}, user=103, idle=97), cpus=2, torch_threads=1
    )
    assert quiet.other_cpu_share == pytest.approx(3 / 200)
    assert not quiet.busy and quiet.busy_reason == ""
    stolen = cpu_sample(1.0, {1: 100}, user=100, idle=55, steal=45)  # 45 / 200 = 0.225
    r = window_record(start, stolen, cpus=2, torch_threads=1)
    assert r.steal_share == pytest.approx(0.225)
    assert r.busy
    assert r.busy_reason == "the hypervisor stole 0.23 of the CPUs' time (threshold 0.10)"


def test_short_window_is_flagged_only_when_clearly_over() -> None:
    start = cpu_sample(0.0, {1: 0}, user=0, idle=0)
    # 0.05 s on 2 CPUs = 10 ticks; the resolution is 2 × (2 + 1) / 10 = 0.6.
    r = window_record(start, cpu_sample(0.05, {1: 0}, user=4, idle=6), cpus=2, torch_threads=1)
    assert r.other_cpu_share == pytest.approx(0.4) and not r.busy
    r = window_record(start, cpu_sample(0.05, {1: 0}, user=10, idle=0), cpus=2, torch_threads=1)
    assert r.other_cpu_share == pytest.approx(1.0) and r.busy
    # A counter read a tick behind the own time does not make a negative share.
    r = window_record(start, cpu_sample(1.0, {1: 101}, user=100, idle=100), cpus=2, torch_threads=1)
    assert r.other_cpu_share == 0.0


def test_oversubscription_flags_small_shares_when_torch_fills_the_cpus() -> None:
    # One other busy CPU of 64: a share of 0.016, but torch's 64 threads leave no CPU free.
    assert busy_reasons(1 / 64, 0.0, cpus=64, torch_threads=64) == [
        "other processes used 1.00 CPUs while torch's 64 threads left 0 of the 64 CPUs free"
        " (oversubscribed; threshold 0.25 CPUs)"
    ]
    assert busy_reasons(1 / 64, 0.0, cpus=64, torch_threads=32) == []  # it fits beside torch
    assert busy_reasons(0.2 / 64, 0.0, cpus=64, torch_threads=64) == []  # under 0.25 CPUs


def test_own_ticks_of_children_and_peers() -> None:
    me, child, gone, peer, born = 1, 2, 3, 4, 5
    start = Sample(0.0, CpuTimes(), {me: 100, child: 10, gone: 50, peer: 30}, frozenset({2, 3}))
    # `gone` ended in the window having used 80 ticks in all: reaped into my cutime.
    end = Sample(1.0, CpuTimes(), {me: 100 + 20 + 80, child: 25, peer: 40, born: 5}, frozenset())
    # mine 20 + child 15 + gone's last 30 + peer 10 + born 5
    assert ml.own_ticks(start, end) == 80


# --- LoadMonitor on a synthetic /proc --------------------------------------------------------


def write_proc(root: Path, stat: str, self_ticks: int) -> None:
    (root / "self").mkdir(parents=True, exist_ok=True)
    (root / "stat").write_text(stat)
    (root / "self" / "stat").write_text(pid_stat(os.getpid(), self_ticks, 0))


def test_monitor_reads_an_injected_proc(tmp_path: Path) -> None:
    times = iter([10.0, 12.0])
    monitor = LoadMonitor(proc=tmp_path, clock=lambda: next(times))
    write_proc(tmp_path, "cpu  1000 0 0 9000 0 0 0 0 0 0\n", self_ticks=300)
    monitor.start()
    write_proc(tmp_path, "cpu  1300 0 100 9000 0 0 0 40 0 0\n", self_ticks=350)
    r = monitor.stop()
    assert monitor.record is r
    capacity = 2.0 * ml.usable_cpus() * ml.clock_ticks_per_second()
    assert r.other_cpu_share == pytest.approx((400 - 50) / capacity)
    assert r.own_cpu_share == pytest.approx(50 / capacity)
    assert r.steal_share == pytest.approx(40 / 440)
    if r.cpus <= 4:  # other processes used 350 ticks of at most 800
        assert r.busy and r.busy_reason.startswith("other processes used")
    assert r.torch_threads == torch.get_num_threads()


def test_no_proc_gives_nan_and_not_busy(tmp_path: Path) -> None:
    with LoadMonitor(proc=tmp_path / "none") as monitor:
        pass
    r = monitor.record
    assert r is not None
    assert math.isnan(r.other_cpu_share) and math.isnan(r.own_cpu_share)
    assert math.isnan(r.steal_share)
    assert not r.busy and r.busy_reason == "not measured (no /proc)"
    assert r.cpus == ml.usable_cpus()


def test_unreadable_proc_never_raises(tmp_path: Path) -> None:
    (tmp_path / "stat").write_text("garbage\n")
    monitor = LoadMonitor(proc=tmp_path)
    monitor.start()
    r = monitor.stop()
    assert not r.busy and math.isnan(r.other_cpu_share)
    assert r.busy_reason.startswith("not measured (")
    with pytest.raises(RuntimeError):
        LoadMonitor(proc=tmp_path).stop()


def test_record_columns() -> None:
    r = LoadRecord.not_measured()
    assert tuple(r.as_row()) == COLUMNS
    assert COLUMNS[-2:] == ("busy", "busy_reason")
    frame = pd.DataFrame([r.as_row()])
    assert list(frame.columns) == list(COLUMNS)


# --- real processes --------------------------------------------------------------------------


@linux
def test_spinning_children_are_other_processes(spinners: int) -> None:
    with LoadMonitor() as monitor:
        time.sleep(1.0)
    r = monitor.record
    assert r is not None
    expected = spinners / r.cpus  # alone on the machine; other jobs only add to it
    assert r.other_cpu_share >= 0.5 * expected
    assert r.other_cpu_share > ml.BUSY_OTHER_SHARE + 0.1
    assert r.busy and "other processes used" in r.busy_reason
    assert r.own_cpu_share < 0.1  # this process slept


@linux
def test_include_children_counts_them_as_own(spinners: int) -> None:
    with LoadMonitor(include_children=True) as monitor:
        time.sleep(1.0)
    r = monitor.record
    assert r is not None
    # Without include_children own would be ~0 (this process slept); other jobs on the
    # machine can take the spinners' CPUs, hence the margin.
    assert r.own_cpu_share >= 0.3 * spinners / r.cpus


def matmul_for(seconds: float) -> None:
    a = torch.randn(256, 256)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        a = torch.tanh(a @ a)


@linux
def test_own_work_is_not_other_processes() -> None:
    # The own time read from /proc/self/stat agrees with the process's CPU clock (all threads).
    before = time.process_time()
    with LoadMonitor() as monitor:
        matmul_for(0.8)
    used = time.process_time() - before
    r = monitor.record
    assert r is not None
    own_s = r.own_cpu_share * r.load_window_s * r.cpus
    assert own_s == pytest.approx(used, abs=0.05 + 0.05 * used)
    assert own_s > 0.3  # it did work
    # The other processes' share does not grow by the own work: compared with an idle window
    # just before, it grows by far less than the own share. Retried: another job on the machine
    # can start in between; counting the own work as other's fails every time.
    for _ in range(3):
        idle = LoadMonitor()
        idle.start()
        time.sleep(0.4)
        quiet = idle.stop()
        with LoadMonitor() as monitor:
            matmul_for(0.8)
        work = monitor.record
        assert work is not None
        if work.other_cpu_share - quiet.other_cpu_share < 0.5 * work.own_cpu_share:
            break
    else:
        pytest.fail(f"own work counted as other processes': {quiet} then {work}")


# --- table helpers ---------------------------------------------------------------------------


def test_busy_cells_and_warning_line() -> None:
    cells = pd.DataFrame(
        {
            "cell_id": ["a", "b", "c", "d"],
            "busy": [True, False, True, None],  # d: a row from an older part
            "other_cpu_share": [0.97, 0.01, 0.40, math.nan],
            "steal_share": [0.0, 0.0, 0.02, math.nan],
        }
    )
    assert list(busy_cells(cells)["cell_id"]) == ["a", "c"]
    line = warning_line(cells)
    assert line is not None
    assert line.startswith(
        "2 of 4 cells ran on a busy machine (other processes used up to 0.97 of the CPUs):"
        " their times are not comparable; rerun them alone"
    )
    stolen = cells.assign(steal_share=[0.3, 0.0, 0.0, 0.0])
    assert "the hypervisor stole up to 0.30" in (warning_line(stolen) or "")


def test_tables_without_busy_cells() -> None:
    old = pd.DataFrame({"cell_id": ["a", "b"], "median_step_ms": [1.0, 2.0]})
    assert busy_cells(old).empty and list(busy_cells(old).columns) == list(old.columns)
    assert warning_line(old) is None
    quiet = old.assign(busy=[False, False])
    assert busy_cells(quiet).empty and warning_line(quiet) is None
    assert warning_line(old.iloc[0:0]) is None
