"""INT8 on OpenVINO: ``retinaedge quantize --target openvino`` (NNCF, min-max ranges, post-processing
ignored) and the project's Q/DQ model, each served only behind the precision gate.

A calibration spoilt on purpose (blank frames only: every activation range collapses, independent of the
CPU's integer kernels) must fail the gate and fall back to FP32 with the reason, in the backend and in
``/readyz``. A good calibration is only asserted to be served exactly when its gate passed: whether INT8
keeps every finding is a property of the CPU's numerics, not something a test may assume.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from retinaedge.runtime.backends.base import BackendOptions
from retinaedge.runtime.backends.openvino.precision import MAX_RECHECK_RATE
from retinaedge.runtime.backends.registry import open_backend
from retinaedge.runtime.bundle import OV_INT8_MODEL_FILE, OV_QUANTIZATION_FILE, load_bundle
from retinaedge.runtime.cli import main
from support.paths import DEMO, EXAMPLES
from support.servers import serve

pytest.importorskip("nncf")

STUDY = EXAMPLES / "study_01"
#: Annotated example frames with every class (as tests/export/test_quantize.py uses them).
EVAL_FILES = tuple(STUDY / f"IM{n:04d}.dcm" for n in (4, 5, 6, 7, 14, 15, 16))


def serves(gate: dict[str, Any]) -> bool:
    """Whether a gated precision serves: its gate passed and its FP32 re-check did not re-run most frames."""
    return bool(gate["passed"]) and (gate.get("recheck_rate") or 0.0) <= MAX_RECHECK_RATE


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("openvino-cache")


@pytest.fixture(scope="module")
def nncf_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nncf") / "demo"
    shutil.copytree(DEMO, root)
    code = main(
        [
            "quantize",
            "--model",
            str(root),
            "--calibration",
            str(STUDY),
            "--target",
            "openvino",
            "--max-frames",
            "16",
        ]
    )
    assert code == 0
    return root


@pytest.fixture(scope="module")
def spoilt_bundle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    import retinaedge.export.quantize_openvino as qov

    root = tmp_path_factory.mktemp("spoilt") / "demo"
    shutil.copytree(DEMO, root)
    manifest = load_bundle(root).manifest
    shape = (1, manifest.input.channels, manifest.input.height, manifest.input.width)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qov, "calibration_frames", lambda *a, **k: iter([np.zeros(shape, np.float32)] * 4))
        qov.quantize_openvino(root, [STUDY], max_frames=4, golden=False)
    yield root


def _open(bundle: Path, cache_dir: Path, **extra: Any) -> Any:
    options = BackendOptions(threads=2, extra={"cache_dir": cache_dir, **extra})
    return open_backend("openvino", load_bundle(bundle), options)


def test_quantize_writes_an_ir_with_its_record(nncf_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record = json.loads((nncf_bundle / OV_QUANTIZATION_FILE).read_text())
    assert record["activation_ranges"] == "minmax" and record["ignored_patterns"] == ["post/.*"]
    assert record["fake_quantize_nodes"] > 50
    assert record["calibration_dicom_frames"] == 16 and record["calibration_golden_frames"] == 2
    assert record["source_model_sha256"] == load_bundle(DEMO).manifest.model_sha256
    assert (nncf_bundle / OV_INT8_MODEL_FILE).with_suffix(".bin").is_file()


def test_int8_is_served_exactly_when_its_gate_passed(nncf_bundle: Path, cache_dir: Path) -> None:
    with _open(nncf_bundle, cache_dir, precision="int8") as backend:
        gate = backend.describe()["gates"]["int8"]
        assert backend.precision == ("int8" if serves(gate) else "fp32")
        assert gate["frames"] == 2 and gate["reference_findings"] >= 1
        if backend.precision == "int8":
            assert backend.describe()["model"] == OV_INT8_MODEL_FILE
            assert backend.describe()["inference_precision"] == "f32"  # float parts stay f32, not bf16
            assert backend.self_test_criteria is not None
        else:
            assert "gate failed" in backend.reason


def test_the_gate_also_evaluates_annotated_dicom(nncf_bundle: Path, cache_dir: Path) -> None:
    extra = {"precision": "int8", "gate_annotations": EXAMPLES / "ground_truth.json", "gate_eval": EVAL_FILES}
    with _open(nncf_bundle, cache_dir, **extra) as backend:
        gate = backend.describe()["gates"]["int8"]
        assert gate["frames"] == 2 + len(EVAL_FILES)
        assert set(gate["map50"]) == {"fp32", "candidate", "drop"} and gate["map50"]["fp32"] is not None
        # Served when its gate passed, unless its FP32 re-check re-ran most frames (FP32 in disguise).
        assert backend.precision == ("int8" if serves(gate) else "fp32")
        if gate["passed"] and not serves(gate):
            assert "re-check re-ran more than" in backend.reason


def test_a_spoilt_calibration_fails_the_gate_and_serves_fp32_with_the_reason(
    spoilt_bundle: Path, cache_dir: Path
) -> None:
    for precision in ("int8", "auto"):
        with _open(spoilt_bundle, cache_dir, precision=precision) as backend:
            gate = backend.describe()["gates"]["int8"]
            assert not gate["passed"] and gate["lost"] and "FP32 findings lost" in gate["reasons"][0]
            assert backend.precision != "int8"
            assert "int8" in backend.reason and "failed" in backend.reason
    record = json.loads((Path(backend.describe()["cache_entry"]) / "record.json").read_text())
    assert record["precision"] == backend.precision  # the entry of the precision that serves


def test_the_service_says_why_int8_was_not_used(spoilt_bundle: Path) -> None:
    with (
        serve(model=spoilt_bundle, backend="openvino", openvino_precision="int8", threads=2) as url,
        httpx.Client(timeout=60) as c,
    ):
        ready = c.get(f"{url}/readyz").json()
        assert ready["precision"] == "fp32" and "gate failed" in ready["backend_reason"]
        assert ready["engine"]["openvino"]["gates"]["int8"]["passed"] is False


def test_a_replaced_int8_model_is_not_used(nncf_bundle: Path, tmp_path: Path, cache_dir: Path) -> None:
    tampered = tmp_path / "demo"
    shutil.copytree(nncf_bundle, tampered)
    with (tampered / OV_INT8_MODEL_FILE).with_suffix(".bin").open("ab") as fh:
        fh.write(b"\0")
    with _open(tampered, cache_dir, precision="int8") as backend:
        assert backend.precision == "fp32" and "sha256 differs" in backend.reason


def test_the_qdq_model_runs_on_openvino_behind_the_gate(tmp_path: Path, cache_dir: Path) -> None:
    from retinaedge.export.quantize import quantize_bundle

    root = tmp_path / "demo"
    shutil.copytree(DEMO, root)
    quantize_bundle(root, [STUDY], max_frames=8)
    with _open(root, cache_dir, precision="int8", int8_model="qdq") as backend:
        gate = backend.describe()["gates"]["int8"]
        assert backend.precision == ("int8" if serves(gate) else "fp32")
        if backend.precision == "int8":
            assert backend.describe()["model"] == "model.int8.qdq.onnx"


def test_a_gate_bundle_decides_for_another_bundle_whose_own_gate_is_only_reported(
    nncf_bundle: Path, spoilt_bundle: Path, cache_dir: Path
) -> None:
    """The benchmark's --gate-model: a precision that passed on the trained bundle runs on the other one."""
    with _open(nncf_bundle, cache_dir, precision="int8") as proof:
        decided = proof.precision
    with _open(spoilt_bundle, cache_dir, precision="int8", gate_bundle=nncf_bundle) as backend:
        facts = backend.describe()
        assert facts["gate_bundle"]["bundle"] == str(nncf_bundle)
        assert facts["gate_bundle"]["precision"] == decided == backend.precision
        assert facts["gates"]["int8"]["passed"] is False  # its own (spoilt) gate, reported, not deciding
        assert "pass/fail from the gate on" in backend.reason and "not deciding" in backend.reason


