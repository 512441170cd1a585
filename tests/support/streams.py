"""A client streaming STOW-RS while a test kills or changes the server (the crash and update drills)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np

from support.clients import multipart
from support.dicomgen import mr_instance, to_bytes


@contextmanager
def stow_streams(
    url: str, clients: int = 2, pause_s: float = 0.2, headers: dict[str, str] | None = None
) -> Iterator[set[str]]:
    """``clients`` threads posting one new single-frame MR instance at a time to ``url`` (the STOW-RS
    route) every ``pause_s``, while the block runs; yields the set of the SOP Instance UIDs acknowledged
    (filled as they are). A refused connection (the server down) is retried with another instance."""
    acknowledged: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def client(seed: int) -> None:
        local = np.random.default_rng(seed)
        # One httpx client per thread (a new one costs ~30 ms of CPU, taken from the booting server); no
        # keep-alive, so every request opens its own connection as a one-shot httpx.post would.
        with httpx.Client(timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as http:
            while not stop.is_set():
                pixels = local.integers(0, 4096, size=(96, 96), dtype=np.uint16)
                body, ctype = multipart([to_bytes(mr_instance(pixels, window=(2048, 4096)))])
                try:
                    r = http.post(url, content=body, headers={**(headers or {}), "Content-Type": ctype})
                except httpx.TransportError:
                    time.sleep(0.05)  # server down: not acknowledged, try another instance
                    continue
                if r.status_code == 200:
                    with lock:
                        acknowledged.add(r.json()["00081199"]["Value"][0]["00081155"]["Value"][0])
                time.sleep(pause_s)  # a steady stream, bounded so the backlog stays reasonable

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    try:
        yield acknowledged
    finally:
        stop.set()
        for t in threads:
            t.join(60)
