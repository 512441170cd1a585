"""Readers in worker processes (``reader_processes`` > 0): the CPU stages beside the GIL, not under it.

In one process every reader shares the GIL with the event loop, the result writer and the inference
thread, so the service's Python tops out near one core however many cores there are. Here each of
``processes`` child processes (``spawn``: nothing of the parent's threads or locks is inherited) opens
instances with its own :class:`~retinaedge.runtime.reader.InstanceReader`: parse, validate, intended use,
the kept header (the ``on_open`` callback's :attr:`Extracting.extract` half, run there), decode, window and
letterbox. The request's bytes go down the child's pipe (a spooled file: its path); each prepared frame
comes back through a block of shared memory of one model input (C x H x W float32), copied out by the
pool thread that asked for it, so the block is free again before the child's next reply.

The pipeline's logic does not change: a pool thread of :class:`~.stages.InferenceWorker` runs each reading
step of a job (:class:`~.jobs.InstanceJob`, with its frame budget, fairness and parking) and only waits,
without the GIL, while a child works. An instance stays with the child that opened it until it is closed.
A child that dies (killed, out of memory) fails the instances it held with
:class:`ReaderProcessError` and is started again for the next ones. A child ends when its pipe closes:
when the service stops or its process dies.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import multiprocessing
import threading
from collections.abc import Callable, Iterator
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from retinaedge.runtime.bundle import Bundle
from retinaedge.runtime.dicomio import DicomInput, ImageInfo, Limits
from retinaedge.runtime.errors import RetinaEdgeError
from retinaedge.runtime.reader import InstanceReader, OpenInstance, ReadFrame

log = logging.getLogger(__name__)

_SPAWN = multiprocessing.get_context("spawn")


class ReaderProcessError(RetinaEdgeError):
    """The reader process holding an instance ended while reading it (500; the next requests are served by
    a new one)."""

    type = "reader-process-failed"
    http_status = 500


class Extracting(Protocol):
    """An ``on_open`` callback that can run where the instance is read: ``extract`` (a module-level
    function: it is sent to the child by name) returns a picklable value from the parsed instance, then
    ``accept`` takes that value in the service's process. Called in process, ``callback(src)`` does both."""

    extract: Callable[[DicomInput], Any]

    def accept(self, value: Any) -> None: ...

    def __call__(self, src: DicomInput) -> None: ...


class RemoteReader:
    """:class:`~retinaedge.runtime.reader.InstanceReader`'s part in the pipeline, with ``processes``
    children doing the reading; new instances go to them in turn. Thread-safe."""

    def __init__(self, bundle: Bundle, limits: Limits, processes: int) -> None:
        self.bundle = bundle
        self.limits = limits
        spec = bundle.manifest.input
        frame_bytes = 4 * spec.channels * spec.height * spec.width
        self._children: list[_Child] = []
        try:
            for number in range(processes):
                self._children.append(_Child(bundle, limits, frame_bytes, number))
        except BaseException:
            self.close()
            raise
        self._turn = itertools.count()

    def open(self, source: bytes | Path, on_open: Any | None = None) -> RemoteInstance:
        """Parse and validate ``source`` in a child (raises what the in-process reader raises); runs
        ``on_open``'s ``extract`` there and its ``accept`` here."""
        child = self._children[next(self._turn) % len(self._children)]
        extract = getattr(on_open, "extract", None) if on_open is not None else None
        if on_open is not None and extract is None:
            log.warning("an on_open callback without an extract half is not called with reader processes")
        inst = child.open(source, extract)
        if extract is not None and on_open is not None:
            on_open.accept(inst.extracted)
        return inst

    def pids(self) -> list[int]:
        """The children's process ids (the benchmark counts their CPU)."""
        return [c.pid for c in self._children if c.pid is not None]

    def close(self) -> None:
        for child in self._children:
            child.close()


class RemoteInstance:
    """An instance open in a child: ``info``, ``timings_ms``; :meth:`frames` yields the frame the child
    prepared when it opened the instance, then asks for one frame at a time. The child says which frame is
    the last, so a single-frame instance takes one exchange in all."""

    def __init__(
        self, child: _Child, job: int, generation: int, info: ImageInfo, timings_ms: dict[str, float]
    ) -> None:
        self._child, self._job, self._generation = child, job, generation
        self.info = info
        self.timings_ms = timings_ms
        self.extracted: Any = None
        self.pending: tuple[Any, ...] | None = None  # the first frame's step, from the open reply
        self._done = False  # the child has let go of the instance (its last frame, the end, an error)

    def frames(self) -> Iterator[ReadFrame]:
        step, self.pending = self.pending, None
        while True:
            if step is None:
                step = self._child.call(("next", self._job), generation=self._generation)
            if step[0] == "error":
                self._done = True
                raise rebuild(step[1], step[2], step[3])
            self.timings_ms.update(step[-1])
            if step[0] == "end":
                self._done = True
                return
            _kind, index, letterbox, rule, image, last, _timings = step
            self._done = last
            yield ReadFrame(index, image, letterbox, rule, None)
            if last:
                return
            step = None

    def close(self) -> None:
        if not self._done:
            self._child.forget(self._job, self._generation)


