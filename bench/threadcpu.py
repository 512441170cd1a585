"""CPU time of a process's threads, by thread name, from ``/proc/<pid>/task/*/`` (Linux).

The service names its threads (``retinaedge-prepare_0``, ``retinaedge-inference``, ``retinaedge-finish_0``,
the event loop is ``MainThread``'s process name; :mod:`retinaedge.runtime.threadname`), so a difference of
two snapshots says where its CPU went. Times are seconds of CPU (user + system) of each thread: the
scheduler's own account of its run time, in nanoseconds (the first field of ``task/<tid>/schedstat``),
where the kernel offers it; otherwise ``utime + stime`` of ``task/<tid>/stat``, which the kernel counts
by sampling at each clock tick (``SC_CLK_TCK``, usually 10 ms). The ticks made a saturated level of 200
requests (about 0.6 s of the service's CPU, over six threads) move by up to a tenth between runs; the
scheduler's account does not.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

#: The name given to the process's main thread (the service's event loop; its comm is the program's).
MAIN = "main-event-loop"
#: A thread's number suffix (``retinaedge-prepare_3``, ``ThreadPoolExecutor-0_1``) dropped to group a pool.
_SUFFIX = re.compile(r"[_-]\d+$")


def _ticks_per_s() -> float:
    try:
        return float(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):
        return 100.0


def read_tree(pid: int) -> dict[int, tuple[str, float]]:
    """:func:`read_threads` of ``pid`` and of its child processes (the service's reader processes, named
    ``reader-process``; any other child by its own name), so that no CPU the service causes is left out."""
    out = read_threads(pid)
    for child in child_pids(pid):
        out.update(read_threads(child, main=None))
    return out


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (``/proc/*/stat``; empty off Linux)."""
    found: list[int] = []
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return found
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                fields = fh.read().rpartition(")")[2].split()
        except OSError:  # ended meanwhile
            continue
        if fields and int(fields[1]) == pid:  # after comm: state, then ppid
            found.append(int(entry))
    return found


def read_threads(pid: int, main: str | None = MAIN) -> dict[int, tuple[str, float]]:
    """``{tid: (name, cpu seconds)}`` of every live thread of ``pid`` (empty off Linux or when gone); its
    main thread is named ``main`` (None: its own name)."""
    hz = _ticks_per_s()
    out: dict[int, tuple[str, float]] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            text = (task / "stat").read_text()
            run_ns = _run_ns(task)
        except OSError:  # the thread ended meanwhile
            continue
        # "tid (comm) state ppid ...": comm may hold spaces or parentheses; it ends at the last ')'.
        head, _, rest = text.rpartition(")")
        name = main if main is not None and int(task.name) == pid else head.partition("(")[2]
        fields = rest.split()
        # After comm: state is field 3 of stat(5), utime 14 and stime 15 -> indices 11 and 12 here.
        ticks = (int(fields[11]) + int(fields[12])) / hz
        out[int(task.name)] = (name, ticks if run_ns is None else run_ns / 1e9)
    return out


def _run_ns(task: Path) -> int | None:
    """The thread's time on a CPU in nanoseconds (``schedstat``'s first field), None where the kernel
    does not offer it (built without scheduler statistics); OSError when the thread is gone."""
    try:
        text = (task / "schedstat").read_text()
    except FileNotFoundError:
        if not task.exists():
            raise
        return None
    fields = text.split()
    return int(fields[0]) if fields and fields[0].isdigit() else None


def group_name(name: str) -> str:
    """A thread's group: its name without a trailing pool number."""
    return _SUFFIX.sub("", name) or name


def cpu_by_group(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds spent between two :func:`read_threads` snapshots, summed per :func:`group_name`
    (a thread born in between counts from zero; one that ended in between is lost, at most its last
    interval)."""
    out: dict[str, float] = {}
    for tid, (name, cpu) in after.items():
        spent = cpu - before.get(tid, (name, 0.0))[1]
        if spent > 0:
            key = group_name(name)
            out[key] = out.get(key, 0.0) + spent
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def system_busy_s() -> float | None:
    """CPU seconds every CPU of the machine has spent not idle since boot (``/proc/stat``: all but
    idle and iowait), or None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    # guest time is already counted in user and nice
    busy = sum(ticks[:8]) - idle
    return busy / _ticks_per_s()


def foreign_cores(before: dict[str, Any], after: dict[str, Any], service_cpu_s: float) -> float | None:
    """Cores used by other processes between two probes (``t``, ``system_busy_s``, ``self_cpu_s``):
    the machine's busy CPU minus the service's and the benchmark's own, per second of wall time."""
    keys = ("t", "system_busy_s", "self_cpu_s")
    if any(p.get(k) is None for p in (before, after) for k in keys):
        return None
    wall = after["t"] - before["t"]
    if wall <= 0:
        return None
    busy = after["system_busy_s"] - before["system_busy_s"]
    own = after["self_cpu_s"] - before["self_cpu_s"]
    return max(0.0, float(busy - own - service_cpu_s) / wall)
