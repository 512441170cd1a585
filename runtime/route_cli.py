"""``retinaedge route --model A [--model B ...] FILE...``: which models take each file, without a server.

For each DICOM file (directories are searched) it prints one JSON line: the models whose intended use
accepts it (``models``) and, for each model that does not, the rules it fails with the value seen
(``not_applicable``; :mod:`retinaedge.runtime.intended_use`). Only the header is read. Exit status 0;
with ``--require-all``, 1 when a file goes to no model (a scanner's series nobody would see).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", type=Path, action="append", required=True, help="a model bundle (repeat for several)"
    )
    p.add_argument("files", nargs="+", type=Path, help="DICOM files or directories")
    p.add_argument(
        "--require-all", action="store_true", help="exit 1 when a file is not applicable to any model"
    )


def run(args: argparse.Namespace) -> int:
    import pydicom
    from retinaedge.runtime.bundle import load_bundle
    from retinaedge.runtime.discovery import dicom_files
    from retinaedge.runtime.jsonout import emit

    manifests = [load_bundle(path).manifest for path in args.model]
    names = [m.name for m in manifests]
    if len(set(names)) != len(names):
        log.warning("two bundles share a model name: the output names them alike")
    unrouted = unreadable = 0
    for path in dicom_files(args.files):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (OSError, ValueError, pydicom.errors.InvalidDicomError) as exc:
            unreadable += 1
            emit({"file": str(path), "error": {"type": "malformed-dicom", "message": type(exc).__name__}})
            continue
        taken, refused = [], {}
        for m in manifests:
            failures = m.intended_use.check(ds) if m.intended_use is not None else []
            if failures:
                refused[m.name] = [f.to_json() for f in failures]
            else:
                taken.append(m.name)
        unrouted += not taken
        emit({"file": str(path), "models": taken, "not_applicable": refused})
    log.info("%d file(s) go to no model, %d unreadable", unrouted, unreadable)
    return 1 if args.require_all and (unrouted or unreadable) else 0
