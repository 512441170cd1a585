"""No DICOM value and no traceback for an expected error in any log line, whoever logs it.

The project's own log lines carry no patient data (UIDs are logged as keyed hashes). Its dependencies'
lines are another matter: pydicom warns ``Invalid value for VR DA: '19010203'`` with the raw value (as a
Python warning and a log record), decoders log caught exceptions with a traceback at ERROR, and uvicorn
logs every client that disconnects mid-request as ``Exception in ASGI application`` with a traceback.

:func:`install` changes every log record made by a logger outside ``retinaedge`` when it is created
(a record factory, so every handler sees the same safe record, pytest's capture included):

- the message is reduced to its shape by :func:`redact`: quoted strings, UID-like dotted numbers,
  long digit runs (dates, IDs), person-name-like ``A^B`` values and byte strings are replaced with
  ``…``; for the DICOM libraries (pydicom, highdicom, the pylibjpeg decoders and Python
  warnings, which they issue) only the text before the first ``:`` is kept, since what follows it is
  the offending value;
- a traceback is dropped and replaced with the exception's type when the exception is expected: the
  client's input or transport (:data:`EXPECTED`, :class:`~retinaedge.runtime.errors.DicomInputError`,
  :class:`~retinaedge.runtime.errors.RequestError`), or anything a DICOM library logs (those are caught
  decoder errors that the runtime turns into typed errors). An unexpected exception elsewhere keeps its
  traceback, with the exception's message lines redacted.

Python warnings (pydicom issues each invalid value as a warning too) become one redacted log line of
``retinaedge.warnings`` instead of going to stderr with the value and the source line.
"""

from __future__ import annotations

import logging
import re
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from retinaedge.runtime.errors import DicomInputError, RequestError

#: Loggers whose records are the project's own (already free of patient data).
OWN_PREFIX = "retinaedge"

#: Libraries that handle DICOM values: everything after the first ``:`` of their messages is a value.
DICOM_LOGGERS = (
    "pydicom",
    "pynetdicom",
    "highdicom",
    "pylibjpeg",
    "openjpeg",
    "libjpeg",
    "rle",
    "py.warnings",
    "PIL",
)

#: Exception type names that are the client's doing or the network's, never a bug of ours.
EXPECTED = frozenset(
    {
        "ClientDisconnect",
        "ConnectionResetError",
        "BrokenPipeError",
        "ConnectionAbortedError",
        "CancelledError",
        "TimeoutError",
        "LocalProtocolError",
        "RemoteProtocolError",
        "InvalidDicomError",
        "MultiPartException",
        "SSLError",  # a client speaking plain HTTP (or an old TLS) to the HTTPS port
    }
)

_QUOTED = re.compile(r"b?'[^']*'|b?\"[^\"]*\"")
_LINK = re.compile(r"\s*(?:Please see )?<https?://[^>]*>[^.]*\.?")
_PERSON = re.compile(r"\S*\^\S*")
# Dotted numbers of five components or more (UIDs; an IPv4 address has four), and long digit runs
# (dates, times, IDs; a process ID or a port is shorter). Stricter for the DICOM libraries.
_DOTTED = re.compile(r"\d+(?:\.\d+){4,}")
_DIGITS = re.compile(r"\d{8,}")
_DOTTED_DICOM = re.compile(r"\d+(?:\.\d+)+")
_DIGITS_DICOM = re.compile(r"\d{4,}")

_installed: Callable[..., logging.LogRecord] | None = None


def redact(text: str, *, dicom: bool = False) -> str:
    """``text`` with values replaced by ``…``; ``dicom``: keep only what precedes the first ``:`` (what
    follows is the offending value in pydicom's messages) and redact shorter numbers too."""
    text = _LINK.sub("", text)
    if dicom and ":" in text:
        text = text.split(":", 1)[0] + ": …"
    text = _QUOTED.sub("'…'", text)
    text = _PERSON.sub("…", text)
    text = (_DOTTED_DICOM if dicom else _DOTTED).sub("…", text)
    return (_DIGITS_DICOM if dicom else _DIGITS).sub("…", text)


