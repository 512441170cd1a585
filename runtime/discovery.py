"""Which files a command line names: the one rule for every verb that takes DICOM files or directories.

``retinaedge detect``, ``eval``, ``quantize`` (calibration and accuracy files), ``export --parity-dicom``
and ``benchmark --dicom`` all expand their paths with :func:`dicom_files`:

- a **file** named on the command line is taken as given, whatever its name or content (the verb then
  reports a file it cannot read, as it does for any rejected input);
- a **directory** is walked recursively; its regular files (symbolic links to files included) come in
  sorted path order, except
  - hidden ones: a name, or a directory on the way below the one given, starting with ``.``
    (``.DS_Store``, ``.git/``);
  - ``DICOMDIR`` (any case): a DICOM media directory, which has no pixel data;
  - files that do not start as a DICOM Part 10 file does: a 128-byte preamble then ``DICM``
    (:data:`MAGIC_OFFSET`). The runtime reads nothing else (it never parses with ``force``), so what is
    skipped here it would reject anyway, and ``ground_truth.json``, notes, previews or a ``LICENSE``
    beside the images are not reported as rejected inputs. The file name does not matter: DICOM files
    often have no extension (``IM000001`` on media).
- a path that does not exist is a :class:`~.errors.ConfigError`, and so is a non-empty list of paths
  that yields no file at all.

Paths in ``exclude`` (compared after resolving) are left out wherever they come from: ``eval`` leaves out
its own ground-truth file, which a shell glob over the data directory names.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from retinaedge.runtime.errors import ConfigError

log = logging.getLogger(__name__)

MAGIC = b"DICM"
MAGIC_OFFSET = 128  # bytes of preamble before the magic
SKIPPED_NAMES = frozenset({"DICOMDIR"})

RULE_HELP = (
    "a directory means every DICOM Part 10 file below it (recursively, sorted; hidden files and "
    "directories and DICOMDIR skipped; files are recognised by their 'DICM' header, not their name)"
)


def has_dicom_header(path: Path) -> bool:
    """Whether ``path`` starts with a 128-byte preamble and ``DICM``; an unreadable file counts as one
    (so the verb reports why it cannot be read)."""
    try:
        with path.open("rb") as f:
            head = f.read(MAGIC_OFFSET + len(MAGIC))
    except OSError as exc:
        log.debug("cannot read %s (%s): left to the verb to report", path, exc)
        return True
    return head[MAGIC_OFFSET:] == MAGIC


def _candidate(path: Path, top: Path) -> bool:
    parts = path.relative_to(top).parts
    if any(part.startswith(".") for part in parts):
        return False
    if path.name.upper() in SKIPPED_NAMES or not path.is_file():
        return False
    return has_dicom_header(path)


def dicom_files(paths: Iterable[str | Path], *, exclude: Iterable[Path] = ()) -> list[Path]:
    """The files ``paths`` name, by the module's rule, in order (each directory's files sorted)."""
    excluded = {p.resolve() for p in exclude}
    given = [Path(p) for p in paths]
    out: list[Path] = []
    for p in given:
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if _candidate(q, p))
            log.debug("%s: %d DICOM file(s)", p, len(found))
        elif p.exists():
            found = [p]
        else:
            raise ConfigError(f"{p} does not exist")
        for q in found:
            if excluded and q.resolve() in excluded:
                log.info("%s is excluded (not an input), skipped", q)
                continue
            out.append(q)
    if given and not out:
        raise ConfigError(f"no DICOM files in {[str(p) for p in given]}")
    return out
