"""The bundled demo model, the sample studies and `make demo`'s driver, for real.

- the demo bundle is small, loads, and passes its golden self-test; the checkpoint beside it is the one
  the manifest names;
- `tools/demo.py` (what `make demo` runs) serves the bundle, sends the examples by STOW-RS and
  /v1/detect, prints findings that hit every class of the sample study, writes overlays, exits 0;
- `retinaedge eval` on held-out phantoms (seeds never used in training) reproduces the model card's AP50.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from retinaedge.runtime.bundle import load_bundle
from retinaedge.runtime.hashing import sha256_file
from support.paths import DEMO, EXAMPLES, REPO_ROOT

CHECKPOINT = REPO_ROOT / "models" / "demo_checkpoint.pt"
HELDOUT_SEED = 100000
HELDOUT_STUDIES = 20
# mAP50 on those studies as measured for models/demo/MODEL_CARD.md (same command, deterministic data).
CARD_MAP50 = 0.9131


def test_demo_bundle_is_small_loads_and_self_tests() -> None:
    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert size <= 25 * 1024**2, f"demo bundle is {size / 1024**2:.1f} MiB"
    bundle = load_bundle(DEMO)
    assert bundle.manifest.class_names == ("glioma", "meningioma", "pituitary")
    from retinaedge.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from retinaedge.runtime.bundle import self_test

    with OnnxRuntimeBackend(bundle.model_path, threads=1) as backend:
        reports = self_test(backend, bundle)
    assert reports and all(r.match_rate == 1.0 for r in reports)
    assert (DEMO / "MODEL_CARD.md").is_file()
    assert (DEMO / "NOTICE-MNI-ICBM152.txt").is_file()


def test_checkpoint_beside_the_bundle_is_its_source() -> None:
    manifest = json.loads((DEMO / "manifest.json").read_text())
    assert manifest["source"]["sha256"] == sha256_file(CHECKPOINT)


def test_demo_driver_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo-output"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "demo.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    hits = [line for line in table.splitlines() if line.rstrip().endswith(" hit")]
    for kind in ("glioma", "meningioma", "pituitary"):
        assert any(f" {kind} " in line for line in hits), f"no {kind} hit in:\n{table}"
    assert "by STOW-RS" in table and "by /v1/detect" in table
    # 3D findings of the single-frame series (series number 1, 27 slices): one hit per tumour kind.
    for kind in ("glioma", "meningioma", "pituitary"):
        assert re.search(rf"^\s+1\s+27\s+{kind}\s+\d+-\s*\d+ .* hit$", table, re.M), f"no 3D {kind}:\n{table}"
    pngs = sorted(out.glob("*.png"))
    assert pngs, "no overlays written"
    assert (out / "service.log").is_file()
    # No patient data in what the demo prints or what the service logged.
    import pydicom

    ds = pydicom.dcmread(next(EXAMPLES.rglob("IM*.dcm")), stop_before_pixels=True)
    for marker in (str(ds.PatientName), str(ds.PatientID), str(ds.StudyInstanceUID)):
        assert marker not in table
        assert marker not in (out / "service.log").read_text()


def make_heldout(data: Path) -> list[Path]:
    """The held-out studies of :data:`HELDOUT_SEED` (``tools/make_phantoms.py --seed HELDOUT_SEED --studies
    HELDOUT_STUDIES``), written by two processes at once (the generator uses one core): the first writes
    studies 1 to 10 (seeds 100001-100010), the second 11 to 20 (``--seed 100010``: seeds 100011-100020),
    the same instances, byte for byte, as one run writes (a study's files depend on its seed only). Their
    ground truths are joined into ``data/ground_truth.json``; returns the two directories."""
    half = HELDOUT_STUDIES // 2
    dirs = [data / "first", data / "second"]
    data.mkdir(parents=True)
    procs = []
    for k, out in enumerate(dirs):
        argv = [str(out), "--seed", str(HELDOUT_SEED + k * half), "--studies", str(half)]
        with open(data / f"{out.name}.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(REPO_ROOT / "tools" / "make_phantoms.py"), *argv],
                    stdout=subprocess.PIPE,
                    stderr=log,
                )
            )
    seeds = []
    for out, proc in zip(dirs, procs, strict=True):
        stdout, _ = proc.communicate(timeout=1200)
        assert proc.returncode == 0, (data / f"{out.name}.log").read_text()[-2000:]
        seeds += [study["seed"] for study in json.loads(stdout)["studies"]]
    assert seeds == [HELDOUT_SEED + k for k in range(1, HELDOUT_STUDIES + 1)]
    truths = [json.loads((out / "ground_truth.json").read_text()) for out in dirs]
    assert truths[0]["classes"] == truths[1]["classes"]
    joined = {"classes": truths[0]["classes"], "annotations": [a for t in truths for a in t["annotations"]]}
    (data / "ground_truth.json").write_text(json.dumps(joined))
    return dirs


@pytest.mark.slow
def test_heldout_ap50_meets_the_model_card(tmp_path: Path) -> None:
    data = tmp_path / "heldout"
    dirs = make_heldout(data)
    from retinaedge.runtime.cli import main

    report = tmp_path / "eval.json"
    rc = main(
        [
            "eval",
            "--model",
            str(DEMO),
            "--annotations",
            str(data / "ground_truth.json"),
            *map(str, dirs),
            "--min-map50",
            f"{CARD_MAP50 - 0.01:.4f}",
            "--out",
            str(report),
        ]
    )
    result = json.loads(report.read_text())
    assert rc == 0, result
    assert abs(result["map50"] - CARD_MAP50) < 0.01, (result["map50"], CARD_MAP50)
    for kind in ("glioma", "meningioma", "pituitary"):
        assert result["classes"][kind]["ground_truth"] > 0
