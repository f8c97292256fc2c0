"""Machine load over a cell's training window: was the machine busy while the cell was timed?

A step time measured while other processes use the cores is not the optimizer's step time. On the
project's 2-core machine, one other torch job made a 4-cell suite take 77 s instead of 4.7 s and
recorded a K-FAC median step of 6,602 ms instead of 198 ms, with no warning. The slowdown is far
worse than a fair 2x share because both jobs run as many OpenMP threads as there are cores: a
parallel region ends at its slowest thread, and a thread that shares its core with another
process stalls every region (and the spinning waits of the other threads compete too).

:class:`LoadMonitor` spans one window (a cell's training) and returns a :class:`LoadRecord` whose
fields are the ``cells`` table columns :data:`COLUMNS`. It reads Linux ``/proc`` (no psutil):

* **other processes' CPU time**: the busy time of the usable CPUs in ``/proc/stat`` minus this
  process's CPU time (``/proc/self/stat``), as a share of the window's capacity,
  ``other_cpu_share = other_cpu_s / (wall_s × cpus)``;
* **steal**: the share of the CPUs' time a hypervisor gave to other guests (``steal_share``);
* **oversubscription**: torch's intra-op threads plus the other processes' demand (in CPUs) more
  than the usable CPUs;
* the 1-minute load average at the end (``load_avg_1m``), recorded for the reader only: it lags
  (an exponential average sampled every 5 s) and counts this process's own running threads, so it
  is no criterion.

A cell is ``busy`` when one of these exceeds its threshold by more than the measurement's
resolution (see below); ``busy_reason`` says which, in one line. On a platform without ``/proc``
the shares are NaN, ``busy`` is False and the reason says "not measured (no /proc)"; measuring
never raises.

Thresholds, measured with this module on the project's machine (a 2-vCPU Firecracker VM,
HZ = 100), 1 s windows. Other engineers' test runs shared the machine: windows meant to be idle
read 0.40-1.00 while their pytest processes ran, so the numbers below are from windows that a
quiet 1 s window had just preceded, several of each:

* idle (this process sleeping): ``other_cpu_share`` 0.000-0.015 (system daemons and kernel
  threads, at most 0.03 CPUs), steal 0.000-0.015 (up to 0.05 when the machine was loaded);
* one ``python -c 'while True: pass'`` spinner: 0.494-0.534 (6 windows); two: 0.983-1.008
  (6 windows; a share can pass 1 by the resolution below);
* a torch loop (two threads, two 512×512 matmuls a step, median 1.65-1.88 ms alone) beside a
  process busy 25% of the time: 0.20 CPUs taken, median step 1.65-2.36 ms (unchanged in 3 of 4);
  busy 50%: 0.34 CPUs, 1.74-1.85 ms, but the loop's own CPU time fell from 0.99 to 0.75 of the
  machine (a quarter less throughput); one spinner: 0.60-0.68 CPUs (share 0.30-0.34), median
  3.80-5.06 ms (2.2-3x); two spinners: 1.0 CPU (share 0.50), 6.0-16.0 ms (up to 9x).

:data:`BUSY_OTHER_SHARE` = 0.25 (half a CPU here) is 17 times the daemons' share and half of one
spinner's: a quarter of the machine taken by others is flagged whatever the thread counts.
:data:`BUSY_OVERSUB_CPUS` = 0.25 CPUs is the criterion that catches the large slowdowns: when
torch's threads already fill the CPUs, a parallel region waits for the thread that shares its core,
so one other busy CPU slows every region (2.2-3x above, while the share, 0.30-0.34, is barely over
0.25; on 64 cores one busy core is a share of 0.016). A quarter of a CPU beyond the CPUs torch
leaves free is 8 times the daemons' demand and lies between the 25%-busy neighbour (0.20 CPUs, no
change in the median step) and the 50%-busy one (0.34 CPUs, a quarter of the throughput lost).
:data:`BUSY_STEAL_SHARE` = 0.10: a hypervisor that takes a tenth of the vCPUs' time slows a
compute-bound step by at least that much, and more when it stalls one OpenMP thread of a region;
steal here stayed under 0.05.

Resolution: ``/proc/stat`` and ``/proc/<pid>/stat`` count in clock ticks (``USER_HZ``, 10 ms), so
each CPU's counters and each process's CPU time are off by up to one tick at each end of the
window: up to ``(2 × cpus + 2) / (HZ × wall_s × cpus)`` of the share (0.03 for 1 s on 2 CPUs, 0.3
for 0.1 s). A window is flagged only when a value exceeds its threshold by more than this, so a
window under about 0.2 s is flagged only when clearly over (a 0.05 s window only when the other
processes used more than 0.85 of the CPUs). Cells time their steps over seconds; a cell of
0.5 s is resolved to 0.06. Where the kernel accounts CPU time by sampling at the tick (no
``VIRT_CPU_ACCOUNTING``), a load whose bursts are phase-locked with the tick can be off by more; a
steady competitor (another benchmark, a build) is not.

What counts as this process: all its threads (torch's intra-op pool included: ``/proc/self/stat``
sums every thread). Child processes are *other* processes by default: cells train in the runner's
own process, and a child started during a cell (a subprocess's CPU) competes with the timed steps
like any other process. ``include_children=True`` counts live and reaped descendants as this
run's own, for a launcher that times work done in its children. ``peer_pids`` counts given
processes as own too: the other ranks of a data-parallel run on the same host, which would
otherwise make every CPU cell of ``--nproc N`` look busy.

CUDA cells: the same measure is kept. GPU kernels do not slow down when the CPUs are busy, but a
launch-bound step (small kernels, the Python of the optimizer, host syncs) runs at the speed of
its launching thread, which competes with the other processes like a CPU cell's threads do. The
oversubscription criterion counts torch's CPU threads, which a CUDA step barely uses, so on CUDA
it flags conservatively (a busy flag on a CUDA cell means "rerun to be sure", not "surely slow").

Limits: the capacity is the CPUs in this process's affinity mask; a cgroup CPU quota
(``cpu.max``) is not read, and ``/proc/stat`` inside a container counts the host's CPUs.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any

import pandas as pd
import torch

PROC = Path("/proc")

BUSY_OTHER_SHARE = 0.25
"""Other processes' CPU time above this share of the window's capacity flags the cell."""

BUSY_OVERSUB_CPUS = 0.25
"""Other processes' demand beyond the CPUs torch's threads leave free, in CPUs, that flags it."""

BUSY_STEAL_SHARE = 0.10
"""Hypervisor steal above this share of the CPUs' time flags the cell."""

