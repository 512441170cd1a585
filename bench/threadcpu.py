"""CPU time of a process's threads, by thread name, from ``/proc/<pid>/task/*/stat`` (Linux).

The service names its threads (``retinaedge-prepare_0``, ``retinaedge-inference``, ``retinaedge-finish_0``,
the event loop is ``MainThread``'s process name; :mod:`retinaedge.runtime.threadname`), so a difference of
two snapshots says where its CPU went. Times are seconds of CPU (user + system), at the kernel's clock-tick
resolution (``SC_CLK_TCK``, usually 10 ms): meaningful over a level of a few hundred requests.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

#: The name given to the process's main thread (the service's event loop; its comm is the program's).
MAIN = "main-event-loop"
#: A thread's number suffix (``retinaedge-prepare_3``, ``ThreadPoolExecutor-0_1``) dropped to group a pool.
_SUFFIX = re.compile(r"[_-]\d+$")


def _ticks_per_s() -> float:
    try:
        return float(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):
        return 100.0


def read_threads(pid: int) -> dict[int, tuple[str, float]]:
    """``{tid: (name, cpu seconds)}`` of every live thread of ``pid`` (empty off Linux or when gone)."""
    hz = _ticks_per_s()
    out: dict[int, tuple[str, float]] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            text = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        # "tid (comm) state ppid ...": comm may hold spaces or parentheses; it ends at the last ')'.
        head, _, rest = text.rpartition(")")
        name = MAIN if int(task.name) == pid else head.partition("(")[2]
        fields = rest.split()
        # After comm: state is field 3 of stat(5), utime 14 and stime 15 -> indices 11 and 12 here.
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / hz)
    return out


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
