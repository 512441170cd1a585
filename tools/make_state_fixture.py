"""Write a service data directory (``state.sqlite3`` and the files it refers to) with an earlier version's
own code: the fixture of tests/service/test_state_migrations.py (``tests/data/state-v0/``).

The database has no schema version (``PRAGMA user_version`` 0): it is what the code before versioning
(commit 98b2db9, modules flat in ``service/``, relative imports) wrote. This script runs that code, not
today's: it is given a checkout of it, links the checkout's packages under a ``retinaedge`` package in a
temporary directory, puts that directory first on ``sys.path`` and checks that every module it uses comes
from the checkout. Nothing is installed. How the committed fixture was made::

    git worktree add /tmp/landed 98b2db9
    .venv/bin/python tools/make_state_fixture.py /tmp/landed --out tests/data/state-v0
    git worktree remove /tmp/landed

With the checkout's own classes (``Store``, ``IdentityFiles``, ``Spool``, ``store_spooled``,
``Exporter`` and its ``Outbox``, ``Detector`` on the demo bundle) it records, in the order the service
would:

- destinations ``pacs`` (C-STORE, instance SRs) and ``archive`` (STOW-RS, series SRs only);
- study_01 IM0001-IM0003 and IM0005 received by STOW-RS (spooled, identity files, pending rows); IM0001-3
  processed (done: their ``pacs`` jobs enqueued by the trigger, the series watched), IM0005 failed;
- the J2K instance of examples/compressed (another series) received and processed: a ``pacs`` job, its
  series watched (its quiet period not over: still watched);
- study_01 IM0010 as a ``/v1/detect`` result (done, no job);
- the ``pacs`` jobs: IM0001 delivered at the first attempt (its SR file released), IM0002 dead after
  three refused attempts (SR file kept), IM0003 one failed attempt then one in flight when the service
  "stopped" (SR file kept, the attempt's outcome NULL), the J2K instance's job pending, never tried;
- series study_01 asked complete (``POST .../complete``) and found complete by the exporter's watch: an
  ``archive`` job for its series SR, delivered after an unanswered attempt (a possible duplicate);
- then study_01 IM0004 received (pending; its spooled file is the example file itself, byte for byte:
  ``spool.json`` says which, and the test copies it back, to keep the fixture small).

The database is then checkpointed and vacuumed with 1 KiB pages (a few tens of KiB instead of ~100 KiB
of mostly empty 4 KiB pages; the rows are untouched). Running it again makes an equivalent fixture, not
an identical one (times, UIDs of the SRs, file names and detections' timings differ).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger("make_state_fixture")

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "runtime", "export", "device")
STUDY = REPO_ROOT / "examples" / "study_01"
OTHER_SERIES = REPO_ROOT / "examples" / "compressed" / "study_01_IM0016_J2K.dcm"
DESTINATIONS = [
    {"name": "pacs", "type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 11112},
    {
        "name": "archive",
        "type": "stowrs",
        "url": "https://archive.example/dicom-web",
        "instance_sr": False,
        "series_sr": True,
    },
]


def import_landed(checkout: Path, where: Path) -> dict[str, ModuleType]:
    """The checkout's modules this script uses, imported as ``retinaedge.<package>...`` from a package
    made of links to the checkout's folders in ``where`` (which goes first on ``sys.path``)."""
    if any(name == "retinaedge" or name.startswith("retinaedge.") for name in sys.modules):
        raise RuntimeError("retinaedge is imported already: run this as a script")
    package = where / "retinaedge"
    package.mkdir()
    (package / "__init__.py").write_text(
        '"""The checkout under test, linked by tools/make_state_fixture.py."""\n'
    )
    for name in PACKAGES:
        (package / name).symlink_to(checkout / name, target_is_directory=True)
    sys.path.insert(0, str(where))
    names = {
        "settings": "retinaedge.service.settings",
        "store": "retinaedge.service.store",
        "outbox": "retinaedge.service.outbox",
        "exporter": "retinaedge.service.exporter",
        "evidence": "retinaedge.service.evidence",
        "spool": "retinaedge.service.spool",
        "ingest": "retinaedge.service.ingest",
        "detector": "retinaedge.runtime.detector",
        "dicomio": "retinaedge.runtime.dicomio",
    }
    modules = {key: importlib.import_module(name) for key, name in names.items()}
    for name, module in sys.modules.items():
        if name.startswith("retinaedge.") and getattr(module, "__file__", None):
            if not Path(module.__file__).resolve().is_relative_to(checkout):
                raise RuntimeError(f"{name} was imported from {module.__file__}, not from {checkout}")
    return modules


def receive(m: dict[str, ModuleType], path: Path, spool: Any, store: Any, identities: Any) -> str:
    """STOW-RS's path for one instance (``ingest.store_spooled``): spooled, identity file, pending row."""
    part, fh = spool.open_part()
    data = path.read_bytes()
    spool.write(fh, data)
    stored = m["ingest"].store_spooled(
        part, fh, len(data), spool=spool, store=store, limits=m["dicomio"].Limits(), identities=identities
    )
    if not getattr(stored, "inserted", False):
        raise RuntimeError(f"{path.name} was not stored: {stored}")
    return str(stored.sop_instance)


def detect(det: Any, path: Path) -> dict[str, Any]:
    """The body the processor records for an instance (``Processor._infer``)."""
    body: dict[str, Any] = det.detect(path).to_json()
    body["backend"] = "onnxruntime"
    body["backend_reason"] = det.backend_reason
    return body