NO_PROC = "not measured (no /proc)"


@dataclass(frozen=True)
class LoadRecord:
    """The machine's load over one window; the fields are ``cells`` table columns.

    Attributes:
        load_window_s: wall-clock length of the window (s).
        load_avg_1m: the 1-minute load average at the window's end (lagging; counts this
            process's own running threads; NaN where the platform has none).
        other_cpu_share: CPU time of other processes / (window × cpus), in [0, 1].
        own_cpu_share: this process's CPU time (all threads) / (window × cpus).
        steal_share: hypervisor steal / the usable CPUs' time over the window.
        torch_threads: ``torch.get_num_threads()`` (intra-op threads) at the window's start.
        cpus: usable CPUs (this process's affinity mask).
        busy: the window ran on a busy machine; its times are not comparable.
        busy_reason: one line saying why when busy ("" otherwise, or "not measured (...)").
    """

    load_window_s: float
    load_avg_1m: float
    other_cpu_share: float
    own_cpu_share: float
    steal_share: float
    torch_threads: int
    cpus: int
    busy: bool
    busy_reason: str

    def as_row(self) -> dict[str, Any]:
        """The record as ``cells`` table columns, in :data:`COLUMNS` order."""
        return asdict(self)

    @classmethod
    def not_measured(cls, why: str = NO_PROC, *, window_s: float = math.nan) -> LoadRecord:
        """A record of a window that could not be measured: NaN shares, not busy, ``why``."""
        return cls(
            load_window_s=window_s,
            load_avg_1m=load_average(),
            other_cpu_share=math.nan,
            own_cpu_share=math.nan,
            steal_share=math.nan,
            torch_threads=torch.get_num_threads(),
            cpus=usable_cpus(),
            busy=False,
            busy_reason=why,
        )


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(LoadRecord))
"""The ``cells`` table columns a :class:`LoadRecord` fills, in order."""