class _Child:
    """One reader process, its pipe and its frame block; one exchange at a time (``_lock``)."""

    def __init__(self, bundle: Bundle, limits: Limits, frame_bytes: int, number: int) -> None:
        self._args = (bundle, limits, logging.getLogger().getEffectiveLevel())
        self._block = shared_memory.SharedMemory(create=True, size=max(1, frame_bytes))
        self._number = number
        self._lock = threading.Lock()
        self._jobs = itertools.count(1)
        self.generation = 0
        self.pid: int | None = None
        self._conn: Connection | None = None
        self._proc: Any = None
        self._closed = False
        try:
            with self._lock:
                self._start()
        except BaseException:
            self._block.close()
            self._block.unlink()
            raise

    def _start(self) -> None:
        parent, child = _SPAWN.Pipe()
        proc = _SPAWN.Process(
            target=serve,
            args=(child, *self._args[:2], self._block.name, self._args[2]),
            name=f"retinaedge-reader-{self._number}",
            daemon=True,
        )
        proc.start()
        child.close()
        self._conn, self._proc, self.pid = parent, proc, proc.pid
        self.generation += 1

    def open(self, source: bytes | Path, extract: Callable[[DicomInput], Any] | None) -> RemoteInstance:
        job = next(self._jobs)
        if isinstance(source, Path):
            reply = self.call(("open", job, extract, str(source)))
        else:
            reply = self.call(("open", job, extract, None), payload=source)
        _kind, info, extracted, timings, first, generation = reply
        inst = RemoteInstance(self, job, generation, info, timings)
        inst.extracted, inst.pending = extracted, first
        return inst

    def call(self, message: tuple[Any, ...], payload: bytes | None = None, generation: int = 0) -> Any:
        """Send ``message`` (and ``payload``), return the reply; a frame's image is copied out of the block
        before the lock is let go. Raises the child's error, or :class:`ReaderProcessError`."""
        with self._lock:
            if self._closed:
                raise ReaderProcessError("the reader processes are stopped")
            if generation and generation != self.generation:
                raise ReaderProcessError("the reader process holding this instance ended")
            assert self._conn is not None
            try:
                self._conn.send(message)
                if payload is not None:
                    self._conn.send_bytes(payload)
                reply = self._conn.recv()
            except (EOFError, OSError) as exc:
                code = self._proc.exitcode if self._proc is not None else None
                log.error("reader process %d ended (exit code %s); starting another", self._number, code)
                self._restart()
                raise ReaderProcessError("the reader process ended while reading the instance") from exc
            if reply[0] == "frame":
                reply = self._copied(reply)
            elif reply[0] == "opened":
                first = self._copied(reply[4]) if reply[4][0] == "frame" else reply[4]
                reply = (*reply[:4], first, self.generation)
        if reply[0] == "error":
            raise rebuild(reply[1], reply[2], reply[3])
        return reply

    def _copied(self, step: tuple[Any, ...]) -> tuple[Any, ...]:
        """A frame step with its image copied out of the block (shape in, array out)."""
        image = np.ndarray(step[4], np.float32, buffer=self._block.buf).copy()
        return (*step[:4], image, *step[5:])

    def forget(self, job: int, generation: int) -> None:
        """The child closes instance ``job`` (no reply awaited; nothing to do if the child is gone)."""
        with self._lock:
            if self._closed or generation != self.generation or self._conn is None:
                return
            try:
                self._conn.send(("close", job))
            except (EOFError, OSError):
                pass  # found out by the next call

    def _restart(self) -> None:
        self._stop_process()
        if not self._closed:
            self._start()

    def _stop_process(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._proc is not None:
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop_process()
            self._block.close()
            self._block.unlink()


def rebuild(module: str, name: str, state: tuple[tuple[Any, ...], dict[str, Any]]) -> BaseException:
    """An exception of the child's, by class and state (not pickled whole: the runtime's errors take other
    arguments than their ``args``); a class that cannot be found becomes a :class:`ReaderProcessError`."""
    args, attributes = state
    try:
        cls = getattr(importlib.import_module(module), name)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            exc = cls.__new__(cls)
            exc.args = args
            exc.__dict__.update(attributes)
            return exc
    except Exception:  # an unknown class: its message still goes back
        pass
    return ReaderProcessError(f"{name}: {args[0] if args else ''}")


def _flatten(exc: BaseException) -> tuple[str, str, str, tuple[tuple[Any, ...], dict[str, Any]]]:
    return ("error", type(exc).__module__, type(exc).__qualname__, (exc.args, dict(vars(exc))))


def serve(
    conn: Connection, bundle: Bundle, limits: Limits, block_name: str, log_level: int = logging.WARNING
) -> None:
    """A reader process: opens, reads and closes instances as the pipe asks, until it closes. It logs as
    the service does (``log_level``, the same format, to the same stderr), through the same redaction:
    pydicom's warnings about a header's values are read here, and carry none of them
    (:mod:`retinaedge.runtime.logsafety`)."""
    import signal
    import sys

    from retinaedge.runtime import logsafety
    from retinaedge.runtime.threadname import name_this_thread

    logging.basicConfig(
        level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logsafety.install()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the service, which closes the pipe
    name_this_thread("retinaedge-reader-process")  # what ps, top -H and the benchmark see
    reader = InstanceReader(bundle, limits)
    block = shared_memory.SharedMemory(block_name)
    held: dict[int, _Held] = {}
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return  # the service closed the pipe or ended
            kind, job = message[0], message[1]
            if kind == "close":
                _drop(held, job)
                continue
            try:
                reply = _reply(conn, reader, block, held, message)
            except BaseException as exc:  # the request's error, sent back to it
                _drop(held, job)
                reply = _flatten(exc)
            try:
                conn.send(reply)
            except Exception as exc:  # a reply that does not pickle: its error's message at least
                _drop(held, job)
                conn.send(_flatten(ReaderProcessError(f"{type(exc).__name__}: {exc}")))
    finally:
        for one in held.values():
            one.inst.close()
        block.close()


class _Held:
    """An instance open in a reader process and its frames; :meth:`step` prepares the next one."""

    def __init__(self, inst: OpenInstance) -> None:
        self.inst = inst
        self._frames = inst.frames()
        self._ahead: ReadFrame | BaseException | None | bool = False  # False: nothing read ahead

    def _pull(self) -> ReadFrame | BaseException | None:
        try:
            return next(self._frames)
        except StopIteration:
            return None
        except BaseException as exc:  # for the step that reaches it
            return exc

    def step(self, block: shared_memory.SharedMemory) -> tuple[Any, ...]:
        """``("frame", index, letterbox, rule, shape, last, timings)`` with the image in ``block``, or
        ``("end", timings)``; raises the frame's error. The frame declared last is followed by one more
        read (no decoding: the end), so the reply can say it was the last."""
        current = self._pull() if self._ahead is False else self._ahead
        self._ahead = False
        if isinstance(current, BaseException):
            raise current
        if current is None or current is True:
            return ("end", dict(self.inst.timings_ms))
        last = False
        if current.index + 1 >= self.inst.info.frames:
            self._ahead = self._pull()
            last = self._ahead is None
        image = np.ascontiguousarray(current.image, dtype=np.float32)
        np.ndarray(image.shape, np.float32, buffer=block.buf)[...] = image
        timings = dict(self.inst.timings_ms)
        return ("frame", current.index, current.letterbox, current.rule, image.shape, last, timings)


def _drop(held: dict[int, _Held], job: int) -> None:
    one = held.pop(job, None)
    if one is not None:
        one.inst.close()


def _reply(
    conn: Connection,
    reader: InstanceReader,
    block: shared_memory.SharedMemory,
    held: dict[int, _Held],
    message: tuple[Any, ...],
) -> tuple[Any, ...]:
    """The reply to ``open`` (with the first frame's step, its error deferred to it) or ``next``."""
    kind, job = message[0], message[1]
    if kind == "open":
        _kind, _job, extract, path = message
        source: bytes | Path = Path(path) if path is not None else conn.recv_bytes()
        inst = reader.open(source)
        try:
            extracted = extract(inst.src) if extract is not None else None
        except BaseException:
            inst.close()
            raise
        held[job] = _Held(inst)
        try:
            first = _step(held, job, block)
        except BaseException as exc:  # the instance opened: its first frame's error comes with its frames
            _drop(held, job)
            first = _flatten(exc)
        return ("opened", inst.info, extracted, dict(inst.timings_ms), first)
    if kind == "next":
        return _step(held, job, block)
    raise ValueError(f"unknown reader request {kind!r}")


def _step(held: dict[int, _Held], job: int, block: shared_memory.SharedMemory) -> tuple[Any, ...]:
    """The next step of ``job``; the instance is let go after its last frame or its end."""
    step = held[job].step(block)
    if step[0] == "end" or step[5]:
        _drop(held, job)
    return step
