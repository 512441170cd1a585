"""Issue #3, items 1-3: pydicom's whole test corpus through ``retinaedge detect``, truncation sweep,
lying headers rejected before allocation."""

from __future__ import annotations

import collections
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pydicom
import pytest
from retinaedge.runtime.cli import main
from retinaedge.runtime.detector import Detector
from retinaedge.runtime.dicomio import open_dicom, validate
from retinaedge.runtime.errors import DicomInputError, OverBudgetError, RetinaEdgeError
from support.paths import CORPUS_FILES, demo_any_image

#: The demo model without its intended use: pydicom's corpus (CT, US, SC, broken files) reaches the runtime.
ANY_IMAGE = demo_any_image()

COMPRESSED = {
    "1.2.840.10008.1.2.4.50": "JPEG baseline",
    "1.2.840.10008.1.2.4.70": "JPEG lossless",
    "1.2.840.10008.1.2.4.80": "JPEG-LS lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.5": "RLE",
    "1.2.840.10008.1.2.1.99": "deflate",
}


def test_corpus_is_there() -> None:
    assert len(CORPUS_FILES) >= 70


@pytest.mark.slow
def test_corpus_through_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    options = ["--model", str(ANY_IMAGE), "--overlay", str(tmp_path / "ov")]
    code = main(["--log-level", "WARNING", "detect", *options, *CORPUS_FILES])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["file"] for line in lines] == CORPUS_FILES  # one line per file, in order
    outcomes = collections.Counter(line["error"]["type"] if "error" in line else "ok" for line in lines)
    assert "internal-error" not in outcomes, [
        line for line in lines if "error" in line and line["error"]["type"] == "internal-error"
    ]
    assert code == (1 if len(lines) > outcomes["ok"] else 0)
    decoded = set()
    frames = 0
    for line in lines:
        if "error" in line:
            assert line["error"]["message"]
            continue
        assert len(line["frames"]) == line["image"]["frames"] >= 1
        assert [f["index"] for f in line["frames"]] == list(range(line["image"]["frames"]))
        decoded.add(line["image"]["transfer_syntax"])
        frames += len(line["frames"])
    missing = {name for uid, name in COMPRESSED.items() if uid not in decoded}
    assert not missing, f"compressed syntaxes never decoded: {missing}"
    assert outcomes["ok"] >= 55
    assert len(list((tmp_path / "ov").glob("*.png"))) == frames
    print(
        f"corpus: {len(lines)} files, outcomes {dict(outcomes)}, {frames} frames detected, "
        f"transfer syntaxes decoded {sorted(decoded)}"
    )


def _valid_images() -> list[str]:
    good = []
    for path in CORPUS_FILES:
        try:
            with open_dicom(path) as src:
                validate(src)
            good.append(path)
        except RetinaEdgeError:
            pass
    return good


def _pixel_span(data: bytes) -> tuple[int, int]:
    """(start of the Pixel Data value, end of it) in the file's bytes."""
    ds = pydicom.dcmread(io.BytesIO(data), defer_size=1024)
    ts = str(ds.file_meta.TransferSyntaxUID)
    if ts == "1.2.840.10008.1.2.1.99":  # deflated: offsets are in the inflated stream
        return 132, len(data)
    raw = ds.get_item(0x7FE00010, keep_deferred=True)
    end = raw.value_tell + (raw.length if raw.length != 0xFFFFFFFF else len(data) - raw.value_tell)
    return raw.value_tell, min(end, len(data))


@pytest.mark.slow
def test_truncation_sweep() -> None:
    """Every valid image cut at ten points before the end of its pixel data is rejected, typed."""
    warnings.simplefilter("ignore")
    files = _valid_images()
    assert len(files) >= 50
    checked = 0
    with Detector.open(ANY_IMAGE) as det:
        for path in files:
            data = Path(path).read_bytes()
            start, end = _pixel_span(data)
            for k in range(10):
                cut = start + (end - start) * k // 10 if end > start else start
                with pytest.raises(DicomInputError) as info:
                    det.detect(data[:cut])
                assert info.value.http_status in (400, 413, 415, 422)
                checked += 1
    assert checked == 10 * len(files)
    print(
        f"truncation sweep: {len(files)} valid image files x 10 cuts = {checked} rejected with typed errors"
    )


def _lying(path: str, **attrs: int) -> bytes:
    ds = pydicom.dcmread(path)
    for key, value in attrs.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_lying_headers_rejected_before_allocation(tmp_path: Path) -> None:
    """Rows/columns/frames far beyond the bytes present: rejected from the header; RSS barely moves."""
    test_files = Path(CORPUS_FILES[0]).parent
    cases = {
        "native_65535x65535x1000": _lying(
            str(test_files / "CT_small.dcm"), Rows=65535, Columns=65535, NumberOfFrames=1000
        ),
        "native_frames_only": _lying(str(test_files / "CT_small.dcm"), NumberOfFrames=60000),
        "native_4096_square": _lying(str(test_files / "CT_small.dcm"), Rows=4096, Columns=4096),
        "j2k_65535x65535": _lying(str(test_files / "JPEG2000.dcm"), Rows=65535, Columns=65535),
        "rle_frames_1000": _lying(str(test_files / "MR_small_RLE.dcm"), NumberOfFrames=1000),
    }
    for name, data in cases.items():
        (tmp_path / f"{name}.dcm").write_bytes(data)
    script = f"""
import json, sys, glob

def hwm_kib():
    # VmHWM is this process's own peak RSS (ru_maxrss can carry the forking parent's peak across exec).
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

from retinaedge.runtime.dicomio import open_dicom, validate, iter_frames
from retinaedge.runtime.errors import DicomInputError
before = hwm_kib()
out = {{}}
for path in sorted(glob.glob({str(tmp_path)!r} + "/*.dcm")):
    try:
        with open_dicom(path) as src:
            info = validate(src)
            for _ in iter_frames(src, info):
                pass
        out[path] = "accepted"
    except DicomInputError as exc:
        out[path] = exc.type
after = hwm_kib()
print(json.dumps({{"outcomes": out, "peak_increase_kib": after - before}}))
"""
    # Import pydicom's decoders first so their one-off import cost is not counted as allocation.
    warm = "import pydicom.pixels, numpy, pylibjpeg\n"
    proc = subprocess.run([sys.executable, "-c", warm + script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert set(report["outcomes"].values()) <= {"over-budget", "truncated-dicom"}, report
    assert report["outcomes"][str(tmp_path / "native_65535x65535x1000.dcm")] == "over-budget"
    assert report["peak_increase_kib"] < 50 * 1024, report
    print("lying headers:", json.dumps(report))


def test_budget_errors_say_what_is_wrong() -> None:
    data = _lying(
        str(Path(CORPUS_FILES[0]).parent / "CT_small.dcm"), Rows=65535, Columns=65535, NumberOfFrames=1000
    )
    with open_dicom(data) as src, pytest.raises(OverBudgetError, match="65535 x 65535"):
        validate(src)


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEGLSNearLossless_16.dcm"])
def test_codestream_larger_than_header_is_refused_before_decoding(name: str) -> None:
    """Decoders allocate from the codestream's own SOF/SIZ size: it must not exceed the DICOM header's."""
    path = Path(CORPUS_FILES[0]).parent / name
    if not path.exists():
        pytest.skip(f"{name} not in this pydicom's corpus")
    data = _lying(str(path), Rows=8, Columns=8)
    with (
        open_dicom(data) as src,
        pytest.raises(DicomInputError, match="declares .* pixels but the header says 8 x 8"),
    ):
        validate(src)