@dataclass(frozen=True)
class CpuTimes:
    """CPU time counters of one or more ``/proc/stat`` ``cpu`` lines, in clock ticks.

    Guest time (``guest``, ``guest_nice``) is already included in ``user`` and ``nice`` by the
    kernel, so it is not read again; ``iowait`` is idle time (a CPU waiting for I/O is free).
    """

    user: int = 0
    nice: int = 0
    system: int = 0
    idle: int = 0
    iowait: int = 0
    irq: int = 0
    softirq: int = 0
    steal: int = 0

    @property
    def busy(self) -> int:
        """Time spent running this machine's processes and interrupts (steal excluded).

        Interrupt time is charged to no process, so it counts as other processes' time even
        when this process caused it (its own I/O); a compute-bound cell causes little.
        """
        return self.user + self.nice + self.system + self.irq + self.softirq

    @property
    def total(self) -> int:
        """All the CPUs' time: busy, idle, iowait and steal."""
        return self.busy + self.idle + self.iowait + self.steal

    def __sub__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))


def parse_proc_stat(text: str, cpus: Collection[int] | None = None) -> CpuTimes:
    """Sum the ``/proc/stat`` lines of ``cpus`` (the aggregate ``cpu`` line when None).

    Only the usable CPUs matter: other processes on CPUs outside this process's affinity mask
    do not take cores from it. When a usable CPU has no line (offline), the aggregate is used.

    Raises:
        ValueError: no ``cpu`` line, or a malformed one.
    """
    lines: dict[str, list[int]] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name.startswith("cpu"):
            # user nice system idle iowait irq softirq steal [guest guest_nice]; old kernels
            # have fewer fields (steal since 2.6.11): missing ones are 0.
            values = [int(v) for v in rest.split()[:8]]
            lines[name] = values + [0] * (8 - len(values))
    wanted = [f"cpu{c}" for c in sorted(cpus)] if cpus is not None else []
    if not wanted or any(name not in lines for name in wanted):
        wanted = ["cpu"]
    if "cpu" not in lines and wanted == ["cpu"]:
        raise ValueError("no 'cpu' line in /proc/stat")
    return CpuTimes(*(sum(lines[name][i] for name in wanted) for i in range(8)))


