"""Issue #3, items 4-6: windowing against pydicom, MONOCHROME1, letterbox geometry, frame-by-frame memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from retinaedge.runtime.dicomio import iter_frames, open_dicom, validate
from retinaedge.runtime.errors import DicomInputError
from retinaedge.runtime.geometry import Letterbox
from retinaedge.runtime.manifest import Preprocessing, WindowPolicy
from retinaedge.runtime.preprocess import to_unit
from support.dicomgen import mr_instance, to_bytes, write
from support.paths import CORPUS_FILES


def _windowed_corpus() -> list[str]:
    out = []
    warnings.simplefilter("ignore")
    for path in CORPUS_FILES:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        if (
            "WindowCenter" in ds
            and "WindowWidth" in ds
            and "PixelData" in pydicom.dcmread(path)
            and ds.get("PhotometricInterpretation") in ("MONOCHROME1", "MONOCHROME2")
        ):
            out.append(path)
    return out


def _pydicom_unit(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """pydicom's modality LUT + VOI, rescaled from its documented output range to 0..1."""
    out = apply_voi_lut(apply_modality_lut(arr, ds), ds, index=0)
    if ds.PixelRepresentation == 0:
        y_min, y_max = 0.0, 2.0**ds.BitsStored - 1
    else:
        y_min, y_max = -(2.0 ** (ds.BitsStored - 1)), 2.0 ** (ds.BitsStored - 1) - 1
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        y_min = y_min * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        y_max = y_max * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    unit = (out - y_min) / (y_max - y_min)
    return 1.0 - unit if ds.PhotometricInterpretation == "MONOCHROME1" else unit


def test_windowing_agrees_with_pydicom() -> None:
    files = _windowed_corpus()
    assert len(files) >= 5, files
    compared = 0
    for path in files:
        ds = pydicom.dcmread(path)
        with open_dicom(path) as src:
            try:
                info = validate(src)
            except DicomInputError:
                continue  # rejected files (e.g. MR_truncated.dcm) are covered by the corpus tests
            compared += 1
            for index, (arr, photometric) in enumerate(iter_frames(src, info)):
                mine, rule = to_unit(arr, photometric, src.ds, index, Preprocessing(), info.bits_stored)
                assert rule == "file-window"
                ref = _pydicom_unit(arr, ds)
                np.testing.assert_allclose(mine, ref, atol=2e-6, err_msg=os.path.basename(path))
                break
    assert compared >= 5


def test_monochrome1_is_inverted() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4096, size=(64, 80)).astype(np.uint16)
    results = {}
    for photometric in ("MONOCHROME2", "MONOCHROME1"):
        data = to_bytes(mr_instance(pixels, photometric=photometric, window=(2048, 4096)))
        with open_dicom(data) as src:
            info = validate(src)
            arr, ph = next(iter_frames(src, info))
            results[photometric], _ = to_unit(arr, ph, src.ds, 0, Preprocessing(), info.bits_stored)
    np.testing.assert_allclose(results["MONOCHROME1"], 1.0 - results["MONOCHROME2"], atol=1e-6)
    assert results["MONOCHROME2"][0, 0] == pytest.approx((pixels[0, 0] - 2047.5) / 4095 + 0.5, abs=1e-6)


