"""Write synthetic brain MR studies as DICOM, with their ground truth (development tooling).

Usage::

    .venv/bin/python tools/make_phantoms.py OUT_DIR [--seed 1000] [--studies 3] [--multiframe N]
        [--compressed N] [--rows 256] [--cols 256] [--overwrite] [-v]

Study ``k`` (1-based) uses seed ``SEED + k`` and is written to ``OUT_DIR/study_kk/IM0001.dcm ...`` (one
MR Image Storage instance per slice, inferior to superior). For the first ``--multiframe`` studies the
same slices are also written as one Legacy Converted Enhanced MR Image in its own series,
``OUT_DIR/study_kk_multiframe/MF0001.dcm`` (frames in highdicom's spatial order, superior to inferior);
for the first ``--compressed`` studies one slice with a tumour is re-encoded as JPEG 2000 Lossless, a new
instance in its own series, ``OUT_DIR/compressed/study_kk_IMnnnn_J2K.dcm``. So no directory holds the
same slice twice.

Also written: ``OUT_DIR/ground_truth.json`` (every box on every written frame, the format
``retinaedge eval --annotations`` reads), ``OUT_DIR/lesions.json`` (each series' seed, pose and tumours
with the instances and frames they appear on) and ``OUT_DIR/NOTICE-MNI-ICBM152.txt``. The output is
byte-for-byte deterministic in ``--seed`` and the other options. A JSON summary goes to stdout, logs to
stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger("make_phantoms")

OWN_NAMES = re.compile(
    r"^(study_\d{2,}(_multiframe)?|compressed|ground_truth\.json|lesions\.json|NOTICE-MNI-ICBM152\.txt)$"
)
SINGLE_FRAME_SERIES_NUMBER = 1
MULTIFRAME_SERIES_NUMBER = 101
COMPRESSED_SERIES_NUMBER = 201


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Write synthetic brain MR studies (DICOM) and their ground truth.",
        epilog="Synthetic images derived from the MNI ICBM152 2009a template; not patients; not for clinical use.",
    )
    parser.add_argument(
        "out_dir", type=Path, metavar="OUT_DIR", help="output directory (created; must be empty)"
    )
    parser.add_argument("--seed", type=int, default=1000, help="base seed: study k (1-based) uses SEED + k")
    parser.add_argument("--studies", type=int, default=3, help="number of studies (default 3)")
    parser.add_argument(
        "--multiframe",
        type=int,
        default=0,
        metavar="N",
        help="also write the first N studies as one multi-frame instance",
    )
    parser.add_argument(
        "--compressed",
        type=int,
        default=0,
        metavar="N",
        help="also write one slice with a tumour of the first N studies re-encoded as JPEG 2000 Lossless",
    )
    parser.add_argument("--rows", type=int, default=256, help="rows per slice (default 256)")
    parser.add_argument("--cols", type=int, default=256, help="columns per slice (default 256)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier output of this tool in OUT_DIR (only its own files; anything else is an error)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if args.studies < 1:
        parser.error("--studies must be at least 1")
    for name in ("multiframe", "compressed"):
        if not 0 <= getattr(args, name) <= args.studies:
            parser.error(f"--{name} must be between 0 and --studies ({args.studies})")
    if args.rows < 16 or args.cols < 16:
        parser.error("--rows and --cols must be at least 16")
    return args


def prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Create ``out``; refuse a non-empty one unless ``overwrite`` and it holds only this tool's output."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    entries = sorted(out.iterdir())
    if not entries:
        return
    if not overwrite:
        raise SystemExit(f"{out} is not empty (use --overwrite to replace an earlier output of this tool)")
    foreign = [p.name for p in entries if not OWN_NAMES.match(p.name)]
    if foreign:
        raise SystemExit(f"{out} holds files this tool did not write, refusing to overwrite: {foreign[:5]}")
    for p in entries:
        log.info("removing earlier output %s", p)
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def pick_lesion_slice(series: object) -> int:
    """The slice with the largest total area of non-difficult boxes (else of any box, else the middle one)."""
    boxes = series.boxes  # type: ignore[attr-defined]
    for keep in (lambda b: not b.difficult, lambda b: True):
        areas = [sum((b.x2 - b.x1) * (b.y2 - b.y1) for b in row if keep(b)) for row in boxes]
        if max(areas, default=0) > 0:
            return max(range(len(areas)), key=lambda s: (areas[s], -s))
    log.warning("series %d has no tumour: compressing its middle slice", series.seed)  # type: ignore[attr-defined]
    return len(boxes) // 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("openjpeg").setLevel(logging.WARNING)  # logs every tile at INFO
    from phantom.dicomwrite import (
        NOTICE_FILE,
        compress_instance,
        ground_truth,
        lesion_truth,
        phantom_uid,
        record_files,
        study_context,
        write_multiframe,
        write_single_frame_series,
    )
    from phantom.study import make_series
    from pydicom.uid import JPEG2000Lossless

    started = time.monotonic()
    out: Path = args.out_dir
    prepare_out_dir(out, args.overwrite)
    written = []
    summary_studies = []
    for k in range(1, args.studies + 1):
        seed = args.seed + k
        name = f"study_{k:02d}"
        t0 = time.monotonic()
        series = make_series(seed, rows=args.rows, cols=args.cols)
        context = study_context(seed)
        paths = write_single_frame_series(
            series, out / name, context=context, series_number=SINGLE_FRAME_SERIES_NUMBER
        )
        written.append(record_files(series, paths))
        entry: dict[str, object] = {
            "dir": name,
            "seed": seed,
            "study_instance_uid": context.study_uid,
            "series_instance_uid": written[-1].series_instance_uid,
            "slices": len(paths),
            "lesions": [lesion.kind for lesion in series.lesions],
            "multiframe": None,
            "compressed": None,
        }
        if k <= args.multiframe:
            mf_path, order = write_multiframe(
                paths,
                out / f"{name}_multiframe" / "MF0001.dcm",
                series_instance_uid=phantom_uid(context.study_uid, "series", MULTIFRAME_SERIES_NUMBER),
                series_number=MULTIFRAME_SERIES_NUMBER,
                sop_instance_uid=phantom_uid(context.study_uid, "multiframe", MULTIFRAME_SERIES_NUMBER),
            )
            written.append(record_files(series, [mf_path], [order]))
            entry["multiframe"] = mf_path.relative_to(out).as_posix()
        if k <= args.compressed:
            s = pick_lesion_slice(series)
            c_path = compress_instance(
                paths[s],
                out / "compressed" / f"{name}_IM{s + 1:04d}_J2K.dcm",
                JPEG2000Lossless,
                sop_instance_uid=phantom_uid(context.study_uid, "compressed", s),
                series_instance_uid=phantom_uid(context.study_uid, "series", COMPRESSED_SERIES_NUMBER),
                series_number=COMPRESSED_SERIES_NUMBER,
            )
            written.append(record_files(series, [c_path], [[s]]))
            entry["compressed"] = c_path.relative_to(out).as_posix()
        summary_studies.append(entry)
        log.info(
            "%s: seed %d, %d slices, lesions %s (%.1f s)",
            name,
            seed,
            len(paths),
            entry["lesions"],
            time.monotonic() - t0,
        )

    gt = ground_truth(written)
    (out / "ground_truth.json").write_text(json.dumps(gt, indent=1) + "\n", encoding="utf-8")
    truth = lesion_truth(written, root=out)
    (out / "lesions.json").write_text(json.dumps(truth, indent=1) + "\n", encoding="utf-8")
    shutil.copyfile(NOTICE_FILE, out / NOTICE_FILE.name)
    summary = {
        "out_dir": str(out),
        "seed": args.seed,
        "studies": summary_studies,
        "instances": sum(len(ws.instances) for ws in written),
        "frames": sum(len(inst.slices) for ws in written for inst in ws.instances),
        "annotations": len(gt["annotations"]),  # type: ignore[arg-type]
        "ground_truth": "ground_truth.json",
        "lesions": "lesions.json",
        "seconds": round(time.monotonic() - started, 1),
    }
    sys.stdout.write(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