def parse_pid_stat(text: str, *, children: bool = False) -> int:
    """CPU ticks of a process from its ``/proc/<pid>/stat``: utime + stime of all its threads,
    plus cutime + cstime (its waited-for children) when ``children``.

    The second field (the command name) may hold spaces and parentheses, so fields are counted
    from the last ``)``.
    """
    after = text[text.rindex(")") + 2 :].split()
    # after[0] is field 3 (state): utime, stime, cutime, cstime are fields 14-17.
    utime, stime, cutime, cstime = (int(v) for v in after[11:15])
    return utime + stime + (cutime + cstime if children else 0)


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def _affinity() -> frozenset[int] | None:
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def load_average() -> float:
    """The 1-minute load average (NaN where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return math.nan


def clock_ticks_per_second() -> int:
    """``USER_HZ``, the unit of ``/proc/stat`` and ``/proc/<pid>/stat`` times (100 on Linux)."""
    try:
        return int(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):
        return 100


@dataclass(frozen=True)
class Sample:
    """The counters at one end of a window.

    Attributes:
        wall: ``time.monotonic()`` (s).
        cpu: the usable CPUs' counters.
        own: CPU ticks of each process counted as this run's own (this process, its peers and,
            with ``include_children``, its descendants), by pid.
        descendants: which of ``own`` are descendants (their time moves into this process's
            cutime/cstime when they are reaped).
    """

    wall: float
    cpu: CpuTimes
    own: Mapping[int, int]
    descendants: frozenset[int] = frozenset()


def own_ticks(start: Sample, end: Sample) -> int:
    """This run's CPU ticks between two samples.

    A process present at both ends contributes its difference, one born in the window all its
    time. A descendant that ended in the window was reaped into this process's cutime/cstime
    with all its time, so the part it had used before the window is taken off; a peer that
    ended is not counted (its last ticks are lost, and count as other processes').
    """
    ticks = sum(t - start.own.get(pid, 0) for pid, t in end.own.items())
    return ticks - sum(
        t for pid, t in start.own.items() if pid not in end.own and pid in start.descendants
    )


def window_record(
    start: Sample,
    end: Sample,
    *,
    cpus: int,
    torch_threads: int,
    hz: int = 100,
    load_avg_1m: float = math.nan,
) -> LoadRecord:
    """The record of the window between two samples (pure: the arithmetic of the monitor).

    Args:
        start: the counters at the window's start.
        end: the counters at its end.
        cpus: usable CPUs (the capacity is ``wall × cpus``).
        torch_threads: torch's intra-op threads during the window.
        hz: clock ticks per second of the counters.
        load_avg_1m: the load average to record.
    """
    wall = end.wall - start.wall
    if wall <= 0 or cpus <= 0:
        return LoadRecord.not_measured("not measured (empty window)", window_s=wall)
    delta = end.cpu - start.cpu
    capacity = wall * cpus * hz  # ticks
    own = own_ticks(start, end)
    # Counters can go backwards by a tick across reads; a negative share means "none".
    other_share = max(delta.busy - own, 0) / capacity
    own_share = max(own, 0) / capacity
    steal_share = delta.steal / delta.total if delta.total > 0 else 0.0
    # One tick per counter at each end: cpus lines of /proc/stat and the own processes.
    resolution = 2 * (cpus + max(len(end.own), 1)) / capacity
    reasons = busy_reasons(other_share, steal_share, cpus, torch_threads, resolution)
    return LoadRecord(
        load_window_s=wall,
        load_avg_1m=load_avg_1m,
        other_cpu_share=other_share,
        own_cpu_share=own_share,
        steal_share=steal_share,
        torch_threads=torch_threads,
        cpus=cpus,
        busy=bool(reasons),
        busy_reason="; ".join(reasons),
    )


def busy_reasons(
    other_share: float, steal_share: float, cpus: int, torch_threads: int, resolution: float = 0.0
) -> list[str]:
    """Why a window counts as busy (empty: it does not); each value must exceed its threshold by
    more than ``resolution`` (a share of the capacity)."""
    reasons = []
    if other_share - resolution > BUSY_OTHER_SHARE:
        reasons.append(
            f"other processes used {other_share:.2f} of the {cpus} CPUs"
            f" (threshold {BUSY_OTHER_SHARE:.2f})"
        )
    else:
        # Oversubscription: other demand beyond the CPUs that torch's threads leave free.
        other_cpus = other_share * cpus
        spare = max(cpus - torch_threads, 0)
        if other_cpus - spare - resolution * cpus > BUSY_OVERSUB_CPUS:
            reasons.append(
                f"other processes used {other_cpus:.2f} CPUs while torch's {torch_threads}"
                f" threads left {spare} of the {cpus} CPUs free (oversubscribed;"
                f" threshold {BUSY_OVERSUB_CPUS:.2f} CPUs)"
            )
    if steal_share - resolution > BUSY_STEAL_SHARE:
        reasons.append(
            f"the hypervisor stole {steal_share:.2f} of the CPUs' time"
            f" (threshold {BUSY_STEAL_SHARE:.2f})"
        )
    return reasons


class LoadMonitor:
    """Measures the machine's load over a window: ``start()``, train, ``stop()``.

    Also a context manager: ``with LoadMonitor() as monitor: ...`` then ``monitor.record``.

    Args:
        include_children: count this process's descendants' CPU time as its own (default: they
            are other processes).
        peer_pids: processes whose CPU time counts as this run's own (the other ranks of a
            data-parallel run on this host).
        proc: the ``/proc`` directory (tests point it at a synthetic one).
        clock: wall clock in seconds (tests inject one).
    """

    def __init__(
        self,
        *,
        include_children: bool = False,
        peer_pids: Collection[int] = (),
        proc: Path = PROC,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.include_children = include_children
        self.peer_pids = frozenset(peer_pids)
        self.proc = proc
        self.clock = clock
        self.record: LoadRecord | None = None
        self._start: Sample | None = None
        self._failed: str | None = None
        self._affinity = _affinity()
        self._cpus = len(self._affinity) if self._affinity else usable_cpus()
        self._torch_threads = torch.get_num_threads()

    def start(self) -> None:
        """Start the window (again, if it was started before)."""
        self.record = None
        self._torch_threads = torch.get_num_threads()
        self._start, self._failed = self._sample()

    def stop(self) -> LoadRecord:
        """End the window and return its record (also kept as ``self.record``); never raises
        for lack of ``/proc``.

        Raises:
            RuntimeError: :meth:`start` was not called.
        """
        if self._start is None and self._failed is None:
            raise RuntimeError("LoadMonitor.stop() before start()")
        end, failed = self._sample()
        start, self._start = self._start, None
        if start is None or end is None:
            why = self._failed or failed or NO_PROC
            window = end.wall - start.wall if start and end else math.nan
            self.record = LoadRecord.not_measured(why, window_s=window)
        else:
            self.record = window_record(
                start,
                end,
                cpus=self._cpus,
                torch_threads=self._torch_threads,
                hz=clock_ticks_per_second(),
                load_avg_1m=load_average(),
            )
        self._failed = None
        return self.record

    def __enter__(self) -> LoadMonitor:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _sample(self) -> tuple[Sample | None, str | None]:
        """The counters now, or None and why they could not be read."""
        wall = self.clock()
        stat = self.proc / "stat"
        if not stat.exists():
            return None, NO_PROC
        try:
            cpu = parse_proc_stat(stat.read_text(), self._affinity)
            own, descendants = self._own_ticks()
        except (OSError, ValueError, IndexError) as exc:
            return None, f"not measured ({type(exc).__name__}: {exc})"
        return Sample(wall, cpu, own, descendants), None

    def _own_ticks(self) -> tuple[dict[int, int], frozenset[int]]:
        me = os.getpid()
        self_stat = self.proc / "self" / "stat"
        own = {me: parse_pid_stat(self_stat.read_text(), children=self.include_children)}
        descendants = _descendants(self.proc, me) if self.include_children else set()
        for pid in (descendants | self.peer_pids) - {me}:
            try:
                text = (self.proc / str(pid) / "stat").read_text()
            except OSError:  # ended between listing and reading
                continue
            own[pid] = parse_pid_stat(text, children=pid in descendants)
        return own, frozenset(descendants)


def _descendants(proc: Path, root: int) -> set[int]:
    """Pids of ``root``'s live descendants, from every process's parent pid (``/proc/*/stat``)."""
    parents: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            after = (entry / "stat").read_text()
            ppid = int(after[after.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def busy_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``cells`` that ran on a busy machine (``busy`` is True).

    Tables written before the load was recorded have no ``busy`` column: no rows. A missing
    value (a row from an older part next to newer ones) is not busy.
    """
    if "busy" not in cells.columns:
        return cells.iloc[0:0]
    return cells[cells["busy"].eq(True)]  # NaN/None are not True


def warning_line(cells: pd.DataFrame) -> str | None:
    """One line warning that some cells ran on a busy machine, or None when none did."""
    busy = busy_cells(cells)
    if busy.empty:
        return None
    what = []
    if "other_cpu_share" in busy.columns and busy["other_cpu_share"].notna().any():
        what.append(f"other processes used up to {busy['other_cpu_share'].max():.2f} of the CPUs")
    if "steal_share" in busy.columns and (busy["steal_share"] > BUSY_STEAL_SHARE).any():
        what.append(f"the hypervisor stole up to {busy['steal_share'].max():.2f}")
    detail = f" ({'; '.join(what)})" if what else ""
    return (
        f"{len(busy)} of {len(cells)} cells ran on a busy machine{detail}: their times are not"
        " comparable; rerun them alone with `kfacbench run SUITE --resume RUN_DIR --rerun-busy`"
    )