def test_policies_fixed_and_minmax() -> None:
    pixels = np.linspace(0, 1000, 64 * 64).reshape(64, 64).astype(np.uint16)
    data = to_bytes(mr_instance(pixels, rescale=(1.0, -1024.0)))  # modality values -1024..-24
    with open_dicom(data) as src:
        info = validate(src)
        arr, ph = next(iter_frames(src, info))
        fixed, rule = to_unit(
            arr, ph, src.ds, 0, Preprocessing(window=WindowPolicy("fixed", -524.0, 501.0)), info.bits_stored
        )
        assert rule == "fixed"
        assert fixed.min() == 0.0 and fixed.max() == 1.0 and 0.45 < float(fixed[32, 0]) < 0.55
        mm, rule = to_unit(arr, ph, src.ds, 0, Preprocessing(window=WindowPolicy("minmax")), info.bits_stored)
        assert rule == "minmax" and mm.min() == 0.0 and mm.max() == 1.0
        # A file without a window falls back to the robust min-max under the default 'file' policy.
        fallback, rule = to_unit(arr, ph, src.ds, 0, Preprocessing(), info.bits_stored)
        assert rule == "minmax"


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16])
def test_histogram_percentiles_equal_numpys_bit_for_bit(dtype: type) -> None:
    """The min-max VOI takes its percentiles from the order statistics of the stored values (fast path); they are
    exactly np.percentile of the rescaled values, for every shape of input tried here."""
    from retinaedge.runtime.preprocess import stored_percentiles

    rng = np.random.default_rng(7)
    info = np.iinfo(dtype)
    for case in range(150):
        n = int(rng.integers(1, 3000))
        lo, hi = sorted(int(v) for v in rng.integers(info.min, info.max, size=2))
        stored = rng.integers(lo, hi + 1, size=n).astype(dtype)
        slope, intercept = [(1.0, 0.0), (0.5, -1024.0), (2.5, 7.25), (1e-3, 0.0)][case % 4]
        q = [(0.5, 99.5), (0.0, 100.0), tuple(sorted(rng.uniform(0, 100, size=2)))][case % 3]
        values = stored.astype(np.float64)
        if (slope, intercept) != (1.0, 0.0):
            values = values * slope + intercept
        assert stored_percentiles(stored, q, slope, intercept) == list(np.percentile(values, q)), case


@pytest.mark.parametrize(("fh", "fw"), [(512, 512), (300, 700), (1023, 257), (96, 128), (2000, 1500)])
@pytest.mark.parametrize(("ih", "iw"), [(512, 512), (480, 640), (256, 320)])
def test_geometry_round_trip(fh: int, fw: int, ih: int, iw: int) -> None:
    lb = Letterbox.fit(fh, fw, ih, iw)
    assert lb.resized_h <= ih and lb.resized_w <= iw
    assert lb.resized_h == ih or lb.resized_w == iw
    rng = np.random.default_rng(fh * fw)
    a = rng.uniform(0, [lb.resized_w, lb.resized_h], size=(50, 2))
    b = rng.uniform(0, [lb.resized_w, lb.resized_h], size=(50, 2))
    boxes = np.concatenate([np.minimum(a, b), np.maximum(a, b)], axis=1)
    back = lb.to_input(lb.to_frame(boxes))
    assert np.abs(back - boxes).max() < 0.5
    frame_boxes = lb.to_frame(boxes)
    assert np.all(frame_boxes[:, 2] <= fw) and np.all(frame_boxes[:, 3] <= fh)


@pytest.mark.parametrize(("fh", "fw"), [(600, 400), (300, 900), (512, 512)])
def test_object_found_where_it_is(fh: int, fw: int) -> None:
    """A bright rectangle at a known place in a frame, located in the letterboxed model input and mapped
    back, lands at its known place (within a pixel of the frame's grid and the resampling)."""
    frame = np.zeros((1, fh, fw), np.float32)
    x1, y1, x2, y2 = int(fw * 0.55), int(fh * 0.2), int(fw * 0.8), int(fh * 0.45)
    frame[0, y1:y2, x1:x2] = 1.0
    lb = Letterbox.fit(fh, fw, 256, 320)
    model_input = lb.apply(frame, 0.0)
    ys, xs = np.nonzero(model_input[0] > 0.5)
    found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float64)
    mapped = lb.to_frame(found)[0]
    tol = 1.0 / min(lb.scale_x, lb.scale_y) + 1
    assert np.allclose(mapped, [x1, y1, x2, y2], atol=tol), (mapped, (x1, y1, x2, y2))
    assert np.all(model_input[0, lb.resized_h :, :] == 0) and np.all(model_input[0, :, lb.resized_w :] == 0)


PEAK = """
import json, sys
mode, path, model = sys.argv[1:4]

def hwm_kib():
    # VmHWM is this process's own peak RSS (ru_maxrss can carry the forking parent's peak across exec).
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

import numpy, pydicom, pydicom.pixels, onnxruntime
from retinaedge.runtime.detector import Detector
det = Detector.open(model, batch_size=4) if mode == "detect" else None
if det is not None:  # warm the session so its arenas are in the baseline
    import numpy as np
    spec = det.bundle.manifest.input
    det.backend.infer(np.zeros((4, spec.channels, spec.height, spec.width), np.float32))
base = hwm_kib()
if mode == "detect":
    result = det.detect(path)
    n = len(result.frames)
else:
    n = pydicom.dcmread(path).pixel_array.shape[0]
peak = hwm_kib()
print(json.dumps({"frames": n, "increase_mib": (peak - base) / 1024}))
"""


