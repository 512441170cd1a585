"""Reading request bodies under the service's limits: the declared size first, then an idle timeout.

A body that declares more than the limit (``Content-Length``) is refused with 413 before a byte of it is
read; one that stops arriving for ``idle_timeout_s`` gets 408. Both ``POST /v1/detect`` and STOW-RS use
these, so a slow or lying client holds neither memory nor a spool file for long.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

from retinaedge.runtime.errors import PayloadTooLargeError, RequestError, RequestTimeoutError


def check_declared_length(headers: Mapping[str, str], limit: int) -> int | None:
    """The declared body size (``Content-Length``) or None; 413 above ``limit``, 400 when not a number."""
    declared = headers.get("content-length")
    if declared is None:
        return None
    if not declared.isdigit():
        raise RequestError("Content-Length is not a number")
    if int(declared) > limit:
        raise PayloadTooLargeError(f"body of {declared} bytes exceeds the {limit}-byte limit")
    return int(declared)


async def idle_timeout(stream: AsyncIterator[bytes], seconds: float | None) -> AsyncIterator[bytes]:
    """``stream``'s chunks; :class:`RequestTimeoutError` (408) when none arrives for ``seconds``."""
    if seconds is None:
        async for chunk in stream:
            yield chunk
        return
    it = stream.__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(it.__anext__(), seconds)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError as exc:
            raise RequestTimeoutError(f"no request body bytes for {seconds:g} s") from exc
        yield chunk


async def read_body(stream: AsyncIterator[bytes], limit: int, idle_timeout_s: float | None = None) -> bytes:
    """The whole body (``limit`` bytes at most: 413 beyond), chunk by chunk under the idle timeout."""
    chunks, total = [], 0
    async for chunk in idle_timeout(stream, idle_timeout_s):
        total += len(chunk)
        if total > limit:
            raise PayloadTooLargeError(f"body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)
