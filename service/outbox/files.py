"""The outbox's document files under ``<data_dir>/outbox``: what every attempt of a job sends.

A built document (an SR, a GSPS, a KOS: one SOP instance) is one file, written once, fsynced and
owner-only (:meth:`DocumentFiles.write`). A stored document (``sc``: the secondary captures of an
instance's frames with findings, made when its result was recorded) is a folder holding one
``<part>.dcm`` per part, hard links to the stored files (copies where a link cannot be made), so it stays
whatever retention does to the result (:meth:`DocumentFiles.link`). The outbox's database names either
(``export_documents.path``); :meth:`DocumentFiles.instances` reads back what to send.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from retinaedge.runtime.durable import fsync_path
from retinaedge.service.outbox.senders import Instance

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


class DocumentFiles:
    """The documents' files and folders under ``root``, by name."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def names(self) -> list[str]:
        return [p.name for p in self.root.iterdir()]

    def write(self, document_id: int, ds: Dataset) -> tuple[str, list[Instance]]:
        """Write a built document ``ds`` -> (its file's name, its one instance)."""
        fd, part = tempfile.mkstemp(dir=self.root, prefix=f"{document_id}-", suffix=".dcm")
        try:
            with os.fdopen(fd, "wb") as fh:
                ds.save_as(fh, enforce_file_format=True)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            Path(part).unlink(missing_ok=True)
            raise
        return Path(part).name, [Instance(Path(part), str(ds.SOPClassUID), str(ds.SOPInstanceUID))]

    def link(self, document_id: int, parts: dict[int, Path]) -> tuple[str, list[Instance]]:
        """Keep a stored document's files (part number -> file) in a new folder -> (its name, its
        instances in part order). Raises ``FileNotFoundError`` when a file is gone meanwhile."""
        folder = Path(tempfile.mkdtemp(dir=self.root, prefix=f"{document_id}-", suffix=".parts"))
        try:
            for number, source in parts.items():
                target = folder / f"{number}.dcm"
                try:
                    os.link(source, target)  # the same bytes, without copying them
                except FileNotFoundError:
                    raise
                except OSError:  # another file system, or no hard links there
                    shutil.copyfile(source, target)
                    fsync_path(target)
            fsync_path(folder)
            return folder.name, self.instances(folder.name)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def instances(self, name: str) -> list[Instance]:
        """The SOP instances of the document kept as ``name`` (a file, or a folder in part order), their
        SOP class and instance UIDs read from the headers. Raises what reading them raises (``OSError``,
        pydicom's ``InvalidDicomError``, ``AttributeError`` for a header without them)."""
        import pydicom

        path = self.root / name
        if path.is_dir():
            files = sorted(path.glob("*.dcm"), key=lambda f: int(f.stem) if f.stem.isdigit() else 0)
        else:
            files = [path]
        if not files:
            raise FileNotFoundError(f"the document folder {name} is empty")
        out = []
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            out.append(Instance(f, str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
        return out

    def remove(self, name: str) -> None:
        """Delete a document's file, or its folder."""
        path = self.root / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