def _peak_process(mode: str, path: Path, bundle: Path, log: Path) -> subprocess.Popen[str]:
    """:data:`PEAK` in ``mode`` on ``path`` as a new process (its stderr to ``log``)."""
    with open(log, "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-c", PEAK, mode, str(path), str(bundle)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )


@pytest.mark.slow
def test_200_frames_processed_frame_by_frame(small_bundle: Path, tmp_path: Path) -> None:
    # On the exported ResNet-18 bundle (as before): with models/demo the detect increase was measured at
    # 72-73 MiB against 200 MiB all at once, above the third this test allows; not explained yet.
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 4096, size=(200, 512, 512), dtype=np.uint16)
    path = write(mr_instance(pixels, window=(2048, 4096)), tmp_path / "mf200.dcm")
    del pixels
    # Both measurements at once: each process reports its own peak (VmHWM), which the other cannot change.
    logs = {mode: tmp_path / f"{mode}.log" for mode in ("all-at-once", "detect")}
    procs = {mode: _peak_process(mode, path, small_bundle, log) for mode, log in logs.items()}
    report = {}
    try:
        for mode, proc in procs.items():
            stdout, _ = proc.communicate(timeout=900)
            assert proc.returncode == 0, logs[mode].read_text()[-2000:]
            report[mode] = json.loads(stdout)
    finally:
        for proc in procs.values():
            proc.kill()  # a no-op for a process that has exited
            proc.wait(60)
    assert report["detect"]["frames"] == report["all-at-once"]["frames"] == 200
    decoded_mib = 200 * 512 * 512 * 2 / 2**20  # 100 MiB of decoded pixels
    assert report["all-at-once"]["increase_mib"] >= decoded_mib * 0.9
    assert report["detect"]["increase_mib"] < report["all-at-once"]["increase_mib"] / 3, report
    print("200-frame 512x512 16-bit instance, peak RSS increase (MiB):", json.dumps(report))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16])
def test_grey_by_table_equals_per_pixel_bit_for_bit(dtype: type) -> None:
    """The grey pipeline run once per stored value and looked up (to_unit's fast path) gives exactly the
    float32 values of the per-pixel pipeline: every policy it takes, rescale, MONOCHROME1, narrow and
    offset ranges."""
    from pydicom.dataset import Dataset
    from retinaedge.runtime.preprocess import _by_table, _grey, _grey_by_table, frame_params

    rng = np.random.default_rng(11)
    info = np.iinfo(dtype)
    policies = [
        WindowPolicy("minmax"),
        WindowPolicy("fixed", 40.0, 80.0),
        WindowPolicy("file"),
        WindowPolicy("minmax", percentiles=(0.0, 100.0)),
    ]
    tried = 0
    for case in range(48):
        lo = int(rng.integers(info.min, max(info.min + 1, info.max // 2)))
        hi = min(info.max, lo + int(rng.integers(0, 400)))  # at most 401 values: a table
        arr = rng.integers(lo, hi + 1, size=(int(rng.integers(24, 64)), 40)).astype(dtype)
        ds = Dataset()
        ds.RescaleSlope, ds.RescaleIntercept = [("1", "0"), ("0.5", "-1024"), ("2.5", "7.25")][case % 3]
        if case % 2:
            ds.WindowCenter, ds.WindowWidth = str(lo + 20), str(max(1, (hi - lo) // 2))
            ds.VOILUTFunction = ["LINEAR", "LINEAR_EXACT"][case % 4 // 2]
        params = frame_params(ds, 0)
        policy = policies[case % 4]
        photometric = ["MONOCHROME2", "MONOCHROME1"][case % 5 % 2]
        if not _by_table(arr, ds, params, policy):
            continue
        tried += 1
        fast, fast_rule = _grey_by_table(arr, ds, params, policy, photometric)
        slow, slow_rule = _grey(arr, ds, params, policy, photometric, arr)
        assert fast_rule == slow_rule, case
        assert fast.dtype == slow.dtype == np.float32 and fast.shape == slow.shape, case
        assert fast.tobytes() == slow.tobytes(), case
    assert tried >= 24