def test_a_gate_recorded_for_the_same_inputs_is_reused_and_new_inputs_run_it_again(
    nncf_bundle: Path, tmp_path: Path
) -> None:
    evals = tmp_path / "eval"
    evals.mkdir()
    for f in EVAL_FILES:
        shutil.copy(f, evals / f.name)
    cache = tmp_path / "cache"
    extra = {"precision": "int8", "gate_annotations": EXAMPLES / "ground_truth.json", "gate_eval": [evals]}
    with _open(nncf_bundle, cache, **extra) as first:
        measured = first.describe()["gates"]["int8"]
    with _open(nncf_bundle, cache, **extra) as second:
        reused = second.describe()["gates"]["int8"]
        assert second.precision == first.precision
    assert measured["reused"] is False and reused["reused"] is True
    same = ("passed", "kept", "reference_findings", "lost", "new", "map50", "frames", "inputs")
    assert {k: reused[k] for k in same} == {k: measured[k] for k in same}
    (evals / EVAL_FILES[0].name).write_bytes((evals / EVAL_FILES[0].name).read_bytes())  # a new mtime
    with _open(nncf_bundle, cache, **extra) as third:
        again = third.describe()["gates"]["int8"]
        assert again["reused"] is False and again["inputs"] != measured["inputs"]