def write(checkout: Path, data: Path) -> dict[str, str]:
    """Record the scenario of the module docstring in ``data``; returns the spool's file -> example file."""
    import pydicom

    with tempfile.TemporaryDirectory(prefix="retinaedge-landed-") as where:
        m = import_landed(checkout, Path(where))
        model = checkout / "models" / "demo"
        settings = m["settings"].load_settings(model=model, data_dir=data, export_destinations=DESTINATIONS)
        store = m["store"].Store(data / "state.sqlite3")
        identities = m["evidence"].IdentityFiles(data / "identity")
        spool = m["spool"].Spool(data / "spool", 0)
        det = m["detector"].Detector.open(model, backend="onnxruntime")
        exporter = m["exporter"].Exporter(
            settings, store, identities, det.bundle.manifest.name, str(det.bundle.manifest.model_sha256)
        )
        outbox = exporter.outbox
        try:
            first = {n: receive(m, STUDY / f"IM000{n}.dcm", spool, store, identities) for n in (1, 2, 3, 5)}
            other = receive(m, OTHER_SERIES, spool, store, identities)
            for n in (1, 2, 3):
                store.done(first[n], detect(det, STUDY / f"IM000{n}.dcm"))
            store.failed(first[5], "malformed-dicom", "the pixel data is shorter than its header says")
            store.done(other, detect(det, OTHER_SERIES))
            # /v1/detect: the result writer's identity file and row.
            ds = pydicom.dcmread(STUDY / "IM0010.dcm", stop_before_pixels=True)
            evidence, identity = m["evidence"].split_dataset(ds)
            uid = str(ds.SOPInstanceUID)
            identities.put(uid, identity, replace=True)
            store.put_done(
                uid, str(ds.SOPClassUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                (STUDY / "IM0010.dcm").stat().st_size, detect(det, STUDY / "IM0010.dcm"), evidence,
            )  # fmt: skip

            jobs = {j.subject_uid: j for j in outbox.jobs("pending", "pacs", 100)}
            delivered, dead, interrupted = jobs[first[1]], jobs[first[2]], jobs[first[3]]
            exporter._document(delivered)
            outbox.finish(delivered, outbox.begin(delivered), "delivered", "C-STORE status 0x0000")
            exporter._document(dead)
            for n in (1, 2, 3):
                job = outbox.job(dead.id)
                retry = 0.0 if n < 3 else None
                outbox.finish(
                    job, outbox.begin(job), "failed", "C-STORE failure status 0xA900", retry_in_s=retry
                )
            exporter._document(interrupted)
            outbox.finish(interrupted, outbox.begin(interrupted), "failed", "no connection", retry_in_s=0.0)
            outbox.begin(outbox.job(interrupted.id))  # in flight when the service stops

            series = str(store.get(first[1]).series_uid)
            store.request_series_complete(series)
            exporter._watch_series()
            (series_job,) = outbox.jobs("pending", "archive", 100)
            exporter._document(series_job)
            outbox.finish(
                series_job, outbox.begin(series_job), "unknown", "no STOW-RS response", retry_in_s=0.0
            )
            job = outbox.job(series_job.id)
            outbox.finish(job, outbox.begin(job), "delivered", "STOW-RS HTTP 200")
            for name in outbox.release_documents():
                (data / "outbox" / name).unlink(missing_ok=True)

            late = receive(m, STUDY / "IM0004.dcm", spool, store, identities)
            spooled = {str(store.get(late).spool_path): "examples/study_01/IM0004.dcm"}
        finally:
            det.close()
            outbox.close()
            store.close()
        return spooled


def compact(path: Path) -> None:
    """Checkpoint the WAL into the file and vacuum it with 1 KiB pages (the rows are untouched)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute("PRAGMA page_size=1024")
        db.execute("VACUUM")
        if db.execute("PRAGMA user_version").fetchone()[0] != 0:
            raise RuntimeError("the checkout set a schema version: it is not the code before versioning")
    finally:
        db.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a checkout of the earlier version (e.g. 98b2db9)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "tests" / "data" / "state-v0")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # a line per module it copies into an SR
    checkout = args.checkout.resolve()
    if not (checkout / "service" / "outbox.py").is_file():
        parser.error(f"{checkout} has no service/outbox.py: not a checkout of the code before versioning")
    for key in [k for k in os.environ if k.startswith("RETINAEDGE_")]:
        del os.environ[key]  # the checkout's settings from defaults and this script only
    commit = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="retinaedge-fixture-") as tmp:
        data = Path(tmp) / "data"
        spooled = write(checkout, data)
        compact(data / "state.sqlite3")
        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.mkdir(parents=True)
        shutil.copy2(data / "state.sqlite3", args.out / "state.sqlite3")
        for folder in ("identity", "outbox"):
            shutil.copytree(data / folder, args.out / folder)
    (args.out / "spool.json").write_text(json.dumps(spooled, indent=1) + "\n")
    (args.out / "README.md").write_text(
        "A data directory written by retinaedge at commit "
        f"{commit or '(unknown)'} (before state.sqlite3 had a schema version), made by "
        "`tools/make_state_fixture.py` (its docstring says what it holds and how to make it again). "
        "`spool.json`: the spooled file of the pending instance, which is that example file byte for "
        "byte (the test copies it into `spool/`).\n"
    )
    size = (args.out / "state.sqlite3").stat().st_size
    log.info("wrote %s (state.sqlite3: %d bytes)", args.out, size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