def _unquoted_values(text: str) -> str:
    """``text`` with person names, UIDs and long digit runs redacted (not quoted strings: a template's own
    quotes are code; string arguments were redacted whole)."""
    return _DIGITS.sub("…", _DOTTED.sub("…", _PERSON.sub("…", text)))


def _is_dicom_logger(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in DICOM_LOGGERS)


def expected(exc: BaseException, *, from_dicom_library: bool = False) -> bool:
    """Whether ``exc`` is an input or transport error (no traceback is logged for it)."""
    if from_dicom_library or isinstance(exc, (DicomInputError, RequestError)):
        return True
    return any(t.__name__ in EXPECTED for t in type(exc).__mro__)


def redacted_traceback(exc_info: Any, *, dicom: bool = False) -> str:
    """The formatted traceback with its message lines (not the ``File`` and source lines) redacted."""
    text = "".join(traceback.format_exception(*exc_info)).rstrip("\n")
    lines = []
    source_next = False
    for ln in text.splitlines():
        bare = ln.lstrip(" |+-")  # exception groups prefix their sub-tracebacks with | and +-
        if bare.startswith("File "):
            lines.append(ln)
            source_next = True
        elif source_next or bare.startswith("Traceback ") or not bare:
            lines.append(ln)  # a source line of the project or a library, not data
            source_next = False
        else:
            lines.append(redact(ln, dicom=dicom))

    return "\n".join(lines)


def _redact_args(record: logging.LogRecord) -> bool:
    """Redact a record's template and string arguments separately, keeping ``args`` a tuple (formatters
    such as uvicorn's access formatter unpack it); False when that would not be as safe as redacting the
    formatted message, which the caller then does."""
    if not isinstance(record.args, tuple) or not record.args or not isinstance(record.msg, str):
        return False
    template = record.msg  # written by a programmer; the check below catches values in it too
    # Numbers stay numbers (for %d); anything else is redacted as its text (an exception, a path ...).
    args = tuple(a if isinstance(a, (int, float)) else redact(str(a)) for a in record.args)
    try:
        message = template % args
    except Exception:  # redaction changed the placeholders
        return False
    if _unquoted_values(message) != message:  # a value only the formatted message shows (a long number)
        return False
    record.msg, record.args = template, args
    return True


def make_safe(record: logging.LogRecord) -> logging.LogRecord:
    """Rewrite a dependency's ``record`` in place (see the module docstring); our own pass unchanged."""
    name = record.name or ""  # logging.makeLogRecord() makes records without a name
    if name == OWN_PREFIX or name.startswith(OWN_PREFIX + "."):
        return record
    dicom = _is_dicom_logger(name)
    if not (not dicom and _redact_args(record)):
        try:
            message = record.getMessage()
        except Exception:  # a dependency's malformed format string: keep the template only
            message = str(record.msg)
        record.msg = redact(message, dicom=dicom)
        record.args = None
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        if expected(exc, from_dicom_library=dicom):
            record.msg = f"{record.msg.rstrip()} ({type(exc).__name__})"
            record.exc_info = None
            record.exc_text = None
        else:  # a bug somewhere: keep the traceback, with the exception's message lines redacted
            record.exc_text = redacted_traceback(record.exc_info, dicom=dicom)
            record.exc_info = None
    if record.stack_info:
        record.stack_info = None
    return record


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` replacement: one redacted log line, no source line, no value."""
    where = f"{Path(filename).name}:{lineno}"
    logging.getLogger(f"{OWN_PREFIX}.warnings").warning(
        "%s (%s): %s", category.__name__, where, redact(str(message), dicom=True)
    )


def install() -> None:
    """Make every dependency's log record safe from now on, and route Python warnings into logging.

    Idempotent; called by the ``retinaedge`` entry point and the service's app factory.
    """
    global _installed
    warnings.showwarning = _show_warning
    if _installed is not None:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        return make_safe(previous(*args, **kwargs))

    logging.setLogRecordFactory(factory)
    _installed = previous
