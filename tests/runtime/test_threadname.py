"""OS thread names (runtime/threadname.py): what ``top -H`` shows for the appliance's threads."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest
from retinaedge.runtime.threadname import os_thread_name
from support.paths import DEMO

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names via /proc")


def _names() -> dict[int, str]:
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            out[int(tid)] = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        except OSError:
            pass
    return out


def test_names_lose_the_prefix_and_fit_linux_limit() -> None:
    assert os_thread_name("retinaedge-inference") == "inference"
    assert os_thread_name("retinaedge-export-pacs-archive-main") == "export-pacs-arc"
    assert len(os_thread_name("retinaedge-" + "é" * 20).encode()) <= 15


@linux_only
def test_the_backends_threads_take_the_name_of_the_thread_that_opens_it() -> None:
    """The inference thread names itself before it opens ONNX Runtime: the intra-op threads show as
    ``inference`` too, so their CPU adds up under that name."""
    from retinaedge.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from retinaedge.runtime.threadname import name_this_thread

    before = set(_names())
    opened: list[object] = []

    def run() -> None:
        name_this_thread("retinaedge-inference")
        opened.append(OnnxRuntimeBackend(DEMO / "model.onnx", threads=2))

    t = threading.Thread(target=run, name="retinaedge-inference")
    t.start()
    t.join()
    new = {tid: name for tid, name in _names().items() if tid not in before}
    assert new and set(new.values()) == {"inference"}, new  # ONNX Runtime's worker, still alive
    opened.clear()
