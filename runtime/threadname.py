"""OS names for the appliance's threads, so that ``top -H``, ``ps -L`` and ``/proc/<pid>/task/*/comm``
tell them apart (Python 3.11 names threads for Python only; the OS sees every one as the process).

A thread names itself: :func:`name_this_thread` at the start of its target (or as a thread pool's
``initializer``). Threads it creates afterwards, ONNX Runtime's intra-op threads among them, inherit the
name. Linux keeps 15 bytes of a name; elsewhere, or when ``/proc`` is not writable, nothing happens.
"""

from __future__ import annotations

import threading

PREFIX = "retinaedge-"
#: Linux's limit on a thread name (``TASK_COMM_LEN`` 16, with the terminating NUL).
MAX_BYTES = 15


def os_thread_name(python_name: str) -> str:
    """The OS name for a Python thread name: without :data:`PREFIX`, cut to :data:`MAX_BYTES` bytes."""
    name = python_name.removeprefix(PREFIX)
    return name.encode("utf-8")[:MAX_BYTES].decode("utf-8", "ignore")


def name_this_thread(name: str | None = None) -> None:
    """Give the calling thread ``name`` (default: from its Python name, :func:`os_thread_name`)."""
    text = os_thread_name(name or threading.current_thread().name)
    try:
        with open("/proc/thread-self/comm", "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError:  # not Linux, or /proc read-only: the name is only cosmetic
        pass
