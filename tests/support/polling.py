"""The tests' one wait-until loop. Every caller passes its own bound and interval."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def poll(fetch: Callable[[], T], until: Callable[[T], Any] = bool, *, timeout: float, interval: float) -> T:
    """Call ``fetch()`` every ``interval`` s until ``until(value)`` holds or ``timeout`` s have passed;
    returns the last value either way (the caller asserts on it). ``fetch`` runs at least once."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if until(value) or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wait_until(
    fetch: Callable[[], T], what: str, until: Callable[[T], Any] = bool, *, timeout: float, interval: float
) -> T:
    """:func:`poll`, failing the test (``AssertionError`` naming ``what``) if ``until`` never held."""
    value = poll(fetch, until, timeout=timeout, interval=interval)
    if not until(value):
        raise AssertionError(f"not within {timeout} s: {what}")
    return value
