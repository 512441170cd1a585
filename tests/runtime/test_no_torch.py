"""The bundle runs with nothing but onnxruntime and numpy: torch and torchvision are blocked outright."""

from __future__ import annotations

import json
from pathlib import Path

from support.blocked import run_blocked
from support.paths import DEMO


def test_bare_model_onnx_runs_with_onnxruntime_and_numpy_only() -> None:
    """Only onnxruntime + numpy + the embedded manifest: what an integrator's own code would do."""
    proc = run_blocked(
        f"""
        import json, sys
        import numpy as np, onnxruntime as ort
        sess = ort.InferenceSession({str(DEMO / "model.onnx")!r}, providers=["CPUExecutionProvider"])
        meta = json.loads(sess.get_modelmeta().custom_metadata_map["retinaedge.manifest"])
        h, w = meta["input"]["height"], meta["input"]["width"]
        golden = np.load({str(DEMO / "golden.npz")!r})["images"].astype(np.float32) / np.float32(255)
        num, boxes, scores, labels = sess.run(None, {{"images": golden}})
        assert "torch" not in sys.modules
        print(json.dumps({{"num": int(num[0]), "classes": meta["class_names"], "hw": [h, w]}}))
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    expected = json.loads((DEMO / "golden.json").read_text())["detections"][0]
    assert out["num"] == len(expected["scores"]) > 0
    assert out["classes"] == ["glioma", "meningioma", "pituitary"] and out["hw"] == [256, 256]


def test_runtime_self_test_without_torch() -> None:
    proc = run_blocked(
        f"""
        import sys
        from retinaedge.runtime.bundle import load_bundle, self_test
        from retinaedge.runtime.backends.onnxruntime import OnnxRuntimeBackend
        from retinaedge.runtime.cli import build_parser
        build_parser()  # every verb's argument parser loads without torch
        bundle = load_bundle({str(DEMO)!r})
        with OnnxRuntimeBackend(bundle.model_path) as backend:
            reports = self_test(backend, bundle)
        assert "torch" not in sys.modules and "torchvision" not in sys.modules
        print(reports[0].matched, reports[0].reference)
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    matched, reference = map(int, proc.stdout.split())
    assert matched == reference > 0


def test_export_without_torch_names_the_extra(tmp_path: Path) -> None:
    proc = run_blocked(
        f"""
        from retinaedge.runtime.cli import main
        raise SystemExit(main(["export", "x.pth", "--arch", "resnet18_fpn", "--out", {str(tmp_path / "b")!r},
                               "--input-size", "256", "--num-classes", "2"]))
        """
    )
    assert proc.returncode == 1
    err = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
    assert err["type"] == "missing-dependency"
    assert "pip install 'retinaedge[export]'" in err["message"]
